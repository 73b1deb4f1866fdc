"""SQLite's driver-level hot path stores exactly what the SQLAlchemy Core path stores."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from corespond.daemon.decision import Evidence, Response
from corespond.daemon.snapshot import (
    Caution,
    Disposition,
    GeoPoint,
    IncidentStatus,
    Location,
    Note,
    Person,
    Snapshot,
    Unit,
    snapshot_protected_json,
    snapshot_public_json,
)
from corespond.daemon.store import writer
from corespond.daemon.store.engine import create_store_engine, json_text
from corespond.daemon.store.tables import sqlite_datetime_text
from corespond.daemon.store.writer import StoredSnapshot, write_batch
from tests.daemon.store.records import at, decision, record, reject, snapshot

TABLES = ("incidents", "snapshots", "decisions", "rejected_messages")


@pytest.fixture
def two_engines(sqlite_template: Path, tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    engines = []
    for name in ("driver.db", "core.db"):
        shutil.copyfile(sqlite_template, tmp_path / name)
        engines.append(create_store_engine(f"sqlite:///{tmp_path / name}"))
    yield engines[0], engines[1]
    for engine in engines:
        engine.dispose()


def batches() -> list[list[Any]]:
    """New incidents, updates, late and repeated snapshots, odd text and times, rejects."""
    plus_two = timezone(timedelta(hours=2))
    first = record(snapshot("INC-1", updated=1), decision(Response.CLINICIAN), received=2)
    odd = snapshot("INC-\x00\ud800é", updated=3, call_type="WELFARE \x00 CHECK", narrative="é\x00")
    return [
        [first, record(snapshot("INC-2", updated=1), received=2), reject(b"\x00bad")],
        [
            record(snapshot("INC-1", updated=5), decision(Response.NONE), received=6),
            first,  # a repeat of a stored snapshot
            record(snapshot("INC-1", updated=3, call_type="LATE"), received=7),
            record(snapshot("INC-2", updated=9, status=IncidentStatus.CLOSED), received=9),
            record(odd, decision(Response.POLICE, category="x\x00y"), received=8),
        ],
        [
            # Times in another zone and naive (taken as UTC) are stored as the same UTC text.
            replace(
                record(snapshot("INC-3", updated=2), received=4),
                received_at=datetime(2031, 3, 4, 7, 6, 11, 123456, tzinfo=plus_two),
            ),
            replace(
                record(snapshot("INC-4", updated=2), received=4),
                received_at=at(4).replace(tzinfo=None, microsecond=0),
            ),
            reject(b"{", received=5),
        ],
    ]


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row as stored (text, not decoded values)."""
    with engine.connect() as conn:
        return {
            table: [
                tuple(row) for row in conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY id")
            ]
            for table in TABLES
        }


def write_all(engine: Engine) -> list[list[StoredSnapshot | int]]:
    out = []
    for items in batches():
        with engine.begin() as conn:
            out.append(write_batch(conn, items))
    return out


def test_driver_level_rows_equal_core_rows(
    two_engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    driver, core = two_engines
    with driver.connect() as conn:
        statements = writer._dialect_statements(conn)
    assert statements.driver_level
    driver_results = write_all(driver)
    monkeypatch.setitem(
        writer._STATEMENTS,
        "sqlite",
        replace(statements, driver_level=False, binds=writer._CORE_BINDS),
    )
    core_results = write_all(core)
    assert driver_results == core_results
    driver_rows, core_rows = dump(driver), dump(core)
    assert driver_rows == core_rows
    assert len(driver_rows["snapshots"]) == 8 and len(driver_rows["rejected_messages"]) == 2


def test_sqlite_finds_incidents_and_snapshots_by_index(engine: Engine) -> None:
    """No batch statement scans a whole table (the row-value IN (VALUES ...) form did)."""
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite query plans")
    statements: list[str] = []

    def seen(statement: str) -> None:  # as SQLite ran it, the values in place
        if statement.lstrip().upper().startswith("SELECT") and "max(id)" not in statement:
            statements.append(statement)

    stored = [
        record(snapshot("INC-1", updated=1), decision(Response.CLINICIAN)),
        record(snapshot("INC-2", updated=1)),
    ]
    with engine.begin() as conn:
        write_batch(conn, stored)
    with engine.begin() as conn:
        # The batch runs on the driver's own cursor: SQLite's trace sees every statement.
        driver = conn.connection.driver_connection
        driver.set_trace_callback(seen)  # type: ignore[union-attr]
        try:
            write_batch(
                conn,
                [
                    record(snapshot("INC-1", updated=2), decision(Response.NONE)),
                    record(snapshot("INC-2", updated=2)),
                    stored[1],
                ],
            )
        finally:
            driver.set_trace_callback(None)  # type: ignore[union-attr]
    # incidents, their existing (incident, digest) pairs and the previous decision
    assert len(statements) == 3, statements
    with engine.connect() as conn:
        for statement in statements:
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement).all()
            scans = [
                row[3] for row in plan if row[3].startswith("SCAN") and "CONSTANT" not in row[3]
            ]
            assert scans == [], statement


def test_driver_errors_are_raised_as_sqlalchemy_raises_them(engine: Engine) -> None:
    """The store retries and reports by DBAPIError; the driver-level path raises the same."""
    bad = replace(record(snapshot("INC-1")), feed=None)  # feed is NOT NULL
    with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
        write_batch(conn, [bad])
    assert caught.value.orig is not None


def test_multi_row_inserts_of_every_size_equal_core_rows(
    two_engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows go in several a statement, in runs of 64 and the powers of two below: batches of
    sizes around those runs store what the Core path stores."""
    sizes = (1, 2, 3, 63, 64, 65, 130)
    n = itertools.count()

    def all_batches() -> list[list[Any]]:
        out = []
        for size in sizes:
            # New incidents, and updates of incidents of the batches before (late ones too).
            out.append(
                [
                    record(snapshot(f"INC-{(i := next(n)) % 150}", updated=i % 97), received=i)
                    for _ in range(size)
                ]
            )
        return out

    driver, core = two_engines
    driver_results = []
    for items in all_batches():
        with driver.begin() as conn:
            driver_results.append(write_batch(conn, items))
    with driver.connect() as conn:
        statements = writer._dialect_statements(conn)
    monkeypatch.setitem(
        writer._STATEMENTS,
        "sqlite",
        replace(statements, driver_level=False, binds=writer._CORE_BINDS),
    )
    n = itertools.count()
    core_results = []
    for items in all_batches():
        with core.begin() as conn:
            core_results.append(write_batch(conn, items))
    assert driver_results == core_results
    assert dump(driver) == dump(core)
    assert len(dump(driver)["snapshots"]) == sum(sizes)


# Every datetime a column may be given: UTC, another zone, naive (taken as UTC).
_any_datetimes = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5)), None]),
)


@given(_any_datetimes)
def test_sqlite_time_is_what_utcdatetime_binds(value: datetime) -> None:
    """The driver path cuts the SQLite text out of the snapshot JSON's time text when the
    value is UTC; it is the text UTCDateTime binds, for every value."""
    writer._SQLITE_TIMES.clear()
    assert writer._sqlite_time(value) == sqlite_datetime_text(value)
    assert writer._sqlite_time(value) == sqlite_datetime_text(value)  # remembered
    assert writer._sqlite_time(value.replace(microsecond=0)) == sqlite_datetime_text(
        value.replace(microsecond=0)
    )


@given(_any_datetimes)
def test_sqlite_datetime_text_is_the_utc_isoformat(value: datetime) -> None:
    """orjson writes the text; it is isoformat's in UTC to the microsecond, for every value
    (a whole second too, where orjson writes no fraction)."""
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    expected = utc.replace(tzinfo=None).isoformat(" ", "microseconds")
    assert sqlite_datetime_text(value) == expected
    whole = utc.replace(microsecond=0)
    assert sqlite_datetime_text(whole) == whole.replace(tzinfo=None).isoformat(" ", "microseconds")


@given(
    st.lists(st.text(), max_size=3),
    st.lists(st.tuples(st.text(), st.text(), st.integers(0, 10**6), st.text()), max_size=3),
)
def test_decision_json_is_what_the_json_column_binds(
    rules: list[str], spans: list[tuple[str, str, int, str]]
) -> None:
    """orjson writes a decision's rules and Evidence itself: the same text as json_text of
    the lists the Core path binds, lone surrogates and NUL included."""
    dec = replace(
        decision(Response.CLINICIAN),
        rules=tuple(rules),
        evidence=tuple(Evidence(r, f, s, s + len(t), t) for r, f, s, t in spans),
    )
    assert writer._decision_json_texts(dec) == (
        json_text(list(dec.rules)),
        json_text(dec.evidence_json()),
    )


_times = st.one_of(
    st.none(),
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, UTC, timezone(timedelta(hours=3)), None]),
    ),
)
_texts = st.one_of(st.none(), st.text(max_size=8))
_floats = st.one_of(st.floats(-180, 180), st.floats(allow_nan=True, allow_infinity=True))


@given(
    st.builds(
        Snapshot,
        incident_id=st.text(max_size=8),
        updated_at=_times.filter(lambda t: t is not None),
        status=st.sampled_from(IncidentStatus),
        incident_number=_texts,
        call_type=_texts,
        opened_at=_times,
        closed_at=_times,
        location=st.one_of(
            st.none(),
            st.builds(
                Location,
                point=st.one_of(st.none(), st.builds(GeoPoint, _floats, _floats)),
                address=_texts,
                city=_texts,
                state=_texts,
            ),
        ),
        # Every field of the parts filled: a new one must reach the JSON as the dicts have it.
        units=st.lists(st.builds(Unit, st.text(max_size=5), _texts, _texts), max_size=2).map(
            tuple
        ),
        cautions=st.lists(st.builds(Caution, st.text(max_size=5), _texts), max_size=2).map(tuple),
        dispositions=st.lists(st.builds(Disposition, st.text(max_size=5), _texts), max_size=2).map(
            tuple
        ),
        notes=st.lists(st.builds(Note, st.text(max_size=8), _times), max_size=2).map(tuple),
        persons=st.lists(
            st.builds(
                Person,
                st.lists(st.text(max_size=4), max_size=2).map(tuple),
                _texts,
                _texts,
                _texts,
                _texts,
            ),
            max_size=2,
        ).map(tuple),
    )
)
def test_snapshot_json_is_what_the_json_columns_bind(snap: Snapshot) -> None:
    """The driver path encodes the snapshot's two JSON columns with msgspec over its own
    values: the same text as json_text of snapshot_public_json / snapshot_protected_json,
    which the Core path binds (and the public part holds no field the dicts leave out)."""
    assert writer._snapshot_json_texts(snap) == (
        json_text(snapshot_public_json(snap)),
        json_text(snapshot_protected_json(snap)),
    )
