"""AVL from EIDO: where each CAD unit of an EIDO is, and since when.

An EIDO's ``emergencyResourceComponent[]`` (NENA-STA-021.1b) names a unit
(``emergencyResourceName``, else its ``$id``) and points at its position with
``unitLocationReference`` (``{"$ref": <the $id of a locationComponent>}``); that location
component holds the position as a PIDF-LO document in ``locationByValue``. The fix time is the
location component's ``lastUpdateTimeStamp`` (when the CAD last moved the unit), else the
resource's, else the EIDO's: the fix is as old as the EIDO says, so ``max_fix_age_seconds``
applies to it, not to when it arrived.

This is separate from :mod:`corespond.adapters.eido` on purpose: snapshots do not carry unit
positions (a snapshot is the incident), and the incident parse stays as fast as it is. The
daemon reads unit positions only from EIDOs that name a ``unitLocationReference``.

Each resource's status comes out too (:class:`UnitStatus`): its last
``secondaryUnitStatusRegistryText`` (``Dispatched``, ``EnRoute``, ``OnScene``, ``Cleared``...),
else its ``primaryUnitStatusRegistryText`` (``Available``, ``NotAvailable``...), as the incident
parse reads it, with the resource's own ``lastUpdateTimeStamp`` (else the EIDO's) as the time the
CAD set it, and ``activeOnIncidentId`` when the CAD says which call the unit works.

A resource without a reference, or whose referenced location has no point (civic only), gives
no fix and no error; one without a status gives no status. Anything else that does not parse
is a :class:`RejectedMessage` with a JSON pointer, per unit, so one bad unit does not hide the
others' positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from corespond.adapters.eido import load_json, unit_status
from corespond.adapters.pidflo import parse_pidf_lo
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import parse_time

MARKER: Final = b"unitLocationReference"
MAX_UNIT_CHARS: Final = 64


@dataclass(frozen=True, slots=True)
class UnitFix:
    """One CAD unit's position, as the EIDO gives it."""

    unit: str
    latitude: float
    longitude: float
    fixed_at: datetime
    where: str  # the resource's JSON pointer, for errors further on


@dataclass(frozen=True, slots=True)
class UnitStatus:
    """One CAD unit's status word, as the EIDO gives it, and when the CAD set it."""

    unit: str
    status: str
    at: datetime | None  # None: neither the resource nor the EIDO says when
    active_on: str | None  # activeOnIncidentId: the call the unit works, when the CAD says
    where: str


@dataclass(frozen=True, slots=True)
class UnitLocations:
    fixes: tuple[UnitFix, ...]
    problems: tuple[RejectedMessage, ...]
    statuses: tuple[UnitStatus, ...] = ()


NONE: Final = UnitLocations((), ())


def may_have_unit_locations(message: bytes) -> bool:
    """Whether ``message`` can hold a unit location at all: a byte search, so EIDOs without
    one (most) cost nothing more than their incident parse."""
    return MARKER in message


def unit_locations_of_message(message: bytes, *, statuses: bool = False) -> UnitLocations:
    """The unit positions (and with ``statuses``, the unit statuses) in one EIDO message; never
    raises for bad input (a message that is not JSON at all is one problem)."""
    if not statuses and not may_have_unit_locations(message):
        return NONE
    try:
        doc = load_json(message)
    except RejectedMessage as err:
        return UnitLocations((), (err,))
    return unit_locations(doc)


def unit_locations(doc: Any) -> UnitLocations:
    """The unit positions in one decoded EIDO."""
    if not isinstance(doc, Mapping):
        return UnitLocations((), (RejectedMessage("invalid-field", "not a JSON object", "/"),))
    fixes: list[UnitFix] = []
    problems: list[RejectedMessage] = []
    statuses: list[UnitStatus] = []
    try:
        eido_time = _time(doc, "")
        locations = _locations_by_id(doc)
        resources = list(_items(doc, "emergencyResourceComponent", ""))
    except RejectedMessage as err:
        return UnitLocations((), (err,))
    for where, resource in resources:
        try:
            status = _unit_status(resource, where, eido_time)
            fix = _unit_fix(resource, where, locations, eido_time)
        except RejectedMessage as err:
            problems.append(err)
            continue
        if status is not None:
            statuses.append(status)
        if fix is not None:
            fixes.append(fix)
    return UnitLocations(tuple(fixes), tuple(problems), tuple(statuses))


def _unit_status(
    resource: Mapping[str, Any], where: str, eido_time: datetime | None
) -> UnitStatus | None:
    # The incident parse's rule (eido.unit_status); the words are checked here, per unit.
    key = "secondaryUnitStatusRegistryText"
    secondary = resource.get(key)
    if secondary is not None and not isinstance(secondary, list):
        raise RejectedMessage("invalid-field", "must be an array", f"{where}/{key}")
    words = [w for i, x in enumerate(secondary or ()) if (w := _word(x, f"{where}/{key}/{i}"))]
    status = unit_status(words, lambda: _text(resource, "primaryUnitStatusRegistryText", where))
    if status is None:
        return None
    if len(status) > MAX_UNIT_CHARS:
        raise RejectedMessage("invalid-field", f"a unit status is at most {MAX_UNIT_CHARS} "
                              "characters", f"{where}/{key}")  # fmt: skip
    unit = _unit_name(resource, where)
    active_on = _text(resource, "activeOnIncidentId", where)
    return UnitStatus(unit, status, _time(resource, where) or eido_time, active_on, where)


def _unit_name(resource: Mapping[str, Any], where: str) -> str:
    unit = _text(resource, "emergencyResourceName", where) or _text(resource, "$id", where)
    if unit is None:
        raise RejectedMessage("missing-field", "a resource needs emergencyResourceName or $id",
                              where)  # fmt: skip
    if len(unit) > MAX_UNIT_CHARS:
        raise RejectedMessage("invalid-field", f"a unit id is at most {MAX_UNIT_CHARS} characters",
                              f"{where}/emergencyResourceName")  # fmt: skip
    return unit


def _unit_fix(
    resource: Mapping[str, Any],
    where: str,
    locations: Mapping[str, tuple[str, Mapping[str, Any]]],
    eido_time: datetime | None,
) -> UnitFix | None:
    reference = resource.get("unitLocationReference")
    if reference is None:
        return None
    if not isinstance(reference, Mapping):
        raise RejectedMessage("invalid-field", "must be a reference object",
                              f"{where}/unitLocationReference")  # fmt: skip
    target = _text(reference, "$ref", f"{where}/unitLocationReference")
    if target is None:
        raise RejectedMessage("missing-field", "the reference has no $ref",
                              f"{where}/unitLocationReference/$ref")  # fmt: skip
    unit = _unit_name(resource, where)
    found = locations.get(target)
    if found is None:
        raise RejectedMessage("invalid-field", "refers to no locationComponent of this EIDO",
                              f"{where}/unitLocationReference/$ref")  # fmt: skip
    location_where, location = found
    value = location.get("locationByValue")
    if value is None:
        return None  # by reference only: nothing to read here
    point = parse_pidf_lo(value, f"{location_where}/locationByValue").point
    if point is None:
        return None  # a civic address is no fix
    fixed_at = _time(location, location_where) or _time(resource, where) or eido_time
    if fixed_at is None:
        raise RejectedMessage("missing-field", "no lastUpdateTimeStamp says when the unit was "
                              "there", f"{location_where}/lastUpdateTimeStamp")  # fmt: skip
    return UnitFix(unit, point.lat, point.lon, fixed_at, where)


def _locations_by_id(doc: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    found: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for where, location in _items(doc, "locationComponent", ""):
        location_id = _text(location, "$id", where)
        if location_id is not None:
            found.setdefault(location_id, (where, location))
    return found


def _items(obj: Mapping[str, Any], key: str, where: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    value = obj.get(key)
    if value is None:
        return
    if not isinstance(value, list):
        raise RejectedMessage("invalid-field", "must be an array", f"{where}/{key}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise RejectedMessage("invalid-field", "must be an object", f"{where}/{key}/{i}")
        yield f"{where}/{key}/{i}", item


def _text(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    return _word(obj.get(key), f"{where}/{key}")


def _word(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RejectedMessage("invalid-field", "must be a string", where)
    if "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value if ord(c) > 0x7F):
        raise RejectedMessage("invalid-field", "holds a NUL or an unpaired surrogate", where)
    return value.strip() or None


def _time(obj: Mapping[str, Any], where: str) -> datetime | None:
    text = _text(obj, "lastUpdateTimeStamp", where)
    return parse_time(text, f"{where}/lastUpdateTimeStamp") if text else None


__all__ = [
    "MARKER",
    "UnitFix",
    "UnitLocations",
    "UnitStatus",
    "may_have_unit_locations",
    "unit_locations",
    "unit_locations_of_message",
]
