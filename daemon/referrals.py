"""Referrals to treatment providers: creation, the durable outbox and its worker, replies.

A referral is created (:func:`create_referral`, from the CLI or the daemon) with its HL7
message built once, validated strictly and stored with its MSH-10 in ``referral_messages``:
resends use those exact bytes. A Part 2 (SUD) referral is queued only under a recorded consent
that covers the provider and the purpose ``treatment``, and its message carries the §2.32
notice; without one it is held with the reason ``part2-no-consent``.

:class:`ReferralWorker` delivers the outbox. It claims due rows (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so several daemons can share one database) under a lease, at most one per provider
at a time, sends over one MLLP connection per provider and records the result before the
provider gets its next message:

- AA/CA: delivered, and the disclosure logged, in one transaction;
- AE/AR/CE/CR: held for a person with the peer's text (stored, never logged);
- no connection, a dropped connection or no ACK in time: the same bytes again later, after an
  exponential backoff with jitter (held after ``max_attempts`` when that is set).

A held row never blocks the others. A daemon killed at any instant leaves either a committed
result or a row in ``sending`` whose lease expires, after which it is sent again with the same
MSH-10: only what the peer did not acknowledge (as far as we committed) is resent.

:func:`store_inbound` records what the MLLP listener receives (verbatim, with parse errors) and
matches ACKs and RRI^I12 replies to referrals.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, Engine, and_, exists, func, or_, select
from sqlalchemy.orm import aliased
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from corespond.adapters import mllp
from corespond.adapters.framing import FramingError
from corespond.adapters.hl7_referral import (
    URGENCIES,
    BuildError,
    Hl7Reply,
    Person,
    ReferralContent,
    build_ack,
    build_message,
    log_token,
    parse_header,
    parse_reply,
)
from corespond.adapters.tls import client_tls_options, server_tls_options
from corespond.daemon.clock import Clock
from corespond.daemon.config import ProviderConfig, ReferralsConfig
from corespond.daemon.errors import RejectedMessage, SafeMessage
from corespond.daemon.store.tables import (
    ReferralMessageRow,
    hl7_inbound,
    referral_consents,
    referral_disclosures,
    referral_messages,
    referral_outcomes,
    referrals,
)

log = structlog.get_logger("corespond.referrals")

T = TypeVar("T")

ACCEPTED = ("AA", "CA")
PEER_ERRORS = ("AE", "AR", "CE", "CR")
PURPOSE = "treatment"
DELIVERY_WHAT = "HL7 {profile} referral"


class ReferralError(SafeMessage, ValueError):
    """A referral that cannot be created or changed; the text names ids only."""


# --- creating ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReferralRequest:
    incident_ref: str
    provider: str
    service_type: str
    referring_clinician: str
    urgency: str = "routine"
    person: Person = field(default_factory=Person)
    summary: str | None = None
    part2: bool = False
    consent_ref: str | None = None
    program: str | None = None
    region: str | None = None


@dataclass(frozen=True, slots=True)
class CreatedReferral:
    id: int
    ref: str
    state: str
    hold_reason: str | None
    control_id: str | None


def new_control_id() -> str:
    """A fresh MSH-10: 20 characters, unique without coordination between daemons."""
    return "CR" + uuid.uuid4().hex[:18].upper()


def new_referral_ref() -> str:
    return "R" + uuid.uuid4().hex[:15].upper()


def routing_problem(provider: ProviderConfig, request: ReferralRequest) -> str | None:
    """Why ``provider`` may not take ``request`` by its routing rules, or None."""
    checks = (
        ("service type", provider.service_types, request.service_type),
        ("program", provider.programs, request.program),
        ("region", provider.regions, request.region),
    )
    for what, allowed, value in checks:
        if allowed and value not in allowed:
            shown = value if value is not None else "(none given)"
            return f"provider {provider.name} does not take {what} {shown}"
    return None


def consent_covering(
    conn: Connection, consent_ref: str | None, provider: str, now: datetime
) -> tuple[int | None, str | None]:
    """(consent id, None) when ``consent_ref`` covers ``provider`` for treatment now, else
    (None, why not)."""
    if consent_ref is None:
        return None, "part2-no-consent: a Part 2 referral needs --consent"
    row = conn.execute(
        select(referral_consents).where(referral_consents.c.consent_ref == consent_ref)
    ).first()
    if row is None:
        return None, f"part2-no-consent: no consent {consent_ref} is recorded"
    if row.provider != provider or row.purpose != PURPOSE:
        return None, (
            f"part2-no-consent: consent {consent_ref} does not cover provider "
            f"{provider} for {PURPOSE}"
        )
    if row.revoked_at is not None and row.revoked_at <= now:
        return None, f"part2-no-consent: consent {consent_ref} was revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return None, f"part2-no-consent: consent {consent_ref} has expired"
    return int(row.id), None


def record_consent(
    conn: Connection,
    consent_ref: str,
    provider: str,
    now: datetime,
    *,
    purpose: str = PURPOSE,
    expires_at: datetime | None = None,
) -> int:
    return int(
        conn.execute(
            referral_consents.insert()
            .values(
                consent_ref=consent_ref,
                provider=provider,
                purpose=purpose,
                recorded_at=now,
                expires_at=expires_at,
            )
            .returning(referral_consents.c.id)
        ).scalar_one()
    )


def referral_content(
    config: ReferralsConfig,
    provider: ProviderConfig,
    request: ReferralRequest,
    referral_ref: str,
    control_id: str,
    now: datetime,
) -> ReferralContent:
    return ReferralContent(
        control_id=control_id,
        created_at=now,
        sending_application=config.sending_application,
        sending_facility=config.sending_facility,
        receiving_application=provider.receiving_application,
        receiving_facility=provider.receiving_facility,
        referral_ref=referral_ref,
        incident_ref=request.incident_ref,
        service_type=request.service_type,
        urgency=request.urgency,
        referring_clinician=request.referring_clinician,
        person=request.person,
        summary=request.summary,
        part2=request.part2,
        processing_id=config.processing_id,
    )


def create_referral(
    engine: Engine,
    config: ReferralsConfig,
    request: ReferralRequest,
    now: datetime,
    *,
    build: Callable[[ReferralContent, str], bytes] = build_message,
    on_stored: Callable[[Connection, str], None] | None = None,
) -> CreatedReferral:
    """Store a referral and, unless it must be held, its message in the outbox (due now).
    ``on_stored(conn, ref)`` runs in the same transaction (what asked for the referral marks
    itself done there: both commit or neither).

    Blocking (database and hl7apy): call it from a thread, never on the reactor.
    """
    provider = config.provider(request.provider)
    if provider is None:
        known = ", ".join(p.name for p in config.providers) or "none"
        raise ReferralError(f"unknown provider {request.provider} (configured: {known})")
    if request.urgency not in URGENCIES:
        raise ReferralError(f"unknown urgency {request.urgency}: one of {', '.join(URGENCIES)}")
    problem = routing_problem(provider, request)
    if problem is not None:
        raise ReferralError(problem)
    ref, control_id = new_referral_ref(), new_control_id()
    consent_id: int | None = None
    hold: str | None = None
    if request.part2:
        with engine.connect() as conn:
            consent_id, hold = consent_covering(conn, request.consent_ref, provider.name, now)
    message: bytes | None = None
    if hold is None:
        try:
            message = build(
                referral_content(config, provider, request, ref, control_id, now),
                provider.profile,
            )
        except BuildError as err:
            raise ReferralError(f"the message does not validate: {err}") from None
    with engine.begin() as conn:
        referral_id = int(
            conn.execute(
                referrals.insert()
                .values(
                    ref=ref,
                    incident_ref=request.incident_ref,
                    provider=provider.name,
                    service_type=request.service_type,
                    urgency=request.urgency,
                    program=request.program,
                    region=request.region,
                    referring_clinician=request.referring_clinician,
                    state="held" if hold else "queued",
                    hold_reason=hold,
                    part2=request.part2,
                    consent_id=consent_id,
                    created_at=now,
                    updated_at=now,
                    person={k: v for k, v in asdict(request.person).items() if v is not None},
                    summary=request.summary,
                )
                .returning(referrals.c.id)
            ).scalar_one()
        )
        if message is not None:
            _queue_message(conn, referral_id, provider, control_id, message, now)
        if on_stored is not None:
            on_stored(conn, ref)
    log.info(
        "referral.created",
        referral_id=ref,
        provider=provider.name,
        state="held" if hold else "queued",
        reason=hold,
    )
    return CreatedReferral(
        referral_id,
        ref,
        "held" if hold else "queued",
        hold,
        control_id if message is not None else None,
    )


def _queue_message(
    conn: Connection,
    referral_id: int,
    provider: ProviderConfig,
    control_id: str,
    message: bytes,
    now: datetime,
) -> None:
    conn.execute(
        referral_messages.insert().values(
            referral_id=referral_id,
            control_id=control_id,
            provider=provider.name,
            profile=provider.profile,
            state="pending",
            attempts=0,
            next_due=now,
            created_at=now,
            message=message,
        )
    )


# --- operator actions --------------------------------------------------------------------------


def _referral_row(conn: Connection, ref: str) -> Any:
    row = conn.execute(select(referrals).where(referrals.c.ref == ref)).first()
    if row is None:
        raise ReferralError(f"no referral {ref}")
    return row


def retry_referral(
    engine: Engine,
    config: ReferralsConfig,
    ref: str,
    now: datetime,
    *,
    consent_ref: str | None = None,
    build: Callable[[ReferralContent, str], bytes] = build_message,
) -> CreatedReferral:
    """Send a held referral again: the same message (same MSH-10) when one was built, else
    (held for consent) a check of the consent and a new message."""
    with engine.connect() as conn:
        row = _referral_row(conn, ref)
        message = conn.execute(
            select(referral_messages).where(referral_messages.c.referral_id == row.id)
        ).first()
    if row.state not in ("held",):
        raise ReferralError(f"referral {ref} is {row.state}: only held referrals are retried")
    if message is not None:
        with engine.begin() as conn:
            conn.execute(
                referral_messages.update()
                .where(referral_messages.c.id == message.id)
                .values(
                    state="pending", next_due=now, attempts=0, lease_until=None, claimed_by=None
                )
            )
            conn.execute(
                referrals.update()
                .where(referrals.c.id == row.id)
                .values(state="queued", hold_reason=None, peer_error=None, updated_at=now)
            )
        log.info("referral.retried", referral_id=ref, control_id=message.control_id)
        return CreatedReferral(row.id, ref, "queued", None, message.control_id)
    if consent_ref is None:
        raise ReferralError(
            f"referral {ref} is held for consent: record the consent and give "
            "it with --consent (a Part 2 referral is never sent without one)"
        )
    return attach_consent(engine, config, ref, consent_ref, now, build=build)


def attach_consent(
    engine: Engine,
    config: ReferralsConfig,
    ref: str,
    consent_ref: str,
    now: datetime,
    *,
    build: Callable[[ReferralContent, str], bytes] = build_message,
) -> CreatedReferral:
    """Queue a referral held for want of consent, now that ``consent_ref`` is recorded."""
    with engine.connect() as conn:
        row = _referral_row(conn, ref)
        has_message = conn.execute(
            select(exists().where(referral_messages.c.referral_id == row.id))
        ).scalar()
        if row.state != "held" or has_message:
            raise ReferralError(f"referral {ref} is not held for consent")
        consent_id, why = consent_covering(conn, consent_ref, row.provider, now)
    if why is not None:
        raise ReferralError(why)
    provider = config.provider(row.provider)
    if provider is None:
        raise ReferralError(f"provider {row.provider} is no longer configured")
    request = ReferralRequest(
        incident_ref=row.incident_ref,
        provider=row.provider,
        service_type=row.service_type,
        referring_clinician=row.referring_clinician,
        urgency=row.urgency,
        person=Person(**row.person),
        summary=row.summary,
        part2=row.part2,
        consent_ref=consent_ref,
    )
    control_id = new_control_id()
    message = build(
        referral_content(config, provider, request, ref, control_id, now), provider.profile
    )
    with engine.begin() as conn:
        _queue_message(conn, row.id, provider, control_id, message, now)
        conn.execute(
            referrals.update()
            .where(referrals.c.id == row.id)
            .values(state="queued", hold_reason=None, consent_id=consent_id, updated_at=now)
        )
    log.info("referral.consent.attached", referral_id=ref, control_id=control_id)
    return CreatedReferral(row.id, ref, "queued", None, control_id)


def cancel_referral(engine: Engine, ref: str, now: datetime) -> str:
    """Cancel a referral not yet delivered; returns its previous state."""
    with engine.begin() as conn:
        row = _referral_row(conn, ref)
        if row.state in ("delivered", "cancelled"):
            raise ReferralError(f"referral {ref} is already {row.state}")
        conn.execute(
            referral_messages.update()
            .where(
                referral_messages.c.referral_id == row.id,
                referral_messages.c.state.in_(("pending", "held")),
            )
            .values(state="cancelled")
        )
        conn.execute(
            referrals.update()
            .where(referrals.c.id == row.id)
            .values(state="cancelled", updated_at=now)
        )
    log.info("referral.cancelled", referral_id=ref, state=row.state)
    return str(row.state)


def list_referrals(
    conn: Connection, *, state: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Newest first, without PHI: what an operator lists."""
    m = aliased(ReferralMessageRow)
    query = (
        select(
            referrals.c.ref,
            referrals.c.incident_ref,
            referrals.c.provider,
            referrals.c.service_type,
            referrals.c.urgency,
            referrals.c.state,
            referrals.c.hold_reason,
            referrals.c.part2,
            referrals.c.outcome,
            referrals.c.created_at,
            referrals.c.delivered_at,
            m.control_id,
            m.attempts,
            m.state.label("message_state"),
            m.ack_code,
            m.last_error,
            m.next_due,
        )
        .outerjoin(m, m.referral_id == referrals.c.id)
        .order_by(referrals.c.id.desc())
        .limit(limit)
    )
    if state is not None:
        query = query.where(referrals.c.state == state)
    return [dict(r._mapping) for r in conn.execute(query)]


def show_referral(conn: Connection, ref: str, *, with_phi: bool = False) -> dict[str, Any]:
    row = _referral_row(conn, ref)
    out = {k: v for k, v in row._mapping.items() if k not in ("person", "summary", "peer_error")}
    if with_phi:
        out.update(person=row.person, summary=row.summary, peer_error=row.peer_error)
    out["messages"] = [
        {k: v for k, v in r._mapping.items() if k != "message"}
        for r in conn.execute(
            select(referral_messages).where(referral_messages.c.referral_id == row.id)
        )
    ]
    out["disclosures"] = [
        dict(r._mapping)
        for r in conn.execute(
            select(referral_disclosures).where(referral_disclosures.c.referral_id == row.id)
        )
    ]
    out["outcomes"] = [
        dict(r._mapping)
        for r in conn.execute(
            select(referral_outcomes).where(referral_outcomes.c.referral_id == row.id)
        )
    ]
    return out


# --- the outbox --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    referral_id: int
    control_id: str
    provider: str
    profile: str
    attempts: int
    message: bytes


def claim_due(
    conn: Connection,
    now: datetime,
    worker_id: str,
    *,
    busy: frozenset[str] = frozenset(),
    lease: timedelta,
    limit: int = 50,
    provider: str | None = None,
) -> list[Claimed]:
    """Claim due rows, at most one per provider and none for a provider in ``busy`` or with a
    live claim elsewhere; rows locked by another daemon are skipped (PostgreSQL)."""
    m, other = referral_messages, referral_messages.alias("other")
    due = or_(
        and_(m.c.state == "pending", m.c.next_due <= now),
        and_(m.c.state == "sending", m.c.lease_until <= now),  # its claimer died
    )
    live_elsewhere = exists().where(
        other.c.provider == m.c.provider,
        other.c.state == "sending",
        other.c.lease_until > now,
    )
    query = (
        select(m.c.id, m.c.provider)
        .where(due, ~live_elsewhere)
        .order_by(m.c.next_due, m.c.id)
        .limit(limit)
    )
    if busy:
        query = query.where(m.c.provider.not_in(sorted(busy)))
    if provider is not None:
        query = query.where(m.c.provider == provider)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=m)
    chosen: dict[str, int] = {}
    for row in conn.execute(query):
        chosen.setdefault(row.provider, row.id)
    if conn.dialect.name == "postgresql":
        chosen = {p: i for p, i in chosen.items() if _provider_free(conn, p, now)}
    if not chosen:
        return []
    ids = sorted(chosen.values())
    conn.execute(
        m.update()
        .where(m.c.id.in_(ids))
        .values(state="sending", lease_until=now + lease, claimed_by=worker_id)
    )
    return [
        Claimed(r.id, r.referral_id, r.control_id, r.provider, r.profile, r.attempts, r.message)
        for r in conn.execute(select(m).where(m.c.id.in_(ids)).order_by(m.c.id))
    ]


def _provider_free(conn: Connection, provider: str, now: datetime) -> bool:
    """PostgreSQL: hold the provider's claim lock for this transaction, then look again.

    Two daemons may each pick a different row of one provider before either commits (SKIP
    LOCKED hides the other's row, the live-claim check its uncommitted claim); the lock lets
    one of them through, and the second look sees a claim committed meanwhile.
    """
    key = func.hashtext("corespond.referrals:" + provider)
    if not conn.execute(select(func.pg_try_advisory_xact_lock(key))).scalar():
        return False
    m = referral_messages
    live = select(
        exists().where(m.c.provider == provider, m.c.state == "sending", m.c.lease_until > now)
    )
    return not conn.execute(live).scalar()


def record_delivered(conn: Connection, claimed: Claimed, ack_code: str, now: datetime) -> None:
    """The peer accepted: the message and the referral are delivered, the disclosure logged."""
    conn.execute(
        referral_messages.update()
        .where(referral_messages.c.id == claimed.id)
        .values(
            state="delivered",
            ack_code=ack_code,
            acked_at=now,
            lease_until=None,
            attempts=claimed.attempts + 1,
            last_error=None,
        )
    )
    row = conn.execute(
        select(referrals.c.consent_id, referrals.c.part2).where(
            referrals.c.id == claimed.referral_id
        )
    ).one()
    conn.execute(
        referrals.update()
        .where(referrals.c.id == claimed.referral_id, referrals.c.state != "cancelled")
        .values(state="delivered", delivered_at=now, hold_reason=None, updated_at=now)
    )
    what = DELIVERY_WHAT.format(profile=claimed.profile)
    if row.part2:
        what += " with substance use disorder information (42 CFR Part 2)"
    conn.execute(
        referral_disclosures.insert().values(
            referral_id=claimed.referral_id,
            message_id=claimed.id,
            control_id=claimed.control_id,
            provider=claimed.provider,
            consent_id=row.consent_id,
            what=what,
            disclosed_at=now,
        )
    )


def record_held(
    conn: Connection,
    claimed: Claimed,
    reason: str,
    now: datetime,
    *,
    ack_code: str | None = None,
    peer_text: str | None = None,
) -> None:
    conn.execute(
        referral_messages.update()
        .where(referral_messages.c.id == claimed.id)
        .values(
            state="held",
            ack_code=ack_code,
            lease_until=None,
            attempts=claimed.attempts + 1,
            last_error=reason,
        )
    )
    conn.execute(
        referrals.update()
        .where(referrals.c.id == claimed.referral_id, referrals.c.state != "cancelled")
        .values(state="held", hold_reason=reason, peer_error=peer_text, updated_at=now)
    )


def record_retry(
    conn: Connection, claimed: Claimed, error: str, next_due: datetime, *, count: bool = True
) -> None:
    conn.execute(
        referral_messages.update()
        .where(referral_messages.c.id == claimed.id, referral_messages.c.state == "sending")
        .values(
            state="pending",
            next_due=next_due,
            lease_until=None,
            attempts=claimed.attempts + (1 if count else 0),
            last_error=error,
        )
    )


def backoff_delay(
    attempts: int, initial: float, maximum: float, rand: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with jitter: in [d/2, d] for d = min(maximum, initial * 2^(n-1))."""
    ceiling = min(maximum, initial * 2 ** max(0, min(attempts - 1, 62)))
    return ceiling * (0.5 + 0.5 * rand())


ConnectFn = Callable[[ProviderConfig], "Deferred[mllp.MLLPClientProtocol]"]


class ReferralWorker:
    """Delivers the outbox: polls for due rows, one message in flight per provider."""

    def __init__(
        self,
        engine: Engine,
        reactor: Any,
        config: ReferralsConfig,
        *,
        clock: Any = None,
        worker_id: str | None = None,
        connect: ConnectFn | None = None,
        rand: Callable[[], float] = random.random,
        lease_margin: float = 30.0,
    ) -> None:
        self.engine = engine
        self.reactor = reactor
        self.config = config
        self._timer = clock or reactor  # an IReactorTime: tests pass a task.Clock
        self.clock = Clock(self._timer)
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self._connect = connect or self._connect_provider
        self._rand = rand
        self._lease_margin = lease_margin
        self._pool = ThreadPool(0, 2, name="corespond-referrals")
        self._links: dict[str, mllp.MLLPClientProtocol] = {}
        self._in_flight: dict[str, Deferred[None]] = {}
        self._polling = False
        self._again = False
        self._loop: Any = None
        self._tls: dict[str, Any] = {}
        self._stopping = False
        self.delivered = 0

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._pool.start()
        for provider in self.config.providers:  # bad TLS files fail now, not at first send
            if provider.tls is not None:
                self._tls[provider.name] = client_tls_options(
                    provider.tls.server_name,
                    provider.tls.ca_file,
                    provider.tls.cert_file,
                    provider.tls.key_file,
                )
        self._loop = self.clock.looping_call(self.config.poll_interval, self.poll, now=True)

    def stop(self) -> Deferred[None]:
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for link in list(self._links.values()):
            link.close()
        pending = list(self._in_flight.values())

        def stopped(_: object) -> None:
            self._pool.stop()

        d: Deferred[Any] = DeferredList(pending, consumeErrors=True)
        return d.addCallback(stopped)

    def wake(self) -> None:
        """Look for due work now (after a referral was created, say)."""
        self.poll()

    # --- polling -------------------------------------------------------------------------------

    def _in_thread(self, fn: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self._pool, fn)

    def poll(self) -> Deferred[None]:
        if self._polling:
            self._again = True
            return succeed(None)
        self._polling = True
        return ensureDeferred(self._poll())

    async def _poll(self) -> None:
        try:
            while True:
                self._again = False
                now = self.clock.now()
                busy = frozenset(self._in_flight)
                lease = self._lease()

                try:
                    claimed = await self._in_thread(partial(self._claim, now, busy, lease))
                except Exception as err:
                    log.error("referral.claim.failed", error=type(err).__name__)
                    return
                for item in claimed:
                    d = ensureDeferred(self._deliver(item))
                    self._in_flight[item.provider] = d
                    d.addBoth(self._delivered, item.provider)
                if not self._again:
                    return
        finally:
            self._polling = False

    def _lease(self) -> timedelta:
        """How long a claim holds: the longest connect and ACK wait, and a margin."""
        longest = max(
            (p.ack_timeout + p.connect_timeout for p in self.config.providers), default=60.0
        )
        return timedelta(seconds=longest + self._lease_margin)

    def _claim(self, now: datetime, busy: frozenset[str], lease: timedelta) -> list[Claimed]:
        with self.engine.begin() as conn:
            return claim_due(conn, now, self.worker_id, busy=busy, lease=lease)

    def _delivered(self, result: object, provider: str) -> None:
        self._in_flight.pop(provider, None)
        if isinstance(result, Failure):  # _deliver catches everything it expects
            log.error(
                "referral.worker.failed", provider=provider, error=type(result.value).__name__
            )
        self.clock.call_later(0, self.poll)

    # --- one delivery --------------------------------------------------------------------------

    async def _deliver(self, first: Claimed) -> None:
        """Send ``first``, then whatever else is due for its provider: each result is committed
        in the transaction that claims the next message, before that message goes."""
        item: Claimed | None = first
        while item is not None:
            item = await self._deliver_one(item)

    async def _deliver_one(self, item: Claimed) -> Claimed | None:
        provider = self.config.provider(item.provider)
        if provider is None:
            await self._commit(
                lambda c: record_held(
                    c, item, "unknown-provider: the provider is not configured", self.clock.now()
                )
            )
            return None
        try:
            link = self._links.get(provider.name)
            if link is None or not link.connected_:
                link = await self._connect(provider)
                self._links[provider.name] = link
            reply = await link.send(item.message, item.control_id, provider.ack_timeout)
        except Exception as err:
            await self._failed(item, provider, err)
            return None
        code = reply.ack_code or ""
        now = self.clock.now()
        if code in ACCEPTED:
            record = partial(record_delivered, claimed=item, ack_code=code, now=now)
        else:
            reason = f"peer-error: the provider answered {code}"
            record = partial(
                record_held,
                claimed=item,
                reason=reason,
                now=now,
                ack_code=code,
                peer_text=reply.ack_text,
            )
        next_item = await self._in_thread(partial(self._record_and_claim, record, provider, now))
        if code in ACCEPTED:
            self.delivered += 1
            log.info(
                "referral.delivered",
                control_id=item.control_id,
                provider=provider.name,
                code=code,
                attempt=item.attempts + 1,
            )
        else:
            log.warning(
                "referral.held", control_id=item.control_id, provider=provider.name, code=code
            )
        return next_item

    def _record_and_claim(
        self, record: Callable[..., None], provider: ProviderConfig, now: datetime
    ) -> Claimed | None:
        """One transaction: the result of this message, and the claim of the provider's next."""
        with self.engine.begin() as conn:
            record(conn)
            if not self._loop or not self._loop.running:
                return None  # stopping: claim nothing more
            claimed = claim_due(
                conn, now, self.worker_id, lease=self._lease(), limit=1, provider=provider.name
            )
        return claimed[0] if claimed else None

    async def _failed(self, item: Claimed, provider: ProviderConfig, err: Exception) -> None:
        link = self._links.pop(provider.name, None)
        if link is not None:
            link.close()
        code = getattr(err, "code", None) or f"connect-failed ({type(err).__name__})"
        now = self.clock.now()
        if self._stopping:
            # Our own shutdown cut it short: due again at once, and not counted as an attempt.
            await self._commit(lambda c: record_retry(c, item, "daemon-stopped", now, count=False))
            return
        attempts = item.attempts + 1
        if provider.max_attempts and attempts >= provider.max_attempts:
            reason = f"undeliverable: {code} after {attempts} attempts"
            await self._commit(lambda c: record_held(c, item, reason, now))
            log.warning(
                "referral.held",
                control_id=item.control_id,
                provider=provider.name,
                reason=code,
                attempt=attempts,
            )
            return
        delay = backoff_delay(attempts, provider.backoff_initial, provider.backoff_max, self._rand)
        due = now + timedelta(seconds=delay)
        await self._commit(lambda c: record_retry(c, item, code, due))
        log.warning(
            "referral.retry",
            control_id=item.control_id,
            provider=provider.name,
            reason=code,
            attempt=attempts,
            seconds=round(delay, 3),
        )

    async def _commit(self, fn: Callable[[Connection], None]) -> None:
        def run() -> None:
            with self.engine.begin() as conn:
                fn(conn)

        await self._in_thread(run)

    def _connect_provider(self, provider: ProviderConfig) -> Deferred[mllp.MLLPClientProtocol]:
        return mllp.connect(
            self.reactor,
            provider.host,
            provider.port,
            tls=self._tls.get(provider.name),
            timeout=provider.connect_timeout,
            clock=self._timer,
        )


# --- inbound (the MLLP listener) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InboundResult:
    inbound_id: int
    referral_id: int | None
    outcome: str | None
    ack: bytes | None


def store_inbound(
    engine: Engine,
    raw: bytes | FramingError,
    peer: str | None,
    now: datetime,
    *,
    sending_application: str = "CORESPOND",
    sending_facility: str = "",
) -> InboundResult:
    """Keep what arrived, match it to a referral, and give the ACK to send (after commit).

    Blocking: run it in a thread. ACKs are never answered (no ACK of an ACK).
    """
    reply: Hl7Reply | None = None
    header: Hl7Reply | None = None
    error: RejectedMessage | None = None
    if isinstance(raw, FramingError):
        error = RejectedMessage(raw.code, raw.reason)
        data = b""
    else:
        data = raw
        try:
            reply = parse_reply(data)
            if reply.control_id is None:
                raise RejectedMessage(
                    "missing-field", "MSH-10 (message control id) is empty", "MSH-10"
                )
        except RejectedMessage as err:
            error = err
            header = parse_header(data)  # to name the message in the AE
    referral_id: int | None = None
    outcome: str | None = None
    known = reply or header
    with engine.begin() as conn:
        if reply is not None and error is None:
            referral_id = _match(conn, reply)
            if reply.message_type == "RRI" and referral_id is None:
                error = RejectedMessage(
                    "unknown-referral", "RF1-6 and MSA-2 name no referral sent from here", "RF1-6"
                )
        inbound_id = int(
            conn.execute(
                hl7_inbound.insert()
                .values(
                    received_at=now,
                    peer=peer,
                    message_type=known.message_type if known else None,
                    control_id=known.control_id if known else None,
                    acked_control_id=known.acked_control_id if known else None,
                    referral_id=referral_id,
                    error_code=error.code if error else None,
                    error_reason=error.reason if error else None,
                    raw=data,
                )
                .returning(hl7_inbound.c.id)
            ).scalar_one()
        )
        if error is None and reply is not None and reply.message_type == "RRI":
            assert referral_id is not None
            if reply.referral_status is not None:
                outcome = reply.referral_status
                conn.execute(
                    referral_outcomes.insert().values(
                        referral_id=referral_id,
                        inbound_id=inbound_id,
                        status=outcome,
                        appointment_at=reply.appointment_at,
                        received_at=now,
                    )
                )
                conn.execute(
                    referrals.update()
                    .where(referrals.c.id == referral_id)
                    .values(
                        outcome=outcome,
                        outcome_at=now,
                        updated_at=now,
                        appointment_at=reply.appointment_at,
                    )
                )
    ack: bytes | None = None
    is_ack = reply is not None and reply.message_type == "ACK"
    if not is_ack:
        code = "AA"
        if error is not None:
            # AR: not HL7 we can read at all; AE: readable, but wrong.
            code = "AR" if reply is None and header is None else "AE"
        ack = build_ack(
            reply or header,
            code,
            new_control_id(),
            now,
            text=str(error) if error else None,
            sending_application=sending_application,
            sending_facility=sending_facility,
        )
    log.info(
        "hl7.inbound.stored",
        peer=peer,
        kind=log_token(known.message_type) if known else None,
        control_id=log_token(known.control_id) if known else None,
        referral_pk=referral_id,
        code=error.code if error else None,
        state=outcome,
    )
    return InboundResult(inbound_id, referral_id, outcome, ack)


def _match(conn: Connection, reply: Hl7Reply) -> int | None:
    if reply.originating_referral_id:
        found = conn.execute(
            select(referrals.c.id).where(referrals.c.ref == reply.originating_referral_id)
        ).scalar()
        if found is not None:
            return int(found)
    if reply.acked_control_id:
        found = conn.execute(
            select(referral_messages.c.referral_id).where(
                referral_messages.c.control_id == reply.acked_control_id
            )
        ).scalar()
        if found is not None:
            return int(found)
    return None


class ReferralListener:
    """The MLLP listener's handler: store first, answer after the commit."""

    def __init__(
        self, engine: Engine, reactor: Any, config: ReferralsConfig, clock: Any = None
    ) -> None:
        self.engine = engine
        self.reactor = reactor
        self.config = config
        self.clock = Clock(clock or reactor)
        self._pool = ThreadPool(0, 1, name="corespond-hl7-inbound")
        self._port: Any = None

    def start(self) -> None:
        """Listen where ``config.listen`` says (TLS and client certificates as configured)."""
        self._pool.start()
        listen = self.config.listen
        if listen is None:
            return
        tls = None
        if listen.tls is not None:
            tls = server_tls_options(
                listen.tls.cert_file,
                listen.tls.key_file,
                listen.tls.client_ca_file,
                listen.tls.require_client_cert,
            )
        self._port = mllp.listen(
            self.reactor, listen.port, self.factory(), interface=listen.host, tls=tls
        )
        log.info(
            "hl7.listener.started",
            host=listen.host,
            port=self.port,
            transport="tls" if tls else "tcp",
        )

    @property
    def port(self) -> int | None:
        return int(self._port.getHost().port) if self._port is not None else None

    def factory(self) -> mllp.MLLPServerFactory:
        return mllp.MLLPServerFactory(self.handle, self.config.max_message_bytes)

    def handle(self, frame: bytes | FramingError, peer: str | None) -> Deferred[bytes | None]:
        now = self.clock.now()

        def store() -> bytes | None:
            return store_inbound(
                self.engine,
                frame,
                peer,
                now,
                sending_application=self.config.sending_application,
                sending_facility=self.config.sending_facility,
            ).ack

        return deferToThreadPool(self.reactor, self._pool, store)

    async def stop(self) -> None:
        if self._port is not None:
            await self._port.stopListening()
            self._port = None
        self._pool.stop()


def person_of_incident(conn: Connection, incident: str) -> tuple[Person, str | None] | None:
    """The first person recorded on the incident's current snapshot, and its zone."""
    from corespond.daemon.store.tables import incidents, snapshots

    row = conn.execute(
        select(incidents.c.current_snapshot_id, incidents.c.zone)
        .where(or_(incidents.c.incident_number == incident, incidents.c.external_id == incident))
        .order_by(incidents.c.last_received_at.desc())
    ).first()
    if row is None:
        return None
    protected = (
        conn.execute(
            select(snapshots.c.protected).where(snapshots.c.id == row.current_snapshot_id)
        ).scalar()
        or {}
    )
    persons = protected.get("persons") or []
    chosen = next(
        (p for p in persons if "patient" in (p.get("roles") or [])), persons[0] if persons else {}
    )
    name = (chosen.get("name") or "").strip()
    given, _, family = name.rpartition(" ") if " " in name else ("", "", name)
    return Person(
        family=family or None,
        given=given or None,
        birth_date=chosen.get("birth_date"),
        phone=chosen.get("phone"),
        street=protected.get("address"),
    ), row.zone


class ReferralService:
    """The outbox worker and the inbound listener, started and stopped with the daemon."""

    def __init__(
        self,
        engine: Engine,
        reactor: Any,
        config: ReferralsConfig,
        clock: Any = None,
        build: Callable[[ReferralContent, str], bytes] = build_message,
    ) -> None:
        self.engine = engine
        self.config = config
        self._build = build
        self.worker = ReferralWorker(engine, reactor, config, clock=clock)
        self.listener = ReferralListener(engine, reactor, config, clock=clock)

    def create(self, request: ReferralRequest) -> Deferred[CreatedReferral]:
        """Create a referral from inside the daemon (an API, a rule): the hl7apy build and the
        insert run in the worker's thread pool, never on the reactor; then the worker looks."""
        now = self.worker.clock.now()
        done = self.worker._in_thread(
            lambda: create_referral(self.engine, self.config, request, now, build=self._build)
        )

        def wake(created: CreatedReferral) -> CreatedReferral:
            self.worker.wake()
            return created

        return done.addCallback(wake)

    def create_from_request(self, request: ReferralRequest) -> Deferred[CreatedReferral]:
        """Like :meth:`create`, for a request that may leave out the person (the API): then
        the person recorded on the incident's current snapshot, and its zone as the region."""
        if request.person != Person():
            return self.create(request)

        def with_person(found: tuple[Person, str | None] | None) -> ReferralRequest:
            if found is None:
                return request
            person, zone = found
            return replace(request, person=person, region=request.region or zone)

        d = self.person_of(request.incident_ref).addCallback(with_person)
        return d.addCallback(self.create)

    def person_of(self, incident_ref: str) -> Deferred[tuple[Person, str | None] | None]:
        """The person recorded on the incident's current snapshot and its zone (the referral
        form shows it to be confirmed), read in the worker's thread pool."""

        def look() -> tuple[Person, str | None] | None:
            with self.engine.connect() as conn:
                return person_of_incident(conn, incident_ref)

        return self.worker._in_thread(look)

    def start(self) -> None:
        self.worker.start()
        self.listener.start()

    async def stop(self) -> None:
        await self.listener.stop()
        await self.worker.stop()
