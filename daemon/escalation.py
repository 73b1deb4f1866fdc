"""Durable escalation: from a decision to pages, and on to supervisors and dispatch.

A decision of ``clinician`` or ``co-response`` for an open incident starts a *dispatch* chain,
the covering program's escalation steps snapshotted as they are now; ``police`` starts a
*notify* chain (the supervisor group is told, nobody is sent). Each step is a row with a due
time; :class:`PagingService` claims due rows, runs them and inserts the next step in the same
transaction, then delivers the pages it created from the page outbox through the configured
:class:`~corespond.daemon.pager.Pager` of each endpoint. The reactor timer only says "look
again at the next due time", recomputed from the database after every pass and at start-up, so
a restarted daemon resumes every chain where it stood.

A chain usually starts in the transaction that stores the snapshot calling for it: the service
is the store's :class:`~corespond.daemon.store.writer.Follower` (:meth:`PagingService.follow`),
so the chain, its first step and its page commit with the snapshot, and the page goes as soon
as that one commit is done. The pipeline's observers (:meth:`PagingService.observe`,
:meth:`PagingService.observe_current`) start it after the commit when that did not happen.

Only a human answer (a reply through :meth:`PagingService.reply`, or
:meth:`PagingService.answer` from the ack page) stops a chain (accept, en route) or moves it on
now (decline); a delivery receipt is only recorded. A call that closes ends its chain as soon
as the closing snapshot is seen (:meth:`PagingService.observe_current`), telling nobody. The
service is also the :class:`~corespond.daemon.responders.ClinicianDesk` the location feeds and
the web API call.
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
from corespond.daemon.dispatcher import Fix, choose
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
from corespond.daemon.responders import (
    Availability,
    DeskRefusal,
    LocationFix,
    PageView,
    UnitStatusChange,
    UnitStatusOutcome,
)
from corespond.daemon.roster import Program, Roster
from corespond.daemon.roster_table import Positions, RosterTable
from corespond.daemon.snapshot import IncidentStatus
from corespond.daemon.store import paging as db
from corespond.daemon.store.writer import SnapshotRecord, StoredSnapshot

log = structlog.get_logger(__name__)

T = TypeVar("T")
RunInThread = Callable[[Callable[[], Any]], Deferred[Any]]
RunRead = Callable[[Callable[[Connection], Any]], Deferred[Any]]
# Runs ``fn(conn)`` in a committed transaction, as soon as it can: IncidentStore.ride_next_batch
# (a savepoint inside the next ingest batch, or a transaction of its own shortly after).
RunTx = Callable[[Callable[[Connection], Any]], Deferred[Any]]


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


# How old the positions kept in memory may be before a step reads them again. Another daemon's
# fixes (PostgreSQL) are seen after at most this; this one's own at once.
POSITIONS_REFRESH = timedelta(seconds=1)
# Older than this (an idle spell), a step reads the positions in its own transaction instead.
POSITIONS_MAX_AGE = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class EtaQuestion:
    """What a page step asks the routing service: drive times from these clinicians."""

    point: tuple[float, float]
    clinicians: list[str]
    origins: list[tuple[float, float]]


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
        run_read: RunRead | None = None,
        ride: RunTx | None = None,
        ride_later: RunTx | None = None,
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
        # A read-only look off the writer (the store's readers); default: a transaction here.
        self._read: RunRead = run_read or self._tx
        # The transactions a page waits for (a chain's first step, due steps, claims, failed
        # submissions): on SQLite they ride the store's next ingest batch, ahead of
        # background work; default: a transaction as any other.
        self._page_tx: RunTx = ride or self._tx
        # Recording submissions (no page waits for it): rides a batch within a longer bound.
        self._later_tx: RunTx = ride_later or self._tx
        self._timer: IDelayedCall | None = None
        self._wanted: datetime | None = None  # a due time learnt while a pass was running
        self._work: set[Deferred[Any]] = set()  # chain starts and their deliveries in flight
        self._submitted: list[tuple[db.ClaimedPage, str | None, datetime, Deferred[None]]] = []
        self._recording = False
        # Every clinician's latest fix and when it was read: 500 rows are about 10 ms to read
        # and convert, too much for each page; refreshed in the background (see _positions).
        self._fixes: Mapping[str, Fix] = {}
        self._fix_arrays: tuple[RosterTable, Positions] | None = None  # _fixes as arrays
        self._fixes_at: datetime | None = None
        self._fixes_loading = False
        # The recent window's pages as a reader saw them (SQLite; None elsewhere): a first
        # page step reads only those added since (see RecentPages). Read with the positions.
        self._recent: db.RecentPages | None = None
        self._recent_loading = False
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
        """Fires when no pass, chain start, delivery or recording is running (tests and
        shutdown wait on it)."""
        if self._quiet():
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter

    def _quiet(self) -> bool:
        return not self._passing and not self._work and not self._recording

    def _release_idle(self) -> None:
        if self._quiet():
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    def _track(self, work: Deferred[T]) -> Deferred[T]:
        """Count ``work`` as running until it ends (:meth:`idle` waits for it)."""
        if work.called:
            return work
        self._work.add(work)

        def ended(result: T) -> T:
            self._work.discard(work)
            self._release_idle()
            return result

        return work.addBoth(ended)

    def _wake_at(self, due: datetime) -> None:
        """Make sure a pass runs by ``due`` (a step or lease the fast path created)."""
        if not self._running:
            return
        if self._passing:
            self._wanted = due if self._wanted is None else min(self._wanted, due)
            return
        delay = max(0.0, (due - self.clock.now()).total_seconds())
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= self._reactor.seconds() + delay:
                return
            timer.cancel()
        self._timer = self.clock.call_later(delay, self.wake)

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
        wanted, self._wanted = self._wanted, None
        if wanted is not None:  # a chain started during the pass, after it read next_due
            soon = (wanted - self.clock.now()).total_seconds()
            delay = soon if delay is None else min(delay, soon)
        if self._again:
            self.wake()
        elif self._running and delay is not None:
            self._timer = self.clock.call_later(max(0.0, delay), self.wake)
        self._release_idle()

    def _positions(self) -> Positions | None:
        """The latest fixes for a step about to run: those in memory while younger than
        :data:`POSITIONS_MAX_AGE` (read again in the background once older than
        :data:`POSITIONS_REFRESH`), else None: the step reads them in its transaction."""
        now = self.clock.now()
        at = self._fixes_at
        if (at is None or now - at >= POSITIONS_REFRESH) and not self._fixes_loading:
            self._fixes_loading = True
            self._track(self._read(db.latest_fixes).addBoth(self._positions_read, now))
            if not self._recent_loading:
                self._recent_loading = True
                read = partial(
                    db.read_recent_pages, since=now - self.settings.recent_window, kept=self._recent
                )
                self._track(self._read(read).addBoth(self._recent_read))
        at = self._fixes_at  # (a synchronous read has just set it)
        if at is None or now - at >= POSITIONS_MAX_AGE:
            return None
        table = self.roster.table
        arrays = self._fix_arrays
        if arrays is None or arrays[0] is not table:
            arrays = self._fix_arrays = (table, table.positions(self._fixes))
        return arrays[1]

    def _positions_ready(self, roster: Roster, now: datetime) -> Positions | None:
        """:meth:`_positions` as kept, for a step on another thread (it starts no read): None
        when they are too old or were made for another roster."""
        at, arrays = self._fixes_at, self._fix_arrays
        if at is None or arrays is None or arrays[0] is not roster.table:
            return None
        return arrays[1] if now - at < POSITIONS_MAX_AGE else None

    def _positions_read(self, result: dict[str, Fix] | Failure, at: datetime) -> None:
        self._fixes_loading = False
        if isinstance(result, Failure):
            log.warning("escalation.positions.unread", error=error_text(result))
            return
        old, arrays = self._fixes, self._fix_arrays
        for cid, fix in old.items():  # a fix recorded here while the read ran
            known = result.get(cid)
            if known is not fix and (known is None or known.fixed_at < fix.fixed_at):
                result[cid] = fix
        self._fixes, self._fixes_at = result, at
        if arrays is not None:  # (the read's unchanged rows are the same Fix objects)
            arrays = (arrays[0], arrays[0].positions_since(arrays[1], old, result))
        self._fix_arrays = arrays

    def _recent_read(self, result: db.RecentPages | Failure | None) -> None:
        self._recent_loading = False
        if isinstance(result, Failure):
            log.warning("escalation.recent.unread", error=error_text(result))
            return
        self._recent = result

    def _tx(self, fn: Callable[[Connection], T]) -> Deferred[T]:
        def work() -> T:
            with self.engine.begin() as conn:
                return fn(conn)

        work.trace_label = getattr(fn, "__qualname__", "paging")  # type: ignore[attr-defined]
        return self._run(work)

    # --- one pass -----------------------------------------------------------------------------

    async def _run_pass(self) -> float | None:
        s = self.settings
        while True:
            steps, created = await self._run_due_steps()
            claimed = await self._page_tx(
                partial(
                    db.claim_due_pages,
                    now=self.clock.now(),
                    worker=self.worker,
                    lease=s.lease,
                    limit=s.batch,
                )
            )
            deliveries = [Deferred.fromCoroutine(self._deliver(p)) for p in created + claimed]
            if deliveries:
                await gatherResults(deliveries, consumeErrors=True)
            if not steps and not claimed:
                break  # a step may have made pages due, a failure the next endpoint: again
        due = await self._tx(db.next_due)
        if due is None:
            return None
        return (due - self.clock.now()).total_seconds()

    async def _run_due_steps(self) -> tuple[int, list[db.ClaimedPage]]:
        """Run the due steps: how many, and the pages they created (claimed by this worker)."""
        s = self.settings
        now = self.clock.now()
        fixes = self._positions()

        def gather(conn: Connection) -> list[db.StepWork]:
            return db.claim_and_gather_steps(
                conn, now, self.worker, s.lease, s.batch, self.roster, s.recent_window, fixes
            )

        if self.eta_source is None:
            # Claim, gather, choose and finish every due step in one transaction.
            finished = await self._page_tx(
                lambda c: db.finish_steps(
                    c, gather(c), lambda w: self._decide(w, None, now), self.worker, now, s.lease
                )
            )
        else:  # ask the routing service between two transactions
            questions = await self._page_tx(
                lambda c: [(w, self._closest(w, now)) for w in gather(c)]
            )
            etas = {w.step.step_id: await self._etas(q) for w, q in questions}
            finished = await self._page_tx(
                lambda c: db.finish_steps(
                    c, [w for w, _ in questions],
                    lambda w: self._decide(w, etas[w.step.step_id], now), self.worker, now,
                    s.lease,
                )
            )  # fmt: skip
        created: list[db.ClaimedPage] = []
        for work, result, done in finished:
            self._step_done(work, result, done)
            created.extend(done.pages if done is not None else ())
        return len(finished), created

    def _pass(self) -> Deferred[float | None]:
        return Deferred.fromCoroutine(self._run_pass())

    def _step_done(
        self, work: db.StepWork, result: db.StepOutcome, done: db.FinishedStep | None
    ) -> None:
        step = work.step
        if done is None:
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
            pages=[p.page_ref for p in done.pages],
            program=work.program,
        )

    def _closest(self, work: db.StepWork, now: datetime) -> EtaQuestion | None:
        """Whom to ask the routing service about for a page step: the closest few eligible
        by distance (None: no service, or fewer than two to reorder). A scan of the whole
        roster: it runs with the step's transaction, off the reactor."""
        facts, candidates = work.incident, work.candidates
        if self.eta_source is None or not candidates or facts.lat is None or facts.lon is None:
            return None
        point = (facts.lat, facts.lon)
        program_ids = {p.id for p in self.roster.programs_covering(*point)}
        first = choose(point, program_ids, candidates, now, self.settings.max_fix_age)
        closest = first.top(self.settings.eta_candidates)
        if len(closest) < 2:
            return None  # nothing to reorder
        origins = []
        for c in closest:
            origin = candidates.point(c.clinician_id)
            assert origin is not None  # eligible ones have a fix
            origins.append(origin)
        return EtaQuestion(point, [c.clinician_id for c in closest], origins)

    async def _etas(self, question: EtaQuestion | None) -> dict[str, float | None] | None:
        """The routing service's drive times for ``question`` (None: no answer in time)."""
        if question is None or self.eta_source is None:
            return None
        try:
            asked = self.eta_source.eta_seconds(question.origins, question.point)
            asked.addTimeout(self.settings.eta_timeout_seconds, self._reactor)
            times = await asked
        except Exception as err:
            log.warning("escalation.eta.unavailable", error=error_text(Failure(err)))
            return None
        if len(times) != len(question.clinicians):
            log.warning("escalation.eta.unavailable", error="wrong number of times")
            return None
        return dict(zip(question.clinicians, times, strict=True))

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
        if work.candidates is None:
            return db.StepOutcome("no-candidate", None, (), None, True)
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
            exhausted = await self._page_tx(lambda c: db.page_failed(c, page, code, None, now))
            log.warning(
                "page.submit.failed",
                page_ref=page.page_ref,
                gateway=page.gateway,
                error=code,
                outcome="undeliverable" if exhausted else "next-endpoint",
            )
            self.wake()  # the next endpoint, or the chain's next step, is due now
            return
        recorded: Deferred[None] = Deferred()
        self._submitted.append((page, submitted.gateway_id, self.clock.now(), recorded))
        self._record_submissions()
        await recorded
        log.info("page.sent", page_ref=page.page_ref, gateway=page.gateway, kind=page.kind)

    def _record_submissions(self) -> None:
        """Commit the submissions waiting, in one transaction; those that arrive meanwhile go
        in the next. Until its commit a submitted page stays claimed: a daemon that dies first
        sends it again, with the same message id, after the lease (as before grouping)."""
        if self._recording or not self._submitted:
            return
        batch, self._submitted = self._submitted, []
        self._recording = True
        rows = [(page, gateway_id, at) for page, gateway_id, at, _ in batch]

        def done(result: object) -> None:
            self._recording = False
            for *_, waiter in batch:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            self._record_submissions()
            self._release_idle()

        self._later_tx(lambda c: db.pages_submitted(c, rows)).addBoth(done)

    # --- the pipeline's observer ------------------------------------------------------------

    def observe(self, record: SnapshotRecord, stored: StoredSnapshot) -> None:
        """A decision changed: start the chain the incident now calls for, or end its wait for
        one (never raises). Decision changes are few: no first look on a reader."""
        if stored.followed is not None:
            return  # done in the snapshot's own transaction (see follow)
        previous = stored.previous_decision
        if record.decision.response is Response.NONE and (
            previous is None or previous.response is Response.NONE
        ):
            return  # it never called for a chain: there is no wait to end
        self._open_chain(stored)

    def observe_current(self, record: SnapshotRecord, stored: StoredSnapshot) -> None:
        """A snapshot became an incident's current state without changing its decision: a call
        with no chain may have become eligible (its location arrived, it was reopened), or a
        waiting one closed, or one with an open chain closed (the chain ends now, in the
        transaction that sees it closed, not when its next step would have run). Most
        snapshots call for nobody and cost nothing here; the others take a look on a reader
        first, and the writer only when it may start or end something (never raises)."""
        if stored.followed is not None or record.decision.response is Response.NONE:
            return

        def looked(maybe: bool) -> None:
            if maybe:
                self._open_chain(stored)

        self._track(
            self._read(lambda c: db.may_need_chain(c, stored.incident_pk)).addCallbacks(
                looked, self._not_started, errbackArgs=(stored,)
            )
        )

    # --- the store's follower: a chain started in the snapshot's own transaction -------------

    def wants(self, record: SnapshotRecord) -> bool:
        """(:class:`~corespond.daemon.store.writer.Follower`, on the reactor.) A snapshot whose
        decision calls for a response may start its incident's chain, or end it (a closed
        call), while this worker runs. The positions kept in memory are made ready for the
        choice here, on the reactor (the writer thread only reads them)."""
        if not self._running or record.decision.response is Response.NONE:
            return False
        self._positions()
        return True

    def follow(
        self, conn: Connection, record: SnapshotRecord, stored: StoredSnapshot
    ) -> tuple[datetime, db.OpenedChain, Any] | None:
        """(Follower, on the writer thread, inside the transaction that stores the snapshot.)
        What :meth:`observe` or :meth:`observe_current` would start after the commit, done
        before it: the chain, its first step chosen and its page claimed by this worker,
        committed with the snapshot. A page then waits for one commit, not for the
        snapshot's and then its chain's in the next batch, with a read on a reader between
        them. None: nothing to do (a repeated snapshot of a call that has its chain)."""
        if not stored.decision_changed and not (
            stored.became_current and db.may_need_chain(conn, stored.incident_pk)
        ):
            return None
        roster = self.roster
        now = self.clock.now()
        fixes = self._positions_ready(roster, now)
        s = self.settings
        choose = None
        if self.eta_source is None:
            # The first page step chosen under the incident's lock, as open_chain reads it
            # (nothing read twice): the chain goes in with its first step done by the cheaper
            # inserts of a choice made ahead.
            recent = self._recent

            def choose(c: Connection, work: db.StepWork, response: str) -> db.PreChoice | None:
                work = db.first_step_candidates(
                    c, work, roster, now, s.recent_window, fixes, recent
                )
                result = self._page_step(work, None, now)
                return db.PreChoice.of(work, result, response, now, s.recent_window, s.lease)

        return (
            now,
            *self._open_in(roster, stored.incident_pk, now, fixes, True, None, conn, choose),
        )

    def followed(self, record: SnapshotRecord, stored: StoredSnapshot) -> None:
        """(A snapshot observer, on the reactor after the commit.) Log and deliver what
        :meth:`follow` did; when it failed (its savepoint rolled back, the snapshot stands),
        start the chain the way :meth:`observe` does (never raises)."""
        done = stored.followed
        if done is None:
            return
        if not done.ok:
            log.warning(
                "escalation.chain.retried",
                incident_id=stored.external_id,
                error=error_text(done.value),
            )
            self._open_chain(stored)
            return
        if done.value is None:
            return
        now, opened, after = done.value
        self._track(
            Deferred.fromCoroutine(self._chain_opened(stored, now, opened, after)).addErrback(
                self._not_started, stored
            )
        )

    # --- starting a chain ----------------------------------------------------------------------

    def _open_chain(self, stored: StoredSnapshot) -> None:
        """Start the incident's chain after its snapshot committed, riding the next batch
        (the way when :meth:`follow` did not: the worker stopped, the follower failed, a
        decision that no longer calls for a response ends the incident's wait).

        The first page step is chosen before that transaction, from a read on a reader (the
        roster scan, and the routing service's drive times, off the writer): the transaction
        checks the choice under the incident's lock and, when it holds, only inserts
        (:class:`~corespond.daemon.store.paging.PreChoice`). When it does not, or there was
        nothing to choose ahead, the step is gathered and chosen in the transaction; with a
        routing service, the drive times are then asked between two transactions."""
        now = self.clock.now()
        running = self._running
        fixes = self._positions() if running else None
        roster = self.roster

        async def run() -> None:
            chosen = await self._choose_ahead(stored.incident_pk, now, fixes) if running else None
            opened, after = await self._page_tx(
                partial(self._open_in, roster, stored.incident_pk, now, fixes, running, chosen)
            )
            await self._chain_opened(stored, now, opened, after)

        self._track(Deferred.fromCoroutine(run()).addErrback(self._not_started, stored))

    def _open_in(
        self,
        roster: Roster,
        incident_pk: int,
        now: datetime,
        fixes: Positions | None,
        running: bool,
        chosen: db.PreChoice | None,
        conn: Connection,
        choose: Callable[[Connection, db.StepWork, str], db.PreChoice | None] | None = None,
    ) -> tuple[db.OpenedChain, Any]:
        """In a transaction: start the incident's chain and, when the worker runs, its first
        step: choose, create the pages claimed by this worker, to submit as soon as it
        commits, without a timer or a claiming round trip. What comes after the commit: None
        (no step to run here), the step and the question for the routing service, or the
        step done (:meth:`_chain_opened`)."""
        s = self.settings
        opened = db.open_chain(
            conn, incident_pk, roster, now,
            worker=self.worker if running else None, lease=s.lease if running else None,
            chosen=chosen, choose=choose,
        )  # fmt: skip
        if opened.done is not None:
            assert opened.chosen is not None
            return opened, (opened.done[0], opened.chosen, opened.done[1])
        if opened.first is None:
            return opened, None
        gathered = db.gather_step(conn, opened.first, roster, now, s.recent_window, fixes, opened)
        if not running or self.eta_source is not None:
            return opened, (gathered, self._closest(gathered, now))
        result = self._decide(gathered, None, now)
        done = db.finish_step_and_claim(
            conn, gathered, result, self.worker, now, s.lease, fresh=True
        )
        return opened, (gathered, result, done)

    async def _chain_opened(
        self, stored: StoredSnapshot, now: datetime, opened: db.OpenedChain, after: Any
    ) -> None:
        """After :meth:`_open_in` committed: say what it did, ask the routing service and
        finish the first step when it has to, then deliver the step's pages."""
        s = self.settings
        for chain_id in opened.cancelled:
            log.info(
                "escalation.chain.cancelled",
                chain_id=chain_id,
                incident_id=stored.external_id,
                reason="incident-closed",
            )
        if opened.chain is None:
            if opened.waiting:
                log.info(
                    "escalation.chain.waiting",
                    incident_id=stored.external_id,
                    reason=opened.reason,
                )
            return
        log.info(
            "escalation.chain.started",
            chain_id=opened.chain_id,
            incident_id=stored.external_id,
            program=opened.chain.program,
            response=opened.chain.response,
            kind=opened.chain.kind,
        )
        if after is None:
            self.wake()  # not running: start() picks the step up
            return
        if len(after) == 2:  # ask the routing service, then finish as a pass would
            gathered, question = after
            etas = await self._etas(question)

            def finish(conn: Connection) -> Any:
                result = self._decide(gathered, etas, now)
                done = db.finish_step_and_claim(conn, gathered, result, self.worker, now, s.lease)
                return gathered, result, done

            after = await self._page_tx(finish)
        gathered, result, done = after
        self._step_done(gathered, result, done)
        if done is None:
            return
        if done.next_due is not None:
            self._wake_at(done.next_due)
        if done.pages:
            self._wake_at(now + s.lease)  # a delivery that never ends is claimed again
            deliveries = [Deferred.fromCoroutine(self._deliver(p)) for p in done.pages]
            await gatherResults(deliveries, consumeErrors=True)

    def _not_started(self, failure: Failure, stored: StoredSnapshot) -> None:
        log.error(
            "escalation.chain.not_started",
            incident_id=stored.external_id,
            error=error_text(failure),
        )
        self.wake()  # whatever was committed is due: a pass takes it

    async def _choose_ahead(
        self, incident_pk: int, now: datetime, fixes: Positions | None
    ) -> db.PreChoice | None:
        """The first page step of the incident's new chain, chosen from a read on a reader
        (with the routing service's drive times for the closest few, when there is one); None
        when there is nothing to choose ahead or the read failed (the transaction chooses)."""
        s = self.settings
        read = partial(self._choose_from, roster=self.roster, incident_pk=incident_pk, now=now,
                       fixes=fixes)  # fmt: skip
        try:
            found = await self._read(read)
            if found is None:
                return None
            work, response, ahead = found
            if self.eta_source is not None:  # (a routing service: choose with its times)
                ahead = self._page_step(work, await self._etas(ahead), now)
        except Exception as err:
            log.warning("escalation.choice.unread", error=error_text(Failure(err)))
            return None
        # (nobody eligible: None, the transaction decides what comes next)
        return db.PreChoice.of(work, ahead, response, now, s.recent_window, s.lease)

    def _choose_from(
        self,
        conn: Connection,
        roster: Roster,
        incident_pk: int,
        now: datetime,
        fixes: Positions | None,
    ) -> tuple[db.StepWork, str, Any] | None:
        """What the first page step of the incident's new chain would read and choose (the
        question for the routing service instead, when there is one), with the decision's
        response; None when no dispatch chain with a page step first would start now."""
        gathered = db.gather_first_step(
            conn, incident_pk, roster, now, self.settings.recent_window, fixes, self._recent
        )
        if gathered is None:
            return None
        work, response = gathered
        if self.eta_source is not None:
            return work, response, self._closest(work, now)
        return work, response, self._page_step(work, None, now)

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

        def written(_: None) -> None:
            known = self._fixes.get(fix.clinician_id)
            if known is None or known.fixed_at < fix.fixed_at:  # copied: steps read it
                point = Fix(fix.latitude, fix.longitude, fix.fixed_at)
                self._fixes = {**self._fixes, fix.clinician_id: point}
                arrays = self._fix_arrays
                i = arrays[0].index.get(fix.clinician_id) if arrays is not None else None
                if arrays is not None and i is not None:
                    self._fix_arrays = (arrays[0], arrays[1].with_fix(i, point))
                else:
                    self._fix_arrays = None

        return self._tx(lambda c: db.write_fix(c, fix, now)).addCallback(written)

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

    def unit_status(self, change: UnitStatusChange) -> Deferred[UnitStatusOutcome]:
        """A CAD unit status (:mod:`corespond.daemon.unit_locations`): the availability and the
        page answer it carries, through the same store functions as a reply."""
        if change.clinician_id not in self.roster.clinicians:
            return fail(DeskRefusal("unknown-clinician", "no such clinician in the roster"))
        from corespond.daemon.store.unit_status import apply_unit_status

        now = self.clock.now()

        def done(outcome: UnitStatusOutcome) -> UnitStatusOutcome:
            if outcome.applied and change.state is not None:
                log.info("clinician.availability.changed", clinician_id=change.clinician_id,
                         state=change.state.value, via=change.via)  # fmt: skip
            if outcome.answered is not None and change.answer is not None:
                log.info("page.answered", page_ref=outcome.answered,
                         clinician_id=change.clinician_id, answer=change.answer.value,
                         via=change.via)  # fmt: skip
                self.wake()
            return outcome

        return self._tx(lambda c: apply_unit_status(c, change, now)).addCallback(done)
