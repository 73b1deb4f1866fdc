"""Referrals to treatment providers: creation, the durable outbox and its worker, replies.

A referral is created (:func:`create_referral` from the CLI; :meth:`ReferralService.create`
in the daemon, which stores the referral first and builds in a builder process) with its HL7
message built once, validated strictly and stored with its MSH-10 in ``referral_messages``:
resends use those exact bytes. A Part 2 (SUD) referral is queued only under a recorded consent
that covers the provider and the purpose ``treatment``, and its message carries the §2.32
notice; without one it is held with the reason ``part2-no-consent``.

:class:`ReferralWorker` delivers the outbox. It claims due rows (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so several daemons can share one database) under a lease, a few per provider
(``claim_ahead``) for one worker at a time, sends them one at a time over one MLLP connection
per provider and commits the results in groups while the next message is on the wire:

- AA/CA: delivered, and the disclosure logged, in one transaction;
- AE/AR/CE/CR: held for a person with the peer's text (stored, never logged);
- no connection, a dropped connection or no ACK in time: the same bytes again later, after an
  exponential backoff with jitter (held after ``max_attempts`` when that is set).

A held row never blocks the others. A daemon killed at any instant leaves either a committed
result or a row in ``sending`` whose lease expires, after which it is sent again with the same
bytes and MSH-10: only what the peer did not acknowledge (as far as we committed) is resent,
which includes at most ``claim_ahead`` messages per provider whose ACK had arrived and whose
result was not yet committed (see :class:`ReferralWorker`).

:func:`store_inbound` records what the MLLP listener receives (verbatim, with parse errors) and
matches ACKs and RRI^I12 replies to referrals.
"""

from __future__ import annotations

import functools
import hashlib
import random
import uuid
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import orjson
import structlog
from sqlalchemy import Connection, Engine, Integer, and_, bindparam, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
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
from corespond.daemon.log import LineLogger, lines_held
from corespond.daemon.referral_metrics import ReferralMetrics
from corespond.daemon.referral_trace import ReactorSpans
from corespond.daemon.rollups import keeping_referral_flags
from corespond.daemon.store.engine import json_text
from corespond.daemon.store.tables import (
    ReferralMessageRow,
    hl7_inbound,
    referral_consents,
    referral_disclosures,
    referral_idempotency,
    referral_messages,
    referral_outcomes,
    referrals,
    sqlite_datetime_text,
)

log = structlog.get_logger("corespond.referrals")
# The two lines of every referral, by the log's short way (LineLogger.fixed: the same line for
# about half the instructions), on the reactor in a turn of their own (ReferralWorker.note).
_lines = LineLogger("corespond.referrals")
_created_line = _lines.fixed(
    "referral.created", "referral_id", "provider", "state", "reason", "control_id"
)
_delivered_line = _lines.fixed("referral.delivered", "control_id", "provider", "code", "attempt")

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
    # "<origin>:<caller's key>" (API: Idempotency-Key; form: its submission nonce): a second
    # request with the same key gets the first referral back instead of a new one.
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class CreatedReferral:
    id: int
    ref: str
    state: str
    hold_reason: str | None
    control_id: str | None
    replayed: bool = False  # made before, under the same idempotency key


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


def checked_provider(config: ReferralsConfig, request: ReferralRequest) -> ProviderConfig:
    """The provider ``request`` names, if it exists and its routing rules take the request."""
    provider = config.provider(request.provider)
    if provider is None:
        known = ", ".join(p.name for p in config.providers) or "none"
        raise ReferralError(f"unknown provider {request.provider} (configured: {known})")
    if request.urgency not in URGENCIES:
        raise ReferralError(f"unknown urgency {request.urgency}: one of {', '.join(URGENCIES)}")
    problem = routing_problem(provider, request)
    if problem is not None:
        raise ReferralError(problem)
    return provider


def _insert_referral(
    conn: Connection,
    provider: ProviderConfig,
    request: ReferralRequest,
    ref: str,
    now: datetime,
    hold: str | None,
    consent_id: int | None,
) -> int:
    person = request.person
    values = dict(
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
        person={k: v for k in _PERSON_FIELDS if (v := getattr(person, k)) is not None},
        summary=request.summary,
    )
    with keeping_referral_flags(conn, incident_ref=request.incident_ref):
        if _driver_level(conn):
            return _insert_referral_sqlite(conn, values)
        return int(conn.execute(_INSERT_REFERRAL, values).scalar_one())


_PERSON_FIELDS = tuple(f.name for f in fields(Person))


@functools.cache
def _sqlite_insert(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({_marks(len(columns))})"


def _insert_referral_sqlite(conn: Connection, values: dict[str, Any]) -> int:
    """``values`` bound as UTCDateTime, JSON and Boolean bind them on SQLite."""
    bound = dict(
        values,
        part2=int(values["part2"]),
        created_at=sqlite_datetime_text(values["created_at"]),
        updated_at=sqlite_datetime_text(values["updated_at"]),
        person=json_text(values["person"]),
    )
    # Through SQLAlchemy, _INSERT_REFERRAL took about 0.2 ms of the writer's CPU.
    cursor = _cursor(conn)
    cursor.execute(_sqlite_insert("referrals", tuple(bound)), tuple(bound.values()))
    return int(cursor.lastrowid)


# Statements built once, their values bound per call: ``insert().values(row)`` built and
# cache-keyed a new statement for every referral (most of its transaction's CPU, on the
# writer that pages share).
_INSERT_REFERRAL = referrals.insert().returning(referrals.c.id)
_INSERT_MESSAGE = referral_messages.insert().returning(referral_messages.c.id)


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

    Blocking (database and hl7apy): for the CLI, or a thread; the daemon builds in its
    process pool instead (:meth:`ReferralService.create`).
    """
    provider = checked_provider(config, request)
    content = referral_content(
        config, provider, request, new_referral_ref(), new_control_id(), now
    )
    with engine.connect() as conn:
        earlier = earlier_referral(conn, request)  # a repeat builds nothing
        hold = None
        if earlier is None and request.part2:
            hold = consent_covering(conn, request.consent_ref, provider.name, now)[1]
    if earlier is not None:
        log.info("referral.replayed", referral_id=earlier.ref, state=earlier.state)
        return earlier
    message: bytes | None = None
    if hold is None:
        try:
            message = build(content, provider.profile)
        except BuildError as err:
            raise ReferralError(f"the message does not validate: {err}") from None
    created, _ = store_referral(
        engine, provider, request, content, message, now, on_stored=on_stored
    )
    log.info(
        "referral.created",
        referral_id=created.ref,
        provider=provider.name,
        state=created.state,
        reason=created.hold_reason,
    )
    return created


@dataclass(frozen=True, slots=True)
class Unbuilt:
    """A referral stored without its message yet: what the builder process needs."""

    id: int
    ref: str
    provider: str
    profile: str
    content: ReferralContent


def request_digest(request: ReferralRequest) -> str:
    """SHA-256 of a request as submitted, its idempotency key aside."""
    value = asdict(replace(request, idempotency_key=None))
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


_i = referral_idempotency
_EARLIER = (
    select(
        _i.c.digest, referrals.c.id, referrals.c.ref, referrals.c.state, referrals.c.hold_reason,
        referral_messages.c.control_id,
    )
    .join_from(_i, referrals, referrals.c.id == _i.c.referral_id)
    .outerjoin(referral_messages, referral_messages.c.referral_id == referrals.c.id)
    .where(_i.c.key == bindparam("b_key"))
)  # fmt: skip


def earlier_referral(conn: Connection, request: ReferralRequest) -> CreatedReferral | None:
    """The referral made before under ``request``'s idempotency key, or None; a
    :class:`ReferralError` when that key was used for a different request."""
    if request.idempotency_key is None:
        return None
    row = conn.execute(_EARLIER, {"b_key": request.idempotency_key}).first()
    if row is None:
        return None
    if row.digest != request_digest(request):
        raise ReferralError(
            f"the idempotency key was used for another request (referral {row.ref})"
        )
    return CreatedReferral(
        row.id, row.ref, row.state, row.hold_reason, row.control_id, replayed=True
    )


Claim = tuple[str, timedelta]  # (worker id, lease): claim a queued message for that worker


def store_referral(
    engine: Engine,
    provider: ProviderConfig,
    request: ReferralRequest,
    content: ReferralContent,
    message: bytes | None,
    now: datetime,
    *,
    on_stored: Callable[[Connection, str], None] | None = None,
    claim: Claim | None = None,
) -> tuple[CreatedReferral, Claimed | None]:
    """Store a referral and its built message, queued, in one transaction: the referral
    side's one write per referral. Held instead when it is Part 2 without a covering consent
    (the message is then not kept); stored without a message (``message`` None: its builder
    died) to be built again by :meth:`ReferralService.rebuild`. With ``claim``, the message
    is claimed for that worker in the same transaction, unless another worker is sending to
    the provider: the worker sends it without a claim of its own (see
    :meth:`ReferralWorker.adopt`). ``on_stored(conn, ref)`` runs in the transaction too.

    A request whose idempotency key was used before gets that referral back, and nothing
    is stored. Blocking (database): run it in a thread.
    """
    try:
        with engine.begin() as conn:
            return store_referral_in(
                conn, provider, request, content, message, now, on_stored=on_stored, claim=claim
            )
    except IntegrityError:
        # PostgreSQL: the same key, submitted twice at once; the first to commit wins.
        with engine.connect() as conn:
            earlier = earlier_referral(conn, request)
        if earlier is None:
            raise
        return earlier, None


def store_referral_in(
    conn: Connection,
    provider: ProviderConfig,
    request: ReferralRequest,
    content: ReferralContent,
    message: bytes | None,
    now: datetime,
    *,
    on_stored: Callable[[Connection, str], None] | None = None,
    claim: Claim | None = None,
) -> tuple[CreatedReferral, Claimed | None]:
    """:func:`store_referral`'s statements, in the caller's transaction on ``conn`` (on
    SQLite, a savepoint of the next ingest batch: see ``ReferralService(ride=...)``)."""
    ref, control_id = content.referral_ref, content.control_id
    earlier = earlier_referral(conn, request)
    if earlier is not None:
        return earlier, None
    consent_id: int | None = None
    hold: str | None = None
    if request.part2:
        consent_id, hold = consent_covering(conn, request.consent_ref, provider.name, now)
    referral_id = _insert_referral(conn, provider, request, ref, now, hold, consent_id)
    if request.idempotency_key is not None:
        conn.execute(
            _i.insert().values(
                key=request.idempotency_key, referral_id=referral_id,
                digest=request_digest(request), created_at=now,
            )
        )  # fmt: skip
    claimed = None
    if hold is None and message is not None:
        claimed = _queue_message(
            conn, referral_id, provider, control_id, message, now, claim=claim,
            part2=request.part2, consent_id=consent_id,
        )  # fmt: skip
    if on_stored is not None:
        on_stored(conn, ref)
    state = "held" if hold else "queued"
    queued_id = control_id if hold is None and message is not None else None
    return CreatedReferral(referral_id, ref, state, hold, queued_id), claimed


def queue_built(engine: Engine, unbuilt: Unbuilt, message: bytes, now: datetime) -> str | None:
    """Queue the message built for ``unbuilt``; the MSH-10 of the referral's message (this one,
    or one another builder queued first), or None when the referral is no longer queued.

    Blocking (database). The referral's row is locked (PostgreSQL), so that two builders of
    one referral (two daemons recovering it) queue one message.
    """
    with engine.begin() as conn:
        query = select(referrals.c.state).where(referrals.c.id == unbuilt.id)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        state = conn.execute(query).scalar()
        existing = conn.execute(
            select(referral_messages.c.control_id).where(
                referral_messages.c.referral_id == unbuilt.id
            )
        ).scalar()
        if existing is not None:
            return str(existing)
        if state != "queued":
            return None
        _queue_message(
            conn, unbuilt.id, (unbuilt.provider, unbuilt.profile), unbuilt.content.control_id,
            message, now,
        )  # fmt: skip
    return unbuilt.content.control_id


def hold_unbuildable(engine: Engine, referral_id: int, reason: str, now: datetime) -> None:
    """A stored referral (found again after a crash) whose message does not validate."""
    with engine.begin() as conn:
        conn.execute(
            referrals.update()
            .where(referrals.c.id == referral_id, referrals.c.state == "queued")
            .values(state="held", hold_reason=reason, updated_at=now)
        )


def unbuilt_referrals(
    engine: Engine, config: ReferralsConfig, skip: Collection[int], limit: int = 100
) -> list[Unbuilt]:
    """Queued referrals without a message (their builder died, or the daemon did): to build.

    Blocking (database). Each gets a fresh MSH-10: none was ever sent.
    """
    with engine.connect() as conn:
        rows = conn.execute(
            select(referrals)
            .where(
                referrals.c.state == "queued",
                ~exists().where(referral_messages.c.referral_id == referrals.c.id),
            )
            .order_by(referrals.c.id)
            .limit(limit)
        ).all()
    out = []
    for row in rows:
        provider = config.provider(row.provider)
        if row.id in skip or provider is None:
            continue
        request = request_of_row(row)
        content = referral_content(
            config, provider, request, row.ref, new_control_id(), row.created_at
        )
        out.append(Unbuilt(row.id, row.ref, provider.name, provider.profile, content))
    return out


def request_of_row(row: Any, consent_ref: str | None = None) -> ReferralRequest:
    return ReferralRequest(
        incident_ref=row.incident_ref,
        provider=row.provider,
        service_type=row.service_type,
        referring_clinician=row.referring_clinician,
        urgency=row.urgency,
        person=Person(**(row.person or {})),
        summary=row.summary,
        part2=row.part2,
        consent_ref=consent_ref,
        program=row.program,
        region=row.region,
    )


def _queue_message(
    conn: Connection,
    referral_id: int,
    provider: ProviderConfig | tuple[str, str],
    control_id: str,
    message: bytes,
    now: datetime,
    *,
    claim: Claim | None = None,
    part2: bool = False,
    consent_id: int | None = None,
) -> Claimed | None:
    """Queue ``message``, due now; with ``claim``, claimed for that worker when no other
    worker holds a live claim on the provider (the claim, or None)."""
    name, profile = (
        provider if isinstance(provider, tuple) else (provider.name, provider.profile)
    )
    lease_until: datetime | None = None
    worker_id = None
    if claim is not None:
        worker_id, lease = claim
        if _provider_free(conn, name, now, worker_id):
            lease_until = now + lease
    if _driver_level(conn):
        cursor = _cursor(conn)
        at = sqlite_datetime_text(now)
        cursor.execute(
            _SQLITE_QUEUE_MESSAGE,
            (
                referral_id, control_id, name, profile,
                "pending" if lease_until is None else "sending", at, at, message,
                sqlite_datetime_text(lease_until), None if lease_until is None else worker_id,
            ),
        )  # fmt: skip
        message_id = cursor.lastrowid
    else:
        message_id = _insert_message(
            conn, referral_id, control_id, name, profile, now, message, lease_until, worker_id
        )
    if lease_until is None:
        return None
    return Claimed(
        int(message_id), referral_id, control_id, name, profile, 0, message, part2, consent_id
    )


def _insert_message(
    conn: Connection, referral_id: int, control_id: str, name: str, profile: str,
    now: datetime, message: bytes, lease_until: datetime | None, worker_id: str | None,
) -> int:  # fmt: skip
    return conn.execute(
        _INSERT_MESSAGE,
        dict(
            referral_id=referral_id,
            control_id=control_id,
            provider=name,
            profile=profile,
            state="pending" if lease_until is None else "sending",
            attempts=0,
            next_due=now,
            created_at=now,
            message=message,
            lease_until=lease_until,
            claimed_by=None if lease_until is None else worker_id,
        ),
    ).scalar_one()


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
    request = request_of_row(row, consent_ref)
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
        with keeping_referral_flags(conn, incident_ref=row.incident_ref):
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
    part2: bool = False  # the referral's, for the disclosure log
    consent_id: int | None = None


# The outbox's hot statements, built once: building a SQLAlchemy statement (an alias above
# all) costs more CPU than executing it from the compiled cache. Parameters are bound by name.
_m, _r = referral_messages, referrals
_other = referral_messages.alias("other")
_NOW = bindparam("b_now", type_=_m.c.next_due.type)


def _candidates(postgres: bool, one_provider: bool) -> Any:
    due = or_(
        and_(_m.c.state == "pending", _m.c.next_due <= _NOW),
        and_(_m.c.state == "sending", _m.c.lease_until <= _NOW),  # its claimer died
    )
    live_elsewhere = exists().where(
        _other.c.provider == _m.c.provider,
        _other.c.state == "sending",
        _other.c.lease_until > _NOW,
        _other.c.claimed_by != bindparam("b_worker"),
    )
    query = (
        select(_m.c.id, _m.c.provider)
        .where(due, ~live_elsewhere, _m.c.provider.not_in(bindparam("b_busy", expanding=True)))
        .order_by(_m.c.next_due, _m.c.id)
        .limit(bindparam("b_limit", type_=Integer))
    )
    if one_provider:
        query = query.where(_m.c.provider == bindparam("b_provider"))
    if postgres:
        query = query.with_for_update(skip_locked=True, of=_m)
    return query


_CANDIDATES = {(pg, one): _candidates(pg, one) for pg in (False, True) for one in (False, True)}
_CLAIM = (
    _m.update()
    .where(_m.c.id.in_(bindparam("b_ids", expanding=True)))
    .values(state="sending", lease_until=bindparam("b_lease"), claimed_by=bindparam("b_worker"))
)
_CLAIMED_ROWS = (
    select(
        _m.c.id, _m.c.referral_id, _m.c.control_id, _m.c.provider, _m.c.profile, _m.c.attempts,
        _m.c.message, _r.c.part2, _r.c.consent_id,
    )
    .join_from(_m, _r, _r.c.id == _m.c.referral_id)
    .where(_m.c.id.in_(bindparam("b_ids", expanding=True)))
)  # fmt: skip
_RENEW = (
    _m.update()
    .where(
        _m.c.id.in_(bindparam("b_ids", expanding=True)),
        _m.c.state == "sending",
        _m.c.claimed_by == bindparam("b_worker"),
    )
    .values(lease_until=bindparam("b_lease"))
)
_MESSAGES_DELIVERED = (
    _m.update()
    .where(_m.c.id == bindparam("b_id"))
    .values(
        state="delivered",
        ack_code=bindparam("b_code"),
        acked_at=bindparam("b_at"),
        lease_until=None,
        attempts=bindparam("b_attempts"),
        last_error=None,
    )
)
_REFERRALS_DELIVERED = (
    _r.update()
    .where(_r.c.id == bindparam("b_id"), _r.c.state != "cancelled")
    .values(
        state="delivered",
        delivered_at=bindparam("b_at"),
        hold_reason=None,
        updated_at=bindparam("b_at"),
    )
)
_DISCLOSED = referral_disclosures.insert()
# Rows not yet delivered, by provider (the poll's gauge). Built once: building it took twice
# the CPU of the claim itself (0.5 ms against 0.24 ms).
_OUTBOX_DEPTH = (
    select(_m.c.provider, func.count())
    .where(_m.c.state.in_(("pending", "sending")))
    .group_by(_m.c.provider)
)


def claim_due(
    conn: Connection,
    now: datetime,
    worker_id: str,
    *,
    busy: frozenset[str] = frozenset(),
    lease: timedelta,
    limit: int = 50,
    provider: str | None = None,
    per_provider: int = 1,
) -> list[Claimed]:
    """Claim due rows, at most ``per_provider`` per provider (oldest first) and none for a
    provider in ``busy`` or with a live claim of another worker; rows locked by another daemon
    are skipped (PostgreSQL). The rows come back in the order they are to be sent."""
    postgres = conn.dialect.name == "postgresql"
    if provider is not None and not busy and _driver_level(conn):
        return _claim_sqlite(conn, now, worker_id, now + lease, provider, min(limit, per_provider))
    params: dict[str, Any] = {
        "b_now": now, "b_worker": worker_id, "b_busy": sorted(busy), "b_limit": limit,
    }  # fmt: skip
    if provider is not None:
        params["b_provider"] = provider
    chosen: dict[str, list[int]] = {}
    for row in conn.execute(_CANDIDATES[postgres, provider is not None], params):
        ids = chosen.setdefault(row.provider, [])
        if len(ids) < per_provider:
            ids.append(row.id)
    if postgres:
        chosen = {p: i for p, i in chosen.items() if _provider_free(conn, p, now, worker_id)}
    if not chosen:
        return []
    ids = sorted(i for group in chosen.values() for i in group)
    conn.execute(_CLAIM, {"b_ids": ids, "b_lease": now + lease, "b_worker": worker_id})
    rows = {r.id: r for r in conn.execute(_CLAIMED_ROWS, {"b_ids": ids})}
    return [Claimed(*r) for r in (rows[i] for group in chosen.values() for i in group)]


def _provider_free(conn: Connection, provider: str, now: datetime, worker_id: str) -> bool:
    """Whether no other worker holds a live claim on ``provider``. PostgreSQL: the
    provider's claim lock is held for this transaction first, then it looks.

    Two daemons may each pick a different row of one provider before either commits (SKIP
    LOCKED hides the other's row, the live-claim check its uncommitted claim); the lock lets
    one of them through, and the second look sees a claim committed meanwhile. (SQLite has
    one writer at a time: a look is enough.)
    """
    if conn.dialect.name == "postgresql":
        key = func.hashtext("corespond.referrals:" + provider)
        if not conn.execute(select(func.pg_try_advisory_xact_lock(key))).scalar():
            return False
    if _driver_level(conn):
        at = sqlite_datetime_text(now)
        live = _cursor(conn).execute(_SQLITE_LIVE_ELSEWHERE, (provider, at, worker_id))
        return live.fetchone() is None
    return not conn.execute(
        _LIVE_CLAIM, {"f_provider": provider, "f_now": now, "f_worker": worker_id}
    ).scalar()


_m = referral_messages
_LIVE_CLAIM = select(
    exists().where(
        _m.c.provider == bindparam("f_provider"),
        _m.c.state == "sending",
        _m.c.lease_until > bindparam("f_now"),
        _m.c.claimed_by != bindparam("f_worker"),
    )
)


def renew_claims(
    conn: Connection, ids: Collection[int], worker_id: str, lease_until: datetime
) -> None:
    """Extend the lease of claims this worker still holds (claimed ahead, not yet sent)."""
    if not ids:
        return
    if _driver_level(conn):
        _cursor(conn).execute(
            _SQLITE_RENEW.format(marks=_marks(len(ids))),
            (sqlite_datetime_text(lease_until), worker_id, *sorted(ids)),
        )
        return
    conn.execute(_RENEW, {"b_ids": sorted(ids), "b_worker": worker_id, "b_lease": lease_until})


# --- SQLite: the group commit's statements on the driver's cursor -----------------------------
#
# The same statements as _CANDIDATES (one provider, nothing busy), _CLAIM, _CLAIMED_ROWS,
# _RENEW, _MESSAGES_DELIVERED, _REFERRALS_DELIVERED and _DISCLOSED, for SQLite, where a group
# commit is the worker's one transaction per few referrals: through SQLAlchemy they cost
# about 2.4 ms of CPU per commit (its per-statement work and the expanding IN lists rendered
# at each execution), on a thread that holds the GIL the reactor needs for the next send.
# Times are bound as UTCDateTime binds them on SQLite (sqlite_datetime_text). PostgreSQL keeps
# the Core statements (FOR UPDATE SKIP LOCKED, the advisory lock).

# _CANDIDATES for one provider, in two steps: whether another worker holds a live claim on
# it (once, not per row), then its due rows. Pending rows come in the order of the (state,
# next_due) index, LIMIT applied, rather than every due row sorted in a temporary b-tree (an
# outbox of 300 due rows took about 370 us a claim that way); expired claims are few.
_SQLITE_LIVE_ELSEWHERE = (
    "SELECT 1 FROM referral_messages WHERE provider = ? AND state = 'sending'"
    " AND lease_until > ? AND claimed_by != ? LIMIT 1"
)
_SQLITE_CANDIDATES = (
    "SELECT id, next_due FROM (SELECT id, next_due FROM referral_messages"
    " WHERE state = 'pending' AND next_due <= ? AND provider = ? ORDER BY next_due, id LIMIT ?)"
    " UNION ALL SELECT id, next_due FROM referral_messages"
    " WHERE state = 'sending' AND lease_until <= ? AND provider = ?"
)
_SQLITE_CLAIM = (
    "UPDATE referral_messages SET state = 'sending', lease_until = ?, claimed_by = ?"
    " WHERE id IN ({marks})"
)
_SQLITE_CLAIMED_ROWS = (
    "SELECT m.id, m.referral_id, m.control_id, m.provider, m.profile, m.attempts, m.message,"
    " r.part2, r.consent_id FROM referral_messages AS m JOIN referrals AS r"
    " ON r.id = m.referral_id WHERE m.id IN ({marks})"
)
_SQLITE_RENEW = (
    "UPDATE referral_messages SET lease_until = ? WHERE state = 'sending' AND claimed_by = ?"
    " AND id IN ({marks})"
)
_SQLITE_MESSAGES_DELIVERED = (
    "UPDATE referral_messages SET state = 'delivered', ack_code = ?, acked_at = ?,"
    " lease_until = NULL, attempts = ?, last_error = NULL WHERE id = ?"
)
_SQLITE_REFERRALS_DELIVERED = (
    "UPDATE referrals SET state = 'delivered', delivered_at = ?, hold_reason = NULL,"
    " updated_at = ? WHERE id = ? AND state != 'cancelled'"
)
# _INSERT_MESSAGE (a new referral's message, on the writer inside an ingest batch): through
# SQLAlchemy about 0.35 ms of CPU, most of it its per-statement work.
_SQLITE_QUEUE_MESSAGE = (
    "INSERT INTO referral_messages (referral_id, control_id, provider, profile, state,"
    " attempts, next_due, created_at, message, lease_until, claimed_by)"
    " VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)"
)
_SQLITE_OUTBOX_DEPTH = (
    "SELECT provider, count(*) FROM referral_messages WHERE state IN ('pending', 'sending')"
    " GROUP BY provider"
)
_SQLITE_DISCLOSED = (
    "INSERT INTO referral_disclosures (referral_id, message_id, control_id, provider,"
    " consent_id, what, disclosed_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


SQLITE_DRIVER_LEVEL = True  # False: the Core statements on SQLite too (the tests compare them)


def _driver_level(conn: Connection) -> bool:
    return SQLITE_DRIVER_LEVEL and conn.dialect.name == "sqlite"


def _cursor(conn: Connection) -> Any:
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _claim_sqlite(
    conn: Connection, now: datetime, worker_id: str, lease_until: datetime, provider: str,
    limit: int,
) -> list[Claimed]:  # fmt: skip
    """:func:`claim_due` for one provider with nothing busy, on SQLite's own cursor."""
    cursor = _cursor(conn)
    at = sqlite_datetime_text(now)
    if cursor.execute(_SQLITE_LIVE_ELSEWHERE, (provider, at, worker_id)).fetchone():
        return []
    due = cursor.execute(_SQLITE_CANDIDATES, (at, provider, limit, at, provider)).fetchall()
    if not due:
        return []
    # In the order of _CANDIDATES, (next_due, id): the times are fixed-width text.
    order = [i for _, i in sorted((d, i) for i, d in due)[:limit]]
    ids = sorted(order)
    marks = _marks(len(ids))
    cursor.execute(
        _SQLITE_CLAIM.format(marks=marks), (sqlite_datetime_text(lease_until), worker_id, *ids)
    )
    rows = {r[0]: r for r in cursor.execute(_SQLITE_CLAIMED_ROWS.format(marks=marks), ids)}
    return [
        Claimed(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), bool(r[7]), r[8])
        for r in (rows[i] for i in order)
    ]


def record_delivered(conn: Connection, claimed: Claimed, ack_code: str, now: datetime) -> None:
    """The peer accepted: the message and the referral are delivered, the disclosure logged."""
    record_delivered_many(conn, [(claimed, ack_code, now)])


def record_delivered_many(
    conn: Connection, accepted: Sequence[tuple[Claimed, str, datetime]]
) -> None:
    """:func:`record_delivered` for a group of messages, a statement per table (the referral's
    Part 2 flag and consent came with the claim)."""
    if not accepted:
        return
    if _driver_level(conn):
        _delivered_sqlite(conn, accepted)
        return
    conn.execute(
        _MESSAGES_DELIVERED,
        [
            {"b_id": c.id, "b_code": code, "b_at": at, "b_attempts": c.attempts + 1}
            for c, code, at in accepted
        ],
    )
    conn.execute(
        _REFERRALS_DELIVERED, [{"b_id": c.referral_id, "b_at": at} for c, _, at in accepted]
    )
    columns = ("referral_id", "message_id", "control_id", "provider", "consent_id", "what")
    conn.execute(
        _DISCLOSED,
        [
            {**dict(zip(columns, _disclosure(c), strict=True)), "disclosed_at": at}
            for c, _, at in accepted
        ],
    )


def _disclosure(c: Claimed) -> tuple[int, int, str, str, int | None, str]:
    """The disclosure row of a delivered message, but its time (as _SQLITE_DISCLOSED binds)."""
    what = DELIVERY_WHAT.format(profile=c.profile)
    if c.part2:
        what += " with substance use disorder information (42 CFR Part 2)"
    return (c.referral_id, c.id, c.control_id, c.provider, c.consent_id, what)


def _delivered_sqlite(conn: Connection, accepted: Sequence[tuple[Claimed, str, datetime]]) -> None:
    cursor = _cursor(conn)
    times = [sqlite_datetime_text(at) for _, _, at in accepted]
    cursor.executemany(
        _SQLITE_MESSAGES_DELIVERED,
        [(code, t, c.attempts + 1, c.id) for (c, code, _), t in zip(accepted, times, strict=True)],
    )
    cursor.executemany(
        _SQLITE_REFERRALS_DELIVERED,
        [(t, t, c.referral_id) for (c, _, _), t in zip(accepted, times, strict=True)],
    )
    cursor.executemany(
        _SQLITE_DISCLOSED,
        [(*_disclosure(c), t) for (c, _, _), t in zip(accepted, times, strict=True)],
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
# The longest a result waits for others to share its transaction (see _commit_now); a crash
# meanwhile means a resend with the same bytes and MSH-10, as for any uncommitted ACK.
COMMIT_WITHIN = 0.2
# Log lines of what was committed wait at most this long, then go out together, a few
# a reactor turn (ReferralWorker.note).
NOTES_WITHIN = 0.05
NOTES_A_TURN = 4
RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]
# ``fn(conn)`` in a savepoint of the next ingest batch's transaction (IncidentStore.ride_later).
RideBatch = Callable[[Callable[[Connection], Any]], "Deferred[Any]"]


@dataclass(slots=True)
class _Outcome:
    """The result of one send, to be committed with its group; ``after`` runs once committed."""

    claimed: Claimed
    record: Callable[[Connection], None] | None  # None: ``accepted`` (recorded as a group)
    after: Callable[[], None]
    accepted: tuple[str, datetime] | None = None  # (ACK code, when) of an AA/CA


@dataclass(slots=True)
class _Lane:
    """One provider's sender: the messages it holds claimed, in order, and the results of
    those sent whose commit is pending. ``claimed`` holds every id claimed and not yet
    committed (queued, in flight or awaiting its group commit)."""

    provider: str
    queue: deque[Claimed]
    claimed: set[int]
    renewed_at: datetime  # when its claims' leases were last set
    outcomes: list[_Outcome] = field(default_factory=list)
    committing: bool = False
    broken: bool = False
    drained: list[Deferred[None]] = field(default_factory=list)
    timer: Any = None  # the delayed commit of results gathered below a group's size
    soon: Any = None  # the reactor turn that looks at the results gathered (_group_commit_soon)
    closed: bool = False  # its sender has returned: a new claim needs a new lane


class ReferralWorker:
    """Delivers the outbox: polls for due rows, one message in flight per provider.

    Each provider's sender holds up to ``config.claim_ahead`` messages claimed. When an ACK
    arrives, the next claimed message goes on the wire at once while the result is committed
    in the background; results that arrive while a commit runs go together in the next one
    (group commit), whose transaction also renews the leases of the claims still held and
    claims more. Throughput then approaches the round trip, not round trip + fsync.

    The crash window, bounded: a message whose ACK arrived but whose result was not yet
    committed stays ``sending`` under its lease; after a crash it is sent again, with the same
    bytes and MSH-10, once the lease runs out (at most ``claim_ahead`` such messages per
    provider, which the peer deduplicates by MSH-10). Nothing is counted, logged as delivered
    or reported to a caller before its commit.
    """

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
        run_in_thread: RunInThread | None = None,
        ride: RideBatch | None = None,
        ride_claims: RideBatch | None = None,
        metrics: ReferralMetrics | None = None,
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
        longest = max(
            (p.ack_timeout + p.connect_timeout for p in config.providers), default=60.0
        )
        self._lease_length = timedelta(seconds=longest + lease_margin)
        self._pool = ThreadPool(0, 2, name="corespond-referrals")
        # SQLite: the store's writer thread, so that our commits queue instead of sleeping in
        # SQLite's busy handler; otherwise (PostgreSQL, tests, the bench) our own pool.
        self._run_in_thread = run_in_thread
        # SQLite: the group commit of send results rides the next ingest batch (a savepoint in
        # its transaction) instead of a transaction and an fsync of its own on the writer
        # pages share; it waits for one only briefly (the bound the daemon gives it).
        self._ride = ride
        # SQLite: the poll's claim rides an ingest batch too (``IncidentStore.ride_later``):
        # alone, it was a transaction on the writer that a page's batch could queue behind
        # (2.4-7 ms in the slowest 1 % of pages in the dispatch benchmark).
        self._ride_claims = ride_claims
        self.metrics = metrics
        self._links: dict[str, mllp.MLLPClientProtocol] = {}
        self._in_flight: dict[str, Deferred[None]] = {}
        self._lanes: dict[str, _Lane] = {}
        self._passed_over: set[str] = set()  # busy providers a poll skipped
        self._polling = False
        self._again = False
        self._loop: Any = None
        self._tls: dict[str, Any] = {}
        self._stopping = False
        self.delivered = 0
        self.commits = 0  # group commits of send results (for tests and the bench)
        # Log lines of what was committed, written later and together (see :meth:`note`).
        self._notes: deque[Callable[[], None]] = deque()
        self._notes_call: Any = None
        self._stopped = False  # stop() has finished: a line is written at once
        # The reactor's time in referral callbacks, when the store's trace is on (the bench).
        self.spans = ReactorSpans.from_environment()
        self._next_note_timed = self.spans.timed(self._next_note)
        self._group_commit_timed = self.spans.timed(self._group_commit_now)

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
        self._loop = self.clock.looping_call(
            self.config.poll_interval, self.spans.timed(self.poll), now=True
        )

    def stop(self) -> Deferred[None]:
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for link in list(self._links.values()):
            link.close()
        pending = list(self._in_flight.values())

        def stopped(_: object) -> None:
            self._stopped = True
            self._write_notes()
            self._pool.stop()
            self.spans.close()

        d: Deferred[Any] = DeferredList(pending, consumeErrors=True)
        return d.addCallback(stopped)

    def wake(self) -> None:
        """Look for due work now (after a referral was created, say)."""
        self.poll()

    def note(self, line: Callable[[], None]) -> None:
        """Write ``line`` (a log line of something already committed) later, with the others
        gathered within ``NOTES_WITHIN``, in a reactor turn of their own and one flush: not in
        the callback that hands a referral to its sender or records its result, which a page
        may be waiting behind (issue 5). A line written alone cost that callback about 50 us
        of CPU and a write() to the log's stream, which lets the store's writer thread take
        the GIL. Lines still waiting are written when the worker stops."""
        if self._stopped:
            line()
            return
        self._notes.append(line)
        if self._notes_call is None:
            self._notes_call = self.reactor.callLater(NOTES_WITHIN, self._next_note_timed)

    def _next_note(self) -> None:
        self._notes_call = None
        with lines_held():
            for _ in range(min(NOTES_A_TURN, len(self._notes))):
                self._notes.popleft()()
        if self._notes:  # more than a turn's worth: the rest in the next turn
            self._notes_call = self.reactor.callLater(0, self._next_note_timed)

    def _write_notes(self) -> None:
        if self._notes_call is not None and self._notes_call.active():
            self._notes_call.cancel()
        self._notes_call = None
        with lines_held():
            while self._notes:
                self._notes.popleft()()

    # --- polling -------------------------------------------------------------------------------

    def in_thread(self, fn: Callable[[], T]) -> Deferred[T]:
        """Run ``fn`` (database work) where the referral side's transactions run: the store's
        writer thread on SQLite, else this worker's pool. The service, the certificate checks
        and the automatic referrals share it."""
        if self._run_in_thread is not None:
            d = self._run_in_thread(fn)
        else:
            d = deferToThreadPool(self.reactor, self._pool, fn)
        if not self.spans.enabled:
            return d
        what = getattr(getattr(fn, "func", fn), "__qualname__", "work")  # a partial's function
        return self.spans.relay(d, "result of " + what)

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
                if self._stopping:
                    return
                now = self.clock.now()
                busy = frozenset(self._in_flight)
                self._passed_over.update(busy)
                lease = self._lease()

                try:
                    claimed = await self._claim_due(now, busy, lease)
                except Exception as err:
                    log.error("referral.claim.failed", error=type(err).__name__)
                    return
                lanes: dict[str, list[Claimed]] = {}
                for item in claimed:
                    lanes.setdefault(item.provider, []).append(item)
                for name, items in lanes.items():
                    self._start_lane(name, items, now)
                if not self._again:
                    return
        finally:
            self._polling = False

    def _start_lane(self, provider: str, items: list[Claimed], now: datetime) -> None:
        lane = _Lane(provider, deque(items), {i.id for i in items}, renewed_at=now)
        self._lanes[provider] = lane
        d = ensureDeferred(self._deliver(lane))
        if not d.called:
            self._in_flight[provider] = d
        d.addBoth(self._delivered, provider, lane)

    def claim_for(self) -> Claim | None:
        """What a referral's transaction needs to claim its message for this worker (see
        :func:`store_referral`), or None while stopping."""
        return None if self._stopping else (self.worker_id, self._lease())

    def adopt(self, claimed: Claimed) -> None:
        """Send a message claimed for this worker by the transaction that queued it: behind
        the provider's sender when one runs, else in a new one. No claim transaction of its
        own, no wait for the next poll."""
        if self._stopping:
            return  # claimed, never sent: due again when its lease runs out
        lane = self._lanes.get(claimed.provider)
        if lane is not None and not lane.closed and not lane.broken:
            lane.queue.append(claimed)
            lane.claimed.add(claimed.id)
            return
        if claimed.provider in self._in_flight:  # a broken sender still finishing
            return  # its lease runs out, then the poll sends it
        self._start_lane(claimed.provider, [claimed], self.clock.now())

    def _lease(self) -> timedelta:
        """How long a claim holds without renewal: the longest connect and ACK wait, and a
        margin. Every group commit renews the claims a sender still holds."""
        return self._lease_length

    def _claim_due(
        self, now: datetime, busy: frozenset[str], lease: timedelta
    ) -> Deferred[list[Claimed]]:
        """The poll's claim: riding an ingest batch where the daemon lets it (SQLite), else a
        transaction of its own where the referral side's transactions run."""
        if self._ride_claims is not None:
            return self.spans.relay(
                self._ride_claims(partial(self._claim_in, now, busy, lease)),
                "result of the poll's claim (rode)",
            )
        return self.in_thread(partial(self._claim, now, busy, lease))

    def _claim(self, now: datetime, busy: frozenset[str], lease: timedelta) -> list[Claimed]:
        with self.engine.begin() as conn:
            return self._claim_in(now, busy, lease, conn)

    def _claim_in(
        self, now: datetime, busy: frozenset[str], lease: timedelta, conn: Connection
    ) -> list[Claimed]:
        claimed = claim_due(
            conn,
            now,
            self.worker_id,
            busy=busy,
            lease=lease,
            limit=max(50, self.config.claim_ahead * 4),
            per_provider=self.config.claim_ahead,
        )
        if self.metrics is not None:
            self._outbox_depth(conn)
        return claimed

    def _outbox_depth(self, conn: Connection) -> None:
        assert self.metrics is not None
        if _driver_level(conn):
            depth: dict[str, int] = dict(_cursor(conn).execute(_SQLITE_OUTBOX_DEPTH).fetchall())
        else:
            depth = dict(conn.execute(_OUTBOX_DEPTH).all())
        for provider in self.config.providers:
            outbox = self.metrics.child(self.metrics.outbox, provider.name)
            outbox.set(depth.get(provider.name, 0))

    def _delivered(self, result: object, provider: str, lane: _Lane) -> None:
        lane.closed = True
        if self._lanes.get(provider) is lane:
            del self._lanes[provider]
        self._in_flight.pop(provider, None)
        if isinstance(result, Failure):  # _deliver catches everything it expects
            log.error(
                "referral.worker.failed", provider=provider, error=type(result.value).__name__
            )
        # A sender ends when its last commit found nothing more due for the provider: no
        # poll then (a transaction on the shared writer per referral, for nothing), unless a
        # poll passed the provider over meanwhile (a row it skipped may have come after that
        # commit) or the sender failed. Rows made here are handed over (adopt).
        passed_over = provider in self._passed_over
        self._passed_over.discard(provider)
        if not self._stopping and (passed_over or lane.broken or isinstance(result, Failure)):
            self.clock.call_later(0, self.spans.timed(self.poll))

    # --- one provider's sender -----------------------------------------------------------------

    async def _deliver(self, lane: _Lane) -> None:
        """Send the lane's messages one at a time; each result is committed in a group while
        the next message is on the wire, and the group commit claims more."""
        while lane.queue and not lane.broken:
            if self._stopping:
                self._release(lane)
                break
            item = lane.queue.popleft()
            # Not ``lane.outcomes.append(await ...)``: a group commit may swap the list meanwhile.
            outcome = await self._send_one(item)
            lane.outcomes.append(outcome)
            self._group_commit_soon(lane)
            if not lane.queue:
                await self._drained(lane)  # the commit may claim more for the queue
        if lane.outcomes or lane.committing:
            await self._drained(lane)
        if lane.queue and not lane.broken and not self._stopping:
            await self._deliver(lane)  # adopted while the last commit ran
        lane.closed = True  # from here on (no await), an adopted claim starts a new lane

    def _release(self, lane: _Lane) -> None:
        """Our own stop: claims not sent are due again at once, not counted as attempts."""
        now = self.clock.now()
        while lane.queue:
            item = lane.queue.popleft()
            lane.outcomes.append(
                _Outcome(
                    item,
                    partial(
                        record_retry, claimed=item, error="daemon-stopped", next_due=now,
                        count=False,
                    ),
                    lambda: None,
                )
            )  # fmt: skip

    def _drained(self, lane: _Lane) -> Deferred[None]:
        """Fires once every result gathered so far is committed (committing them now)."""
        if not lane.committing and not lane.outcomes:
            return succeed(None)
        d: Deferred[None] = Deferred()
        lane.drained.append(d)
        self._group_commit_soon(lane)
        return d

    def _commit_now(self, lane: _Lane) -> bool:
        """Whether the results gathered go to the database now, rather than with more: a
        group is full (half the claims ahead), the sender needs more claims, someone waits
        for the commit, or the sender is stopping. Otherwise they wait for more, at most
        ``COMMIT_WITHIN`` seconds: fewer, larger transactions on the one writer."""
        half = self.config.claim_ahead // 2
        return (
            len(lane.outcomes) >= max(1, half)
            or len(lane.queue) <= half
            or bool(lane.drained)
            or self._stopping
            or lane.broken
        )

    def _commit_due(self, lane: _Lane) -> None:
        lane.timer = None
        if not lane.committing and lane.outcomes:
            self._commit(lane)

    def _group_commit_soon(self, lane: _Lane) -> None:
        """:meth:`_group_commit` in a reactor turn of its own: the ACK's callback then only
        reads the ACK, records its outcome and puts the next message on the wire; starting the
        transaction that records it (a rider on the store's writer) waits for the next turn,
        so that a page does not wait behind both (issue 5). Several results gathered by then
        go together, as they would with a commit running."""
        if lane.soon is None:
            lane.soon = self.reactor.callLater(0, self._group_commit_timed, lane)

    def _group_commit_now(self, lane: _Lane) -> None:
        lane.soon = None
        self._group_commit(lane)

    def _group_commit(self, lane: _Lane) -> None:
        if lane.committing or not lane.outcomes:
            return
        if not self._commit_now(lane):
            if lane.timer is None:
                lane.timer = self.clock.call_later(
                    COMMIT_WITHIN, self.spans.timed(self._commit_due), lane
                )
            return
        self._commit(lane)

    def _commit(self, lane: _Lane) -> None:
        if lane.timer is not None:
            if lane.timer.active():
                lane.timer.cancel()
            lane.timer = None
        group, lane.outcomes = lane.outcomes, []
        lane.committing = True
        now = self.clock.now()
        done = {o.claimed.id for o in group}
        still = lane.claimed - done
        want = 0 if self._stopping or lane.broken else self.config.claim_ahead - len(still)
        if len(still) > self.config.claim_ahead // 2:
            want = 0  # enough in hand: claim in bigger steps, not at every commit
        lease = self._lease()
        # Claims made or renewed less than half the margin ago keep enough lease to cover the
        # longest send before the next commit; older ones are renewed with this commit.
        stale = (now - lane.renewed_at).total_seconds() > self._lease_margin / 2
        renew = bool(still) and (stale or want > 0)
        if stale or want > 0:
            lane.renewed_at = now

        def commit_in(conn: Connection) -> list[Claimed]:
            record_delivered_many(
                conn, [(o.claimed, *o.accepted) for o in group if o.accepted is not None]
            )
            for outcome in group:
                if outcome.record is not None:
                    outcome.record(conn)
            if renew:
                renew_claims(conn, still, self.worker_id, now + lease)
            if want <= 0:
                return []
            return claim_due(
                conn,
                now,
                self.worker_id,
                lease=lease,
                limit=want,
                provider=lane.provider,
                per_provider=want,
            )

        def commit() -> list[Claimed]:
            with self.engine.begin() as conn:
                return commit_in(conn)

        def committed(claimed: list[Claimed]) -> None:
            self.commits += 1
            lane.claimed -= done
            for outcome in group:
                outcome.after()
            lane.claimed.update(c.id for c in claimed)
            lane.queue.extend(claimed)
            if self._stopping:
                self._release(lane)

        def failed(failure: Failure) -> None:
            # Not committed: those rows stay ``sending`` under their lease and are sent again
            # (same bytes, same MSH-10) when it runs out. This sender stops; the poll goes on.
            lane.broken = True
            lane.queue.clear()
            log.error(
                "referral.commit.failed",
                provider=lane.provider,
                count=len(group),
                error=type(failure.value).__name__,
            )

        def finished(_: object) -> None:
            lane.committing = False
            if lane.outcomes and not lane.broken:
                self._group_commit(lane)
                if lane.committing or lane.outcomes:
                    return
            lane.outcomes.clear()
            waiting, lane.drained = lane.drained, []
            for d in waiting:
                d.callback(None)

        stored: Deferred[list[Claimed]]
        if self._ride is not None:
            stored = self.spans.relay(self._ride(commit_in), "result of group commit (rode)")
        else:
            stored = self.in_thread(commit)
        stored.addCallbacks(committed, failed).addBoth(finished)

    async def _send_one(self, item: Claimed) -> _Outcome:
        """Send one claimed message; what to commit for it (never raises)."""
        provider = self.config.provider(item.provider)
        if provider is None:
            reason = "unknown-provider: the provider is not configured"
            return _Outcome(
                item,
                partial(record_held, claimed=item, reason=reason, now=self.clock.now()),
                partial(self._count_held, item.provider, "unknown-provider"),
            )
        try:
            link = self._links.get(provider.name)
            if link is None or not link.connected_:
                link = await self.spans.relay(self._connect(provider), "connected")
                self._links[provider.name] = link
                if self.spans.enabled:  # the ACK's read and parse, before its callbacks
                    link.timed = partial(self.spans.run, label="ACK")
            sent_at = self.reactor.seconds()
            reply = await self.spans.relay(
                link.send(item.message, item.control_id, provider.ack_timeout), "ACK"
            )
        except Exception as err:
            return self._failed(item, provider, err)
        if self.metrics is not None:
            ack_seconds = self.metrics.child(self.metrics.ack_seconds, provider.name)
            ack_seconds.observe(self.reactor.seconds() - sent_at)
        code = reply.ack_code or ""
        now = self.clock.now()
        if code in ACCEPTED:
            return _Outcome(
                item,
                None,
                partial(self._after_delivered, item, provider.name, code),
                accepted=(code, now),
            )
        reason = f"peer-error: the provider answered {code}"
        return _Outcome(
            item,
            partial(
                record_held,
                claimed=item,
                reason=reason,
                now=now,
                ack_code=code,
                peer_text=reply.ack_text,
            ),
            partial(self._after_peer_error, item, provider.name, code),
        )

    def _after_delivered(self, item: Claimed, provider: str, code: str) -> None:
        self.delivered += 1
        if self.metrics is not None:
            self.metrics.child(self.metrics.delivered, provider).inc()
        self.note(partial(_delivered_line, item.control_id, provider, code, item.attempts + 1))

    def _after_peer_error(self, item: Claimed, provider: str, code: str) -> None:
        self._count_held(provider, "peer-error")
        log.warning("referral.held", control_id=item.control_id, provider=provider, code=code)

    def _count_held(self, provider: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.child(self.metrics.held, provider, reason).inc()

    def _failed(self, item: Claimed, provider: ProviderConfig, err: Exception) -> _Outcome:
        link = self._links.pop(provider.name, None)
        if link is not None:
            link.close()
        code = getattr(err, "code", None) or f"connect-failed ({type(err).__name__})"
        now = self.clock.now()
        if self._stopping:
            # Our own shutdown cut it short: due again at once, and not counted as an attempt.
            return _Outcome(
                item,
                partial(
                    record_retry, claimed=item, error="daemon-stopped", next_due=now, count=False
                ),
                lambda: None,
            )
        attempts = item.attempts + 1
        if provider.max_attempts and attempts >= provider.max_attempts:
            reason = f"undeliverable: {code} after {attempts} attempts"

            def held() -> None:
                self._count_held(provider.name, "undeliverable")
                log.warning(
                    "referral.held",
                    control_id=item.control_id,
                    provider=provider.name,
                    reason=code,
                    attempt=attempts,
                )

            return _Outcome(item, partial(record_held, claimed=item, reason=reason, now=now), held)
        delay = backoff_delay(attempts, provider.backoff_initial, provider.backoff_max, self._rand)
        due = now + timedelta(seconds=delay)

        def retry() -> None:
            if self.metrics is not None:
                kind = code.split(" ")[0]
                self.metrics.child(self.metrics.retries, provider.name, kind).inc()
            log.warning(
                "referral.retry",
                control_id=item.control_id,
                provider=provider.name,
                reason=code,
                attempt=attempts,
                seconds=round(delay, 3),
            )

        return _Outcome(item, partial(record_retry, claimed=item, error=code, next_due=due), retry)

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
    message_type: str | None = None
    error_code: str | None = None


INBOUND_TYPES = ("ACK", "RRI", "REF", "ADT", "MDM")  # metric labels; anything else is "other"


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
                record_outcome(conn, referral_id, inbound_id, outcome, reply.appointment_at, now)
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
    return InboundResult(
        inbound_id,
        referral_id,
        outcome,
        ack,
        known.message_type if known else None,
        error.code if error else None,
    )


def record_outcome(
    conn: Connection,
    referral_id: int,
    inbound_id: int,
    status: str,
    appointment_at: datetime | None,
    now: datetime,
) -> None:
    """An RRI^I12 answer's outcome (``status``: accepted, rejected, pending) for a referral:
    kept beside the others and made the referral's current one; the outcome report's
    referral flags of the referral's encounters follow in the same transaction."""
    incident_ref = conn.execute(
        select(referrals.c.incident_ref).where(referrals.c.id == referral_id)
    ).scalar()
    with keeping_referral_flags(conn, incident_ref=incident_ref):
        conn.execute(
            referral_outcomes.insert().values(
                referral_id=referral_id,
                inbound_id=inbound_id,
                status=status,
                appointment_at=appointment_at,
                received_at=now,
            )
        )
        conn.execute(
            referrals.update()
            .where(referrals.c.id == referral_id)
            .values(
                outcome=status,
                outcome_at=now,
                updated_at=now,
                appointment_at=appointment_at,
            )
        )


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
        self,
        engine: Engine,
        reactor: Any,
        config: ReferralsConfig,
        clock: Any = None,
        *,
        run_in_thread: RunInThread | None = None,
        ride: RideBatch | None = None,
        metrics: ReferralMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.reactor = reactor
        self.config = config
        self.clock = Clock(clock or reactor)
        self._pool = ThreadPool(0, 1, name="corespond-hl7-inbound")
        self._run_in_thread = run_in_thread
        # SQLite: the group commit of send results rides the next ingest batch (a savepoint in
        # its transaction) instead of a transaction and an fsync of its own on the writer
        # pages share; it waits for one only briefly (the bound the daemon gives it).
        self._ride = ride
        self.metrics = metrics
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

        def store() -> InboundResult:
            return store_inbound(
                self.engine,
                frame,
                peer,
                now,
                sending_application=self.config.sending_application,
                sending_facility=self.config.sending_facility,
            )

        if self._run_in_thread is not None:
            stored = self._run_in_thread(store)
        else:
            stored = deferToThreadPool(self.reactor, self._pool, store)
        return stored.addCallback(self._stored)

    def _stored(self, result: InboundResult) -> bytes | None:
        if self.metrics is not None:
            kind = result.message_type if result.message_type in INBOUND_TYPES else "other"
            outcome = result.error_code or ("matched" if result.referral_id else "unmatched")
            self.metrics.child(self.metrics.inbound, kind, outcome).inc()
        return result.ack

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


class ReferralBuildFailed(SafeMessage, RuntimeError):
    """The builder process died: the referral is stored (queued) and is built again later."""

    def __init__(self, ref: str, why: str) -> None:
        self.ref = ref
        super().__init__(f"referral {ref}: {why}; it stays queued and is built again")


REBUILD_AFTER = 10.0  # seconds after a builder crash before stored referrals are built again


class ReferralService:
    """The outbox worker, the inbound listener and the message builder processes, started and
    stopped with the daemon.

    ``run_in_thread`` (SQLite: the store's writer thread, ``IncidentStore.run_on_writer``)
    runs every database transaction of the service; without it, its own thread pools.
    """

    def __init__(
        self,
        engine: Engine,
        reactor: Any,
        config: ReferralsConfig,
        clock: Any = None,
        build: Callable[[ReferralContent, str], bytes] = build_message,
        *,
        run_in_thread: RunInThread | None = None,
        ride: RideBatch | None = None,
        ride_commits: RideBatch | None = None,
        ride_claims: RideBatch | None = None,
        metrics: ReferralMetrics | None = None,
    ) -> None:
        from corespond.daemon.referral_build import BuildPool
        from corespond.daemon.referral_metrics import CertificateWatch

        self.engine = engine
        self.config = config
        self.metrics = metrics or ReferralMetrics(None)
        self.worker = ReferralWorker(
            engine, reactor, config, clock=clock, run_in_thread=run_in_thread,
            ride=ride_commits, ride_claims=ride_claims, metrics=self.metrics,
        )  # fmt: skip
        self.listener = ReferralListener(
            engine, reactor, config, clock=clock, run_in_thread=run_in_thread,
            metrics=self.metrics,
        )  # fmt: skip
        # hl7apy in worker processes, so that builds never hold this process's GIL.
        self.builder = BuildPool(
            reactor, config.build_processes, build, timed=self.worker.spans.timed
        )
        self.certificates = CertificateWatch(
            config, self.worker.clock, self.metrics, self.worker.in_thread
        )
        # SQLite: a new referral's statements ride the next ingest batch (a savepoint in its
        # transaction, ``IncidentStore.ride_later``) instead of a transaction and an fsync of
        # their own on the writer that pages share: a page never waits behind that commit.
        self._ride = ride
        self._building: set[int] = set()  # referral ids whose build is under way here
        self._rebuilding = False
        self.started: Deferred[Any] = succeed(None)  # fires once the start's rebuild is done
        self._rebuild_timer: Any = None

    def create(
        self,
        request: ReferralRequest,
        on_stored: Callable[[Connection, str], None] | None = None,
    ) -> Deferred[CreatedReferral]:
        """Create a referral from inside the daemon (an API, a form, a trigger): built and
        validated by hl7apy in a builder process, then stored, queued and claimed for this
        daemon's worker in one transaction (``on_stored(conn, ref)`` runs in it), which hands
        the message straight to the provider's sender. Fires once that is committed; fails
        with :class:`ReferralError` (refused: nothing kept) or :class:`ReferralBuildFailed`
        (the builder died: the referral is stored without its message and built again).
        A request whose idempotency key was used before answers with that referral."""
        return ensureDeferred(self._create(request, on_stored))

    async def _create(
        self, request: ReferralRequest, on_stored: Callable[[Connection, str], None] | None
    ) -> CreatedReferral:
        from corespond.daemon.referral_build import BuildCrashed

        provider = checked_provider(self.config, request)
        if request.idempotency_key is not None or request.part2:
            # A repeat, or a Part 2 referral held for consent, needs no message built.
            earlier, hold = await self.worker.in_thread(partial(self._look, provider, request))
            if earlier is not None:
                log.info("referral.replayed", referral_id=earlier.ref, state=earlier.state)
                return earlier
            if hold is not None:
                return await self._store(provider, request, None, on_stored)
        message: bytes | None
        content = referral_content(
            self.config, provider, request, new_referral_ref(), new_control_id(),
            self.worker.clock.now(),
        )  # fmt: skip
        try:
            message = await self.worker.spans.relay(
                self.builder.build(content, provider.profile), "built"
            )
        except BuildCrashed as err:
            # Stored without its message, as asked for: built again later, never lost.
            created = await self._store(provider, request, None, on_stored, content)
            if created.replayed:
                return created
            self._rebuild_later()
            raise ReferralBuildFailed(created.ref, str(err)) from None
        except BuildError as err:
            raise ReferralError(f"the message does not validate: {err}") from None
        return await self._store(provider, request, message, on_stored, content)

    def _look(
        self, provider: ProviderConfig, request: ReferralRequest
    ) -> tuple[CreatedReferral | None, str | None]:
        """(the referral made before under the request's key, the consent hold); a read."""
        with self.engine.connect() as conn:
            earlier = earlier_referral(conn, request)
            hold = None
            if earlier is None and request.part2:
                hold = consent_covering(
                    conn, request.consent_ref, provider.name, self.worker.clock.now()
                )[1]
        return earlier, hold

    async def _store(
        self,
        provider: ProviderConfig,
        request: ReferralRequest,
        message: bytes | None,
        on_stored: Callable[[Connection, str], None] | None,
        content: ReferralContent | None = None,
    ) -> CreatedReferral:
        now = self.worker.clock.now()
        if content is None:
            content = referral_content(
                self.config, provider, request, new_referral_ref(), new_control_id(), now
            )
        claim = self.worker.claim_for() if message is not None else None
        stored: Deferred[tuple[CreatedReferral, Claimed | None]]
        if self._ride is not None:
            stored = self.worker.spans.relay(
                self._ride(
                    partial(
                        store_referral_in, provider=provider, request=request,
                        content=content, message=message, now=now, on_stored=on_stored,
                        claim=claim,
                    )
                ),
                "result of store_referral_in",
            )  # fmt: skip
        else:
            stored = self.worker.in_thread(
                lambda: store_referral(
                    self.engine, provider, request, content, message, now,
                    on_stored=on_stored, claim=claim,
                )
            )  # fmt: skip
        created, claimed = await stored
        if created.replayed:
            log.info("referral.replayed", referral_id=created.ref, state=created.state)
            return created
        if created.state == "held":
            self.metrics.child(self.metrics.held, provider.name, "part2-no-consent").inc()
        elif created.control_id is not None:
            self.metrics.child(self.metrics.queued, provider.name).inc()
            if claimed is not None:
                self.worker.adopt(claimed)
            else:
                self.worker.wake()
        else:
            # Queued without a message: held when looked at, but a consent was recorded before
            # it was stored. Built by the next rebuild, not only at the next start.
            self._rebuild_later()
        self.worker.note(partial(
            _created_line, created.ref, provider.name, created.state, created.hold_reason,
            created.control_id,
        ))  # fmt: skip
        return created

    async def _build_and_queue(self, unbuilt: Unbuilt) -> str | None:
        self._building.add(unbuilt.id)
        try:
            message = await self.worker.spans.relay(
                self.builder.build(unbuilt.content, unbuilt.profile), "built"
            )
            now = self.worker.clock.now()
            control_id = await self.worker.in_thread(
                lambda: queue_built(self.engine, unbuilt, message, now)
            )
        finally:
            self._building.discard(unbuilt.id)
        if control_id == unbuilt.content.control_id:
            self.metrics.child(self.metrics.queued, unbuilt.provider).inc()
            # The same line as a referral built at once (ReferralService._store), by one way.
            self.worker.note(
                partial(_created_line, unbuilt.ref, unbuilt.provider, "queued", None, control_id)
            )
        self.worker.wake()
        return control_id

    def _rebuild_later(self) -> None:
        if self._rebuild_timer is None or not self._rebuild_timer.active():
            self._rebuild_timer = self.worker.clock.call_later(REBUILD_AFTER, self.rebuild)

    def rebuild(self) -> Deferred[int]:
        """Build and queue the referrals stored without a message (a builder or the daemon
        died first); the number queued."""
        if self._rebuilding:
            return succeed(0)
        self._rebuilding = True

        def done(result: Any) -> Any:
            self._rebuilding = False
            return result

        return ensureDeferred(self._rebuild()).addBoth(done)

    async def _rebuild(self) -> int:
        from corespond.daemon.referral_build import BuildCrashed

        skip = frozenset(self._building)
        found = await self.worker.in_thread(
            lambda: unbuilt_referrals(self.engine, self.config, skip)
        )
        queued = 0
        for unbuilt in found:
            if unbuilt.id in self._building:  # its create (here) is building it now
                continue
            try:
                if await self._build_and_queue(unbuilt) is not None:
                    queued += 1
            except BuildCrashed:
                self._rebuild_later()
                break
            except BuildError as err:
                reason = f"invalid-message: the message does not validate: {err}"
                await self.worker.in_thread(
                    partial(
                        hold_unbuildable, self.engine, unbuilt.id, reason, self.worker.clock.now()
                    )
                )
                self.metrics.child(self.metrics.held, unbuilt.provider, "invalid-message").inc()
                log.warning("referral.held", referral_id=unbuilt.ref, code="invalid-message")
        if found:
            log.info("referral.rebuilt", count=queued)
        return queued

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

        return self.worker.in_thread(look)

    def start(self) -> None:
        self.builder.start()
        self.worker.start()
        self.listener.start()
        self.certificates.start()
        # Referrals stored by a daemon that died before their message was built.
        self.started = self.rebuild().addErrback(
            lambda f: log.error("referral.rebuild.failed", error=type(f.value).__name__)
        )

    async def stop(self) -> None:
        if self._rebuild_timer is not None and self._rebuild_timer.active():
            self._rebuild_timer.cancel()
        self.certificates.stop()
        await self.listener.stop()
        await self.worker.stop()
        self.builder.stop()
