"""Automatic referrals: a configured disposition or rule makes a referral by itself.

``referrals.auto`` lists triggers (``{when: {disposition: resolved_with_referral}, provider: P,
service: TYPE}`` or ``{when: {rule: RULE_ID}, ...}``). A trigger that fires becomes a row in
``auto_referrals`` (one per incident, trigger, provider and service type, so a re-save, a
second decision or a restart adds nothing):

- a disposition, in the very transaction that saves the encounter with it
  (:func:`disposition_hook`, run by the encounter desk for the API and the form alike);
- a rule, when a decision naming it is found by :class:`AutoReferrals`' scan of new decisions
  (by id; at start it looks back ``catch_up`` so a daemon killed after a commit misses none).

:class:`AutoReferrals` claims due rows under a lease (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL) and creates each referral through ``create`` (in the daemon
``ReferralService.create``, the code the API and the form run), with the row marked done *in
the referral's own transaction*: the referral and the mark commit together or not at all, so a
daemon killed at any instant creates it once. A referral the referral rules refuse (a provider
no longer configured, say) is marked refused with the reason (ids only). The person is the one
recorded on the incident; no summary is written for the clinician (never the CAD narrative).

In the daemon (:meth:`AutoReferrals.of_service`) the referral is built in the builder process,
never on the shared writer thread, and stored with the row's mark in one transaction, which
claims its message for the outbox worker (no wake, no claim of its own). A disposition wakes
:class:`AutoReferrals` as soon as the encounter's transaction has committed
(:class:`AfterCommitWake`), not at the next poll.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.python.failure import Failure

from corespond.adapters.hl7_referral import Person
from corespond.daemon.clock import Clock
from corespond.daemon.config import AutoReferralConfig, ReferralsConfig
from corespond.daemon.encounter_desk import SaveHook
from corespond.daemon.log import error_text
from corespond.daemon.referrals import (
    CreatedReferral,
    ReferralBuildFailed,
    ReferralError,
    ReferralRequest,
    ReferralService,
    person_of_incident,
)
from corespond.daemon.store.tables import auto_referrals, decisions, incidents

log = structlog.get_logger(__name__)

# Who refers when no clinician did (PRD-7), unless the trigger names someone.
DEFAULT_REFERRER = "corespond"
# Decisions looked at again on each scan: an id allocated before a later one may commit after
# it (PostgreSQL), and re-reading a few is free (the rows it would add exist).
SCAN_OVERLAP = 256
SCAN_BATCH = 5_000


# How a referral is made: ``ReferralService.create(request, on_stored)``.
Create = Callable[[ReferralRequest, Callable[[Connection, str], None]], Deferred[CreatedReferral]]


class LeaseLost(Exception):
    """Another worker took the row meanwhile: this referral is not ours to create."""


def _insert_ignoring_duplicates(conn: Connection) -> Any:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(auto_referrals).on_conflict_do_nothing(
        index_elements=["incident_pk", "trigger", "provider", "service_type"]
    )


def want_referrals(
    conn: Connection,
    incident_pk: int,
    entries: Sequence[AutoReferralConfig],
    now: datetime,
    *,
    clinician: str | None = None,
    program: str | None = None,
) -> int:
    """Rows for the referrals ``entries`` ask for on ``incident_pk``, due now; those already
    asked for stay as they are. How many are new."""
    if not entries:
        return 0
    rows = [
        {
            "incident_pk": incident_pk, "trigger": e.trigger, "provider": e.provider,
            "service_type": e.service_type,
            "referring_clinician": e.referring_clinician or clinician, "program": program,
            "state": "pending", "due_at": now, "attempts": 0, "created_at": now,
        }
        for e in entries
    ]  # fmt: skip
    # Counted by RETURNING: PostgreSQL's rowcount of a many-row insert is -1 (psycopg).
    insert = _insert_ignoring_duplicates(conn).returning(auto_referrals.c.id)
    return len(conn.execute(insert, rows).all())


class AfterCommitWake:
    """Wakes the automatic referrals once a transaction that asked for one has committed.

    :meth:`mark` is called inside the transaction (the disposition hook, in a thread);
    :meth:`runner` wraps the encounter desk's thread runner so that, when the work that
    marked returns (its ``with engine.begin()`` has committed), ``target`` runs on the
    reactor. Marks are per thread and per piece of work: another save's commit never
    wakes for this one's uncommitted row.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self.target: Callable[[], Any] | None = None
        self.woken = 0

    def mark(self) -> None:
        self._local.marked = True

    def runner(
        self, run: Callable[[Callable[[], Any]], Deferred[Any]]
    ) -> Callable[[Callable[[], Any]], Deferred[Any]]:
        def wrapped(fn: Callable[[], Any]) -> Deferred[Any]:
            def work() -> tuple[Any, bool]:
                self._local.marked = False
                try:
                    return fn(), self._local.marked
                finally:
                    self._local.marked = False

            return run(work).addCallback(self._committed)

        return wrapped

    def _committed(self, done: tuple[Any, bool]) -> Any:
        result, marked = done
        if marked and self.target is not None:
            self.woken += 1
            self.target()
        return result


def disposition_hook(
    entries: Sequence[AutoReferralConfig], on_wanted: Callable[[], None] = lambda: None
) -> SaveHook:
    """The encounter desk's hook: an encounter of an incident saved with a configured
    disposition asks for its referrals in the same transaction (and calls ``on_wanted``, in
    it: :meth:`AfterCommitWake.mark`)."""
    by_disposition: dict[str, list[AutoReferralConfig]] = {}
    for entry in entries:
        if entry.kind == "disposition":
            by_disposition.setdefault(entry.value, []).append(entry)

    def hook(conn: Connection, row: Mapping[str, Any], now: datetime) -> None:
        wanted = by_disposition.get(row.get("disposition") or "", [])
        if wanted and row.get("incident_id") is not None:
            added = want_referrals(
                conn, row["incident_id"], wanted, now,
                clinician=row.get("clinician"), program=row.get("program"),
            )  # fmt: skip
            if added:
                on_wanted()
                log.info("referral.auto.wanted", encounter_id=row["id"], count=added,
                         kind="disposition")  # fmt: skip

    return hook


def first_decision_since(conn: Connection, since: datetime) -> int:
    """The id before the first decision made at or after ``since`` (where a scan starts)."""
    found = conn.execute(
        select(func.min(decisions.c.id)).where(decisions.c.created_at >= since)
    ).scalar()
    if found is not None:
        return int(found) - 1
    return int(conn.execute(select(func.coalesce(func.max(decisions.c.id), 0))).scalar_one())


def scan_rule_triggers(
    conn: Connection, entries: Sequence[AutoReferralConfig], after: int, now: datetime
) -> tuple[int, int]:
    """Rows for every decision after id ``after`` that names a trigger rule; (rows added,
    the last decision id read)."""
    by_rule: dict[str, list[AutoReferralConfig]] = {}
    for entry in entries:
        if entry.kind == "rule":
            by_rule.setdefault(entry.value, []).append(entry)
    rows = conn.execute(
        select(decisions.c.id, decisions.c.incident_id, decisions.c.rules)
        .where(decisions.c.id > after)
        .order_by(decisions.c.id)
        .limit(SCAN_BATCH)
    ).all()
    added = 0
    for row in rows:
        wanted = [e for rule in row.rules or () for e in by_rule.get(rule, ())]
        added += want_referrals(conn, row.incident_id, wanted, now)
    return added, (rows[-1].id if rows else after)


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    incident_pk: int
    trigger: str
    provider: str
    service_type: str
    referring_clinician: str | None
    program: str | None


def claim_due(
    conn: Connection, now: datetime, worker_id: str, lease: timedelta, limit: int = 20
) -> list[Claimed]:
    """Claim due rows (and rows whose claimer's lease ran out); rows another daemon holds are
    skipped (PostgreSQL)."""
    a = auto_referrals.c
    due = or_(
        and_(a.state == "pending", a.due_at <= now),
        and_(a.state == "claimed", a.lease_until <= now),
    )
    query = select(a.id).where(due).order_by(a.due_at, a.id).limit(limit)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    ids = [int(i) for i in conn.execute(query).scalars()]
    if not ids:
        return []
    conn.execute(
        update(auto_referrals)
        .where(a.id.in_(ids))
        .values(state="claimed", claimed_by=worker_id, lease_until=now + lease,
                attempts=a.attempts + 1)
    )  # fmt: skip
    rows = conn.execute(select(auto_referrals).where(a.id.in_(ids)).order_by(a.id)).mappings()
    return [
        Claimed(r["id"], r["incident_pk"], r["trigger"], r["provider"], r["service_type"],
                r["referring_clinician"], r["program"])
        for r in rows
    ]  # fmt: skip


def referral_request(
    conn: Connection, claim: Claimed, entry: AutoReferralConfig
) -> ReferralRequest:
    """The referral a claimed row asks for: the incident's CAD number, zone and person as
    recorded."""
    incident = conn.execute(
        select(incidents.c.incident_number, incidents.c.external_id, incidents.c.zone).where(
            incidents.c.id == claim.incident_pk
        )
    ).one()
    incident_ref = incident.incident_number or incident.external_id
    found = person_of_incident(conn, incident_ref)
    person = found[0] if found is not None else Person()
    return ReferralRequest(
        incident_ref=incident_ref,
        provider=claim.provider,
        service_type=claim.service_type,
        referring_clinician=claim.referring_clinician or DEFAULT_REFERRER,
        urgency=entry.urgency,
        person=person,
        part2=entry.part2,
        program=claim.program,
        region=incident.zone,
    )


def _entry(config: ReferralsConfig, claim: Claimed) -> AutoReferralConfig | None:
    return next(
        (
            e
            for e in config.auto
            if (e.trigger, e.provider, e.service_type)
            == (claim.trigger, claim.provider, claim.service_type)
        ),
        None,
    )


def _mark_done(claim: Claimed, worker_id: str, now: datetime) -> Callable[[Connection, str], None]:
    """The row's mark, run in the referral's own transaction (both commit or neither)."""
    a = auto_referrals.c
    mine = and_(a.id == claim.id, a.state == "claimed", a.claimed_by == worker_id)

    def mark_done(conn: Connection, ref: str) -> None:
        done = conn.execute(
            update(auto_referrals).where(mine)
            .values(state="done", referral_ref=ref, done_at=now, lease_until=None)
        )  # fmt: skip
        if done.rowcount != 1:
            raise LeaseLost()

    return mark_done


def refuse_claimed(
    engine: Engine, claim: Claimed, worker_id: str, now: datetime, err: ReferralError
) -> None:
    a = auto_referrals.c
    mine = and_(a.id == claim.id, a.state == "claimed", a.claimed_by == worker_id)
    with engine.begin() as conn:
        conn.execute(
            update(auto_referrals).where(mine)
            .values(state="refused", refusal=str(err), done_at=now, lease_until=None)
        )  # fmt: skip
    log.warning("referral.auto.refused", incident_pk=claim.incident_pk,
                provider=claim.provider, reason=str(err))  # fmt: skip


def requests_of_claims(
    engine: Engine, config: ReferralsConfig, claims: Sequence[Claimed]
) -> list[tuple[Claimed, ReferralRequest | ReferralError]]:
    """What each claimed row asks for, or why it cannot be made (a read)."""
    out: list[tuple[Claimed, ReferralRequest | ReferralError]] = []
    with engine.connect() as conn:
        for claim in claims:
            entry = _entry(config, claim)
            if entry is None:
                out.append((claim, ReferralError(
                    f"no referrals.auto entry for {claim.trigger} any more")))  # fmt: skip
            else:
                out.append((claim, referral_request(conn, claim, entry)))
    return out


class AutoReferrals:
    """Scans for rule triggers and creates the referrals triggers asked for, every
    ``referrals.poll_interval`` seconds and on :meth:`wake`."""

    def __init__(
        self,
        engine: Engine,
        config: ReferralsConfig,
        *,
        clock: Clock,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]],
        create: Create,
        worker_id: str | None = None,
        lease: timedelta = timedelta(minutes=2),
        catch_up: timedelta = timedelta(hours=24),
    ) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self._run = run_in_thread
        # ReferralService.create(request, on_stored): the builder process, one transaction
        # that also hands the message to the outbox worker (no wake of our own needed).
        self._create = create
        self.worker_id = worker_id or f"auto-{uuid.uuid4().hex[:8]}"
        self.lease = lease
        self.catch_up = catch_up
        self._after: int | None = None  # the last decision id scanned
        self._rules = any(e.kind == "rule" for e in config.auto)
        self._polling = False
        self._again = False
        self._loop: Any = None

    @classmethod
    def of_service(
        cls, engine: Engine, config: ReferralsConfig, service: ReferralService, clock: Clock
    ) -> AutoReferrals:
        """As the daemon runs them: transactions where the service's run, referrals made by
        its ``create``."""
        return cls(engine, config, clock=clock, run_in_thread=service.worker.in_thread,
                   create=service.create)  # fmt: skip

    def start(self) -> None:
        self._loop = self.clock.looping_call(self.config.poll_interval, self.poll, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def wake(self) -> None:
        self.poll()

    def poll(self) -> Deferred[None]:
        if self._polling:
            self._again = True
            return succeed(None)
        self._polling = True
        d: Deferred[int] = ensureDeferred(self._work())

        def done(_: int) -> None:
            self._polling = False
            if self._again:
                self._again = False
                self.poll()

        def failed(failure: Failure) -> None:
            self._polling = False
            log.error("referral.auto.failed", error=error_text(failure))

        return d.addCallbacks(done, failed)

    def _scan(self, now: datetime) -> None:
        if self._rules:
            with self.engine.begin() as conn:
                if self._after is None:
                    self._after = first_decision_since(conn, now - self.catch_up)
                start = max(0, self._after - SCAN_OVERLAP)
                added, last = scan_rule_triggers(conn, self.config.auto, start, now)
                self._after = max(self._after, last)
            if added:
                log.info("referral.auto.wanted", count=added, kind="rule")

    def _claim(self, now: datetime, scan: bool) -> list[tuple[Claimed, Any]]:
        """In a thread: scan (first pass), claim due rows and read what they ask for."""
        if scan:
            self._scan(now)
        with self.engine.begin() as conn:
            claims = claim_due(conn, now, self.worker_id, self.lease)
        return requests_of_claims(self.engine, self.config, claims) if claims else []

    async def _work(self) -> int:
        """One pass through the referral service: claims and reads in a thread, each
        referral built in the builder process and stored with its mark in one transaction;
        the referrals created."""
        created, scan = 0, True
        while True:
            now = self.clock.now()
            claimed = await self._run(partial(self._claim, now, scan))
            scan = False
            if not claimed:
                return created
            for claim, request in claimed:
                created += await self._create_one(claim, request, now)

    async def _create_one(self, claim: Claimed, request: Any, now: datetime) -> int:
        try:
            if isinstance(request, ReferralError):
                raise request
            made = await self._create(request, _mark_done(claim, self.worker_id, now))
        except LeaseLost:
            return 0
        except ReferralBuildFailed as err:  # stored and marked; built again later
            log.warning("referral.auto.created", referral_id=err.ref,
                        incident_pk=claim.incident_pk, provider=claim.provider,
                        code="build-failed")  # fmt: skip
            return 0
        except ReferralError as err:
            await self._run(partial(refuse_claimed, self.engine, claim, self.worker_id, now, err))
            return 0
        log.info("referral.auto.created", referral_id=made.ref, incident_pk=claim.incident_pk,
                 provider=claim.provider, kind=claim.trigger.partition(":")[0],
                 state=made.state)  # fmt: skip
        return 0 if made.replayed else 1


__all__ = [
    "AfterCommitWake",
    "AutoReferrals",
    "Claimed",
    "claim_due",
    "disposition_hook",
    "first_decision_since",
    "referral_request",
    "scan_rule_triggers",
    "want_referrals",
]
