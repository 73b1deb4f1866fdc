"""write_batch: idempotency, late snapshots, decision changes, rejects; on both backends."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, func, select

from corespond.daemon.decision import Response
from corespond.daemon.ingest import SnapshotState
from corespond.daemon.snapshot import IncidentStatus
from corespond.daemon.store import writer
from corespond.daemon.store.queries import (
    audit_incidents,
    derive_incident,
    incident_columns_of,
    list_rejects,
    totals,
)
from corespond.daemon.store.tables import decisions, incidents, rejected_messages, snapshots
from corespond.daemon.store.writer import StoredSnapshot, write_batch
from tests.daemon.store.records import at, decision, record, reject, snapshot

_sources = itertools.count()


def write(engine: Engine, *items: Any) -> list[StoredSnapshot | int]:
    with engine.begin() as conn:
        return write_batch(conn, list(items))


def stored(engine: Engine, *items: Any) -> list[StoredSnapshot]:
    results = write(engine, *items)
    return [r for r in results if isinstance(r, StoredSnapshot)]


def incident_row(engine: Engine, pk: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return incident_columns_of(conn, pk)


def derived(engine: Engine, pk: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return derive_incident(conn, pk)


def test_first_snapshot_creates_the_incident(engine: Engine) -> None:
    rec = record(snapshot("INC-1", updated=5), decision(Response.CLINICIAN), received=10)
    [result] = stored(engine, rec)
    assert result.state is SnapshotState.NEW
    assert result.external_id == "INC-1"
    assert result.became_current and result.decision_changed
    assert result.previous_decision is None
    row = incident_row(engine, result.incident_pk)
    assert row == derived(engine, result.incident_pk)
    assert row["updated_at"] == at(5) and row["first_received_at"] == at(10)
    assert row["updated_at"].tzinfo is not None  # aware on SQLite too
    assert row["status"] == "active" and row["call_type"] == "WELFARE CHECK"
    assert (row["lat"], row["lon"]) == (44.5, -93.25)
    assert row["snapshot_count"] == 1 and row["current_snapshot_id"] == result.snapshot_id
    assert (row["behavioral_health"], row["category"], row["response"]) == (
        True,
        "mental-health",
        "clinician",
    )


def test_same_bytes_twice_is_a_duplicate_and_changes_nothing(engine: Engine) -> None:
    rec = record(snapshot(updated=5), received=10)
    [first] = stored(engine, rec)
    before = incident_row(engine, first.incident_pk)
    with engine.connect() as conn:
        counts = totals(conn)
    [again] = stored(engine, replace(rec, received_at=at(99), feed="feed-b"))
    assert again.state is SnapshotState.DUPLICATE
    assert (again.snapshot_id, again.incident_pk) == (first.snapshot_id, first.incident_pk)
    assert not again.became_current and not again.decision_changed
    assert incident_row(engine, first.incident_pk) == before
    with engine.connect() as conn:
        assert totals(conn) == counts


def test_duplicates_inside_one_batch(engine: Engine) -> None:
    old = record(snapshot(updated=1))
    [kept] = stored(engine, old)
    new = record(snapshot(updated=2), received=3)
    results = stored(engine, new, old, new, new)
    assert [r.state for r in results] == [
        SnapshotState.NEW,
        SnapshotState.DUPLICATE,
        SnapshotState.DUPLICATE,
        SnapshotState.DUPLICATE,
    ]
    assert results[1].snapshot_id == kept.snapshot_id
    assert results[2].snapshot_id == results[3].snapshot_id == results[0].snapshot_id
    with engine.connect() as conn:
        assert totals(conn).snapshots == 2 and totals(conn).decisions == 2
        assert incident_columns_of(conn, kept.incident_pk)["snapshot_count"] == 2


def test_same_bytes_from_two_sources_are_kept_once_for_each(engine: Engine) -> None:
    """Repeats are found per incident: the same bytes on the feeds of two sources name two
    incidents (the store's key is source and external id), and each keeps them once."""
    rec = record(snapshot("INC-1", updated=5), decision(Response.CLINICIAN), received=10)
    other = replace(rec, source="other", feed="feed-b")
    # In one batch, both new; each a repeat of its own afterwards, whichever order.
    a, b, a_again = stored(engine, rec, other, rec)
    assert (a.state, b.state) == (SnapshotState.NEW, SnapshotState.NEW)
    assert a.incident_pk != b.incident_pk and a.snapshot_id != b.snapshot_id
    assert a_again.state is SnapshotState.DUPLICATE and a_again.snapshot_id == a.snapshot_id
    b_again, a_again = stored(engine, other, rec)
    assert [r.state for r in (b_again, a_again)] == [SnapshotState.DUPLICATE] * 2
    assert (b_again.snapshot_id, b_again.incident_pk) == (b.snapshot_id, b.incident_pk)
    assert (a_again.snapshot_id, a_again.incident_pk) == (a.snapshot_id, a.incident_pk)
    assert b_again.external_id == a_again.external_id == "INC-1"
    # A third source, in a batch of its own, after the other two are stored.
    [c] = stored(engine, replace(rec, source="third"))
    assert c.state is SnapshotState.NEW and c.incident_pk not in (a.incident_pk, b.incident_pk)
    with engine.connect() as conn:
        assert conn.execute(
            select(snapshots.c.incident_id).order_by(snapshots.c.id)
        ).scalars().all() == [a.incident_pk, b.incident_pk, c.incident_pk]
        for result in (a, b, c):
            assert incident_columns_of(conn, result.incident_pk)["snapshot_count"] == 1
        assert totals(conn).decisions == 3


def test_late_snapshot_is_stored_but_does_not_roll_the_incident_back(engine: Engine) -> None:
    [newest] = stored(engine, record(snapshot(updated=20, call_type="NEWER"), received=1))
    [late] = stored(engine, record(snapshot(updated=10, call_type="OLDER"), received=2))
    assert late.state is SnapshotState.NEW
    assert not late.became_current and not late.decision_changed
    row = incident_row(engine, newest.incident_pk)
    assert row == derived(engine, newest.incident_pk)
    assert row["call_type"] == "NEWER" and row["updated_at"] == at(20)
    assert row["current_snapshot_id"] == newest.snapshot_id
    assert row["snapshot_count"] == 2 and row["last_received_at"] == at(2)


def test_several_snapshots_of_one_incident_in_one_batch(engine: Engine) -> None:
    results = stored(
        engine,
        record(snapshot(updated=1, call_type="A"), decision(Response.NONE)),
        record(snapshot(updated=3, call_type="C"), decision(Response.CLINICIAN)),
        record(snapshot(updated=2, call_type="B"), decision(Response.POLICE)),
        record(snapshot("INC-2", updated=2)),
    )
    assert [r.became_current for r in results] == [True, True, False, True]
    assert [r.decision_changed for r in results] == [True, True, False, True]
    assert results[1].previous_decision == decision(Response.NONE)
    assert results[0].incident_pk == results[1].incident_pk == results[2].incident_pk
    row = incident_row(engine, results[0].incident_pk)
    assert row["call_type"] == "C" and row["response"] == "clinician"
    assert row["snapshot_count"] == 3
    with engine.connect() as conn:
        assert audit_incidents(conn) == []


def test_equal_source_times_later_received_wins(engine: Engine) -> None:
    a = record(snapshot(updated=5, call_type="A"), received=2)
    b = record(snapshot(updated=5, call_type="B"), received=1)
    c = record(snapshot(updated=5, call_type="C"), received=2)  # same times as a: stored later
    results = stored(engine, a, b, c)
    assert [r.became_current for r in results] == [True, False, True]
    row = incident_row(engine, results[0].incident_pk)
    assert row["call_type"] == "C"
    assert row == derived(engine, results[0].incident_pk)


def test_decision_changed_flags(engine: Engine) -> None:
    seq = [
        (1, decision(Response.NONE)),  # new incident: changed
        (2, decision(Response.NONE)),  # same outcome
        (3, decision(Response.CLINICIAN)),  # changed
        (4, decision(Response.CLINICIAN, evidence_text="disoriented")),  # same outcome
        (0, decision(Response.POLICE)),  # late: not current, not a change
        (5, decision(Response.CLINICIAN, category="suicide")),  # category changed
        (6, decision(Response.POLICE)),  # changed
    ]
    flags = []
    for updated, dec in seq:
        [r] = stored(engine, record(snapshot(updated=updated, narrative=f"n{updated}"), dec))
        flags.append(r.decision_changed)
    assert flags == [True, False, True, False, False, True, True]
    with engine.connect() as conn:
        changed = conn.execute(select(decisions.c.changed).order_by(decisions.c.id)).scalars()
        assert list(changed) == flags
        row = incident_columns_of(conn, r.incident_pk)
    assert row["response"] == "police"


def test_previous_decision_round_trips(engine: Engine) -> None:
    first = decision(Response.CO_RESPONSE, evidence_text="hearing voices")
    stored(engine, record(snapshot(updated=1), first))
    [r] = stored(engine, record(snapshot(updated=2), decision(Response.NONE)))
    assert r.previous_decision == first


def test_closed_incident(engine: Engine) -> None:
    [r] = stored(engine, record(snapshot(updated=9, status=IncidentStatus.CLOSED)))
    row = incident_row(engine, r.incident_pk)
    assert row["status"] == "closed" and row["closed_at"] == at(9)


def test_same_incident_id_from_two_sources_is_two_incidents(engine: Engine) -> None:
    a, b = stored(
        engine,
        record(snapshot("X"), source="county-a"),
        record(snapshot("X", updated=1), source="county-b"),
    )
    assert a.incident_pk != b.incident_pk
    assert a.state is b.state is SnapshotState.NEW


def test_rejects_and_snapshots_in_one_batch(engine: Engine) -> None:
    results = write(
        engine,
        reject(b"\x00\xffbad", received=1),
        record(snapshot(updated=1)),
        reject(b"{", received=2),
    )
    assert isinstance(results[0], int) and isinstance(results[2], int)
    assert results[0] < results[2]
    assert isinstance(results[1], StoredSnapshot)
    with engine.connect() as conn:
        raws = conn.execute(
            select(rejected_messages.c.raw).order_by(rejected_messages.c.id)
        ).scalars()
        assert list(raws) == [b"\x00\xffbad", b"{"]
        listed = list_rejects(conn, 10)
    assert [r.id for r in listed] == [results[2], results[0]]
    assert listed[1].size == 5 and listed[1].code == "malformed-json"
    assert listed[1].origin_name == "127.0.0.1:40000" and listed[1].where == "/"


def test_the_same_reject_twice_is_kept_twice(engine: Engine) -> None:
    a, b = write(engine, reject(), reject())
    assert a != b


def test_a_large_batch(engine: Engine) -> None:
    items = [record(snapshot(f"BIG-{i % 700}", updated=i), received=i) for i in range(1500)]
    results = stored(engine, *items)
    assert all(r.state is SnapshotState.NEW for r in results)
    again = stored(engine, *items[:900])
    assert all(r.state is SnapshotState.DUPLICATE for r in again)
    assert [r.snapshot_id for r in again] == [r.snapshot_id for r in results[:900]]
    with engine.connect() as conn:
        assert totals(conn).incidents == 700 and totals(conn).snapshots == 1500
        assert audit_incidents(conn) == []


def test_empty_batch(engine: Engine) -> None:
    assert write(engine) == []


# --- properties ---------------------------------------------------------------------------------


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Snapshots as (source time, response index, narrative) in arrival order, plus how the
    arrivals are cut into batches. Source times repeat on purpose (ties)."""
    n = draw(st.integers(1, 9))
    snaps = draw(
        st.lists(
            st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(0, 2)),
            min_size=n,
            max_size=n,
        )
    )
    cuts = draw(st.lists(st.integers(1, 4), min_size=1, max_size=n))
    return snaps, cuts


RESPONSES = list(Response)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(arrivals())
def test_any_arrival_order_and_batching_gives_the_newest_state(
    engine: Engine, case: tuple[list[tuple[int, int, int]], list[int]]
) -> None:
    snaps, cuts = case
    n = next(_sources)

    # The same arrivals twice: one per transaction (source a), cut into batches (source b).
    def records(source: str) -> list[Any]:
        return [
            record(
                snapshot("P", updated=t, call_type=f"T{t}-{k}", narrative=f"note {k}"),
                decision(RESPONSES[r]),
                received=i // 2,  # pairs share a receive time
                source=source,
                raw=f"{source}|{t}|{r}|{k}".encode(),  # equal tuples are true duplicates
            )
            for i, (t, r, k) in enumerate(snaps)
        ]

    one_by_one = [stored(engine, rec)[0] for rec in records(f"a{n}")]
    batched: list[StoredSnapshot] = []
    pending = records(f"b{n}")
    for cut in itertools.cycle(cuts):
        if not pending:
            break
        batched += stored(engine, *pending[:cut])
        pending = pending[cut:]

    def flags(results: list[StoredSnapshot]) -> list[tuple[object, ...]]:
        return [(r.state, r.became_current, r.decision_changed) for r in results]

    assert flags(batched) == flags(one_by_one)
    for results in (one_by_one, batched):
        pk = results[0].incident_pk
        row = incident_row(engine, pk)
        assert row == derived(engine, pk)
        with engine.connect() as conn:
            newest = conn.execute(
                select(snapshots.c.id)
                .where(snapshots.c.incident_id == pk)
                .order_by(
                    snapshots.c.source_updated_at.desc(),
                    snapshots.c.received_at.desc(),
                    snapshots.c.id.desc(),
                )
                .limit(1)
            ).scalar_one()
            count = conn.execute(
                select(func.count()).where(snapshots.c.incident_id == pk)
            ).scalar_one()
        assert row["current_snapshot_id"] == newest
        assert row["snapshot_count"] == count == len({(t, r, k) for t, r, k in snaps})
        newest_time = max(t for t, _, _ in snaps)
        assert row["updated_at"] == at(newest_time)


# Any code point, with the troublesome ones (NUL, lone surrogates) made likely.
TEXT = st.text(
    alphabet=st.one_of(
        st.characters(exclude_categories=[]),
        st.sampled_from(["\x00", "\ud800", "\udfff", "\u2028", "é", "'", '"']),
    ),
    min_size=1,
    max_size=30,
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(TEXT, TEXT, TEXT, TEXT)
def test_any_text_is_storable(engine: Engine, ident: str, call: str, note: str, who: str) -> None:
    """NUL bytes and lone surrogates from a feed must not make a batch fail."""
    n = next(_sources)
    snap = snapshot(ident, call_type=call, narrative=note, person=who, address=note)
    rec = record(snap, decision(Response.CLINICIAN, evidence_text=note), source=f"fuzz{n}")
    [r] = stored(engine, replace(rec, raw=f"fuzz{n}".encode()))
    assert r.state is SnapshotState.NEW
    assert incident_row(engine, r.incident_pk) == derived(engine, r.incident_pk)
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(incidents.c.snapshot_count).where(incidents.c.id == r.incident_pk)
            ).scalar_one()
            == 1
        )



def test_postgresql_finds_existing_snapshots_by_the_unique_index(engine: Engine) -> None:
    """The look-up of (incident, digest) pairs can seek the unique index pair by pair on
    PostgreSQL (test_sqlite_path checks SQLite's plans)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL query plans")
    [one] = stored(engine, record(snapshot("INC-1")))
    sent: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        sent.append((statement, params))

    with engine.begin() as conn:
        event.listen(conn, "before_cursor_execute", seen)
        found = writer._existing_snapshots(conn, [(one.incident_pk, "a" * 64), (0, "b" * 64)])
        event.remove(conn, "before_cursor_execute", seen)
        assert found == {}
        [(statement, params)] = sent
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # what it can do, not the cost
        plan = "\n".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + statement, params))
    assert plan.count("Index Scan on ix_snapshots_incident_id_digest") == 2, plan
