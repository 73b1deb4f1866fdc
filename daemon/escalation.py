"""Durable escalation: from a decision to pages, and on to supervisors and dispatch.

A decision of ``clinician`` or ``co-response`` for an open incident starts a *dispatch* chain,
the covering program's escalation steps snapshotted as they are now; ``police`` starts a
*notify* chain (the supervisor group is told, nobody is sent). Each step is a row with a due
time; :class:`PagingService` claims due rows, runs them and inserts the next step in the same
transaction, then delivers the pages it created from the page outbox through the configured
:class:`~corespond.daemon.pager.Pager` of each endpoint. The reactor timer only says "look
again at the next due time", recomputed from the database after every pass and at start-up, so
a restarted daemon resumes every chain where it stood.

Only a human answer (a reply through :meth:`PagingService.reply`, or
:meth:`PagingService.answer` from the ack page) stops a chain (accept, en route) or moves it on
now (decline); a delivery receipt is only recorded. The service is also the
:class:`~corespond.daemon.responders.ClinicianDesk` the location feeds and the web API call.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar

import structlog
from sqlalchemy import Connection, Engine
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from corespond.daemon.clock import Clock
from corespond.daemon.decision import Response
from corespond.daemon.dispatcher import choose
from corespond.daemon.log import error_text
from corespond.daemon.pager import (
    DeliveryReceipt,
    PageAnswer,
    PageMessage,
    Pager,
    PagerError,
    Reply,
    Submitted,
)
from corespond.daemon.responders import Availability, DeskRefusal, LocationFix, PageView
from corespond.daemon.roster import Program, Roster
from corespond.daemon.snapshot import IncidentStatus
from corespond.daemon.store import paging as db
from corespond.daemon.store.writer import SnapshotRecord, StoredSnapshot

log = structlog.get_logger(__name__)

T = TypeVar("T")
RunInThread = Callable[[Callable[[], Any]], Deferred[Any]]


class EtaSource(Protocol):
    def eta_seconds(
        self, origin_points: list[tuple[float, float]], dest: tuple[float, float]
    ) -> Deferred[list[float | None]]: ...


@dataclass(frozen=True, slots=True)
class PagingSettings:
    max_fix_age: timedelta = timedelta(minutes=30)
    eta_candidates: int = 3
    eta_timeout_seconds: float = 5.0
    recent_window: timedelta = timedelta(hours=12)
    lease: timedelta = timedelta(seconds=120)
    batch: int = 50
    worker_id: str = ""


def page_text(kind: str, ref: str, facts: db.IncidentFacts, program: str) -> str:
    """The words of a page: reference, call type, general location. Never a narrative, a name
    or a diagnosis: nothing else from the incident is passed in. The signed ack link is not
    part of the text: it is made at each delivery attempt (a fresh expiry) and travels as
    :attr:`PageMessage.link`, which every adapter appends once."""
    where = f"{facts.call_type}, {facts.general_location}"
    if kind == "page":
        return f"{ref} {where}. Reply ACCEPT, DECLINE or ENROUTE {ref}"
    if kind == "police":
        return f"{ref} police-first BH call ({program}): {where}. No clinician sent"
    if kind == "supervisor":
        return f"{ref} no clinician has accepted ({program}): {where}"
    return f"{ref} no co-responder clinician available ({program}): {where}"


class PagingService:
    """The escalation worker, the page outbox, and the desks the outside world answers to."""

    def __init__(
        self,
        engine: Engine,
        roster: Roster,
        pagers: Mapping[str, Pager],
        reactor: Any,
        settings: PagingSettings = PagingSettings(),
        *,
        eta_source: EtaSource | None = None,
        link_for: Callable[[str, str], str] | None = None,
        run_in_thread: RunInThread | None = None,
    ) -> None:
        self.engine = engine
        self.roster = roster
        self.pagers = dict(pagers)
        self._reactor = reactor
        self.clock = Clock(reactor)
        self.settings = settings
        self.worker = settings.worker_id or f"corespond-{uuid.uuid4().hex[:12]}"
        self.eta_source = eta_source
        self.link_for = link_for
        self._pool = ThreadPool(0, 2, name="corespond-paging")
        self._own_pool = run_in_thread is None
        self._run: RunInThread = run_in_thread or (
            lambda fn: deferToThreadPool(reactor, self._pool, fn)
        )
        self._timer: IDelayedCall | None = None
        self._passing = False
        self._again = False
        self._running = False
        self._idle: list[Deferred[None]] = []

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        if self._own_pool:
            self._pool.start()
        self.wake()  # picks up whatever was due or in flight when the last process stopped

    def stop(self) -> Deferred[None]:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

        def stopped(_: object) -> None:
            if self._own_pool:
                self._pool.stop()

        return self.idle().addCallback(stopped)

    def idle(self) -> Deferred[None]:
        """Fires when no pass is running (tests and shutdown wait on it)."""
        if not self._passing:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter

    def reconfigure(self, roster: Roster, settings: PagingSettings) -> None:
        """A reloaded roster and settings, from the next step on (this worker keeps its name
        unless the new settings give one)."""
        self.roster = roster
        self.settings = settings
        if settings.worker_id:
            self.worker = settings.worker_id
        self.wake()

    def wake(self) -> None:
        """Run a pass now (or right after the current one)."""
        if not self._running:
            return
        if self._passing:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._passing = True
        self._again = False
        maybeDeferred(self._pass).addErrback(self._pass_failed).addBoth(self._pass_done)

    def _pass_failed(self, failure: Failure) -> float:
        log.error("escalation.pass.failed", error=error_text(failure))
        return 5.0  # the database is away: look again soon

    def _pass_done(self, delay: float | None) -> None:
        self._passing = False
        if self._again:
            self.wake()
        elif self._running and delay is not None:
            self._timer = self.clock.call_later(max(0.0, delay), self.wake)
        if not self._passing:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    def _tx(self, fn: Callable[[Connection], T]) -> Deferred[T]:
        def work() -> T:
            with self.engine.begin() as conn:
                return fn(conn)

        return self._run(work)

    # --- one pass -----------------------------------------------------------------------------

    async def _run_pass(self) -> float | None:
        s = self.settings
        while True:
            steps = await self._tx(
                partial(
                    db.claim_due_steps,
                    now=self.clock.now(),
                    worker=self.worker,
                    lease=s.lease,
                    limit=s.batch,
                )
            )
            for step in steps:
                await self._run_step(step)
            claimed = await self._tx(
                partial(
                    db.claim_due_pages,
                    now=self.clock.now(),
                    worker=self.worker,
                    lease=s.lease,
                    limit=s.batch,
                )
            )
            if claimed:
                deliveries = [Deferred.fromCoroutine(self._deliver(p)) for p in claimed]
                await gatherResults(deliveries, consumeErrors=True)
            if not steps and not claimed:
                break  # a step may have made pages due, a failure the next endpoint: again
        due = await self._tx(db.next_due)
        if due is None:
            return None
        return (due - self.clock.now()).total_seconds()

    def _pass(self) -> Deferred[float | None]:
        return Deferred.fromCoroutine(self._run_pass())

    async def _run_step(self, step: db.ClaimedStep) -> None:
        now = self.clock.now()
        work = await self._tx(
            lambda c: db.gather_step(c, step, self.roster, now, self.settings.recent_window)
        )
        etas = await self._etas(work, now)
        result = self._decide(work, etas, now)
        refs = await self._tx(lambda c: db.finish_step(c, work, result, self.worker, now))
        if refs is None:
            log.warning("escalation.step.lost", chain_id=step.chain_id, step=step.step)
            return
        chosen = result.dispatch.get("chosen") if result.dispatch else None
        log.info(
            "escalation.step.done",
            chain_id=step.chain_id,
            step=step.step,
            action=step.action,
            outcome=result.outcome,
            incident_pk=work.incident.incident_pk,
            clinician_id=chosen,
            pages=refs,
            program=work.program,
        )

    async def _etas(self, work: db.StepWork, now: datetime) -> dict[str, float | None] | None:
        facts = work.incident
        if self.eta_source is None or not work.candidates or facts.lat is None or facts.lon is None:
            return None
        point = (facts.lat, facts.lon)
        program_ids = {p.id for p in self.roster.programs_covering(*point)}
        first = choose(point, program_ids, work.candidates, now, self.settings.max_fix_age)
        closest = first.eligible[: self.settings.eta_candidates]
        fixes = {c.clinician_id: c.fix for c in work.candidates}
        origins = []
        for c in closest:
            fix = fixes[c.clinician_id]
            assert fix is not None  # eligible ones have a fix
            origins.append((fix.lat, fix.lon))
        if len(closest) < 2:
            return None  # nothing to reorder
        try:
            asked = self.eta_source.eta_seconds(origins, point)
            asked.addTimeout(self.settings.eta_timeout_seconds, self._reactor)
            times = await asked
        except Exception as err:
            log.warning("escalation.eta.unavailable", error=error_text(Failure(err)))
            return None
        if len(times) != len(closest):
            log.warning("escalation.eta.unavailable", error="wrong number of times")
            return None
        return {c.clinician_id: t for c, t in zip(closest, times, strict=True)}

    def _decide(
        self, work: db.StepWork, etas: dict[str, float | None] | None, now: datetime
    ) -> db.StepOutcome:
        facts = work.incident
        program = self.roster.programs.get(work.program)
        if work.chain_state != db.OPEN:
            return db.StepOutcome("chain-closed", None, (), work.chain_state, False)
        if facts.status != IncidentStatus.ACTIVE.value:
            return db.StepOutcome("incident-closed", None, (), "cancelled", False)
        if work.step.action == "page":
            return self._page_step(work, etas, now)
        if work.step.action == "supervisor":
            kind = "police" if work.chain_kind == "notify" else "supervisor"
            endpoints = self._supervisor_endpoints(program)
        else:
            kind = "dispatch"
            endpoints = [(None, [e.as_json()]) for e in (program.dispatch if program else ())]
        if not endpoints:
            return db.StepOutcome("nobody-to-notify", None, (), None, True)
        notices = [
            db.NewPage("notice", cid, eps, self._text(kind, facts, work.program))
            for cid, eps in endpoints
        ]
        return db.StepOutcome("notified", None, notices, None, False)

    def _page_step(
        self, work: db.StepWork, etas: dict[str, float | None] | None, now: datetime
    ) -> db.StepOutcome:
        facts = work.incident
        if facts.lat is None or facts.lon is None:
            return db.StepOutcome("no-location", None, (), None, True)
        point = (facts.lat, facts.lon)
        covering = [p.id for p in self.roster.programs_covering(*point)]
        result = choose(point, covering, work.candidates, now, self.settings.max_fix_age, etas)
        if result.chosen is None:
            return db.StepOutcome("no-candidate", result.as_json(), (), None, True)
        clinician = self.roster.clinicians[result.chosen]
        page = db.NewPage(
            "page",
            clinician.id,
            [e.as_json() for e in clinician.endpoints],
            self._text("page", facts, work.program),
        )
        return db.StepOutcome("paged", result.as_json(), [page], None, False)

    def _supervisor_endpoints(
        self, program: Program | None
    ) -> list[tuple[str | None, list[dict[str, str]]]]:
        out: list[tuple[str | None, list[dict[str, str]]]] = []
        for member in program.supervisors if program else ():
            if member.clinician_id is not None:
                clinician = self.roster.clinicians.get(member.clinician_id)
                if clinician is not None:
                    out.append((clinician.id, [e.as_json() for e in clinician.endpoints]))
            elif member.endpoint is not None:
                out.append((None, [member.endpoint.as_json()]))
        return out

    def _text(self, kind: str, facts: db.IncidentFacts, program: str) -> Callable[[str], str]:
        """The page text, given its reference."""
        return partial(page_text, kind, facts=facts, program=program)

    def _link(self, page_ref: str, clinician_id: str | None) -> str | None:
        """The signed ack-page link of an answerable page (none for notices or without web)."""
        if self.link_for is None or clinician_id is None:
            return None
        return self.link_for(page_ref, clinician_id)

    async def _deliver(self, page: db.ClaimedPage) -> None:
        pager = self.pagers.get(page.gateway)
        answers = () if page.kind != "page" else None
        try:
            if pager is None:
                raise PagerError(page.gateway, "no such gateway is configured", retryable=False)
            message = PageMessage(
                page_ref=page.page_ref,
                attempt_id=f"{page.page_id}.{page.endpoint_index}",
                address=page.address,
                text=page.text,
                link=self._link(page.page_ref, page.clinician_id if page.kind == "page" else None),
                **({"answers": answers} if answers is not None else {}),
            )
            submitted: Submitted = await pager.submit(message)
        except Exception as err:
            code = str(err) if isinstance(err, PagerError) else type(err).__name__
            now = self.clock.now()
            exhausted = await self._tx(lambda c: db.page_failed(c, page, code, None, now))
            log.warning(
                "page.submit.failed",
                page_ref=page.page_ref,
                gateway=page.gateway,
                error=code,
                outcome="undeliverable" if exhausted else "next-endpoint",
            )
            return
        now = self.clock.now()
        await self._tx(lambda c: db.page_submitted(c, page, submitted.gateway_id, now))
        log.info("page.sent", page_ref=page.page_ref, gateway=page.gateway, kind=page.kind)

    # --- the pipeline's observer ------------------------------------------------------------

    def observe(self, record: SnapshotRecord, stored: StoredSnapshot) -> None:
        """A decision changed: start a chain when it calls for one (never raises)."""
        response = record.decision.response
        snap = record.snapshot
        if response is Response.NONE or snap.status is not IncidentStatus.ACTIVE:
            return
        point = snap.location.point if snap.location else None
        programs = self.roster.programs_covering(point.lat, point.lon) if point else []
        if not programs:
            log.warning(
                "escalation.no_program", incident_id=stored.external_id, response=response.value
            )
            return
        program = programs[0]
        if response is Response.POLICE:
            steps = [{"action": "supervisor", "wait_minutes": 0.0}]
            kind = "notify"
        else:
            steps = [s.as_json() for s in program.escalation]
            kind = "dispatch"
        chain = db.NewChain(stored.incident_pk, kind, program.id, response.value, steps)
        now = self.clock.now()

        def started(chain_id: int | None) -> None:
            if chain_id is None:
                return
            log.info(
                "escalation.chain.started",
                chain_id=chain_id,
                incident_id=stored.external_id,
                program=program.id,
                response=response.value,
                kind=kind,
            )
            self.wake()

        def failed(failure: Failure) -> None:
            log.error(
                "escalation.chain.not_started",
                incident_id=stored.external_id,
                error=error_text(failure),
            )

        self._tx(lambda c: db.start_chain(c, chain, now)).addCallbacks(started, failed)

    # --- PagerEvents --------------------------------------------------------------------------

    def reply(self, reply: Reply) -> Deferred[None]:
        senders = [
            c.id
            for c in self.roster.clinicians.values()
            if reply.sender and any(e.address == reply.sender for e in c.endpoints)
        ]
        now = self.clock.now()

        def apply(conn: Connection) -> tuple[str, str | None, str | None]:
            found = db.find_page(
                conn,
                page_ref=reply.page_ref,
                gateway=reply.gateway,
                gateway_id=reply.gateway_id,
                clinician_ids=senders,
            )
            if found is None:
                db.record_reply(conn, None, None, reply, "unmatched")
                return "unmatched", None, None
            page, matched_by = found
            if reply.answer is None:
                outcome = "not-understood"
            elif matched_by == "page_ref" and senders and page.clinician_id not in senders:
                outcome = "not-your-page"
            else:
                outcome = db.apply_answer(conn, page, reply.answer, reply.gateway, now)
            db.record_reply(conn, page, matched_by, reply, outcome)
            return outcome, page.page_ref, matched_by

        def done(result: tuple[str, str | None, str | None]) -> None:
            outcome, ref, matched_by = result
            log.info(
                "page.reply.received",
                gateway=reply.gateway,
                page_ref=ref,
                matched_by=matched_by,
                answer=reply.answer.value if reply.answer else None,
                outcome=outcome,
            )
            if outcome == "applied":
                self.wake()

        return self._tx(apply).addCallback(done)

    def receipt(self, receipt: DeliveryReceipt) -> Deferred[None]:
        def done(count: int) -> None:
            log.info(
                "page.receipt.received",
                gateway=receipt.gateway,
                state=receipt.state.value,
                code=receipt.detail,
                count=count,
            )

        return self._tx(
            lambda c: db.record_receipt(
                c, receipt.gateway, receipt.gateway_id, receipt.state.value, receipt.received_at
            )
        ).addCallback(done)

    # --- PageDesk -----------------------------------------------------------------------------

    def view(self, page_ref: str) -> Deferred[PageView | None]:
        return self._tx(lambda c: db.page_view(c, page_ref))

    def answer(
        self, page_ref: str, clinician_id: str, answer: PageAnswer, via: str
    ) -> Deferred[PageView]:
        now = self.clock.now()

        def apply(conn: Connection) -> PageView:
            found = db.find_page(conn, page_ref=page_ref)
            if found is None or found[0].kind != "page":
                raise DeskRefusal("unknown-page", "there is no such page")
            page = found[0]
            if page.clinician_id != clinician_id:
                raise DeskRefusal("not-your-page", "this page was sent to another clinician")
            outcome = db.apply_answer(conn, page, answer, via, now)
            if outcome != "applied":
                raise DeskRefusal("page-closed", f"the page cannot take this answer ({outcome})")
            view = db.page_view(conn, page.page_ref)
            assert view is not None
            return view

        def done(view: PageView) -> PageView:
            log.info(
                "page.answered",
                page_ref=view.page_ref,
                clinician_id=clinician_id,
                answer=answer.value,
                via=via,
            )
            self.wake()
            return view

        return self._tx(apply).addCallback(done)

    # --- ClinicianDesk ------------------------------------------------------------------------

    def record_fix(self, fix: LocationFix) -> Deferred[None]:
        if fix.clinician_id not in self.roster.clinicians:
            return fail(DeskRefusal("unknown-clinician", "no such clinician in the roster"))
        now = self.clock.now()
        return self._tx(lambda c: db.write_fix(c, fix, now))

    def set_availability(self, clinician_id: str, state: Availability, via: str) -> Deferred[None]:
        if clinician_id not in self.roster.clinicians:
            return fail(DeskRefusal("unknown-clinician", "no such clinician in the roster"))
        now = self.clock.now()

        def done(_: None) -> None:
            log.info(
                "clinician.availability.changed",
                clinician_id=clinician_id,
                state=state.value,
                via=via,
            )

        return self._tx(
            lambda c: db.write_availability(c, clinician_id, state, via, now)
        ).addCallback(done)
