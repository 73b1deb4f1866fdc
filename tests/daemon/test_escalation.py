"""Escalation over the real store (SQLite and PostgreSQL), driven by a fake clock.

The pager here is a recording double of our own :class:`~corespond.daemon.pager.Pager`
interface; the real gateway adapters are exercised end to end after the merge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text, update
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock as TaskClock

from corespond.daemon.decision import Response
from corespond.daemon.escalation import PagingService, PagingSettings
from corespond.daemon.pager import (
    DeliveryReceipt,
    DeliveryState,
    PageAnswer,
    PageMessage,
    PagerError,
    Reply,
    Submitted,
)
from corespond.daemon.responders import Availability, DeskRefusal, LocationFix
from corespond.daemon.roster import Roster, load_roster
from corespond.daemon.snapshot import GeoPoint, IncidentStatus, Location
from corespond.daemon.store import paging as db
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.tables import Base, pages, phi_columns
from corespond.daemon.store.writer import (
    SnapshotRecord,
    SnapshotState,
    StoredSnapshot,
    follow_in,
    write_batch,
)
from tests.daemon.dispatch_reference import rejections_of
from tests.daemon.store.records import decision, record, snapshot
from tests.daemon.store.test_store import Threads

FIXTURES = Path(__file__).parent.parent / "fixtures" / "paging"
# Monday 9 March 2026, 09:00 CDT: c-101, c-102 (day shift) and s-900 are on call in metro.
T = datetime(2026, 3, 9, 14, 0, tzinfo=UTC)
INCIDENT_POINT = GeoPoint(30.25, -97.75)
MARKERS = ("ZQXNARRATIVE", "ZQXPERSON", "ZQXADDRESS")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test here that stores snapshots runs both ways (see World.in_batch); the modules
    that borrow the ``w`` fixture keep the first."""
    if "w" in metafunc.fixturenames:
        metafunc.parametrize("w", [False, True], ids=["after", "in-batch"], indirect=True)


def inline(fn: Callable[[], Any]) -> Deferred[Any]:
    return maybeDeferred(fn)


class RecordingPager:
    """Takes every page; fails those to addresses in ``refuse``."""

    def __init__(self, name: str, two_way: bool = True) -> None:
        self.name = name
        self.two_way = two_way
        self.sent: list[PageMessage] = []
        self.refuse: set[str] = set()

    def submit(self, message: PageMessage) -> Deferred[Submitted]:
        if message.address in self.refuse:
            return fail(PagerError(self.name, "403 invalid recipient", retryable=False))
        self.sent.append(message)
        return succeed(Submitted(self.name, f"{self.name}-{len(self.sent)}"))


@pytest.fixture(scope="module")
def roster() -> Roster:
    return load_roster(FIXTURES / "roster.yaml")


@dataclasses.dataclass
class World:
    engine: Engine
    roster: Roster
    reactor: TaskClock
    pagers: dict[str, RecordingPager]
    service: PagingService
    # How a stored snapshot reaches paging: after its commit (the observers), or with the
    # chain started in the snapshot's own transaction (the store's follower) as the daemon
    # does while it runs. Each test of this module runs both ways.
    in_batch: bool = False

    def sent(self) -> list[tuple[str, str, str]]:
        """(gateway, address, page_ref) of every page sent, in order."""
        out = [(m.page_ref, name, m.address) for name, p in self.pagers.items() for m in p.sent]
        return [(name, address, ref) for ref, name, address in sorted(out)]

    def advance(self, minutes: float) -> None:
        self.reactor.advance(minutes * 60)

    def rows(self, sql: str) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql)).all())


def make_service(
    engine: Engine, roster: Roster, reactor: TaskClock, pagers: dict[str, RecordingPager], **kw: Any
) -> PagingService:
    return PagingService(
        engine,
        roster,
        pagers,
        reactor,
        PagingSettings(worker_id=kw.pop("worker_id", "w1")),
        run_in_thread=inline,
        link_for=lambda ref, clinician: f"https://corespond.example/p/{ref}?for={clinician}",
        **kw,
    )


@pytest.fixture(name="w")
def world(engine: Engine, roster: Roster, request: pytest.FixtureRequest) -> Iterator[World]:
    reactor = TaskClock()
    reactor.advance(T.timestamp())
    pagers = {n: RecordingPager(n) for n in ("wctp", "sms")}
    pagers["smtp"] = RecordingPager("smtp", two_way=False)
    service = make_service(engine, roster, reactor, pagers)  # type: ignore[arg-type]
    service.start()
    w = World(engine, roster, reactor, pagers, service, getattr(request, "param", False))
    fixes = {"c-101": (30.26, -97.75), "c-102": (30.28, -97.75), "c-103": (30.25, -97.76)}
    for cid, (lat, lon) in fixes.items():
        service.record_fix(LocationFix(cid, lat, lon, T - timedelta(minutes=2), "http"))
    yield w
    service.stop()


def clinician_call(
    response: Response = Response.CLINICIAN,
    *,
    incident_id: str = "2026-001445",
    status: IncidentStatus = IncidentStatus.ACTIVE,
) -> SnapshotRecord:
    snap = snapshot(
        incident_id,
        status=status,
        narrative=f"{MARKERS[0]} hearing voices, took pills",
        person=f"{MARKERS[1]} Example",
        address=f"{MARKERS[2]} 12 Imaginary Lane",
    )
    snap = dataclasses.replace(
        snap,
        incident_number=incident_id,
        location=Location(INCIDENT_POINT, f"{MARKERS[2]} 12 Imaginary Lane", "Testville", "TX"),
    )
    return record(snap, decision(response, evidence_text=MARKERS[0]))


def incident(
    w: World,
    response: Response,
    *,
    incident_id: str = "2026-001445",
    status: IncidentStatus = IncidentStatus.ACTIVE,
) -> StoredSnapshot:
    return stored_and_told(w, clinician_call(response, incident_id=incident_id, status=status))


def stored_and_told(w: World, rec: SnapshotRecord) -> StoredSnapshot:
    """``rec`` stored, and told to the service as the store and the pipeline do: with the
    service as the store's follower in the same transaction (``w.in_batch``), then a changed
    decision to :meth:`observe`, any other new current snapshot to :meth:`observe_current`,
    and every new snapshot to :meth:`followed`."""
    with w.engine.begin() as conn:
        (stored,) = write_batch(conn, [rec])
        assert isinstance(stored, StoredSnapshot)
        if w.in_batch and stored.state is SnapshotState.NEW and w.service.wants(rec):
            stored = follow_in(conn, w.service, rec, stored)
    return told(w, rec, stored)


def told(w: World, rec: SnapshotRecord, stored: StoredSnapshot) -> StoredSnapshot:
    """``stored`` told to the service as the pipeline tells its observers."""
    if stored.state is not SnapshotState.NEW:
        return stored
    previous = stored.previous_decision
    if stored.decision_changed and (previous is not None or rec.decision.behavioral_health):
        w.service.observe(rec, stored)
    elif stored.became_current:
        w.service.observe_current(rec, stored)
    w.service.followed(rec, stored)
    return stored


def test_full_chain_pages_nearest_then_next_then_supervisor_then_dispatch(w: World) -> None:
    incident(w, Response.CLINICIAN)
    assert w.sent() == [("wctp", "5550101", "C1445-1")]
    page = w.pagers["wctp"].sent[0]
    assert page.text.startswith("C1445-1 WELFARE CHECK, zone Z9, Testville.")
    assert page.link == "https://corespond.example/p/C1445-1?for=c-101"
    assert "https://" not in page.text  # the adapter appends the link, once
    (dispatch,) = w.rows("SELECT dispatch FROM escalation_steps WHERE step = 0")
    stored = db_json(dispatch[0])
    assert stored["chosen"] == "c-101"
    reasons = rejections_of(stored)
    assert reasons == {"c-103": "not-on-call", "c-201": "not-on-call", "s-900": "no-location"}
    assert [e["clinician_id"] for e in stored["eligible"]] == ["c-101", "c-102"]
    # A delivery receipt is recorded, and moves nothing.
    w.service.receipt(DeliveryReceipt("wctp", "wctp-1", DeliveryState.DELIVERED, T))
    assert w.rows("SELECT receipt FROM pages") == [("delivered",)]
    w.advance(4.9)
    assert len(w.sent()) == 1
    w.advance(0.2)
    assert w.sent()[-1] == ("wctp", "5550102", "C1445-2")
    w.advance(5)
    assert sorted(w.sent()[2:]) == [
        ("sms", "+15550000900", "C1445-3"),
        ("smtp", "oncall-lead@example.test", "C1445-4"),
    ]
    assert w.pagers["smtp"].sent[0].answers == ()  # a notice offers no answers
    w.advance(10)
    assert w.sent()[-1] == ("smtp", "dispatch@example.test", "C1445-5")
    assert "no co-responder clinician available" in w.pagers["smtp"].sent[-1].text
    assert w.rows("SELECT state FROM escalation_chains") == [("exhausted",)]
    w.advance(60)
    assert len(w.sent()) == 5
    # A late accept of a page nobody withdrew still closes the call.
    w.service.reply(Reply("wctp", T, PageAnswer.ACCEPT, page_ref="C1445-2"))
    assert w.rows("SELECT state, accepted_by FROM escalation_chains") == [("accepted", "c-102")]
    no_phi_outside_phi_columns(w)


def db_json(value: Any) -> Any:
    import json

    return json.loads(value) if isinstance(value, str) else value


def no_phi_outside_phi_columns(w: World) -> None:
    paging_tables = {
        "clinician_states", "location_fixes", "escalation_chains", "escalation_steps", "pages",
        "page_replies",
    }  # fmt: skip
    protected = set(phi_columns())
    with w.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            if table.name not in paging_tables:
                continue
            for row in conn.execute(select(table)).mappings():
                for column, value in row.items():
                    if f"{table.name}.{column}" in protected:
                        continue
                    assert not any(m in str(value) for m in MARKERS), f"{table.name}.{column}"
    for pager in w.pagers.values():
        for message in pager.sent:
            assert not any(m in message.text for m in MARKERS)
            assert "pills" not in message.text and "voices" not in message.text


def test_accept_by_reply_stops_the_chain(w: World) -> None:
    incident(w, Response.CO_RESPONSE)
    w.advance(1)
    # An SMS reply without a reference: the sender's most recent open page.
    w.service.reply(Reply("sms", T, PageAnswer.ACCEPT, sender="+15550000101", text="yes ZQXREPLY"))
    assert w.rows("SELECT state, accepted_by FROM escalation_chains") == [("accepted", "c-101")]
    assert w.rows("SELECT matched_by, outcome FROM page_replies") == [("sender", "applied")]
    w.advance(120)
    assert len(w.sent()) == 1
    assert w.rows("SELECT state FROM escalation_steps ORDER BY step") == [("done",), ("cancelled",)]
    # En route, then on scene, through the ack page: availability follows.
    w.service.answer("C1445-1", "c-101", PageAnswer.EN_ROUTE, "ack-page")
    assert w.rows("SELECT availability FROM clinician_states") == [("en_route",)]
    view = result_of(w.service.answer("C1445-1", "c-101", PageAnswer.ON_SCENE, "ack-page"))
    assert view.state == "on_scene" and view.answers == ()
    assert view.call_type == "WELFARE CHECK" and view.general_location == "zone Z9, Testville"
    # The call became an encounter (issue 6) with its timeline from the paging records.
    [(clinician, paged, ack, en_route, on_scene)] = w.rows(
        "SELECT clinician, clinician_paged_at, page_ack_at, en_route_at, on_scene_at "
        "FROM encounters"
    )
    assert clinician == "c-101"
    assert None not in (paged, ack, en_route, on_scene) and str(paged) <= str(ack)
    # A decision change on the same incident does not page again: a clinician accepted.
    incident(w, Response.CLINICIAN)
    w.advance(1)
    assert len(w.sent()) == 1


def test_decline_pages_the_next_nearest_now(w: World) -> None:
    incident(w, Response.CLINICIAN)
    w.service.reply(Reply("wctp", T, PageAnswer.DECLINE, gateway_id="wctp-1"))
    assert w.sent()[-1] == ("wctp", "5550102", "C1445-2")
    (dispatch,) = w.rows("SELECT dispatch FROM escalation_steps WHERE step = 1")
    reasons = rejections_of(db_json(dispatch[0]))
    assert reasons["c-101"] == "declined"
    # A late accept of the declined page is refused; the second clinician's accept stands.
    with pytest.raises(DeskRefusal) as refused:
        result_of(w.service.answer("C1445-1", "c-101", PageAnswer.ACCEPT, "ack-page"))
    assert refused.value.code == "page-closed"
    with pytest.raises(DeskRefusal) as refused:
        result_of(w.service.answer("C1445-2", "c-101", PageAnswer.ACCEPT, "ack-page"))
    assert refused.value.code == "not-your-page"
    w.service.reply(Reply("wctp", T, PageAnswer.ACCEPT, page_ref="c1445-2", sender="5550102"))
    assert w.rows("SELECT state FROM escalation_chains") == [("accepted",)]


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_busy_off_duty_and_stale_clinicians_are_passed_over(w: World) -> None:
    w.service.set_availability("c-101", Availability.OFF_DUTY, "api")
    w.reactor.advance(29 * 60)  # c-102's fix (2 min old at T) goes stale at 28 min
    w.service.record_fix(LocationFix("s-900", 30.30, -97.75, w.service.clock.now(), "nmea:avl"))
    incident(w, Response.CLINICIAN)
    assert w.sent() == [("sms", "+15550000900", "C1445-1")]
    (dispatch,) = w.rows("SELECT dispatch FROM escalation_steps WHERE step = 0")
    reasons = rejections_of(db_json(dispatch[0]))
    assert reasons["c-101"] == "off-duty" and reasons["c-102"] == "stale-location"
    with pytest.raises(DeskRefusal):
        result_of(w.service.set_availability("nobody", Availability.AVAILABLE, "api"))


def test_unreachable_endpoint_moves_to_the_next_one(w: World) -> None:
    w.pagers["wctp"].refuse.add("5550101")
    incident(w, Response.CLINICIAN)
    assert w.sent() == [("sms", "+15550000101", "C1445-1")]
    assert w.rows("SELECT delivery, endpoint_index, gateway FROM pages") == [
        ("submitted", 1, "sms")
    ]


def test_police_notifies_the_supervisor_group_only(w: World) -> None:
    incident(w, Response.POLICE)
    assert sorted(w.sent()) == [
        ("sms", "+15550000900", "C1445-1"),
        ("smtp", "oncall-lead@example.test", "C1445-2"),
    ]
    assert "police-first" in w.pagers["sms"].sent[0].text
    w.advance(60)
    assert len(w.sent()) == 2
    assert w.rows("SELECT kind, state FROM escalation_chains") == [("notify", "exhausted")]


def test_closed_incident_gets_no_page_and_closing_cancels_the_chain(w: World) -> None:
    incident(w, Response.CLINICIAN, incident_id="2026-000777", status=IncidentStatus.CLOSED)
    assert w.sent() == []
    incident(w, Response.CLINICIAN)
    assert len(w.sent()) == 1
    with w.engine.begin() as conn:
        conn.execute(text("UPDATE incidents SET status = 'closed'"))
    w.advance(5.1)
    assert len(w.sent()) == 1
    assert w.rows("SELECT state FROM escalation_chains") == [("cancelled",)]


def test_eta_reorders_the_closest(w: World, roster: Roster) -> None:
    class Eta:
        def eta_seconds(
            self, origins: list[tuple[float, float]], dest: tuple[float, float]
        ) -> Deferred[list[float | None]]:
            # The river is in the way of the nearest: it is the slowest by road.
            return succeed([900.0 if o[0] == 30.26 else 300.0 for o in origins])

    w.service.eta_source = Eta()
    incident(w, Response.CLINICIAN)
    assert w.sent() == [("wctp", "5550102", "C1445-1")]
    w.advance(5.1)  # the next step, from the worker's pass: the only one left is c-101
    assert w.sent()[-1] == ("wctp", "5550101", "C1445-2")
    (dispatch,) = w.rows("SELECT dispatch FROM escalation_steps WHERE step = 0")
    assert db_json(dispatch[0])["eta_used"] is True


def test_eta_outage_falls_back_to_distance(w: World) -> None:
    class Down:
        def eta_seconds(self, *_: Any) -> Deferred[list[float | None]]:
            return fail(ConnectionRefusedError("osrm down"))

    w.service.eta_source = Down()
    incident(w, Response.CLINICIAN)
    assert w.sent() == [("wctp", "5550101", "C1445-1")]


def test_restart_mid_chain_resumes_at_the_right_moment(w: World, roster: Roster) -> None:
    incident(w, Response.CLINICIAN)
    assert len(w.sent()) == 1
    result_of(w.service.stop())
    # A new process: a fresh engine over the same database, new pagers, a clock 3 min later.
    engine = create_store_engine(w.engine.url.render_as_string(hide_password=False))
    reactor = TaskClock()
    reactor.advance(T.timestamp() + 180)
    pagers = {n: RecordingPager(n) for n in ("wctp", "sms", "smtp")}
    service = make_service(engine, roster, reactor, pagers, worker_id="w2")  # type: ignore[arg-type]
    try:
        service.start()
        assert all(not p.sent for p in pagers.values())  # nothing sent twice
        reactor.advance(119)
        assert all(not p.sent for p in pagers.values())
        reactor.advance(2)  # 5 minutes after the first page
        assert [(m.page_ref, m.address) for m in pagers["wctp"].sent] == [("C1445-2", "5550102")]
    finally:
        result_of(service.stop())
        engine.dispose()


def test_a_page_claimed_by_a_dead_worker_is_sent_after_its_lease(w: World) -> None:
    incident(w, Response.CLINICIAN)
    # As if a worker had claimed the page and died before the gateway took it.
    lease_end = w.service.clock.now() + timedelta(seconds=120)
    with w.engine.begin() as conn:
        conn.execute(
            update(pages).values(delivery="sending", gateway_id=None, lease_until=lease_end)
        )
    w.service.wake()
    assert len(w.sent()) == 1
    w.advance(2.05)
    assert [m.page_ref for m in w.pagers["wctp"].sent] == ["C1445-1", "C1445-1"]
    assert w.rows("SELECT delivery FROM pages") == [("submitted",)]


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_two_workers_never_claim_the_same_step(w: World) -> None:
    result_of(w.service.stop())
    incident(w, Response.CLINICIAN)  # the stopped service does not run it
    now = w.service.clock.now()
    lease = timedelta(minutes=2)
    with w.engine.connect() as first, w.engine.connect() as second:
        with first.begin():
            mine = db.claim_due_steps(first, now, "a", lease, 10)
            with second.begin():
                theirs = db.claim_due_steps(second, now, "b", lease, 10)
        assert len(mine) == 1 and theirs == []
    with w.engine.begin() as conn:
        assert db.claim_due_steps(conn, now, "b", lease, 10) == []  # claimed, lease running
        later = db.claim_due_steps(conn, now + lease * 2, "b", lease, 10)
    assert [s.step_id for s in later] == [mine[0].step_id]


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_two_daemons_never_start_two_chains_for_one_incident(w: World) -> None:
    """Both see a decision change at once: the incident's row lock makes the second wait for
    the first's commit, and then it sees the open chain."""
    import threading

    result_of(w.service.stop())
    stored = incident(w, Response.NONE)  # stored, no chain
    with w.engine.connect() as conn:
        (pk,) = conn.execute(text("SELECT id FROM incidents")).one()
    chain = db.NewChain(pk, "dispatch", "metro", "clinician", [{"action": "page"}])
    now = w.service.clock.now()
    theirs: list[int | None] = []
    with w.engine.connect() as first:
        with first.begin():
            mine = db.start_chain(first, chain, now)

            def second() -> None:
                with w.engine.begin() as conn:
                    theirs.append(db.start_chain(conn, chain, now))

            thread = threading.Thread(target=second)
            thread.start()
            # It waits on the row lock while this transaction lives (PostgreSQL says so).
            with w.engine.connect() as watcher:
                for _ in range(1_000_000):  # until it waits (or, without the lock, ends)
                    waiting = watcher.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    )).scalar()  # fmt: skip
                    # pg_stat_activity is a snapshot per transaction: end it to look again.
                    watcher.rollback()
                    if waiting or not thread.is_alive():
                        break
            assert waiting == 1 and theirs == []
        thread.join(timeout=60)
    assert mine is not None and theirs == [None] and stored.external_id


def test_the_cli_shows_pages_and_clinicians(
    w: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from corespond.daemon.cli import main

    w.service.set_availability("c-102", Availability.UNAVAILABLE, "api")
    incident(w, Response.CLINICIAN)
    w.service.reply(Reply("wctp", T, PageAnswer.ACCEPT, gateway_id="wctp-1", text="ZQXREPLY"))
    url = w.engine.url.render_as_string(hide_password=False)
    config = tmp_path / "corespond.yaml"
    config.write_text(
        f"store: {{url: '{url}', migrate_on_start: false}}\n"
        f"paging: {{roster: {FIXTURES / 'roster.yaml'}}}\n"
    )
    capsys.readouterr()
    assert main(["pages", "list", "--json", "-c", str(config)]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["page_ref"] == "C1445-1" and listed["state"] == "accepted"
    assert listed["clinician_id"] == "c-101" and listed["gateway"] == "wctp"
    assert main(["pages", "show", "c1445-1", "--json", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out)
    assert shown["dispatch"]["chosen"] == "c-101"
    assert shown["chain"]["state"] == "accepted"
    assert shown["replies"][0]["answer"] == "accept"
    assert "ZQXREPLY" not in out and "5550101" not in out  # reply text, addresses: protected
    assert main(["pages", "show", "C9999-1", "-c", str(config)]) == 1
    assert main(["pages", "list", "-c", str(config)]) == 0
    assert "C1445-1" in capsys.readouterr().out
    assert main(["clinicians", "status", "--json", "-c", str(config)]) == 0
    status = {
        row["clinician_id"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())
    }
    assert status["c-101"]["open_pages"] == 1 and status["c-101"]["fix_age_seconds"] is not None
    assert status["c-102"]["availability"] == "unavailable"
    assert status["c-201"]["fix_age_seconds"] is None
    assert main(["clinicians", "list", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "c-101" in out and "wctp,sms" in out and "Test Clinician" not in out
    assert main(["clinicians", "status", "-c", str(config)]) == 0
    assert "AVAILABILITY" in capsys.readouterr().out


def test_a_worker_that_lost_its_claim_writes_nothing(w: World, roster: Roster) -> None:
    result_of(w.service.stop())
    incident(w, Response.CLINICIAN)  # the chain's first step is due; nobody runs it yet
    now = w.service.clock.now()
    lease = timedelta(minutes=2)
    with w.engine.begin() as conn:
        (slow,) = db.claim_due_steps(conn, now, "slow", lease, 10)
        work = db.gather_step(conn, slow, roster, now, timedelta(hours=12))
    # The slow worker's lease runs out; another takes the step and runs it.
    later = now + lease * 2
    with w.engine.begin() as conn:
        (fast,) = db.claim_due_steps(conn, later, "fast", lease, 10)
        assert fast.step_id == slow.step_id
    outcome = db.StepOutcome("no-candidate", None, (), None, True)
    with w.engine.begin() as conn:
        assert db.finish_step(conn, work, outcome, "fast", later) == []
    with w.engine.begin() as conn:
        assert db.finish_step(conn, work, outcome, "slow", later) is None
    assert w.rows("SELECT step, state FROM escalation_steps ORDER BY step") == [
        (0, "done"),
        (1, "pending"),
    ]


# --- incidents that become eligible later --------------------------------------------------------

OUT_OF_ZONE = GeoPoint(44.5, -93.25)


def cad(
    w: World,
    response: Response,
    *,
    updated: float,
    point: GeoPoint | None = INCIDENT_POINT,
    status: IncidentStatus = IncidentStatus.ACTIVE,
) -> StoredSnapshot:
    """A snapshot of incident 2026-001445 stored and told to the service as the pipeline does
    (:func:`stored_and_told`)."""
    return stored_and_told(w, cad_record(response, updated=updated, point=point, status=status))


def cad_record(
    response: Response,
    *,
    updated: float,
    point: GeoPoint | None = INCIDENT_POINT,
    status: IncidentStatus = IncidentStatus.ACTIVE,
) -> SnapshotRecord:
    snap = snapshot("2026-001445", updated=updated, status=status, narrative=MARKERS[0])
    location = Location(point, f"{MARKERS[2]} 12 Imaginary Lane", "Testville", "TX")
    snap = dataclasses.replace(
        snap, incident_number="2026-001445", location=location if point else None
    )
    return record(snap, decision(response, evidence_text=MARKERS[0]))


def test_a_location_that_arrives_later_starts_the_chain(w: World) -> None:
    cad(w, Response.CLINICIAN, updated=0, point=None)
    assert w.sent() == [] and w.rows("SELECT count(*) FROM escalation_chains") == [(0,)]
    assert w.rows("SELECT kind, response, reason FROM chain_waits") == [
        ("dispatch", "clinician", "no-location")
    ]
    w.advance(1)
    cad(w, Response.CLINICIAN, updated=60, point=OUT_OF_ZONE)  # no program covers it
    assert w.sent() == []
    assert w.rows("SELECT reason FROM chain_waits") == [("out-of-zone",)]
    w.advance(1)
    cad(w, Response.CLINICIAN, updated=120)  # the same decision, now inside metro's zone
    assert w.sent() == [("wctp", "5550101", "C1445-1")]
    assert w.rows("SELECT count(*) FROM chain_waits") == [(0,)]
    # Further snapshots of the call start nothing more; the chain goes on as usual.
    cad(w, Response.CLINICIAN, updated=180)
    cad(w, Response.CLINICIAN, updated=240, point=GeoPoint(30.251, -97.751))
    assert len(w.sent()) == 1 and w.rows("SELECT count(*) FROM escalation_chains") == [(1,)]
    w.advance(5.1)
    assert w.sent()[-1] == ("wctp", "5550102", "C1445-2")


def test_a_police_call_waits_for_its_location_too(w: World) -> None:
    cad(w, Response.POLICE, updated=0, point=None)
    assert w.rows("SELECT kind, reason FROM chain_waits") == [("notify", "no-location")]
    cad(w, Response.POLICE, updated=60)
    assert sorted(w.sent()) == [
        ("sms", "+15550000900", "C1445-1"),
        ("smtp", "oncall-lead@example.test", "C1445-2"),
    ]
    assert w.rows("SELECT kind, state FROM escalation_chains") == [("notify", "exhausted")]


def test_a_reopened_call_starts_again_but_an_exhausted_chain_never_pages_again(w: World) -> None:
    cad(w, Response.CLINICIAN, updated=0)
    assert w.sent() == [("wctp", "5550101", "C1445-1")]
    cad(w, Response.CLINICIAN, updated=60, status=IncidentStatus.CLOSED)
    w.advance(5.1)  # the waiting step finds the call closed
    assert w.rows("SELECT state FROM escalation_chains") == [("cancelled",)]
    assert len(w.sent()) == 1
    cad(w, Response.CLINICIAN, updated=400)  # reopened
    # A new chain; the clinician paged for this call before is passed over.
    assert w.sent()[-1] == ("wctp", "5550102", "C1445-2")
    assert w.rows("SELECT state FROM escalation_chains ORDER BY id") == [
        ("cancelled",), ("open",)
    ]  # fmt: skip
    w.advance(5.1)  # nobody else to page: supervisors, then dispatch
    w.advance(10.1)
    assert w.rows("SELECT state FROM escalation_chains ORDER BY id") == [
        ("cancelled",), ("exhausted",)
    ]  # fmt: skip
    sent = len(w.sent())
    assert sent == 5
    # The call is still open and still calls for a clinician: nobody is paged again, not by
    # another snapshot nor by another decision change.
    cad(w, Response.CLINICIAN, updated=2000)
    cad(w, Response.CO_RESPONSE, updated=2100)
    w.advance(60)
    assert len(w.sent()) == sent
    assert w.rows("SELECT count(*) FROM escalation_chains") == [(2,)]


def test_a_taken_reference_gives_a_longer_one(w: World) -> None:
    # Three incidents whose numbers end alike: C1445-1, then 6 digits, then all of them.
    incident(w, Response.CLINICIAN, incident_id="2026-001445")
    incident(w, Response.CLINICIAN, incident_id="2025-001445")
    incident(w, Response.CLINICIAN, incident_id="2024-001445")
    assert [ref for *_, ref in w.sent()] == ["C001445-1", "C1445-1", "C2024001445-1"]


def test_closing_the_call_cancels_its_chain_at_once_and_tells_nobody(w: World) -> None:
    cad(w, Response.CLINICIAN, updated=0)
    assert w.sent() == [("wctp", "5550101", "C1445-1")]
    cad(w, Response.CLINICIAN, updated=60, status=IncidentStatus.CLOSED)  # no time passes
    assert w.rows("SELECT state FROM escalation_chains") == [("cancelled",)]
    assert w.rows("SELECT step, state, outcome FROM escalation_steps ORDER BY step") == [
        (0, "done", "paged"), (1, "cancelled", "incident-closed"),
    ]  # fmt: skip
    assert w.rows("SELECT page_ref, state FROM pages") == [("C1445-1", "cancelled")]
    w.advance(60)  # the step that would have paged the next clinician never runs
    assert w.sent() == [("wctp", "5550101", "C1445-1")]
    # The clinician's late answer changes nothing.
    with pytest.raises(DeskRefusal):
        result_of(w.service.answer("C1445-1", "c-101", PageAnswer.ACCEPT, "web"))


def test_closing_the_call_with_a_changed_decision_cancels_too(w: World) -> None:
    cad(w, Response.CLINICIAN, updated=0)
    cad(w, Response.NONE, updated=60, status=IncidentStatus.CLOSED)
    assert w.rows("SELECT state FROM escalation_chains") == [("cancelled",)]
    w.advance(60)
    assert len(w.sent()) == 1


def test_a_page_not_yet_delivered_is_never_sent_once_the_call_closed(w: World) -> None:
    incident(w, Response.CLINICIAN)
    assert len(w.sent()) == 1
    with w.engine.begin() as conn:  # as if the gateway had asked to try again in a minute
        conn.execute(text("UPDATE pages SET delivery = 'pending', next_try_at = :at"),
                     {"at": T + timedelta(minutes=1)})  # fmt: skip
    cad(w, Response.CLINICIAN, updated=60, status=IncidentStatus.CLOSED)
    assert w.rows("SELECT delivery, next_try_at FROM pages") == [("cancelled", None)]
    w.advance(10)
    assert len(w.sent()) == 1


def test_a_step_another_daemon_holds_when_the_call_closes_writes_nothing(w: World) -> None:
    cad(w, Response.CLINICIAN, updated=0)
    later, lease = T + timedelta(minutes=6), timedelta(minutes=2)
    with w.engine.begin() as conn:  # another daemon claims the due step and gathers it...
        (work,) = db.claim_and_gather_steps(
            conn, later, "w2", lease, 10, w.roster, timedelta(hours=12)
        )
    cad(w, Response.CLINICIAN, updated=60, status=IncidentStatus.CLOSED)
    outcome = db.StepOutcome("paged", {"chosen": "c-102"}, [
        db.NewPage("page", "c-102", [{"gateway": "wctp", "address": "5550102"}], lambda r: r)
    ], None, False)  # fmt: skip
    with w.engine.begin() as conn:  # ...and finishes it after the call closed: its claim is gone
        assert db.finish_step_and_claim(conn, work, outcome, "w2", later, lease) is None
    assert w.rows("SELECT count(*) FROM pages") == [(1,)]
    assert w.rows("SELECT step, state FROM escalation_steps ORDER BY step") == [
        (0, "done"), (1, "cancelled"),
    ]  # fmt: skip


def test_a_waiting_call_that_closes_or_stops_being_bh_stops_waiting(w: World) -> None:
    cad(w, Response.CLINICIAN, updated=0, point=None)
    assert w.rows("SELECT count(*) FROM chain_waits") == [(1,)]
    cad(w, Response.CLINICIAN, updated=60, point=None, status=IncidentStatus.CLOSED)
    assert w.rows("SELECT count(*) FROM chain_waits") == [(0,)]
    cad(w, Response.CLINICIAN, updated=120, point=None)  # reopened, still without a location
    assert w.rows("SELECT reason FROM chain_waits") == [("no-location",)]
    cad(w, Response.NONE, updated=180)  # no longer a call for anyone: the wait ends
    assert w.rows("SELECT count(*) FROM chain_waits") == [(0,)]
    cad(w, Response.NONE, updated=240)
    assert w.sent() == [] and w.rows("SELECT count(*) FROM escalation_chains") == [(0,)]


def test_a_stopped_service_records_the_chain_for_the_next_start(w: World) -> None:
    result_of(w.service.stop())
    cad(w, Response.CLINICIAN, updated=0)
    assert w.sent() == []
    assert w.rows("SELECT step, state FROM escalation_steps") == [(0, "pending")]
    w.service.start()
    assert w.sent() == [("wctp", "5550101", "C1445-1")]


def test_submissions_that_finish_during_a_commit_share_the_next(
    engine: Engine, roster: Roster, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded: list[list[str]] = []
    real = db.pages_submitted

    def spy(conn: Any, done: Any) -> None:
        recorded.append(sorted(page.page_ref for page, _, _ in done))
        real(conn, done)

    monkeypatch.setattr(db, "pages_submitted", spy)
    reactor = TaskClock()
    reactor.advance(T.timestamp())
    held = Threads()  # each unit of work runs when the test says
    pagers = {n: RecordingPager(n) for n in ("wctp", "sms", "smtp")}
    service = PagingService(
        engine, roster, pagers, reactor, PagingSettings(worker_id="w1"),  # type: ignore[arg-type]
        run_in_thread=held,
    )  # fmt: skip
    service.start()
    while held.calls:  # the start-up pass: nothing due
        held.run_next()
    w = World(engine, roster, reactor, pagers, service)  # type: ignore[arg-type]
    incident(w, Response.POLICE)  # two notices: sms and smtp
    held.run_next()  # its one transaction; both notices submitted; the first one's record begins
    assert recorded == [] and len(held.calls) == 1
    incident(w, Response.POLICE, incident_id="2026-001446")
    held.calls.reverse()  # the second call's transaction runs while the first record commits
    while held.calls:
        held.run_next()
    assert recorded == [["C1445-1"], ["C1445-2", "C1446-1", "C1446-2"]]
    assert w.rows("SELECT DISTINCT delivery FROM pages") == [("submitted",)]
    assert len(w.sent()) == 4
    result_of(service.stop())
