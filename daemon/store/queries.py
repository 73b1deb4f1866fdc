"""Reads: synchronous functions over a Connection, plain dataclasses out.

Run them in a thread (:meth:`IncidentStore.run_read`) or from the CLI; no ORM object ever
leaves the function that read it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, func, select

from corespond.daemon.decision import Decision, Evidence, Response
from corespond.daemon.snapshot import parse_time
from corespond.daemon.store.tables import (
    clean_text,
    decisions,
    incidents,
    rejected_messages,
    snapshots,
)

DIGEST_PREFIX = 12


@dataclass(frozen=True, slots=True)
class IncidentRow:
    """An incident as the store holds it: its current, derived state."""

    id: int
    source: str
    external_id: str
    incident_number: str | None
    status: str
    call_type: str | None
    call_type_code: str | None
    apco_type: str | None
    priority: str | None
    agency: str | None
    zone: str | None
    lat: float | None
    lon: float | None
    opened_at: datetime | None
    closed_at: datetime | None
    updated_at: datetime
    first_received_at: datetime
    last_received_at: datetime
    snapshot_count: int
    current_snapshot_id: int | None
    current_decision_id: int | None
    behavioral_health: bool
    category: str | None
    response: str


# The incident columns that its snapshots and decisions determine (see derive_incident).
DERIVED_COLUMNS = tuple(f.name for f in fields(IncidentRow) if f.name not in ("id", "source"))


@dataclass(frozen=True, slots=True)
class SnapshotSummary:
    id: int
    received_at: datetime
    source_updated_at: datetime
    digest: str  # the first DIGEST_PREFIX hex digits of the sha256 of the raw bytes
    feed: str
    format: str
    current: bool


@dataclass(frozen=True, slots=True)
class DecisionSummary:
    id: int
    snapshot_id: int
    created_at: datetime
    changed: bool
    decision: Decision


@dataclass(frozen=True, slots=True)
class IncidentDetail:
    incident: IncidentRow
    snapshots: list[SnapshotSummary]
    decisions: list[DecisionSummary]


@dataclass(frozen=True, slots=True)
class Totals:
    incidents: int
    snapshots: int
    decisions: int
    rejects: int


@dataclass(frozen=True, slots=True)
class RejectSummary:
    """A quarantined message, without its bytes (they are protected)."""

    id: int
    feed: str
    format: str
    received_at: datetime
    code: str
    reason: str
    where: str | None
    origin_name: str | None
    digest: str
    size: int


# What a decisions row needs to become a Decision again.
DECISION_COLUMNS = tuple(
    decisions.c[name]
    for name in (
        "behavioral_health",
        "category",
        "response",
        "score",
        "rules",
        "evidence",
        "ruleset",
    )
)


def decision_from_row(row: Any) -> Decision:
    """A :class:`Decision` from a row holding :data:`DECISION_COLUMNS`."""
    return Decision(
        behavioral_health=bool(row.behavioral_health),
        category=row.category,
        response=Response(row.response),
        score=float(row.score),
        rules=tuple(row.rules),
        evidence=tuple(
            Evidence(e["rule"], e["field"], int(e["start"]), int(e["end"]), e["text"])
            for e in row.evidence
        ),
        ruleset=row.ruleset,
    )


def _incident(row: Row[Any]) -> IncidentRow:
    return IncidentRow(**{f.name: getattr(row, f.name) for f in fields(IncidentRow)})


_INCIDENT_COLUMNS = [incidents.c[f.name] for f in fields(IncidentRow)]


def list_incidents(
    conn: Connection,
    *,
    limit: int = 50,
    status: str | None = None,
    behavioral_health: bool | None = None,
) -> list[IncidentRow]:
    """The most recently updated incidents first (source time of their current snapshot)."""
    stmt = select(*_INCIDENT_COLUMNS).order_by(incidents.c.updated_at.desc(), incidents.c.id.desc())
    if status is not None:
        stmt = stmt.where(incidents.c.status == status)
    if behavioral_health is not None:
        stmt = stmt.where(incidents.c.behavioral_health == behavioral_health)
    return [_incident(row) for row in conn.execute(stmt.limit(limit))]


def find_incident(conn: Connection, ref: str) -> IncidentRow | None:
    """The incident ``ref`` names: its number in the store, its external id, or
    ``source:external_id``. External ids may hold colons (EIDO URNs), so an exact external id
    is tried before the ``source:`` split."""
    ref = ref.strip()
    base = select(*_INCIDENT_COLUMNS)
    if ref.isdigit():
        row = conn.execute(base.where(incidents.c.id == int(ref))).first()
        if row is not None:
            return _incident(row)
    # The same external id from two sources: the most recently updated one.
    row = conn.execute(
        base.where(incidents.c.external_id == ref).order_by(incidents.c.updated_at.desc())
    ).first()
    if row is None and ":" in ref:
        source, external_id = ref.split(":", 1)
        row = conn.execute(
            base.where(incidents.c.source == source, incidents.c.external_id == external_id)
        ).first()
    return _incident(row) if row is not None else None


def incident_detail(conn: Connection, ref: str) -> IncidentDetail | None:
    """An incident with all its snapshots and decisions, oldest source time first."""
    incident = find_incident(conn, ref)
    if incident is None:
        return None
    s, d = snapshots.c, decisions.c
    snaps = [
        SnapshotSummary(
            id=row.id,
            received_at=row.received_at,
            source_updated_at=row.source_updated_at,
            digest=row.digest[:DIGEST_PREFIX],
            feed=row.feed,
            format=row.format,
            current=row.id == incident.current_snapshot_id,
        )
        for row in conn.execute(
            select(s.id, s.received_at, s.source_updated_at, s.digest, s.feed, s.format)
            .where(s.incident_id == incident.id)
            .order_by(s.source_updated_at, s.received_at, s.id)
        )
    ]
    decided = [
        DecisionSummary(
            row.id, row.snapshot_id, row.created_at, row.changed, decision_from_row(row)
        )
        for row in conn.execute(
            select(d.id, d.snapshot_id, d.created_at, d.changed, *DECISION_COLUMNS)
            .where(d.incident_id == incident.id)
            .order_by(d.id)
        )
    ]
    return IncidentDetail(incident, snaps, decided)


def totals(conn: Connection) -> Totals:
    counts = [
        select(func.count()).select_from(table).scalar_subquery()
        for table in (incidents, snapshots, decisions, rejected_messages)
    ]
    row = conn.execute(select(*counts)).one()
    return Totals(*(int(n) for n in row))


REJECT_COLUMNS = tuple(c for c in rejected_messages.c if c.name != "raw")


def list_rejects(conn: Connection, limit: int = 50) -> list[RejectSummary]:
    """The most recent rejects first."""
    r = rejected_messages.c
    stmt = (
        select(*REJECT_COLUMNS, func.length(r.raw).label("size"))
        .order_by(r.received_at.desc(), r.id.desc())
        .limit(limit)
    )
    return [RejectSummary(**row._asdict()) for row in conn.execute(stmt)]


def derive_incident(conn: Connection, incident_pk: int) -> dict[str, Any]:
    """The incident's derived columns (:data:`DERIVED_COLUMNS`) recomputed from its snapshots
    and their decisions alone: the row must equal this (an audit check).

    The current snapshot is the one with the newest source time; on a tie, the one received
    last; on a tie again, the one stored last.
    """
    s, d = snapshots.c, decisions.c
    external_id = conn.execute(
        select(incidents.c.external_id).where(incidents.c.id == incident_pk)
    ).scalar_one()
    stats = conn.execute(
        select(func.count(), func.min(s.received_at), func.max(s.received_at)).where(
            s.incident_id == incident_pk
        )
    ).one()
    current = conn.execute(
        select(
            s.id,
            s.source_updated_at,
            s.public,
            d.id.label("decision_id"),
            d.behavioral_health,
            d.category,
            d.response,
        )
        .join_from(snapshots, decisions, d.snapshot_id == s.id)
        .where(s.incident_id == incident_pk)
        .order_by(s.source_updated_at.desc(), s.received_at.desc(), s.id.desc())
        .limit(1)
    ).one()
    first, last = stats[1], stats[2]
    public = current.public
    location = public.get("location") or {}

    def time(key: str) -> datetime | None:
        return parse_time(public[key], key) if public.get(key) else None

    return {
        "external_id": external_id,
        "incident_number": clean_text(public.get("number")),
        "status": public["status"],
        "call_type": clean_text(public.get("call_type")),
        "call_type_code": clean_text(public.get("call_type_code")),
        "apco_type": clean_text(public.get("apco_type")),
        "priority": clean_text(public.get("priority")),
        "agency": clean_text(public.get("agency")),
        "zone": clean_text(public.get("zone")),
        "lat": location.get("lat"),
        "lon": location.get("lon"),
        "opened_at": time("opened_at"),
        "closed_at": time("closed_at"),
        "updated_at": current.source_updated_at,
        "first_received_at": first,
        "last_received_at": last,
        "snapshot_count": int(stats[0]),
        "current_snapshot_id": current.id,
        "current_decision_id": current.decision_id,
        "behavioral_health": bool(current.behavioral_health),
        "category": current.category,
        "response": current.response,
    }


def incident_columns_of(conn: Connection, incident_pk: int) -> dict[str, Any]:
    """The incident row's :data:`DERIVED_COLUMNS`, to compare with :func:`derive_incident`."""
    row = conn.execute(
        select(*(incidents.c[name] for name in DERIVED_COLUMNS)).where(
            incidents.c.id == incident_pk
        )
    ).one()
    return dict(row._mapping)


def audit_incidents(conn: Connection) -> list[int]:
    """Ids of the incidents whose row differs from what their snapshots say (none, normally)."""
    ids = conn.execute(select(incidents.c.id).order_by(incidents.c.id)).scalars().all()
    return [pk for pk in ids if derive_incident(conn, pk) != incident_columns_of(conn, pk)]
