"""AVL from the CAD feed: EIDO unit positions become the fixes of the clinicians who ride as
those units, through the real daemon (HTTP feed, store, paging core) on SQLite and PostgreSQL;
the EIDO's time is the fix time, so a stale one does not count; bad unit data is quarantined
while the snapshot is stored and answered; the roster's ``units:`` are checked with file:line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred

from corespond.adapters.eido import eido_document
from corespond.adapters.newworld import NewWorldFormat
from corespond.adapters.pidflo import pidf_lo_document
from corespond.daemon.app import Corespond
from corespond.daemon.config import load_config
from corespond.daemon.feeds import HttpListener
from corespond.daemon.ingest import SnapshotState
from corespond.daemon.responders import Availability
from corespond.daemon.roster import RosterError, parse_roster
from corespond.daemon.snapshot import GeoPoint, Location, Snapshot, Unit
from corespond.daemon.store.writer import SnapshotRecord, StoredSnapshot
from tests.adapters.carriers import FakeCarrier, FakeMessagesApi
from tests.browser import free_port
from tests.daemon.dispatch_reference import rejections_of
from tests.daemon.paging_rig import (
    FEED_TOKEN,
    FIXTURES,
    INCIDENT_1,
    ROSTER,
    Turner,
    cad_snapshot,
    rows,
    write_daemon_config,
)

UNIT_LOC = "urn:emergency:uid:eidodatacomponent:loc-unit-m21:psap.test.invalid"


def with_unit(doc: dict[str, Any], unit: str, point: GeoPoint | None, at: datetime,
              pidf: str | None = None) -> dict[str, Any]:  # fmt: skip
    """``doc`` with ``unit`` on the call, placed at ``point`` at ``at`` by a UnitLocation."""
    prologue = {"updatedByAgencyReference": {"$ref": "police.test.invalid"}}
    doc.setdefault("locationComponent", []).append({
        **prologue,
        "$id": UNIT_LOC,
        "lastUpdateTimeStamp": at.isoformat(),
        "locationTypeDescriptionRegistryText": "UnitLocation",
        "locationByValue": pidf or pidf_lo_document(Location(point)),
    })  # fmt: skip
    doc.setdefault("emergencyResourceComponent", []).append({
        **prologue,
        "$id": f"urn:emergency:uid:eidodatacomponent:res-{unit}:psap.test.invalid",
        "lastUpdateTimeStamp": at.isoformat(),
        "emergencyResourceTypeCommonRegistryText": "CrisisInterventionUnit",
        "emergencyResourceName": unit,
        "unitLocationReference": {"$ref": UNIT_LOC},
    })  # fmt: skip
    return doc


def as_utc(value: Any) -> datetime:
    """A timestamp column as read with plain SQL: text on SQLite, aware on PostgreSQL."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass
class Daemon:
    turner: Turner
    app: Corespond
    carrier: FakeCarrier
    store_url: str
    feed: str

    def post(self, doc: dict[str, Any]) -> Any:
        headers = {b"authorization": f"Bearer {FEED_TOKEN}".encode(),
                   b"content-type": b"application/json"}  # fmt: skip
        answer = self.turner.http("POST", self.feed, json.dumps(doc).encode(), headers)
        assert answer.code == 200, answer.body
        return json.loads(answer.body)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.turner.reactor.seconds(), UTC)

    def settle(self) -> None:
        assert self.app.paging is not None
        self.turner.until(self.app.paging.idle())
        self.turner.until(self.app.store.run_read(lambda conn: None))

    def fixes(self) -> list[Any]:
        return rows(self.store_url, "SELECT clinician_id, lat, lon, fixed_at, source "
                    "FROM location_fixes ORDER BY id")  # fmt: skip


@contextmanager
def running_daemon(tmp_path: Path, db_url: str, paging_extra: str = "") -> Iterator[Daemon]:
    turner = Turner()
    carrier, sms = FakeCarrier(), FakeMessagesApi()
    wctp_port, sms_port = turner.serve(carrier), turner.serve(sms)
    config = write_daemon_config(
        tmp_path, store_url=db_url, wctp_url=f"http://127.0.0.1:{wctp_port}/wctp",
        sms_url=f"http://127.0.0.1:{sms_port}", web_port=free_port(),
        extra="",
    )  # fmt: skip
    config.write_text(config.read_text().replace("format: jsonl", "format: eido").replace(
        "  lease_seconds: 10\n",
        f"  lease_seconds: 10\n  max_fix_age_seconds: 600\n{paging_extra}"))  # fmt: skip
    roster = tmp_path / "roster.yaml"
    roster.write_text(ROSTER.replace(
        "  - id: c-3\n", "  - id: c-3\n    units: [m21, cr12]\n"))  # fmt: skip
    app = Corespond(load_config(config), turner.reactor)
    try:
        turner.until(ensureDeferred(app.start()))
        listener = app.feeds.find("http", 0)
        assert isinstance(listener, HttpListener)
        yield Daemon(turner, app, carrier, db_url,
                     f"http://127.0.0.1:{listener.port}/feeds/cad")  # fmt: skip
        turner.until(ensureDeferred(app.stop()))
    finally:
        turner.close()


@pytest.fixture(name="daemon")
def daemon_fixture(tmp_path: Path, db_url: str) -> Iterator[Daemon]:
    with running_daemon(tmp_path, db_url) as daemon:
        yield daemon


def traffic_stop(n: int) -> Any:
    """A call that is not behavioral-health, near incident 1 (the unit is there on it)."""
    return replace(cad_snapshot(n, GeoPoint(30.26, -97.76)), notes=(), call_type="TRAFFIC STOP",
                   call_type_code="TS", apco_type="TRAFFIC")  # fmt: skip


def test_a_units_eido_position_is_its_clinicians_fix_and_is_paged_on(daemon: Daemon) -> None:
    d = daemon
    seen = d.now() - timedelta(seconds=30)
    doc = with_unit(eido_document(traffic_stop(90)), "M21", GeoPoint(30.2601, -97.7501), seen)
    assert d.post(doc)["results"][0]["snapshot"] == "new"
    d.turner.until_true(lambda: len(d.fixes()) == 1)
    [(clinician, lat, lon, fixed_at, source)] = d.fixes()
    assert (clinician, lat, lon, source) == ("c-3", 30.2601, -97.7501, "eido:cad-json")
    assert as_utc(fixed_at) == seen  # the EIDO's time, not the arrival
    # The same position again (the next EIDO of the call repeats every unit): nothing new.
    later = replace(traffic_stop(90), updated_at=d.now())
    d.post(with_unit(eido_document(later), "M21", GeoPoint(30.2601, -97.7501), seen))
    d.settle()
    assert len(d.fixes()) == 1
    # A behavioral-health call at incident 1: only c-3 has a location, so c-3 is paged.
    d.post(eido_document(cad_snapshot(1, INCIDENT_1)))
    d.turner.until_true(lambda: len(d.carrier.submits) == 1)
    recipient = d.carrier.submits[0].find("wctp-SubmitHeader/wctp-Recipient").get("recipientID")
    assert recipient == "5550103"  # c-3's pager


def test_a_stale_eido_time_does_not_count(daemon: Daemon) -> None:
    d = daemon
    old = d.now() - timedelta(seconds=601)  # max_fix_age_seconds is 600
    d.post(with_unit(eido_document(traffic_stop(90)), "M21", INCIDENT_1, old))
    d.turner.until_true(lambda: len(d.fixes()) == 1)
    d.post(eido_document(cad_snapshot(1, INCIDENT_1)))

    def dispatches() -> list[Any]:
        return [r[0] for r in rows(d.store_url, "SELECT dispatch FROM escalation_steps "
                                   "WHERE dispatch IS NOT NULL ORDER BY id")]  # fmt: skip

    d.turner.until_true(lambda: bool(dispatches()))
    d.settle()
    first = dispatches()[0]
    first = first if isinstance(first, dict) else json.loads(first)
    assert first["chosen"] is None
    assert rejections_of(first)["c-3"] == (
        "stale-location"
    )
    assert d.carrier.submits == []


def test_bad_unit_data_is_quarantined_and_the_snapshot_still_stored(daemon: Daemon) -> None:
    d = daemon
    doc = with_unit(eido_document(cad_snapshot(1, INCIDENT_1)), "M21", None, d.now(),
                    pidf="<presence")  # fmt: skip
    assert d.post(doc)["results"][0]["snapshot"] == "new"  # the call is stored and answered

    def rejects() -> list[Any]:
        return rows(d.store_url, 'SELECT format, code, "where", raw FROM rejected_messages')

    d.turner.until_true(lambda: bool(rejects()))
    [(fmt, code, where, raw)] = rejects()
    assert (fmt, code) == ("eido-units", "bad-pidf-lo")
    assert where == "/locationComponent/1/locationByValue"
    assert bytes(raw) == json.dumps(doc).encode()
    [(count,)] = rows(d.store_url, "SELECT count(*) FROM snapshots")
    assert count == 1 and d.fixes() == []
    # A unit nobody rides as (a police car) is ignored, its position and its errors alike.
    other = with_unit(eido_document(traffic_stop(91)), "2A31", INCIDENT_1, d.now())
    d.post(other)
    d.settle()
    assert d.fixes() == [] and len(rejects()) == 1


def test_units_of_the_roster_are_checked_with_file_and_line(tmp_path: Path) -> None:
    text = ROSTER.replace("  - id: c-1\n", "  - id: c-1\n    units: [M21, m21]\n").replace(
        "  - id: c-2\n", "  - id: c-2\n    units: [E7, 'bad id']\n").replace(
        "  - id: c-3\n", "  - id: c-3\n    units: [e7]\n")  # fmt: skip
    path = tmp_path / "roster.yaml"
    shutil.copyfile(FIXTURES / "metro.geojson", tmp_path / "metro.geojson")
    with pytest.raises(RosterError) as caught:
        parse_roster(text, path)
    found = [str(p) for p in caught.value.problems]
    assert any(p.startswith(f"{path}:9: at 'clinicians[1].units[1]'") for p in found), found
    with pytest.raises(RosterError) as caught:
        parse_roster(text.replace(", 'bad id'", ""), path)
    found = [str(p) for p in caught.value.problems]
    assert f"{path}:4: at 'clinicians[0].units[1]': unit 'm21' is already 'c-1''s" in found
    assert f"{path}:14: at 'clinicians[2].units[0]': unit 'e7' is already 'c-2''s" in found
    roster = parse_roster(ROSTER.replace("  - id: c-3\n", "  - id: c-3\n    units: [M21]\n"),
                          path)  # fmt: skip
    assert roster.clinician_of_unit("m21") == "c-3" and roster.clinician_of_unit("E7") is None


# --- CAD unit statuses -------------------------------------------------------------------------


def on_call(snapshot: Snapshot, at: datetime, *units: tuple[str, str]) -> dict[str, Any]:
    """``snapshot`` as the CAD had it at ``at``, with these (unit, status) on the call."""
    return eido_document(replace(snapshot, updated_at=at,
                                 units=tuple(Unit(u, "CrisisInterventionUnit", s)
                                             for u, s in units)))  # fmt: skip


def states(d: Daemon) -> list[tuple[str, str, datetime, str]]:
    return [(c, a, as_utc(t), v) for c, a, t, v in rows(
        d.store_url, "SELECT clinician_id, availability, changed_at, via FROM clinician_states")]


def statuses(d: Daemon, outcome: str) -> float:
    value = d.app.registry.get_sample_value("corespond_cad_unit_statuses_total",
                                            {"outcome": outcome})  # fmt: skip
    return value or 0.0


def test_a_units_cad_status_sets_its_clinicians_availability_in_the_cads_order(
    daemon: Daemon,
) -> None:
    d = daemon
    t0 = d.now().replace(microsecond=0) - timedelta(minutes=5)
    d.post(on_call(traffic_stop(90), t0, ("M21", "OnScene"), ("2A31", "Available")))
    d.turner.until_true(lambda: bool(states(d)))
    # Only the clinician's unit counts (2A31 is a police car); the time is the CAD's.
    assert states(d) == [("c-3", "on_scene", t0, "cad:cad-json")]
    # An older status arriving late does not roll the newer one back.
    d.post(on_call(traffic_stop(90), t0 - timedelta(seconds=30), ("M21", "Available")))
    d.settle()
    assert states(d) == [("c-3", "on_scene", t0, "cad:cad-json")]
    # A word nobody mapped is ignored and counted; the same EIDO again costs nothing.
    d.post(on_call(traffic_stop(90), t0 + timedelta(seconds=10), ("M21", "AtLunch")))
    d.post(on_call(traffic_stop(90), t0 + timedelta(seconds=10), ("M21", "AtLunch")))
    d.settle()
    assert states(d)[0][1] == "on_scene"
    assert d.app.unit_locations.unknown_statuses == 1 and statuses(d, "unknown") == 1
    cleared = t0 + timedelta(seconds=20)
    d.post(on_call(traffic_stop(90), cleared, ("m21", "Cleared")))  # any case
    d.turner.until_true(lambda: states(d)[0][1] == "available")
    assert states(d) == [("c-3", "available", cleared, "cad:cad-json")]
    # The same state again, later (a unit's updates repeat its status): no change, no
    # transaction; the state keeps the time it began.
    d.post(on_call(traffic_stop(90), cleared + timedelta(seconds=5), ("M21", "Available")))
    d.settle()
    assert states(d) == [("c-3", "available", cleared, "cad:cad-json")]
    # A clinician's own word (reply, API) is as new as its arrival: an older CAD status after
    # it changes nothing, a newer one does.
    assert d.app.paging is not None
    d.turner.until(d.app.paging.set_availability("c-3", Availability.UNAVAILABLE, "api"))
    d.post(on_call(traffic_stop(90), cleared + timedelta(seconds=30), ("M21", "EnRoute")))
    d.settle()
    assert states(d)[0][1:] == ("unavailable", as_utc(states(d)[0][2]), "api")
    later = (d.now() + timedelta(seconds=1)).replace(microsecond=0)
    d.post(on_call(traffic_stop(90), later, ("M21", "InService")))
    d.turner.until_true(lambda: states(d)[0][3] != "api")
    assert states(d) == [("c-3", "available", later, "cad:cad-json")]
    d.turner.until_true(lambda: statuses(d, "applied") == 3)
    assert statuses(d, "older") == 2


def pages_of(d: Daemon) -> list[Any]:
    return rows(d.store_url, "SELECT clinician_id, state, answered_via FROM pages "
                "WHERE kind = 'page' ORDER BY id")  # fmt: skip


def chain_state(d: Daemon) -> list[Any]:
    return rows(d.store_url, "SELECT state, accepted_by FROM escalation_chains ORDER BY id")


def paged_c3(d: Daemon) -> Snapshot:
    """A behavioral-health call at incident 1 paged to c-3 (the only clinician with a fix)."""
    d.post(with_unit(eido_document(traffic_stop(90)), "M21", INCIDENT_1,
                     d.now() - timedelta(seconds=30)))  # fmt: skip
    d.turner.until_true(lambda: len(d.fixes()) == 1)
    call = cad_snapshot(1, INCIDENT_1)
    d.post(eido_document(replace(call, updated_at=d.now())))
    d.turner.until_true(lambda: len(d.carrier.submits) == 1)
    assert pages_of(d) == [("c-3", "open", None)]
    return call


def test_the_cad_putting_the_unit_en_route_on_the_paged_call_answers_the_page(
    daemon: Daemon,
) -> None:
    d = daemon
    call = paged_c3(d)
    d.post(on_call(call, d.now(), ("M21", "EnRoute")))
    d.turner.until_true(lambda: pages_of(d)[0][1] == "en_route")
    # A human answer: the dispatcher or the clinician set it in the CAD. The chain is taken,
    # the clinician is en route, the encounter's timeline has it, as after a reply.
    assert pages_of(d) == [("c-3", "en_route", "cad:cad-json")]
    assert chain_state(d) == [("accepted", "c-3")]
    assert [s[1] for s in states(d)] == ["en_route"]
    [(en_route_at,)] = rows(d.store_url, "SELECT en_route_at FROM encounters")
    assert en_route_at is not None
    d.turner.advance(11 * 60)  # past both page waits: nobody else is paged, dispatch is not told
    d.settle()
    assert len(d.carrier.submits) == 1
    d.post(on_call(call, d.now(), ("M21", "OnScene")))
    d.turner.until_true(lambda: pages_of(d)[0][1] == "on_scene")
    assert [s[1] for s in states(d)] == ["on_scene"]
    d.turner.until_true(lambda: statuses(d, "answered") == 2)


def test_dispatched_on_the_paged_call_accepts_and_on_scene_from_open_goes_through_en_route(
    daemon: Daemon,
) -> None:
    d = daemon
    call = paged_c3(d)
    d.post(on_call(call, d.now(), ("M21", "Dispatched")))
    d.turner.until_true(lambda: pages_of(d)[0][1] == "accepted")
    assert chain_state(d) == [("accepted", "c-3")]
    assert states(d) == []  # an assignment changes no availability (the page makes c-3 busy)
    d.post(on_call(call, d.now(), ("M21", "OnScene")))
    d.turner.until_true(lambda: pages_of(d)[0][1] == "on_scene")
    assert [s[1] for s in states(d)] == ["on_scene"]


def test_a_status_for_another_call_sets_availability_but_answers_no_page(daemon: Daemon) -> None:
    d = daemon
    call = paged_c3(d)
    doc = on_call(call, d.now(), ("M21", "EnRoute"))
    doc["emergencyResourceComponent"][0]["activeOnIncidentId"] = "urn:emergency:uid:other"
    d.post(doc)
    d.turner.until_true(lambda: bool(states(d)))
    d.settle()
    assert [s[1] for s in states(d)] == ["en_route"]
    assert pages_of(d) == [("c-3", "open", None)] and chain_state(d)[0][0] == "open"
    # On another call entirely (the traffic stop), likewise.
    d.post(on_call(traffic_stop(90), d.now(), ("M21", "OnScene")))
    d.turner.until_true(lambda: states(d)[0][1] == "on_scene")
    assert pages_of(d) == [("c-3", "open", None)]


def test_new_world_unit_statuses_mapped_in_config_answer_the_page(
    tmp_path: Path, db_url: str
) -> None:
    """A New World unit's local status code (``ENRT``) means en route once the config says so:
    the same path, from the call's time of change."""
    extra = "  unit_status:\n    map: {ENRT: en_route, AtLunch: unavailable, Dispatched: ignore}\n"
    with running_daemon(tmp_path, db_url, extra) as d:
        assert d.app.unit_locations is not None
        raw = (FIXTURES.parent / "newworld" / "bh-2-enroute.xml").read_bytes()
        snapshot = NewWorldFormat(timezone="America/Chicago").parse(raw)
        assert [(u.id, u.status) for u in snapshot.units] == [("CR12", "ENRT"), ("2A31", "ENRT")]
        # Page c-3 for the New World call (the EIDO feed stores it; the status comes after).
        d.post(with_unit(eido_document(traffic_stop(90)), "M21", INCIDENT_1,
                         d.now() - timedelta(seconds=30)))  # fmt: skip
        d.turner.until_true(lambda: len(d.fixes()) == 1)
        call = replace(cad_snapshot(1, INCIDENT_1), updated_at=d.now())
        result = d.post(eido_document(call))["results"][0]
        d.turner.until_true(lambda: len(d.carrier.submits) == 1)
        [(incident_pk,)] = rows(d.store_url, "SELECT id FROM incidents WHERE external_id = "
                                f"'{result['incident_id']}'")  # fmt: skip
        record = SnapshotRecord(
            feed="cad-nw", source="cad-nw", format="newworld", received_at=d.now(), raw=raw,
            snapshot=replace(snapshot, incident_id=call.incident_id, updated_at=d.now()),
            decision=d.app.pipeline.classifier.classify(call),
        )  # fmt: skip
        stored = StoredSnapshot(incident_pk, result["incident_id"], 0, SnapshotState.NEW, True,
                                False, None)  # fmt: skip
        d.app.unit_locations.observe(record, stored)
        d.turner.until_true(lambda: pages_of(d)[0][1] == "en_route")
        assert pages_of(d) == [("c-3", "en_route", "cad:cad-nw")]
        assert [s[1] for s in states(d)] == ["en_route"]
        # The overrides replaced or added words; a mapped "ignore" drops a default.
        assert d.app.unit_locations.statuses["atlunch"] == "unavailable"
        assert d.app.unit_locations.statuses["dispatched"] == "ignore"
        assert d.app.unit_locations.statuses["enroute"] == "en_route"


def test_unit_status_config_is_checked(tmp_path: Path) -> None:
    from corespond.daemon.config import ConfigError

    with pytest.raises(ConfigError) as caught, running_daemon(
        tmp_path, "sqlite:///" + str(tmp_path / "x.db"),
        "  unit_status:\n    map: {EnRoute: driving}\n    answers_pages: maybe\n",
    ):
        pass
    text = str(caught.value)
    assert "paging.unit_status.map.EnRoute" in text and "driving" in text
    assert "paging.unit_status.answers_pages" in text


def test_a_reload_changes_the_unit_status_map_and_a_bad_one_changes_nothing(
    tmp_path: Path, db_url: str
) -> None:
    """SIGHUP's reload applies ``paging.unit_status`` to the next status; a value the check
    refuses fails the whole reload and the running map stays."""
    with running_daemon(tmp_path, db_url) as d:
        assert d.app.unit_locations is not None
        config = d.app.config.path
        before = config.read_text()

        def reload(unit_status: str) -> bool:
            age = "  max_fix_age_seconds: 600\n"
            config.write_text(before.replace(age, age + unit_status))
            return bool(d.turner.until(ensureDeferred(d.app.reload())))

        t0 = d.now().replace(microsecond=0) - timedelta(minutes=5)
        d.post(on_call(traffic_stop(90), t0, ("M21", "AtLunch")))
        d.settle()
        assert states(d) == [] and d.app.unit_locations.unknown_statuses == 1
        assert reload("  unit_status:\n    map: {AtLunch: unavailable}\n")
        # The same word again (the unit's status did not change): it now means something.
        d.post(on_call(traffic_stop(90), t0 + timedelta(seconds=10), ("M21", "AtLunch")))
        d.turner.until_true(lambda: bool(states(d)))
        assert states(d) == [("c-3", "unavailable", t0 + timedelta(seconds=10), "cad:cad-json")]
        # A bad value: nothing of the file is taken; AtLunch and Cleared keep their meaning.
        assert not reload("  unit_status:\n    map: {AtLunch: driving, Cleared: unavailable}\n")
        assert d.app.unit_locations.statuses["atlunch"] == "unavailable"
        d.post(on_call(traffic_stop(90), t0 + timedelta(seconds=20), ("M21", "Cleared")))
        d.turner.until_true(lambda: states(d)[0][1] == "available")
        # answers_pages too: with it off, the CAD's en route on the paged call answers nothing.
        assert reload("  unit_status:\n    map: {AtLunch: unavailable}\n"
                      "    answers_pages: false\n")  # fmt: skip
        assert not d.app.unit_locations.answers_pages
        call = paged_c3(d)
        d.post(on_call(call, d.now(), ("M21", "EnRoute")))
        d.turner.until_true(lambda: states(d)[0][1] == "en_route")
        d.settle()
        assert pages_of(d) == [("c-3", "open", None)]


def test_an_assignment_before_the_page_answers_the_page_sent_later(daemon: Daemon) -> None:
    """The CAD assigns the clinician's unit before the clinician is paged (the call had no
    location yet): nothing is answered then, and the next EIDO of the call that still has
    the unit assigned answers the page sent meanwhile."""
    d = daemon
    d.post(with_unit(eido_document(traffic_stop(90)), "M21", INCIDENT_1,
                     d.now() - timedelta(seconds=30)))  # fmt: skip
    d.turner.until_true(lambda: len(d.fixes()) == 1)
    call = cad_snapshot(1, INCIDENT_1)
    d.post(on_call(replace(call, location=None), d.now(), ("M21", "Dispatched")))
    # (the status is applied on the writer after the snapshot's commit: wait for it)
    d.turner.until_true(lambda: statuses(d, "unchanged") == 1)
    d.settle()
    assert pages_of(d) == [] and statuses(d, "unchanged") == 1
    d.post(eido_document(replace(call, updated_at=d.now())))  # the location: c-3 is paged
    d.turner.until_true(lambda: len(d.carrier.submits) == 1)
    assert pages_of(d) == [("c-3", "open", None)]
    d.post(on_call(call, d.now(), ("M21", "Dispatched")))
    d.turner.until_true(lambda: statuses(d, "unchanged") == 2)
    d.settle()
    assert pages_of(d) == [("c-3", "accepted", "cad:cad-json")]
    assert chain_state(d) == [("accepted", "c-3")]
    # Once answered, the call's repeats cost nothing.
    d.post(on_call(call, d.now(), ("M21", "Dispatched")))
    d.settle()
    assert statuses(d, "unchanged") == 2
