"""Synthetic snapshots, decisions and records for the store tests (no real person's data)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from corespond.daemon.decision import Decision, Evidence, Response
from corespond.daemon.snapshot import (
    GeoPoint,
    IncidentStatus,
    Location,
    Note,
    Person,
    Snapshot,
    snapshot_to_json,
)
from corespond.daemon.store.writer import RejectRecord, SnapshotRecord

T0 = datetime(2031, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def snapshot(
    incident_id: str = "INC-1",
    *,
    updated: float = 0,
    status: IncidentStatus = IncidentStatus.ACTIVE,
    call_type: str = "WELFARE CHECK",
    narrative: str = "caller reports neighbor Testy McTestface confused",
    address: str = "12 Imaginary Lane",
    person: str = "Testy McTestface",
) -> Snapshot:
    return Snapshot(
        incident_id=incident_id,
        updated_at=at(updated),
        status=status,
        incident_number=f"N{incident_id}",
        call_type=call_type,
        call_type_code="WEL",
        apco_type="WELFARE",
        priority="2",
        agency="FAKEPD",
        zone="Z9",
        opened_at=at(-60),
        closed_at=at(updated) if status is IncidentStatus.CLOSED else None,
        location=Location(GeoPoint(44.5, -93.25), address, "Nowhere", "ZZ"),
        notes=(Note(narrative, at(updated)),),
        persons=(Person(("caller",), person, "1990-01-01", "555-0100", "calm"),),
    )


def decision(
    response: Response = Response.NONE,
    *,
    behavioral_health: bool | None = None,
    category: str | None = None,
    evidence_text: str = "confused",
) -> Decision:
    bh = response is not Response.NONE if behavioral_health is None else behavioral_health
    return Decision(
        behavioral_health=bh,
        category=category if category is not None else ("mental-health" if bh else None),
        response=response,
        score=0.75 if bh else 0.0,
        rules=("mh.confused",) if bh else (),
        evidence=(Evidence("mh.confused", "narrative", 0, len(evidence_text), evidence_text),)
        if bh
        else (),
        ruleset="test-1",
    )


def record(
    snap: Snapshot | None = None,
    dec: Decision | None = None,
    *,
    received: float = 0,
    source: str = "test",
    feed: str = "feed-a",
    raw: bytes | None = None,
) -> SnapshotRecord:
    snap = snap or snapshot()
    return SnapshotRecord(
        feed=feed,
        source=source,
        format="corespond-json",
        received_at=at(received),
        raw=raw if raw is not None else json.dumps(snapshot_to_json(snap)).encode(),
        snapshot=snap,
        decision=dec or decision(),
    )


def reject(raw: bytes = b"{not json", *, received: float = 0, feed: str = "feed-a") -> RejectRecord:
    return RejectRecord(
        feed=feed,
        format="corespond-json",
        received_at=at(received),
        raw=raw,
        code="malformed-json",
        reason="expected a JSON object at byte 1",
        where="/",
        origin_name="127.0.0.1:40000",
    )
