"""The report rollups: kept exactly by every encounter change (inserts, updates, deletes,
person merges) and every referral event (recorded on an encounter; HL7 created, answered by
RRI^I12, cancelled), in any order, so that the report read from them equals the row-by-row oracle
and a rebuild from scratch, on SQLite and PostgreSQL; a changed frequent-utilizer threshold
takes the exact slow path until rebuilt; ``corespond report rebuild-rollups``."""

from __future__ import annotations

import contextlib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, delete, select

from corespond.daemon.cli import main
from corespond.daemon.config import FrequentUtilizerConfig, OutcomesConfig
from corespond.daemon.encounters import (
    Prefill,
    add_referral,
    create_encounter,
    delete_encounter,
    merge_persons,
    record_times,
    update_encounter,
)
from corespond.daemon.outcomes import (
    ReportRequest,
    assemble_report,
    outcome_report,
    report_aggregates,
)
from corespond.daemon.outcomes_reference import reference_aggregates
from corespond.daemon.referrals import (
    ReferralError,
    cancel_referral,
    checked_provider,
    new_control_id,
    new_referral_ref,
    referral_content,
    store_inbound,
    store_referral,
)
from corespond.daemon.rollups import fu_threshold, rebuild_rollups
from corespond.daemon.store.tables import (
    encounter_referrals,
    encounters,
    hl7_inbound,
    person_identifiers,
    persons,
    referral_messages,
    referral_outcomes,
    referrals,
    report_person_facts,
    report_rollup_counts,
    report_rollup_durations,
)
from corespond.daemon.synthetic_encounters import seed_encounters
from tests.daemon.referral_rig import config, request
from tests.daemon.test_outcomes import _normalized

CONFIG = OutcomesConfig(person_key=b"r" * 32)
START = datetime(2030, 1, 1, tzinfo=UTC)
FU = FrequentUtilizerConfig(2, 40)  # the rollups' threshold is 3 by default: see below
REQUESTS = [
    ReportRequest(date(2030, 1, 1), date(2030, 4, 30), by=by, frequent_utilizer=fu)
    for by in (None, "month", "program", "zone", "race", "gender")
    for fu in (FrequentUtilizerConfig(3, 40),)
] + [
    # Partial months: the days around the whole months come from the encounters.
    ReportRequest(
        date(2030, 1, 12), date(2030, 3, 20), frequent_utilizer=FrequentUtilizerConfig(3, 40)
    ),
    ReportRequest(date(2030, 2, 1), date(2030, 2, 27), by="age", program="beta"),
    ReportRequest(date(2030, 1, 1), date(2030, 3, 31), by="month", program="alpha"),
]


def _stored(conn: Connection) -> dict[str, Any]:
    """The rollup rows, zero rows left out (a change may leave a cell at zero)."""
    counts = report_rollup_counts
    durations = report_rollup_durations
    return {
        "counts": sorted(
            tuple(r) for r in conn.execute(select(counts).where(counts.c.encounters != 0))
        ),
        "durations": sorted(
            tuple(r) for r in conn.execute(select(durations).where(durations.c.n != 0))
        ),
        "facts": sorted(tuple(r) for r in conn.execute(select(report_person_facts))),
    }


PEOPLE = st.sampled_from([None, "A", "B", "C", "D"])
DISPOSITIONS = st.sampled_from(
    [None, "resolved_on_scene", "resolved_with_referral", "arrest", "jail_booking",
     "voluntary_transport", "involuntary_hold", "ems_transport", "refused"]
)  # fmt: skip
CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "bh_nexus_confirmed": st.sampled_from([True, True, False, None]),
        "disposition": DISPOSITIONS,
        "person": PEOPLE,
        "race_ethnicity": st.sampled_from([[], ["white"], ["asian", "white"], ["declined"]]),
        "gender": st.sampled_from([None, "woman", "man"]),
        "age_band": st.sampled_from([None, "25_34", "65_plus"]),
        "actions": st.sampled_from([[], ["assessment"]]),
        "would_have_been_ed": st.booleans(),
        "would_have_been_arrest": st.booleans(),
        "use_of_force": st.booleans(),
        "times": st.tuples(
            st.integers(0, 900), st.integers(0, 3000), st.integers(0, 4000), st.integers(-1, 3000)
        ),
    },
)
ADD = st.tuples(
    st.just("add"),
    st.integers(0, 119),  # day
    st.integers(0, 86_399),  # second of the day
    st.sampled_from(["alpha", "beta"]),
    st.sampled_from(["Z1", "Z2", None]),
    st.sampled_from(["A", "B", "C", "D", "A", None]),
    CHANGES,
)
ANSWERS = st.sampled_from(["A", "A", "R", "P", "cancel"])
HL7 = st.tuples(
    st.just("hl7"), st.integers(0, 40), st.lists(ANSWERS, max_size=2), st.integers(-5, 80)
)
OPS = st.lists(
    st.one_of(
        ADD,
        ADD,  # adds twice as likely: enough encounters per person for repeats and spans
        st.tuples(st.just("update"), st.integers(0, 40), CHANGES),
        st.tuples(st.just("delete"), st.integers(0, 40)),
        st.tuples(st.just("merge"), PEOPLE, PEOPLE),
        st.tuples(
            st.just("referral"),
            st.integers(0, 40),
            st.sampled_from(["enrolled", "pending", "declined"]),
            st.integers(-5, 80),
        ),
        # HL7 referrals for an encounter's CAD incident: created, then answered by RRI^I12
        # (accepted, rejected, pending) with an appointment so many days into the period, or
        # cancelled; and later answers to any of them.
        HL7,
        HL7,
        st.tuples(st.just("answer"), st.integers(0, 40), ANSWERS, st.integers(-5, 80)),
    ),
    min_size=3,
    max_size=16,
)


def _apply_changes(conn: Connection, eid: int, changes: dict[str, Any], at: datetime) -> None:
    changes = dict(changes)
    times = changes.pop("times", None)
    if "disposition" in changes:
        transport = changes["disposition"] in ("voluntary_transport", "involuntary_hold",
                                               "ems_transport")  # fmt: skip
        changes["destination_type"] = "ed" if transport else None
    person = changes.pop("person", None)
    if person is not None:  # None: the person is left as it is
        changes["person"] = {"mrn": f"MRN-{person}"}
    update_encounter(conn, eid, changes, CONFIG, at)
    if times is not None:
        received = conn.execute(
            select(encounters.c.call_received_at).where(encounters.c.id == eid)
        ).scalar_one()
        paged, ack, scene, stay = times
        record_times(
            conn,
            eid,
            {
                "clinician_paged_at": received + timedelta(seconds=paged),
                "page_ack_at": received + timedelta(seconds=paged + ack // 10),
                "on_scene_at": received + timedelta(seconds=paged + ack),
                "cleared_at": received + timedelta(seconds=paged + ack + scene),
                "officer_cleared_at": received + timedelta(seconds=paged + ack + max(stay, 0)),
            },
            at,
            overwrite=True,
        )


def _person_of(conn: Connection, label: str | None) -> int | None:
    if label is None:
        return None
    return conn.execute(
        select(encounters.c.person_id)
        .where(encounters.c.person_id.is_not(None))
        .order_by(encounters.c.id)
        .limit(1)
        .offset({"A": 0, "B": 1, "C": 2, "D": 3}[label])
    ).scalar()


def _rri(ref: str, status: str, appointment: datetime) -> bytes:
    """An RRI^I12 answer to the referral ``ref`` (RF1-1 status, RF1-7 appointment)."""
    return (
        f"MSH|^~\\&|BHRECV|CSU|CORESPOND|COUNTY-BH|20300101101500||RRI^I12^RRI_I12|R-{ref}|P|"
        f"2.5.1\rMSA|AA|CTRL-NONE\rRF1|{status}^Answer^HL70283|||||{ref}^CORESPOND|"
        f"{appointment:%Y%m%d%H%M%S}\rPRD|RT\rPID|1||{ref}^^^CORESPOND^PI\r"
    ).encode()


def _store_referral(engine: Engine, req: Any) -> str:
    """A referral stored through the service's own transaction, queued without its message
    (as when its builder has not answered yet): the flags move with the referral's row."""
    cfg = config()
    provider = checked_provider(cfg, req)
    ref = new_referral_ref()
    content = referral_content(cfg, provider, req, ref, new_control_id(), START)
    created, _ = store_referral(engine, provider, req, content, None, START)
    return created.ref


def _hl7(engine: Engine, ids: list[int], refs: list[str], op: tuple[Any, ...]) -> None:
    """An HL7 referral event, each through the referral service's own transaction."""
    _, index, answers, days = op
    if op[0] == "hl7":
        if not ids:
            return
        with engine.connect() as conn:
            incident = conn.execute(
                select(encounters.c.cad_incident_no).where(encounters.c.id == ids[index % len(ids)])
            ).scalar_one()
        refs.append(_store_referral(engine, request(incident_ref=incident)))
        ref = refs[-1]
    elif refs:
        ref, answers = refs[index % len(refs)], [answers]
    else:
        return
    for answer in answers:
        if answer == "cancel":
            with contextlib.suppress(ReferralError):  # already cancelled
                cancel_referral(engine, ref, START)
        else:
            rri = _rri(ref, answer, START + timedelta(days=days))
            stored = store_inbound(engine, rri, None, START)
            assert stored.ack is not None and b"MSA|AA" in stored.ack


def _run(engine: Engine, ops: list[tuple[Any, ...]]) -> None:
    ids: list[int] = []
    refs: list[str] = []
    for op in ops:
        if op[0] in ("hl7", "answer"):
            _hl7(engine, ids, refs, op)
            continue
        with engine.begin() as conn:
            if op[0] == "add":
                _, day, second, program, zone, person, changes = op
                at = START + timedelta(days=day, seconds=second)
                prefill = Prefill(
                    program=program,
                    call_received_at=at,
                    zone=zone,
                    agency="PD",
                    cad_incident_no=f"INC-{day % 7}",  # now and then two encounters share one
                )
                eid = create_encounter(conn, prefill, at)
                ids.append(eid)
                first = {"bh_nexus_confirmed": True, "person": person}
                _apply_changes(conn, eid, {**first, **changes}, at)
            elif not ids:
                continue
            elif op[0] == "update":
                eid = ids[op[1] % len(ids)]
                _apply_changes(conn, eid, op[2], START)
            elif op[0] == "delete":
                eid = ids.pop(op[1] % len(ids))
                delete_encounter(conn, eid)
            elif op[0] == "merge":
                kept, merged = _person_of(conn, op[1]), _person_of(conn, op[2])
                if kept is not None and merged is not None and kept != merged:
                    merge_persons(conn, kept, merged, START)
            else:
                _, index, outcome, days = op
                eid = ids[index % len(ids)]
                received = conn.execute(
                    select(encounters.c.call_received_at).where(encounters.c.id == eid)
                ).scalar_one()
                appointment = received + timedelta(days=days) if outcome == "enrolled" else None
                add_referral(conn, eid, "prov-1", received, outcome, appointment)


def _clear(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in (
            referral_outcomes, hl7_inbound, referral_messages, referrals, encounter_referrals,
            encounters, person_identifiers, persons,
        ):  # fmt: skip
            conn.execute(delete(table))
        rebuild_rollups(conn, 3)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
# Every kind of referral event at least once: HL7 created, accepted, rejected later, cancelled.
@example(
    ops=[
        ("add", 1, 5, "alpha", "Z1", "A", {}),
        ("add", 8, 5, "beta", "Z2", "A", {}),
        ("hl7", 0, ["A"], 10),
        ("hl7", 1, ["P", "cancel"], 10),
        ("answer", 0, "R", 3),
        ("referral", 1, "enrolled", 20),
    ]
)
def test_rollups_follow_every_change_exactly(engine: Engine, ops: list[tuple[Any, ...]]) -> None:
    _clear(engine)
    _run(engine, ops)
    with engine.connect() as conn:
        for req in REQUESTS:
            assert not report_aggregates(conn, req).notes  # the rollups were used
            assert _normalized(report_aggregates(conn, req)) == _normalized(
                reference_aggregates(conn, req)
            ), req
        kept = _stored(conn)
    with engine.begin() as conn:
        rebuild_rollups(conn)
        assert _stored(conn) == kept


def test_a_changed_threshold_takes_the_exact_path_until_rebuilt(engine: Engine) -> None:
    with engine.begin() as conn:
        seed_encounters(conn, 1200, date(2030, 1, 1), date(2030, 6, 30), seed=3,
                        programs=("alpha", "beta"))  # fmt: skip
    req = ReportRequest(date(2030, 2, 1), date(2030, 5, 31), frequent_utilizer=FU)
    with engine.connect() as conn:
        assert fu_threshold(conn) == 3
        slow = report_aggregates(conn, req)
        assert "threshold of 3, not 2" in " ".join(slow.notes)
        assert _normalized(slow) == _normalized(reference_aggregates(conn, req))
        report = assemble_report(req, slow)
        assert any("slower exact pass" in note for note in report.notes)
    with engine.begin() as conn:
        rebuild_rollups(conn, 2)
    with engine.connect() as conn:
        fast = report_aggregates(conn, req)
        assert not fast.notes
        assert _normalized(fast) == _normalized(slow)
        assert slow.persons["all"]["fu_enrolled"] > 0  # the before/after rate is not vacuous


def test_frequent_utilizers_before_and_after_enrollment(engine: Engine) -> None:
    """Person A: encounters on days 0, 10, 20 (frequent: 3 within 40 days), enrolled on day 25
    through the referral of day 20; one more encounter on day 50 and one on day 80."""
    day = timedelta(days=1)
    with engine.begin() as conn:
        rebuild_rollups(conn, 3)
        ids = []
        for n in (0, 10, 20, 50, 80):
            at = START + n * day
            eid = create_encounter(conn, Prefill(program="alpha", call_received_at=at), at)
            update_encounter(conn, eid, {"bh_nexus_confirmed": True, "person": {"mrn": "A"}},
                             CONFIG, at)  # fmt: skip
            ids.append(eid)
        add_referral(conn, ids[2], "prov-1", START + 20 * day, "enrolled", START + 25 * day)
    req = ReportRequest(date(2030, 1, 1), date(2030, 1, 31), suppress_below=1,
                        frequent_utilizer=FrequentUtilizerConfig(3, 40))  # fmt: skip
    with engine.connect() as conn:
        report = outcome_report(conn, req)
        assert _normalized(report_aggregates(conn, req)) == _normalized(
            reference_aggregates(conn, req)
        )
    values = {m.key: m.values["all"] for m in report.metrics}
    assert values["frequent_utilizers_enrolled"].value == 1
    before, after = values["frequent_utilizer_rate_before"], values["frequent_utilizer_rate_after"]
    # Before day 25 within 40 days: days 0, 10, 20. From day 25 for 40 days: day 50.
    assert (before.value, before.numerator, before.denominator) == (3.0, 3, 1)
    assert (after.value, after.numerator, after.denominator) == (1.0, 1, 1)
    assert after.shown("per_person") == "1.00 per person (1/1)"
    assert "40 days before their enrollment" in next(
        m.definition for m in report.metrics if m.key == "frequent_utilizer_rate_before"
    )
    with engine.connect() as conn:
        suppressed = assemble_report(
            ReportRequest(req.start, req.end, frequent_utilizer=req.frequent_utilizer),
            report_aggregates(conn, req),
        )
    assert {m.key: m.values["all"] for m in suppressed.metrics}[
        "frequent_utilizer_rate_after"
    ].suppressed


def _config(tmp_path: Path, url: str, threshold: int) -> Path:
    path = tmp_path / "corespond.yaml"
    path.write_text(
        f"state_dir: {tmp_path}\nstore:\n  url: {url}\n"
        f"outcomes:\n  frequent_utilizer: {{threshold: {threshold}, window_days: 180}}\n"
    )
    return path


def test_the_rebuild_command(
    engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with engine.begin() as conn:
        seed_encounters(conn, 300, date(2030, 1, 1), date(2030, 3, 31), seed=4)
        conn.execute(delete(report_rollup_counts))  # damaged
    url = engine.url.render_as_string(hide_password=False)
    assert main(["report", "rebuild-rollups", "-c", str(_config(tmp_path, url, 4))]) == 0
    assert "threshold 4" in capsys.readouterr().out
    with engine.connect() as conn:
        assert fu_threshold(conn) == 4
        req = ReportRequest(date(2030, 1, 1), date(2030, 3, 31),
                            frequent_utilizer=FrequentUtilizerConfig(4, 180))  # fmt: skip
        agg = report_aggregates(conn, req)
        assert not agg.notes
        assert _normalized(agg) == _normalized(reference_aggregates(conn, req))
