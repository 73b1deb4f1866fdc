"""The store's schema: typed SQLAlchemy models for migrations and reads.

The hot path (:mod:`corespond.daemon.store.writer`) uses Core statements built from
``Model.__table__``; the models are the single source of truth that the Alembic migrations must
match (a test compares them).

Protected health information lives only in columns made with :func:`phi_column` (their
``info["phi"]`` is true), so that field encryption and retention can cover all of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Constraint names are fixed so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# 64-bit ids on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY (also 64-bit).
Id = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zones: values are stored as naive UTC text and come back aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        return sqlite_datetime_text

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def sqlite_datetime_text(value: datetime | None) -> str | None:
    """The text a :class:`UTCDateTime` holds on SQLite: ``YYYY-MM-DD HH:MM:SS.ffffff``, UTC.

    One step instead of the decorator's two (the hot path binds several times per snapshot);
    the writer's driver-level statements bind with it too, so both store identical text.
    """
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    # isoformat took about 2.1 us (6k instructions under callgrind) through sprintf, and
    # most snapshots bind a time not bound before (their own update time); orjson writes the
    # same fields in about a quarter of that: '"YYYY-MM-DDTHH:MM:SS.ffffff+00:00"', without
    # the fraction at a whole second.
    try:
        text = _dumps(value).decode()
    except TypeError:  # a datetime subclass
        text = ""
    if len(text) == 34:
        return text[1:11] + " " + text[12:27]
    if len(text) == 27:
        return text[1:11] + " " + text[12:20] + ".000000"
    return value.isoformat(" ", "microseconds")[:26]  # without "+00:00"


_dumps = orjson.dumps


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(value: str | None) -> str | None:
    """``value`` storable on every backend: NUL and lone surrogates become U+FFFD.

    PostgreSQL text cannot hold NUL and UTF-8 cannot encode a lone surrogate; neither may make
    a snapshot unstorable (the batch would fail and the feed would stall on retries).
    """
    if value is None or (value.isascii() and "\x00" not in value):
        return value
    return _UNSTORABLE.sub("\ufffd", value)


def phi_column(*args: Any, **kwargs: Any) -> Any:
    """A column that holds protected health information."""
    kwargs["info"] = dict(kwargs.get("info") or {}, phi=True)
    return mapped_column(*args, **kwargs)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Incident(Base):
    """One incident of one source; its state is copied from its current snapshot."""

    __tablename__ = "incidents"
    __table_args__ = (
        UniqueConstraint("source", "external_id"),
        Index(None, "external_id"),
        Index(None, "updated_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    source: Mapped[str] = mapped_column(String)  # the feed's namespace for incident ids
    external_id: Mapped[str] = mapped_column(String)
    incident_number: Mapped[str | None] = mapped_column(String)
    status: Mapped[str] = mapped_column(String(16))
    call_type: Mapped[str | None] = mapped_column(String)
    call_type_code: Mapped[str | None] = mapped_column(String)
    apco_type: Mapped[str | None] = mapped_column(String)
    priority: Mapped[str | None] = mapped_column(String)
    agency: Mapped[str | None] = mapped_column(String)
    zone: Mapped[str | None] = mapped_column(String)
    lat: Mapped[float | None] = mapped_column(Float)
    lon: Mapped[float | None] = mapped_column(Float)
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)  # source time of current snapshot
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    snapshot_count: Mapped[int] = mapped_column(Integer)
    # Pointers kept by the writer, without foreign keys: incidents and snapshots would
    # otherwise reference each other, which SQLite cannot create in one migration.
    current_snapshot_id: Mapped[int | None] = mapped_column(Id)
    current_decision_id: Mapped[int | None] = mapped_column(Id)
    behavioral_health: Mapped[bool] = mapped_column(Boolean)
    category: Mapped[str | None] = mapped_column(String)
    response: Mapped[str] = mapped_column(String(16))


class SnapshotRow(Base):
    """Every snapshot received, raw bytes included; ``digest`` makes a repeat a no-op.

    Repeats are found per incident (the unique index): the same bytes from two sources are two
    incidents' snapshots, one each. The index also finds an incident's snapshots.
    """

    __tablename__ = "snapshots"
    __table_args__ = (Index(None, "incident_id", "digest", unique=True),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    incident_id: Mapped[int] = mapped_column(Id, ForeignKey("incidents.id"))
    feed: Mapped[str] = mapped_column(String)
    format: Mapped[str] = mapped_column(String)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    source_updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of raw, hex
    raw: Mapped[bytes] = phi_column(LargeBinary)
    public: Mapped[dict[str, Any]] = mapped_column(JSON)  # snapshot_public_json
    protected: Mapped[dict[str, Any]] = phi_column(JSON)  # snapshot_protected_json


class DecisionRow(Base):
    """The classifier's decision on one snapshot, with what it matched."""

    __tablename__ = "decisions"
    __table_args__ = (Index(None, "incident_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    snapshot_id: Mapped[int] = mapped_column(Id, ForeignKey("snapshots.id"), unique=True)
    incident_id: Mapped[int] = mapped_column(Id, ForeignKey("incidents.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ruleset: Mapped[str] = mapped_column(String)
    behavioral_health: Mapped[bool] = mapped_column(Boolean)
    category: Mapped[str | None] = mapped_column(String)
    response: Mapped[str] = mapped_column(String(16))
    score: Mapped[float] = mapped_column(Float)
    rules: Mapped[list[str]] = mapped_column(JSON)
    evidence: Mapped[list[dict[str, Any]]] = phi_column(JSON)  # quotes the narrative
    # This decision changed the incident's current outcome (a new incident's first one does).
    changed: Mapped[bool] = mapped_column(Boolean)


class RejectedMessageRow(Base):
    """A message that could not be parsed or validated, kept verbatim with the reason."""

    __tablename__ = "rejected_messages"
    __table_args__ = (Index(None, "received_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    feed: Mapped[str] = mapped_column(String)
    format: Mapped[str] = mapped_column(String)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    code: Mapped[str] = mapped_column(String)
    reason: Mapped[str] = mapped_column(String)  # never quotes content, by contract
    where: Mapped[str | None] = mapped_column(String)
    origin_name: Mapped[str | None] = mapped_column(String)  # file name or peer
    digest: Mapped[str] = mapped_column(String(64))
    raw: Mapped[bytes] = phi_column(LargeBinary)


incidents: Table = Incident.__table__  # type: ignore[assignment]
snapshots: Table = SnapshotRow.__table__  # type: ignore[assignment]
decisions: Table = DecisionRow.__table__  # type: ignore[assignment]
rejected_messages: Table = RejectedMessageRow.__table__  # type: ignore[assignment]


def phi_columns(metadata: MetaData = Base.metadata) -> list[str]:
    """``table.column`` for every column marked as holding protected health information."""
    return sorted(
        f"{table.name}.{column.name}"
        for table in metadata.tables.values()
        for column in table.columns
        if column.info.get("phi")
    )


# --- paging: availability, location fixes, escalation chains and steps, pages, replies --------


class ClinicianStateRow(Base):
    """A clinician's availability as they last set it (no row: available)."""

    __tablename__ = "clinician_states"

    clinician_id: Mapped[str] = mapped_column(String, primary_key=True)
    availability: Mapped[str] = mapped_column(String)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    via: Mapped[str] = mapped_column(String)


class LocationFixRow(Base):
    """One position report of a clinician (staff, not a patient: not protected)."""

    __tablename__ = "location_fixes"
    __table_args__ = (Index(None, "clinician_id", "fixed_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    clinician_id: Mapped[str] = mapped_column(String)
    lat: Mapped[float] = mapped_column(Float)
    lon: Mapped[float] = mapped_column(Float)
    fixed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    source: Mapped[str] = mapped_column(String)
    accuracy_m: Mapped[float | None] = mapped_column(Float)


class EscalationChainRow(Base):
    """One escalation for one incident: the program's chain as it was when it started."""

    __tablename__ = "escalation_chains"
    __table_args__ = (Index(None, "incident_pk"), Index(None, "state"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    incident_pk: Mapped[int] = mapped_column(Id, ForeignKey("incidents.id"))
    kind: Mapped[str] = mapped_column(String)  # dispatch | notify
    program: Mapped[str] = mapped_column(String)
    response: Mapped[str] = mapped_column(String)  # the decision that started it
    steps: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # snapshot of the program's chain
    state: Mapped[str] = mapped_column(String)  # open, accepted, exhausted, cancelled
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    accepted_by: Mapped[str | None] = mapped_column(String)
    pages_sent: Mapped[int] = mapped_column(Integer)  # numbers the page references


class EscalationStepRow(Base):
    """One step of a chain, due at ``due_at``; (chain, step) is unique: never run twice."""

    __tablename__ = "escalation_steps"
    __table_args__ = (UniqueConstraint("chain_id", "step"), Index(None, "state", "due_at"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    chain_id: Mapped[int] = mapped_column(Id, ForeignKey("escalation_chains.id"))
    step: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String)  # page, supervisor, dispatch
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state: Mapped[str] = mapped_column(String)  # pending, claimed, done, cancelled
    claimed_by: Mapped[str | None] = mapped_column(String)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String)  # paged, no-candidate, notified, ...
    dispatch: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # choice and candidates


class PageRow(Base):
    """One page to one person: the outbox row its delivery is claimed from."""

    __tablename__ = "pages"
    __table_args__ = (
        Index(None, "delivery", "next_try_at"),
        Index(None, "clinician_id", "created_at"),
        Index(None, "gateway", "gateway_id"),
        Index(None, "chain_id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    page_ref: Mapped[str] = mapped_column(String, unique=True)
    chain_id: Mapped[int] = mapped_column(Id, ForeignKey("escalation_chains.id"))
    step_id: Mapped[int] = mapped_column(Id, ForeignKey("escalation_steps.id"))
    incident_pk: Mapped[int] = mapped_column(Id, ForeignKey("incidents.id"))
    kind: Mapped[str] = mapped_column(String)  # page (answerable) or notice
    clinician_id: Mapped[str | None] = mapped_column(String)  # None: a bare supervisor endpoint
    state: Mapped[str] = mapped_column(String)  # open, accepted, declined, en_route, ...
    text: Mapped[str] = mapped_column(String)  # free of protected information by construction
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    answered_via: Mapped[str | None] = mapped_column(String)
    # Delivery, in the clinician's order of endpoints: pending, sending, submitted, failed.
    endpoints: Mapped[list[dict[str, str]]] = phi_column(JSON)  # [{gateway, address}]
    endpoint_index: Mapped[int] = mapped_column(Integer)
    delivery: Mapped[str] = mapped_column(String)
    next_try_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    gateway: Mapped[str | None] = mapped_column(String)
    gateway_id: Mapped[str | None] = mapped_column(String)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    receipt: Mapped[str | None] = mapped_column(String)  # the carrier's latest word
    receipt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String)  # a gateway code, never text


class PageReplyRow(Base):
    """Every reply received, matched or not; its text and sender are the clinician's own."""

    __tablename__ = "page_replies"
    __table_args__ = (Index(None, "page_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    page_id: Mapped[int | None] = mapped_column(Id, ForeignKey("pages.id"))
    gateway: Mapped[str] = mapped_column(String)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    answer: Mapped[str | None] = mapped_column(String)
    matched_by: Mapped[str | None] = mapped_column(String)  # page_ref, gateway_id, sender
    outcome: Mapped[str] = mapped_column(String)  # applied, unmatched, page-closed, ...
    sender: Mapped[str | None] = phi_column(String)
    text: Mapped[str] = phi_column(String)


clinician_states: Table = ClinicianStateRow.__table__  # type: ignore[assignment]
location_fixes: Table = LocationFixRow.__table__  # type: ignore[assignment]
escalation_chains: Table = EscalationChainRow.__table__  # type: ignore[assignment]
escalation_steps: Table = EscalationStepRow.__table__  # type: ignore[assignment]
pages: Table = PageRow.__table__  # type: ignore[assignment]
page_replies: Table = PageReplyRow.__table__  # type: ignore[assignment]


# --- referrals: HL7 v2 referrals to treatment providers, their outbox, consents and replies ---


class ConsentRow(Base):
    """A recorded 42 CFR Part 2 consent: who may receive SUD information, for what purpose."""

    __tablename__ = "referral_consents"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    consent_ref: Mapped[str] = mapped_column(String, unique=True)  # the consent form's id
    provider: Mapped[str] = mapped_column(String)
    purpose: Mapped[str] = mapped_column(String)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ReferralRow(Base):
    """One referral of a person met on an incident to a treatment provider."""

    __tablename__ = "referrals"
    __table_args__ = (Index(None, "incident_ref"), Index(None, "state"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    ref: Mapped[str] = mapped_column(String(32), unique=True)  # RF1-6, our referral id
    incident_ref: Mapped[str] = mapped_column(String)  # the CAD incident number
    provider: Mapped[str] = mapped_column(String)
    service_type: Mapped[str] = mapped_column(String)
    urgency: Mapped[str] = mapped_column(String(16))
    program: Mapped[str | None] = mapped_column(String)
    region: Mapped[str | None] = mapped_column(String)
    referring_clinician: Mapped[str] = mapped_column(String)  # an id, never a name
    # queued, delivered, held, cancelled
    state: Mapped[str] = mapped_column(String(16))
    hold_reason: Mapped[str | None] = mapped_column(String)  # a code and fixed wording
    part2: Mapped[bool] = mapped_column(Boolean)
    consent_id: Mapped[int | None] = mapped_column(Id, ForeignKey("referral_consents.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The provider's clinical answer (RRI^I12 RF1-1): accepted, rejected, pending, expired.
    outcome: Mapped[str | None] = mapped_column(String(16))
    outcome_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    appointment_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    person: Mapped[dict[str, Any]] = phi_column(JSON)  # demographics and contact as recorded
    summary: Mapped[str | None] = phi_column(String)  # written by the clinician
    peer_error: Mapped[str | None] = phi_column(String)  # the peer's text may quote the message


class ReferralMessageRow(Base):
    """The outbox: one HL7 message, its exact bytes and its delivery state.

    ``state``: pending (due at ``next_due``), sending (claimed until ``lease_until``),
    delivered, held (for a person), cancelled.
    """

    __tablename__ = "referral_messages"
    __table_args__ = (Index(None, "state", "next_due"), Index(None, "referral_id"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    referral_id: Mapped[int] = mapped_column(Id, ForeignKey("referrals.id"))
    control_id: Mapped[str] = mapped_column(String(20), unique=True)  # MSH-10
    provider: Mapped[str] = mapped_column(String)
    profile: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_due: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String)
    last_error: Mapped[str | None] = mapped_column(String)  # our own wording, never the peer's
    ack_code: Mapped[str | None] = mapped_column(String(2))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    acked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    message: Mapped[bytes] = phi_column(LargeBinary)  # ER7, built once, resent unchanged


class DisclosureRow(Base):
    """Accounting of disclosures: what left, to whom, when, under which consent."""

    __tablename__ = "referral_disclosures"
    __table_args__ = (Index(None, "referral_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    referral_id: Mapped[int] = mapped_column(Id, ForeignKey("referrals.id"))
    message_id: Mapped[int] = mapped_column(Id, ForeignKey("referral_messages.id"))
    control_id: Mapped[str] = mapped_column(String(20))
    provider: Mapped[str] = mapped_column(String)
    consent_id: Mapped[int | None] = mapped_column(Id, ForeignKey("referral_consents.id"))
    what: Mapped[str] = mapped_column(String)  # a description of the record, not its content
    disclosed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class InboundHl7Row(Base):
    """Every message received on the MLLP listener, verbatim, with its parse error if any."""

    __tablename__ = "hl7_inbound"
    __table_args__ = (Index(None, "received_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    peer: Mapped[str | None] = mapped_column(String)
    message_type: Mapped[str | None] = mapped_column(String)
    control_id: Mapped[str | None] = mapped_column(String)
    acked_control_id: Mapped[str | None] = mapped_column(String)  # MSA-2
    referral_id: Mapped[int | None] = mapped_column(Id, ForeignKey("referrals.id"))
    error_code: Mapped[str | None] = mapped_column(String)
    error_reason: Mapped[str | None] = mapped_column(String)  # never quotes content
    raw: Mapped[bytes] = phi_column(LargeBinary)


class ReferralOutcomeRow(Base):
    """A provider's RRI^I12 answer to a referral."""

    __tablename__ = "referral_outcomes"
    __table_args__ = (Index(None, "referral_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    referral_id: Mapped[int] = mapped_column(Id, ForeignKey("referrals.id"))
    inbound_id: Mapped[int] = mapped_column(Id, ForeignKey("hl7_inbound.id"))
    status: Mapped[str] = mapped_column(String(16))  # accepted, rejected, pending, expired
    appointment_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


referral_consents: Table = ConsentRow.__table__  # type: ignore[assignment]
referrals: Table = ReferralRow.__table__  # type: ignore[assignment]
referral_messages: Table = ReferralMessageRow.__table__  # type: ignore[assignment]
referral_disclosures: Table = DisclosureRow.__table__  # type: ignore[assignment]
hl7_inbound: Table = InboundHl7Row.__table__  # type: ignore[assignment]
referral_outcomes: Table = ReferralOutcomeRow.__table__  # type: ignore[assignment]


# --- outcomes: encounters and the people they link -------------------------------------------


class PersonRow(Base):
    """A pseudonymous person: a random public id, nothing identifying."""

    __tablename__ = "persons"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    pseudonym: Mapped[str] = mapped_column(String, unique=True)  # random, shown in exports
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PersonIdentifierRow(Base):
    """One recorded identifier of a person, found again through its keyed blind index.

    ``blind_index`` is HMAC-SHA256 (key from a file) of the normalized identifier; the raw
    identifier is kept only in ``value`` (protected) so that the index can be rebuilt under a
    new key.
    """

    __tablename__ = "person_identifiers"
    __table_args__ = (UniqueConstraint("kind", "blind_index"), Index(None, "person_id"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    person_id: Mapped[int] = mapped_column(Id, ForeignKey("persons.id"))
    kind: Mapped[str] = mapped_column(String)  # name_dob, mrn, cad_person
    blind_index: Mapped[str] = mapped_column(String)  # hex
    key_id: Mapped[str] = mapped_column(String)  # which key made blind_index
    value: Mapped[str] = phi_column(String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


# Columns the outcome report groups by, each with a covering index (see EncounterRow).
REPORT_INDEXED = (
    "response_seconds",
    "page_ack_seconds",
    "on_scene_seconds",
    "officer_returned_seconds",
    "zone",
)


class EncounterRow(Base):
    """One behavioral-health incident a clinician handled: pre-filled from CAD and the
    daemon's records, completed by the clinician. No free text and no identifiers: every
    column here may feed an aggregate report."""

    __tablename__ = "encounters"
    __table_args__ = (
        UniqueConstraint("incident_id"),
        Index(None, "call_received_at"),
        Index(None, "person_id", "call_received_at"),
        # The outcome report (migration 0005): HL7 referrals find their encounter by CAD
        # number; each per-second histogram and the zone counts read a covering index in
        # value order instead of sorting the table's rows.
        Index(None, "cad_incident_no"),
        *(
            Index(
                f"ix_encounters_report_{column}",
                "bh_nexus_confirmed",
                column,
                "call_received_epoch",
                "program",
            )
            for column in REPORT_INDEXED
        ),
        # The report's per-person pass reads each person's BH encounters in (time, id) order,
        # its window order, from this index alone: no sort, no row fetched.
        Index(
            "ix_encounters_report_person",
            "person_id",
            "call_received_epoch",
            "id",
            "bh_nexus_confirmed",
            "program",
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    incident_id: Mapped[int | None] = mapped_column(Id, ForeignKey("incidents.id"))
    person_id: Mapped[int | None] = mapped_column(Id, ForeignKey("persons.id"))
    program: Mapped[str] = mapped_column(String)
    team_type: Mapped[str | None] = mapped_column(String)
    clinician: Mapped[str | None] = mapped_column(String)  # responder id
    status: Mapped[str] = mapped_column(String)  # open, completed
    # From CAD and the classifier.
    cad_incident_no: Mapped[str | None] = mapped_column(String)
    agency: Mapped[str | None] = mapped_column(String)
    zone: Mapped[str | None] = mapped_column(String)
    call_type: Mapped[str | None] = mapped_column(String)
    call_source: Mapped[str | None] = mapped_column(String)
    priority: Mapped[str | None] = mapped_column(String)
    classifier_response: Mapped[str | None] = mapped_column(String)
    classifier_category: Mapped[str | None] = mapped_column(String)
    bh_nexus_confirmed: Mapped[bool | None] = mapped_column(Boolean)
    # The timeline; each is filled by whoever knows it (CAD, paging, the clinician).
    call_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    clinician_paged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    page_ack_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    en_route_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    on_scene_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cleared_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    officer_cleared_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    response_mode: Mapped[str | None] = mapped_column(String)
    # Derived from the timeline by the same UPDATE that changes it (encounters.refresh_derived):
    # whole seconds, so that reports aggregate integers on every backend.
    call_received_epoch: Mapped[int] = mapped_column(BigInteger)
    response_seconds: Mapped[int | None] = mapped_column(Integer)  # on scene - paged
    page_ack_seconds: Mapped[int | None] = mapped_column(Integer)  # acknowledged - paged
    on_scene_seconds: Mapped[int | None] = mapped_column(Integer)  # cleared - on scene
    officer_returned_seconds: Mapped[int | None] = mapped_column(Integer)  # cleared - officer
    # Completed by the clinician (fixed vocabularies, see corespond.daemon.encounters).
    presenting_issues: Mapped[list[str]] = mapped_column(JSON)
    actions: Mapped[list[str]] = mapped_column(JSON)
    service_on_scene: Mapped[bool] = mapped_column(Boolean)  # at least one action
    disposition: Mapped[str | None] = mapped_column(String)
    destination_type: Mapped[str | None] = mapped_column(String)
    would_have_been_arrest: Mapped[bool | None] = mapped_column(Boolean)
    would_have_been_ed: Mapped[bool | None] = mapped_column(Boolean)
    use_of_force: Mapped[bool | None] = mapped_column(Boolean)
    injury_subject: Mapped[bool | None] = mapped_column(Boolean)
    injury_officer: Mapped[bool | None] = mapped_column(Boolean)
    weapon_present: Mapped[bool | None] = mapped_column(Boolean)
    demographics_source: Mapped[str | None] = mapped_column(String)
    race_ethnicity: Mapped[list[str]] = mapped_column(JSON)
    race_group: Mapped[str | None] = mapped_column(String)  # one selection or multiracial
    gender: Mapped[str | None] = mapped_column(String)
    age_band: Mapped[str | None] = mapped_column(String)
    veteran: Mapped[str | None] = mapped_column(String)
    housing: Mapped[str | None] = mapped_column(String)
    language: Mapped[str | None] = mapped_column(String)
    custom: Mapped[dict[str, Any]] = mapped_column(JSON)  # outcomes.custom_fields
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EncounterReferralRow(Base):
    """A referral made at an encounter and what came of it: the ``referral_outcomes`` shape
    the outcome report reads (HL7 referrals map onto the same columns)."""

    __tablename__ = "encounter_referrals"
    __table_args__ = (Index(None, "encounter_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    encounter_id: Mapped[int] = mapped_column(Id, ForeignKey("encounters.id"))
    referred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    provider: Mapped[str] = mapped_column(String)  # provider id, not a person
    outcome: Mapped[str] = mapped_column(String)  # pending, accepted, declined, enrolled...
    appointment_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


persons: Table = PersonRow.__table__  # type: ignore[assignment]
person_identifiers: Table = PersonIdentifierRow.__table__  # type: ignore[assignment]
encounters: Table = EncounterRow.__table__  # type: ignore[assignment]
encounter_referrals: Table = EncounterReferralRow.__table__  # type: ignore[assignment]


# --- ops: dashboard sessions ---------------------------------------------------------------------


class DashboardSessionRow(Base):
    """A signed-in dashboard user, shared by every daemon on the database. Only the SHA-256 of
    the session id (the cookie) is kept: a copy of the table opens no session. The user is a
    staff login name, not a patient."""

    __tablename__ = "dashboard_sessions"
    __table_args__ = (
        Index(None, "user_name"),
        Index(None, "expires_at"),
        Index(None, "last_seen_at"),
    )

    id_hash: Mapped[str] = mapped_column(String, primary_key=True)  # hex SHA-256 of the id
    user_name: Mapped[str] = mapped_column(String)
    role: Mapped[str] = mapped_column(String)
    clinician: Mapped[str | None] = mapped_column(String)
    csrf: Mapped[str] = mapped_column(String)  # the token its forms carry back
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)  # idle expiry counts from it
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)  # the absolute limit


dashboard_sessions: Table = DashboardSessionRow.__table__  # type: ignore[assignment]


# --- paging latency and incidents that become eligible later (issue 4) -------------------------


class ChainWaitRow(Base):
    """An incident whose decision calls for a chain that could not start: it has no location
    yet, or no program covers it. A later snapshot that gives it one starts the chain (and
    deletes this row); ``pages show`` and audits can tell why nobody was paged meanwhile."""

    __tablename__ = "chain_waits"

    incident_pk: Mapped[int] = mapped_column(Id, ForeignKey("incidents.id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String)  # dispatch | notify: the chain it waits to start
    response: Mapped[str] = mapped_column(String)  # the decision it waits with
    reason: Mapped[str] = mapped_column(String)  # no-location | out-of-zone
    since: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


chain_waits: Table = ChainWaitRow.__table__  # type: ignore[assignment]
# A chain's step reads the pages of its incident (attempts, who was paged or declined).
Index("ix_pages_incident_pk", PageRow.__table__.c.incident_pk)


# --- automatic referrals (mobile: issue 5 item 1) ---------------------------------------------


class AutoReferralRow(Base):
    """A referral a configured trigger asks for (``referrals.auto``): one per incident,
    trigger, provider and service type, due until the referral service has created it, in the
    same transaction that marks this row done."""

    __tablename__ = "auto_referrals"
    __table_args__ = (
        UniqueConstraint("incident_pk", "trigger", "provider", "service_type"),
        Index(None, "state", "due_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    incident_pk: Mapped[int] = mapped_column(Id, ForeignKey("incidents.id"))
    trigger: Mapped[str] = mapped_column(String)  # disposition:<code> or rule:<id>
    provider: Mapped[str] = mapped_column(String)
    service_type: Mapped[str] = mapped_column(String)
    referring_clinician: Mapped[str | None] = mapped_column(String)  # a responder id
    program: Mapped[str | None] = mapped_column(String)
    state: Mapped[str] = mapped_column(String)  # pending, claimed, done, refused
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    referral_ref: Mapped[str | None] = mapped_column(String)  # referrals.ref once created
    refusal: Mapped[str | None] = mapped_column(String)  # why it was not created (ids only)


auto_referrals: Table = AutoReferralRow.__table__  # type: ignore[assignment]


# --- Outcome report rollups (issue 6, migration 0009_rollup) ------------------------------------
# Kept by corespond.daemon.rollups in the same transaction as every encounter change, so that
# the outcome report sums a few thousand rows instead of reading a million encounters. Per UTC
# month x program x one reporting dimension (DIMENSIONS): a row per value of that dimension.
# ``recorded`` is false (and ``value`` empty) where the encounter has no value.

# The per-encounter counts the report needs, one column each (outcomes.encounter_count_columns).
ROLLUP_COUNTS = (
    "encounters", "bh", "documented", "arrested", "enforcement", "no_action", "with_referral",
    "voluntary", "involuntary", "ems", "ed_diverted", "cf_arrest", "jail_diverted", "active",
    "served", "use_of_force", "injury_subject", "injury_officer", "unlinked",
    "voluntary_crisis_center", "voluntary_ed", "voluntary_detox", "voluntary_shelter",
    "voluntary_home_family", "voluntary_other",
    # BH encounters with a referral (migration 0012_reportflags; rollups.referral_flags).
    "referred",
)  # fmt: skip


class ReportRollupCountRow(Base):
    """Encounter counts per month, program and value of one dimension."""

    __tablename__ = "report_rollup_counts"
    __table_args__ = {"sqlite_with_rowid": False}  # read in key order

    dim: Mapped[str] = mapped_column(String, primary_key=True)  # all, agency, zone, race...
    recorded: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    value: Mapped[str] = mapped_column(String, primary_key=True)
    month: Mapped[str] = mapped_column(String, primary_key=True)  # YYYY-MM, UTC
    program: Mapped[str] = mapped_column(String, primary_key=True)


for _name in ROLLUP_COUNTS:
    ReportRollupCountRow.__table__.append_column(  # type: ignore[attr-defined]
        Column(_name, Integer, nullable=False)
    )


class ReportRollupDurationRow(Base):
    """Per-second duration counts (response, page ack, on scene, officer time returned) of BH
    encounters per month, program and value of one dimension: exact medians and percentiles."""

    __tablename__ = "report_rollup_durations"
    __table_args__ = {"sqlite_with_rowid": False}  # read in key order

    measure: Mapped[str] = mapped_column(String, primary_key=True)
    dim: Mapped[str] = mapped_column(String, primary_key=True)
    recorded: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    value: Mapped[str] = mapped_column(String, primary_key=True)
    seconds: Mapped[int] = mapped_column(Integer, primary_key=True)
    month: Mapped[str] = mapped_column(String, primary_key=True)
    program: Mapped[str] = mapped_column(String, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)


REPORT_FACTS_BY_MONTH = (
    "month", "person_id", "call_received_epoch", "program", "gap", "span", "gap_program",
    "span_program", "referred", "enrolled", "enrolled_at", "linked_30", "linked_90",
)  # fmt: skip


class ReportPersonFactRow(Base):
    """One row per BH encounter linked to a person: its place in that person's timeline (all
    programs, and within its program), so the report's per-person pass needs no window."""

    __tablename__ = "report_person_facts"
    __table_args__ = (
        # The report by month groups by (month, person): read in this order, not sorted
        # (migration 0012_reportflags).
        Index("ix_report_person_facts_month", *REPORT_FACTS_BY_MONTH),
        {"sqlite_with_rowid": False},  # read in key order
    )

    person_id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=False)
    call_received_epoch: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    encounter_id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=False)
    program: Mapped[str] = mapped_column(String)
    month: Mapped[str] = mapped_column(String)
    agency: Mapped[str | None] = mapped_column(String)
    zone: Mapped[str | None] = mapped_column(String)
    race_group: Mapped[str | None] = mapped_column(String)
    gender: Mapped[str | None] = mapped_column(String)
    age_band: Mapped[str | None] = mapped_column(String)
    # Seconds to the person's next BH encounter (None: none later); all programs / this one.
    gap: Mapped[int | None] = mapped_column(BigInteger)
    gap_program: Mapped[int | None] = mapped_column(BigInteger)
    # Seconds since the person's BH encounter fu_threshold - 1 before this one (see
    # report_rollup_state): frequent utilizer when within the window.
    span: Mapped[int | None] = mapped_column(BigInteger)
    span_program: Mapped[int | None] = mapped_column(BigInteger)
    # The encounter's referrals (migration 0012_reportflags), as the report's default
    # referral_outcomes relation sees them: referred at all, enrolled, the earliest enrolled
    # appointment (epoch seconds), enrolled with an appointment within 30 / 90 days of the call.
    referred: Mapped[int] = mapped_column(Integer)
    enrolled: Mapped[int] = mapped_column(Integer)
    enrolled_at: Mapped[int | None] = mapped_column(BigInteger)
    linked_30: Mapped[int] = mapped_column(Integer)
    linked_90: Mapped[int] = mapped_column(Integer)


class ReportRollupStateRow(Base):
    """What the rollups were built with: ``fu_threshold`` (the person facts' span)."""

    __tablename__ = "report_rollup_state"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


report_rollup_counts: Table = ReportRollupCountRow.__table__  # type: ignore[assignment]
report_rollup_durations: Table = ReportRollupDurationRow.__table__  # type: ignore[assignment]
report_person_facts: Table = ReportPersonFactRow.__table__  # type: ignore[assignment]
report_rollup_state: Table = ReportRollupStateRow.__table__  # type: ignore[assignment]


# --- What a page costs (issue 4, migration 0010_pagecost) ---------------------------------------


class ClinicianPositionRow(Base):
    """A clinician's latest fix (of ``location_fixes``), kept by ``write_fix`` in the fix's
    transaction: a page step reads one row per clinician, not the fix history."""

    __tablename__ = "clinician_positions"

    clinician_id: Mapped[str] = mapped_column(String, primary_key=True)
    lat: Mapped[float] = mapped_column(Float)
    lon: Mapped[float] = mapped_column(Float)
    fixed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    source: Mapped[str] = mapped_column(String)
    accuracy_m: Mapped[float | None] = mapped_column(Float)


clinician_positions: Table = ClinicianPositionRow.__table__  # type: ignore[assignment]
# A page step reads who is busy by page state, and the recent window's pages by time.
Index("ix_pages_state", PageRow.__table__.c.state)
Index("ix_pages_created_at", PageRow.__table__.c.created_at)
# --- referral cost and idempotency (refcost: issue 5, migration 0011_refcost) ------------------


class ReferralIdempotencyRow(Base):
    """A caller's idempotency key for one referral (the API's ``Idempotency-Key`` header, the
    referral form's submission nonce), stored in the referral's own transaction: a second
    submit with the same key answers with the first referral instead of making another."""

    __tablename__ = "referral_idempotency"

    key: Mapped[str] = mapped_column(String, primary_key=True)  # <origin>:<caller's key>
    referral_id: Mapped[int] = mapped_column(Id, ForeignKey("referrals.id"), unique=True)
    # SHA-256 of the request as first submitted (a reuse for another request is refused); it
    # is derived from the person's details, so it is kept like them.
    digest: Mapped[str] = phi_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


referral_idempotency: Table = ReferralIdempotencyRow.__table__  # type: ignore[assignment]
# The automatic referrals' start-up look-back finds the first decision since a time.
Index("ix_decisions_created_at", DecisionRow.__table__.c.created_at)
