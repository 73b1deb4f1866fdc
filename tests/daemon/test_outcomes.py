"""The outcome report: exact figures on a hand-built program, the SQL against the row-by-row
reference on synthetic data, the same numbers on SQLite and PostgreSQL, suppression, and the
``corespond report outcomes`` command."""

from __future__ import annotations

import csv
import io
import json
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, select

from corespond.daemon.cli import main
from corespond.daemon.config import FrequentUtilizerConfig, OutcomesConfig
from corespond.daemon.encounters import (
    Prefill,
    add_referral,
    create_encounter,
    record_times,
    refresh_derived,
    update_encounter,
)
from corespond.daemon.outcomes import (
    GROUPINGS,
    Aggregates,
    ReportRequest,
    assemble_report,
    nearest_rank,
    outcome_report,
    report_aggregates,
    report_json,
)
from corespond.daemon.outcomes_reference import reference_aggregates
from corespond.daemon.report_cli import write_report
from corespond.daemon.rollups import rebuild_rollups
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.tables import encounters, persons
from corespond.daemon.synthetic_encounters import seed_encounters

KEY = b"q" * 32
CONFIG = OutcomesConfig(person_key=KEY)
DAY1 = datetime(2030, 5, 1, 12, tzinfo=UTC)


def _encounter(
    conn: Connection,
    received: datetime,
    changes: dict[str, Any],
    *,
    person: str | None = None,
    zone: str = "Z1",
    times: dict[str, int] | None = None,
) -> int:
    eid = create_encounter(
        conn, Prefill(program="alpha", call_received_at=received, zone=zone, agency="PD"), received
    )
    if times:
        record_times(conn, eid, {k: received + timedelta(seconds=v) for k, v in times.items()},
                     received)  # fmt: skip
    full = {"bh_nexus_confirmed": True, **changes}
    if person is not None:
        full["person"] = {"mrn": person}
    update_encounter(conn, eid, full, CONFIG, received, complete="disposition" in changes)
    return eid


def _small_program(engine: Engine) -> None:
    """Ten encounters whose every figure can be worked out by hand."""
    with engine.begin() as conn:
        t = {"clinician_paged_at": 60, "page_ack_at": 120, "on_scene_at": 660, "cleared_at": 3660}
        # Person A: three encounters within 20 days (a frequent utilizer, repeats within 30 days).
        a1 = _encounter(conn, DAY1, {"disposition": "resolved_on_scene", "actions": ["assessment"],
                                     "would_have_been_ed": True}, person="A", times=t)  # fmt: skip
        _encounter(conn, DAY1 + timedelta(days=10), {"disposition": "arrest",
                   "would_have_been_arrest": True, "use_of_force": True}, person="A")  # fmt: skip
        t3 = {**t, "on_scene_at": 1260, "officer_cleared_at": 1860}
        _encounter(conn, DAY1 + timedelta(days=20), {"disposition": "resolved_with_referral"},
                   person="A", times=t3)  # fmt: skip
        # Person B: two encounters 40 days apart.
        b1 = _encounter(conn, DAY1 + timedelta(days=1), {"disposition": "voluntary_transport",
                        "destination_type": "ed", "would_have_been_ed": True}, person="B",
                        times={**t, "on_scene_at": 360, "officer_cleared_at": 1260})  # fmt: skip
        _encounter(conn, DAY1 + timedelta(days=41), {"disposition": "citation",
                   "would_have_been_arrest": True}, person="B", zone="Z2")  # fmt: skip
        # Person C: one encounter, diverted from the ED, and enrolled in services.
        c1 = _encounter(conn, DAY1 + timedelta(days=2), {"disposition": "resolved_with_referral",
                        "would_have_been_ed": True, "actions": ["safety_plan"]}, person="C",
                        times=t)  # fmt: skip
        # No person: an involuntary hold, an open encounter, a non-BH encounter.
        _encounter(conn, DAY1 + timedelta(days=3), {"disposition": "involuntary_hold"})
        _encounter(conn, DAY1 + timedelta(days=4), {})
        _encounter(conn, DAY1 + timedelta(days=5), {"bh_nexus_confirmed": False,
                   "disposition": "other"})  # fmt: skip
        # Outside the period (June 2030): counts only as person A's later repeat... not at all,
        # it is 400 days on.
        _encounter(conn, DAY1 + timedelta(days=400), {"disposition": "refused"}, person="A")
        add_referral(conn, c1, "prov-1", DAY1, "enrolled", DAY1 + timedelta(days=2, hours=1))
        add_referral(conn, b1, "prov-2", DAY1, "enrolled", DAY1 + timedelta(days=45))
        add_referral(conn, a1, "prov-2", DAY1, "declined")


def _value(report: Any, key: str, group: str = "all") -> Any:
    return report.metric(key).values[group]


def test_hand_worked_figures(engine: Engine) -> None:
    _small_program(engine)
    req = ReportRequest(date(2030, 5, 1), date(2030, 6, 30), suppress_below=1)
    with engine.connect() as conn:
        report = outcome_report(conn, req)
    # 9 encounters in the period, 8 with a BH nexus, 7 of those documented.
    assert _value(report, "encounters").value == 9
    assert _value(report, "bh_encounters").value == 8
    assert _value(report, "documented").value == 7
    arrest = _value(report, "arrest_avoidance")
    assert (arrest.numerator, arrest.denominator) == (6, 7)
    assert (_value(report, "enforcement").numerator, _value(report, "no_action").numerator) == (
        2,
        1,
    )
    assert _value(report, "voluntary_transport_ed").numerator == 1
    assert _value(report, "involuntary_hold").numerator == 1
    # ED diversion: A1 and C1 were flagged and not taken to an ED; B1 was (voluntary, ED).
    assert _value(report, "ed_diversion").numerator == 2
    jail = _value(report, "jail_diversion")  # A2 arrested, B2 cited: one of two diverted
    assert (jail.numerator, jail.denominator) == (1, 2)
    service = _value(report, "service_on_scene")  # 4 on scene, 2 with an action
    assert (service.numerator, service.denominator) == (2, 4)
    referral = _value(report, "referral")
    assert (referral.numerator, referral.denominator) == (3, 8)
    assert _value(report, "unlinked").value == 2
    assert _value(report, "persons").value == 3
    # Linkage: three persons referred; C enrolled in 2 days, B in 44 (within 90, not 30).
    assert (_value(report, "linkage_30").numerator, _value(report, "linkage_90").numerator) == (
        1,
        2,
    )
    assert _value(report, "linkage_30").denominator == 3
    # Repeats: A (10 days), B (40 days); C none.
    assert [_value(report, f"repeat_{d}").numerator for d in (30, 90, 365)] == [1, 2, 2]
    assert _value(report, "frequent_utilizers").value == 1
    share = _value(report, "frequent_utilizer_share")
    assert (share.numerator, share.denominator) == (3, 6)
    bands = [
        (_value(report, f"enrollment_band_{b}").numerator,
         _value(report, f"enrollment_band_{b}").denominator)
        for b in ("1", "2", "3+")
    ]  # fmt: skip
    assert bands == [(1, 1), (1, 1), (0, 1)]
    # Times: response 600, 1200, 300, 600 s -> nearest-rank median 600, p90 1200.
    assert _value(report, "response_p50").value == 600
    assert _value(report, "response_p90").value == 1200
    assert _value(report, "page_ack_p50").value == 60
    # Officer returned: A3 3660-1860 = 1800 s, B1 3660-1260 = 2400 s.
    assert _value(report, "officer_returned_p50").value == 1800
    assert _value(report, "officer_hours_returned").value == round(4200 / 3600, 1)
    assert _value(report, "use_of_force").numerator == 1
    zones = report.areas[0].values
    assert (zones["Z1"].value, zones["Z2"].value) == (7, 1)
    assert any("3 or more" in note and "365 days" in note for note in report.notes)


def test_small_cells_are_suppressed(engine: Engine) -> None:
    _small_program(engine)
    req = ReportRequest(date(2030, 5, 1), date(2030, 6, 30))  # the default: fewer than 11
    with engine.connect() as conn:
        report = outcome_report(conn, req)
    for metric in report.metrics:
        for value in metric.values.values():
            if value.value is not None and value.value != 0 and metric.kind == "count":
                assert value.suppressed
    as_json = report_json(report)
    assert as_json["metrics"][0]["values"]["all"] == {"suppressed": True}


def test_grouping_and_program_filter(engine: Engine) -> None:
    _small_program(engine)
    with engine.begin() as conn:
        create_encounter(conn, Prefill(program="beta", call_received_at=DAY1), DAY1)
    with engine.connect() as conn:
        by_zone = outcome_report(conn, ReportRequest(date(2030, 5, 1), date(2030, 6, 30),
                                                     by="zone", suppress_below=1))  # fmt: skip
        beta = outcome_report(conn, ReportRequest(date(2030, 5, 1), date(2030, 6, 30),
                                                  program="beta", suppress_below=1))  # fmt: skip
    assert by_zone.groups == ["Z1", "Z2", "(not recorded)"]
    assert _value(by_zone, "encounters", "Z2").value == 1
    assert _value(beta, "encounters").value == 1
    assert _value(beta, "bh_encounters").value == 0


@pytest.fixture
def synthetic(engine: Engine) -> Engine:
    with engine.begin() as conn:
        seed_encounters(conn, 2500, date(2030, 1, 1), date(2030, 12, 31), seed=11,
                        programs=("alpha", "beta"))  # fmt: skip
    return engine


def _normalized(agg: Aggregates) -> dict[str, Any]:
    def nonzero(d: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        return {g: {k: v for k, v in c.items() if v} for g, c in d.items()}

    return {
        "encounters": nonzero(agg.encounters),
        "persons": nonzero(agg.persons),
        "durations": agg.durations,
        "cad_calls": agg.cad_calls,
        "zones": agg.zones,
    }


@pytest.mark.parametrize("by", [None, *GROUPINGS])
def test_sql_agrees_with_the_row_by_row_reference(synthetic: Engine, by: str | None) -> None:
    req = ReportRequest(date(2030, 3, 1), date(2030, 8, 31), by=by, program=None,
                        frequent_utilizer=FrequentUtilizerConfig(3, 120))  # fmt: skip
    with synthetic.connect() as conn:
        sql = report_aggregates(conn, req)
        reference = reference_aggregates(conn, req)
    assert _normalized(sql) == _normalized(reference)
    assert sql.encounters  # not vacuous


def test_derived_columns_match_the_generator(synthetic: Engine) -> None:
    """The generator writes derived seconds itself; SQL recomputing them changes nothing."""
    columns = ("call_received_epoch", "response_seconds", "page_ack_seconds",
               "on_scene_seconds", "officer_returned_seconds")  # fmt: skip
    with synthetic.begin() as conn:
        before = conn.execute(
            select(*(encounters.c[c] for c in columns)).order_by(encounters.c.id)
        ).all()
        refresh_derived(conn)
        after = conn.execute(
            select(*(encounters.c[c] for c in columns)).order_by(encounters.c.id)
        ).all()
    assert before == after and len(before) == 2500


@pytest.mark.postgres
def test_sqlite_and_postgresql_give_identical_reports(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from tests.conftest import _TEMPLATE, PostgresServer

    server: PostgresServer = request.getfixturevalue("postgres_server")
    sqlite_path = tmp_path / "r.db"
    shutil.copyfile(request.getfixturevalue("sqlite_template"), sqlite_path)
    name = server.create_database(template=_TEMPLATE)
    outputs = []
    try:
        for url in (f"sqlite:///{sqlite_path}", server.url(name)):
            engine = create_store_engine(url)
            try:
                with engine.begin() as conn:
                    seed_encounters(conn, 1500, date(2030, 1, 1), date(2030, 6, 30), seed=5)
                with engine.connect() as conn:
                    reports = [
                        report_json(outcome_report(conn, ReportRequest(
                            date(2030, 2, 1), date(2030, 5, 31), by=by, suppress_below=5)))
                        for by in (None, *GROUPINGS)
                    ]  # fmt: skip
                outputs.append(json.dumps(reports, sort_keys=True))
            finally:
                engine.dispose()
    finally:
        server.drop_database(name)
    assert outputs[0] == outputs[1]
    assert '"suppressed": true' in outputs[0] and '"value": 0.' in outputs[0]


def test_no_person_identifier_in_any_output(synthetic: Engine) -> None:
    with synthetic.connect() as conn:
        pseudonyms = set(conn.execute(select(persons.c.pseudonym)).scalars())
        ids = {str(i) for i in conn.execute(select(encounters.c.cad_incident_no)).scalars()}
        report = outcome_report(
            conn, ReportRequest(date(2030, 1, 1), date(2030, 12, 31), by="zone")
        )
    for fmt in ("table", "csv", "json", "html"):
        out = io.StringIO()
        write_report(report, fmt, out)
        text = out.getvalue()
        assert not any(p in text for p in pseudonyms)
        assert not any(i in text for i in ids)
        assert "3 or more behavioral-health encounters within 365 days" in text


def test_nearest_rank() -> None:
    assert nearest_rank([], 50) is None
    assert nearest_rank([(5, 1)], 90) == 5
    assert nearest_rank([(1, 1), (2, 1), (3, 1), (4, 1)], 50) == 2
    assert nearest_rank([(1, 9), (100, 1)], 90) == 1
    assert nearest_rank([(1, 9), (100, 1)], 91) == 100


def test_assembly_handles_an_empty_period() -> None:
    empty = Aggregates({}, {}, {"response": {}, "page_ack": {}, "on_scene": {},
                                "officer_returned": {}}, None, {})  # fmt: skip
    report = assemble_report(ReportRequest(date(2030, 1, 1), date(2030, 1, 1)), empty)
    assert report.groups == ["all"]
    assert _value(report, "arrest_avoidance").value is None


# --- the command ------------------------------------------------------------------------------


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "corespond.yaml"
    path.write_text(
        f"state_dir: {tmp_path}\nstore:\n  url: {url}\n"
        "outcomes:\n  suppress_below: 5\n  frequent_utilizer: {threshold: 4, window_days: 180}\n"
        "  zone_population: {Z01: 50000}\n"
    )
    return path


def test_the_report_command(
    synthetic: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = synthetic.url.render_as_string(hide_password=False)
    config = _config(tmp_path, url)
    base = ["report", "outcomes", "-c", str(config), "--from", "2030-02-01", "--to", "2030-04-30"]
    assert main([*base, "--by", "month"]) == 0
    table = capsys.readouterr().out
    assert "2030-02" in table and "2030-04" in table and "Arrest-avoidance rate" in table
    assert "4 or more behavioral-health encounters within 180 days" in table
    assert "Cells counting 1 to 4 are suppressed" in table
    assert main([*base, "--format", "json", "--program", "alpha"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["frequent_utilizer"]["threshold"], doc["frequent_utilizer"]["window_days"]) == (
        4, 180,
    )  # fmt: skip
    assert {m["key"] for m in doc["areas"]} == {"zone_encounters", "zone_per_1000"}
    assert main([*base, "--format", "csv", "--by", "race"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["group"] for r in rows} >= {"white", "multiracial"}
    assert all(r["definition"] for r in rows)
    out = tmp_path / "r.html"
    assert main([*base, "--format", "html", "-o", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    with pytest.raises(SystemExit) as exited:
        main([*base[:-2], "--to", "30/04/2030"])
    assert exited.value.code == 2
    assert main([*base[:-4], "--from", "2030-05-01", "--to", "2030-04-01"]) == 2


def test_the_encounter_export_command(
    synthetic: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = synthetic.url.render_as_string(hide_password=False)
    config = _config(tmp_path, url)
    config.write_text(
        config.read_text() + "  custom_fields:\n    insurance: {type: choice, values: [a, b]}\n"
    )
    args = ["report", "encounters", "-c", str(config), "--from", "2030-03-01", "--to", "2030-03-31"]
    assert main(args) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows and "custom.insurance" in rows[0] and "cad_incident_no" not in rows[0]
    assert all(r["call_received_at"].startswith("2030-03") for r in rows)
    assert main([*args, "--format", "json", "--program", "beta"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines and all(row["program"] == "beta" for row in lines)
    assert all("SYN-" not in json.dumps(row) for row in lines)


def test_the_report_command_wants_a_current_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    assert main(["report", "outcomes", "-c", str(config), "--from", "2030-01-01",
                 "--to", "2030-01-31"]) == 1  # fmt: skip
    assert "corespond db upgrade" in capsys.readouterr().err


def test_hl7_referrals_and_their_rri_outcomes_count_for_linkage(engine: Engine) -> None:
    """An HL7 referral sent for the encounter's incident, accepted by the provider with an
    appointment (RRI^I12), is a linkage; a rejected one is a referral without linkage; a
    cancelled one does not count."""
    from corespond.daemon.store.tables import referrals

    def hl7_referral(ref: str, incident: str, state: str, outcome: str | None,
                     appointment: datetime | None) -> dict[str, Any]:
        return {
            "ref": ref, "incident_ref": incident, "provider": "csu", "service_type": "crisis",
            "urgency": "routine", "referring_clinician": "c-1", "state": state, "part2": False,
            "created_at": DAY1, "updated_at": DAY1, "outcome": outcome, "outcome_at": DAY1,
            "appointment_at": appointment, "person": {},
        }  # fmt: skip

    with engine.begin() as conn:
        for n, person in enumerate(("P", "Q", "R")):
            eid = create_encounter(
                conn,
                Prefill(program="alpha", call_received_at=DAY1, cad_incident_no=f"24-77{n}"),
                DAY1,
            )
            update_encounter(conn, eid, {"bh_nexus_confirmed": True,
                             "disposition": "resolved_with_referral", "person": {"mrn": person}},
                             CONFIG, DAY1, complete=True)  # fmt: skip
        conn.execute(referrals.insert(), [
            hl7_referral("R1", "24-770", "delivered", "accepted", DAY1 + timedelta(days=3)),
            hl7_referral("R2", "24-771", "delivered", "rejected", None),
            hl7_referral("R3", "24-772", "cancelled", None, None),
        ])  # fmt: skip
        # Rows written here, not by the referral service: the rollups are rebuilt for them.
        rebuild_rollups(conn)
    req = ReportRequest(date(2030, 5, 1), date(2030, 5, 31), suppress_below=1)
    with engine.connect() as conn:
        report = outcome_report(conn, req)
    referral = _value(report, "referral")
    assert (referral.numerator, referral.denominator) == (2, 3)
    linkage = _value(report, "linkage_30")
    assert (linkage.numerator, linkage.denominator) == (1, 2)


def test_sqlite_report_reads_covering_indexes_and_restores_the_connection(
    synthetic: Engine,
) -> None:
    """The per-second histograms and zone counts read their covering index (migration 0005)
    even with statistics that tempt SQLite into skip-scans, and the read tuning (page cache,
    memory map, temp store) stays on the report's connection only."""
    if synthetic.dialect.name != "sqlite":
        pytest.skip("SQLite query plans and pragmas")
    with synthetic.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        statements.append((statement, params))

    event.listen(synthetic, "before_cursor_execute", record)
    with synthetic.connect() as conn:
        pragmas = ("cache_size", "mmap_size", "temp_store")
        before = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in pragmas]
        for by in (None, "month", "program"):
            # Days outside whole months: read from the encounters (the months from rollups).
            outcome_report(conn, ReportRequest(date(2030, 3, 5), date(2030, 8, 20), by=by))
        assert [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in pragmas] == before
        event.remove(synthetic, "before_cursor_execute", record)
        plans = []
        for statement, params in statements:
            if "AS s, count(*)" in statement or statement.startswith("SELECT encounters.zone"):
                rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
                plans.append(" ".join(str(r[-1]) for r in rows))
    assert len(plans) == 3 * 5 * 2  # before and after the whole months
    assert all("USING COVERING INDEX ix_encounters_report_" in p for p in plans), plans
