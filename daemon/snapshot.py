"""The normalized incident snapshot: one type for every CAD format.

CADs send the whole current state of an incident again and again; a :class:`Snapshot` is one
such state as the source knew it at ``updated_at``. Adapters build snapshots; the store keeps
every one and derives the incident's current state from them.

The same type has a JSON form, "corespond incident JSON", which is both a feed format (newline
delimited, documented in the README) and the form the store keeps. Its fields split in two:
the *public* part (codes, times, status, units, geography) and the *protected* part (notes,
persons, street address), which holds protected health information and is stored only in
designated columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from corespond.daemon.errors import RejectedMessage
from corespond.daemon.slotted import fast_init


class IncidentStatus(StrEnum):
    ACTIVE = "active"
    CLOSED = "closed"
    CANCELLED = "cancelled"


@fast_init
@dataclass(frozen=True, slots=True)
class GeoPoint:
    lat: float
    lon: float


@fast_init
@dataclass(frozen=True, slots=True)
class Location:
    """Where the incident is. ``address`` is protected (it can identify a person's home)."""

    point: GeoPoint | None = None
    address: str | None = None
    city: str | None = None
    state: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Unit:
    id: str
    type: str | None = None
    status: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Caution:
    type: str
    severity: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Disposition:
    code: str
    text: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Note:
    """A narrative entry. Protected."""

    text: str
    time: datetime | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Person:
    """A person on the incident. Protected."""

    roles: tuple[str, ...] = ()
    name: str | None = None
    birth_date: str | None = None
    phone: str | None = None
    mental_state: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Snapshot:
    """One state of one incident as its source knew it at ``updated_at`` (UTC)."""

    incident_id: str
    updated_at: datetime
    status: IncidentStatus = IncidentStatus.ACTIVE
    incident_number: str | None = None
    call_type: str | None = None
    call_type_code: str | None = None
    apco_type: str | None = None
    priority: str | None = None
    agency: str | None = None
    zone: str | None = None
    opened_at: datetime | None = None
    closed_at: datetime | None = None
    location: Location | None = None
    units: tuple[Unit, ...] = ()
    cautions: tuple[Caution, ...] = ()
    dispositions: tuple[Disposition, ...] = ()
    notes: tuple[Note, ...] = field(default=(), repr=False)
    persons: tuple[Person, ...] = field(default=(), repr=False)

    @property
    def narrative(self) -> str:
        """All note texts, oldest first, one per line."""
        return "\n".join([note.text for note in self.notes])

    @property
    def mental_states(self) -> tuple[str, ...]:
        return tuple(p.mental_state for p in self.persons if p.mental_state)


# --- times -------------------------------------------------------------------------------------


def utc(value: datetime) -> datetime:
    """The same instant in UTC; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# The store formats every snapshot's times for its JSON, and an update repeats most of them
# (the call's start, every earlier note): remember the latest (isoformat is most of the 5
# calls' 4 us a snapshot). Only UTC values, which is what parsers make: two datetimes in one
# other zone compare equal across a DST fold although they are an hour apart.
_FORMATTED: dict[datetime, str] = {}
_FORMATTED_MAX = 4096


def format_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not UTC:
        return utc(value).isoformat().replace("+00:00", "Z")
    text = _FORMATTED.get(value)
    if text is None:
        if len(_FORMATTED) >= _FORMATTED_MAX:
            _FORMATTED.clear()
        text = _FORMATTED[value] = value.isoformat().replace("+00:00", "Z")
    return text


def parse_time(text: str, where: str) -> datetime:
    """An ISO 8601 timestamp (``Z`` or an offset; a space instead of ``T`` is accepted)."""
    try:
        value = datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    except (ValueError, AttributeError):
        raise RejectedMessage("invalid-field", "not an ISO 8601 timestamp", where) from None
    if not 1900 <= value.year <= 2200:
        raise RejectedMessage("invalid-field", "timestamp year out of range", where)
    return utc(value)


# --- JSON form ---------------------------------------------------------------------------------

PUBLIC_KEYS = (
    "id", "updated_at", "status", "number", "call_type", "call_type_code", "apco_type",
    "priority", "agency", "zone", "opened_at", "closed_at", "location", "units", "cautions",
    "dispositions",
)  # fmt: skip
PROTECTED_KEYS = ("notes", "persons", "address")
_ALL_KEYS = frozenset(PUBLIC_KEYS) | {"notes", "persons"}


def snapshot_public_json(snap: Snapshot) -> dict[str, Any]:
    """The part of a snapshot that holds no protected health information."""
    location = None
    if snap.location is not None:
        loc = snap.location
        location = {
            "lat": loc.point.lat if loc.point else None,
            "lon": loc.point.lon if loc.point else None,
            "city": loc.city,
            "state": loc.state,
        }
    return {
        "id": snap.incident_id,
        "updated_at": format_time(snap.updated_at),
        "status": snap.status.value,
        "number": snap.incident_number,
        "call_type": snap.call_type,
        "call_type_code": snap.call_type_code,
        "apco_type": snap.apco_type,
        "priority": snap.priority,
        "agency": snap.agency,
        "zone": snap.zone,
        "opened_at": format_time(snap.opened_at),
        "closed_at": format_time(snap.closed_at),
        "location": location,
        "units": [{"id": u.id, "type": u.type, "status": u.status} for u in snap.units],
        "cautions": [{"type": c.type, "severity": c.severity} for c in snap.cautions],
        "dispositions": [{"code": d.code, "text": d.text} for d in snap.dispositions],
    }


def snapshot_protected_json(snap: Snapshot) -> dict[str, Any]:
    """The protected part: notes, persons and the street address."""
    return {
        "address": snap.location.address if snap.location else None,
        "notes": [{"time": format_time(n.time), "text": n.text} for n in snap.notes],
        "persons": [
            {
                "roles": list(p.roles),
                "name": p.name,
                "birth_date": p.birth_date,
                "phone": p.phone,
                "mental_state": p.mental_state,
            }
            for p in snap.persons
        ],
    }


def snapshot_to_json(snap: Snapshot) -> dict[str, Any]:
    """The whole snapshot in corespond incident JSON."""
    out = snapshot_public_json(snap)
    protected = snapshot_protected_json(snap)
    if protected["address"] is not None:
        out["location"] = dict(out["location"] or {}, address=protected["address"])
    out["notes"] = protected["notes"]
    out["persons"] = protected["persons"]
    return out


def snapshot_from_json(obj: Any) -> Snapshot:
    """Validate and decode corespond incident JSON. Raises :class:`RejectedMessage`.

    Unknown top-level keys are errors: a field that a sender thinks matters must not be
    dropped silently.
    """
    if not isinstance(obj, Mapping):
        raise RejectedMessage("invalid-field", "an incident must be a JSON object", "/")
    unknown = sorted(set(obj) - _ALL_KEYS)
    if unknown:
        raise RejectedMessage("unknown-field", f"unknown field {unknown[0]!r}", f"/{unknown[0]}")
    incident_id = _text(obj, "id", required=True)
    assert incident_id is not None
    updated_raw = _text(obj, "updated_at", required=True)
    assert updated_raw is not None
    status_raw = _text(obj, "status") or IncidentStatus.ACTIVE.value
    try:
        status = IncidentStatus(status_raw)
    except ValueError:
        raise RejectedMessage(
            "invalid-field", "status must be active, closed or cancelled", "/status"
        ) from None
    return Snapshot(
        incident_id=incident_id,
        updated_at=parse_time(updated_raw, "/updated_at"),
        status=status,
        incident_number=_text(obj, "number"),
        call_type=_text(obj, "call_type"),
        call_type_code=_text(obj, "call_type_code"),
        apco_type=_text(obj, "apco_type"),
        priority=_text(obj, "priority"),
        agency=_text(obj, "agency"),
        zone=_text(obj, "zone"),
        opened_at=_time(obj, "opened_at"),
        closed_at=_time(obj, "closed_at"),
        location=_location(obj.get("location")),
        units=tuple(
            Unit(
                id=_text(u, "id", where=f"/units/{i}", required=True) or "",
                type=_text(u, "type", where=f"/units/{i}"),
                status=_text(u, "status", where=f"/units/{i}"),
            )
            for i, u in _items(obj, "units")
        ),
        cautions=tuple(
            Caution(
                type=_text(c, "type", where=f"/cautions/{i}", required=True) or "",
                severity=_text(c, "severity", where=f"/cautions/{i}"),
            )
            for i, c in _items(obj, "cautions")
        ),
        dispositions=tuple(
            Disposition(
                code=_text(d, "code", where=f"/dispositions/{i}", required=True) or "",
                text=_text(d, "text", where=f"/dispositions/{i}"),
            )
            for i, d in _items(obj, "dispositions")
        ),
        notes=tuple(
            Note(
                text=_text(n, "text", where=f"/notes/{i}", required=True) or "",
                time=_time(n, "time", where=f"/notes/{i}"),
            )
            for i, n in _items(obj, "notes")
        ),
        persons=tuple(_person(p, f"/persons/{i}") for i, p in _items(obj, "persons")),
    )


def _items(obj: Mapping[str, Any], key: str) -> list[tuple[int, Mapping[str, Any]]]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RejectedMessage("invalid-field", "must be a list", f"/{key}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise RejectedMessage("invalid-field", "must be an object", f"/{key}/{i}")
    return list(enumerate(value))


def _text(
    obj: Mapping[str, Any], key: str, *, where: str = "", required: bool = False
) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise RejectedMessage("missing-field", "required field is missing", f"{where}/{key}")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RejectedMessage("invalid-field", "must be a string", f"{where}/{key}")
    text = str(value).strip()
    if required and not text:
        raise RejectedMessage("missing-field", "required field is empty", f"{where}/{key}")
    return text or None


def _time(obj: Mapping[str, Any], key: str, *, where: str = "") -> datetime | None:
    text = _text(obj, key, where=where)
    return parse_time(text, f"{where}/{key}") if text else None


def _location(value: Any) -> Location | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RejectedMessage("invalid-field", "must be an object", "/location")
    unknown = sorted(set(value) - {"lat", "lon", "address", "city", "state"})
    if unknown:
        raise RejectedMessage("unknown-field", f"unknown field {unknown[0]!r}", "/location")
    lat, lon = value.get("lat"), value.get("lon")
    point = None
    if lat is not None or lon is not None:
        point = geo_point(lat, lon, "/location")
    return Location(
        point=point,
        address=_text(value, "address", where="/location"),
        city=_text(value, "city", where="/location"),
        state=_text(value, "state", where="/location"),
    )


def geo_point(lat: Any, lon: Any, where: str) -> GeoPoint:
    """A validated WGS 84 point; raises :class:`RejectedMessage` when out of range."""
    try:
        flat, flon = float(lat), float(lon)
    except (TypeError, ValueError, OverflowError):
        raise RejectedMessage("invalid-field", "lat and lon must both be numbers", where) from None
    if isinstance(lat, bool) or isinstance(lon, bool):
        raise RejectedMessage("invalid-field", "lat and lon must both be numbers", where)
    if not (math.isfinite(flat) and math.isfinite(flon)):
        raise RejectedMessage("invalid-field", "lat and lon must be finite", where)
    if not (-90.0 <= flat <= 90.0 and -180.0 <= flon <= 180.0):
        raise RejectedMessage("invalid-field", "lat/lon out of range", where)
    return GeoPoint(flat, flon)


def _person(value: Mapping[str, Any], where: str) -> Person:
    roles = value.get("roles") or []
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise RejectedMessage("invalid-field", "roles must be a list of strings", f"{where}/roles")
    return Person(
        roles=tuple(roles),
        name=_text(value, "name", where=where),
        birth_date=_text(value, "birth_date", where=where),
        phone=_text(value, "phone", where=where),
        mental_state=_text(value, "mental_state", where=where),
    )
