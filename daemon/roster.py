"""The roster: clinicians, programs with their coverage zones, chains and on-call schedules.

One YAML file (``paging.roster`` in the config) names everything; coverage zones may live in
GeoJSON files and on-call schedules in iCalendar files beside it. The whole roster is loaded
and checked at once: every problem comes back with its file and line, like the config's.

Point-in-zone uses shapely (GEOS): it is the standard geometry library of the Python GIS stack,
handles polygons with holes and multipolygons exactly, and prepares a zone once so that each
test is cheap. The roster logs clinician ids only: display names are staff names, kept out of
logs all the same.

On call: a program with no schedule has all its clinicians on call; otherwise a clinician is
on call when an event of one of its iCalendar files (recurrence, RECURRENCE-ID overrides and
EXDATE applied, in the event's own time zone) or one of its inline weekly shifts covers the
moment. An iCalendar event names the clinicians on call in its SUMMARY (ids, separated by
commas or spaces) or in ``X-CORESPOND-CLINICIANS``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import icalendar
import recurring_ical_events
import shapely
from jsonschema import Draft202012Validator
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from corespond.daemon.config import ConfigError, ConfigProblem, dotted, schema_problems
from corespond.daemon.yaml_source import KeyPath, SourceLocation, YamlDocument, parse_yaml_text

if TYPE_CHECKING:
    from corespond.daemon.roster_table import RosterTable

ESCALATION_ACTIONS = ("page", "supervisor", "dispatch")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFAULT_ESCALATION: tuple[dict[str, Any], ...] = (
    {"action": "page", "wait_minutes": 5},
    {"action": "page", "wait_minutes": 5},
    {"action": "supervisor", "wait_minutes": 5},
    {"action": "dispatch"},
)
ID_PATTERN = "^[A-Za-z0-9._-]+$"
_ICAL_IDS = re.compile(r"[\s,;]+")
MAX_ZONE_FILE_BYTES = 16 * 1_048_576
MAX_ICAL_FILE_BYTES = 8 * 1_048_576


# --- problems ----------------------------------------------------------------------------------


# A roster problem is a config problem (file, line, key path, message) of another file.
RosterProblem = ConfigProblem


class RosterError(ConfigError):
    """The roster is unusable; ``problems`` lists everything wrong, each with file and line.

    Messages name ids, keys and files, never a display name or an endpoint address.
    """


# --- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    gateway: str
    address: str

    def as_json(self) -> dict[str, str]:
        return {"gateway": self.gateway, "address": self.address}


@dataclass(frozen=True, slots=True)
class Clinician:
    id: str
    display_name: str = field(repr=False)
    program: str
    skills: frozenset[str]
    endpoints: tuple[Endpoint, ...]
    # CAD unit ids (EIDO emergencyResourceName) the clinician rides as: their AVL positions
    # are the clinician's location.
    units: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EscalationStep:
    action: str  # page, supervisor, dispatch
    wait_minutes: float = 0.0  # after this step, before the next

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "wait_minutes": self.wait_minutes}


@dataclass(frozen=True, slots=True)
class SupervisorTarget:
    """A member of a supervisor group: a clinician of the roster, or a bare endpoint."""

    clinician_id: str | None
    endpoint: Endpoint | None


@dataclass(frozen=True, slots=True)
class WeeklyShift:
    """Every ``days`` from ``start`` to ``end`` local time (an end not after start: next day)."""

    clinicians: frozenset[str]
    days: frozenset[int]  # 0 = Monday
    start: time
    end: time
    zone: ZoneInfo

    def covers(self, at: datetime) -> bool:
        local = at.astimezone(self.zone)
        # The shift that started today, or the overnight one that started yesterday.
        for back in (0, 1):
            day = local.date() - timedelta(days=back)
            if day.weekday() not in self.days:
                continue
            begins = datetime.combine(day, self.start, self.zone)
            ends_day = day if self.end > self.start else day + timedelta(days=1)
            ends = datetime.combine(ends_day, self.end, self.zone)
            if begins <= local < ends:
                return True
        return False


@dataclass(frozen=True, slots=True)
class IcalSchedule:
    file: Path
    calendar: icalendar.Calendar = field(repr=False)

    def on_call(self, at: datetime) -> set[str]:
        found: set[str] = set()
        for event in recurring_ical_events.of(self.calendar).at(at):
            found |= ical_event_clinicians(event)
        return found


@dataclass(frozen=True)
class Program:
    id: str
    zones: BaseGeometry | None = field(repr=False)  # None: covers nowhere
    supervisors: tuple[SupervisorTarget, ...] = ()
    dispatch: tuple[Endpoint, ...] = ()
    escalation: tuple[EscalationStep, ...] = ()
    schedules: tuple[IcalSchedule, ...] = ()
    shifts: tuple[WeeklyShift, ...] = ()

    def covers(self, lat: float, lon: float) -> bool:
        # GeoJSON order: x is longitude. A point on the boundary counts as inside.
        # (intersects_xy: the predicate of intersects(Point(lon, lat)), without the Point)
        return self.zones is not None and bool(shapely.intersects_xy(self.zones, lon, lat))

    @property
    def scheduled(self) -> bool:
        return bool(self.schedules or self.shifts)

    def on_call(self, at: datetime) -> set[str]:
        """Ids on call at ``at`` by this program's schedules (see :attr:`scheduled`)."""
        found: set[str] = set()
        for schedule in self.schedules:
            found |= schedule.on_call(at)
        for shift in self.shifts:
            if shift.covers(at):
                found |= shift.clinicians
        return found


@dataclass(frozen=True)
class Roster:
    file: Path
    clinicians: Mapping[str, Clinician]
    programs: Mapping[str, Program]  # in file order: the first covering program leads a chain

    unit_clinicians: Mapping[str, str] = field(default_factory=dict)  # casefolded unit id
    # The last point asked about and the programs covering it: a page step asks twice for its
    # incident's point (the chain's program, then the dispatcher's covering programs).
    _last_covering: tuple[float, float, tuple[Program, ...]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def clinician_of_unit(self, unit: str) -> str | None:
        """The clinician who rides as CAD unit ``unit`` (ids compared without case)."""
        return self.unit_clinicians.get(unit.casefold())

    def programs_covering(self, lat: float, lon: float) -> list[Program]:
        last = self._last_covering
        if last is not None and last[0] == lat and last[1] == lon:
            return list(last[2])
        found = tuple(p for p in self.programs.values() if p.covers(lat, lon))
        object.__setattr__(self, "_last_covering", (lat, lon, found))  # (one tuple: atomic)
        return list(found)

    @cached_property
    def table(self) -> RosterTable:
        """The roster as arrays for the dispatcher, built on first use."""
        from corespond.daemon.roster_table import RosterTable

        return RosterTable(self)

    def on_call(self, at: datetime) -> set[str]:
        """Every clinician on call at ``at``, across programs: every member of a program
        without a schedule, the scheduled programs' own members their schedules name (one
        rule, :meth:`RosterTable.on_call`, which page steps use)."""
        table = self.table
        return {str(cid) for cid in table.ids[table.on_call(at)]}


# --- parsing -----------------------------------------------------------------------------------


def ical_event_clinicians(event: Any) -> set[str]:
    raw = event.get("X-CORESPOND-CLINICIANS") or event.get("SUMMARY") or ""
    return {part for part in _ICAL_IDS.split(str(raw)) if part}


def _id(description: str) -> dict[str, Any]:
    return {"type": "string", "pattern": ID_PATTERN, "maxLength": 64, "description": description}


_ENDPOINT = {
    "type": "object",
    "properties": {
        "gateway": {"type": "string", "minLength": 1},
        "address": {"type": "string", "minLength": 1},
    },
    "required": ["gateway", "address"],
    "additionalProperties": False,
}
_GEOMETRY = {
    "type": "object",
    "properties": {
        "type": {"enum": ["Polygon", "MultiPolygon"]},
        "coordinates": {"type": "array"},
    },
    "required": ["type", "coordinates"],
    "additionalProperties": False,
}
_ZONE = {"oneOf": [
    {"type": "object", "properties": {"file": {"type": "string", "minLength": 1}},
     "required": ["file"], "additionalProperties": False},
    _GEOMETRY,
]}  # fmt: skip
_CLOCK = {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"}
_SHIFT = {
    "type": "object",
    "properties": {
        "clinicians": {"type": "array", "items": _id("clinician id"), "minItems": 1},
        "days": {"type": "array", "items": {"enum": list(DAYS)}, "minItems": 1},
        "start": _CLOCK,
        "end": _CLOCK,
    },
    "required": ["clinicians", "start", "end"],
    "additionalProperties": False,
}
_STEP = {
    "type": "object",
    "properties": {
        "action": {"enum": list(ESCALATION_ACTIONS)},
        "wait_minutes": {"type": "number", "minimum": 0, "maximum": 1440},
    },
    "required": ["action"],
    "additionalProperties": False,
}
ROSTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "timezone": {"type": "string", "minLength": 1},
        "clinicians": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": _id("clinician id"),
                    "name": {"type": "string", "minLength": 1},
                    "program": _id("program id"),
                    "skills": {"type": "array", "items": {"type": "string", "minLength": 1}},
                    "endpoints": {"type": "array", "items": _ENDPOINT, "minItems": 1},
                    "units": {"type": "array", "items": _id("CAD unit id (EIDO resource name)")},
                },
                "required": ["id", "name", "program", "endpoints"],
                "additionalProperties": False,
            },
        },
        "programs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": _id("program id"),
                    "zones": {"type": "array", "items": _ZONE, "minItems": 1},
                    "supervisors": {
                        "type": "array",
                        "items": {"oneOf": [_id("clinician id"), _ENDPOINT]},
                    },
                    "dispatch": {"type": "array", "items": _ENDPOINT},
                    "escalation": {"type": "array", "items": _STEP, "minItems": 1},
                    "on_call": {
                        "type": "object",
                        "properties": {
                            "ical": {"type": "array", "items": {"type": "string", "minLength": 1}},
                            "shifts": {"type": "array", "items": _SHIFT},
                        },
                        "additionalProperties": False,
                    },
                },
                "required": ["id", "zones"],
                "additionalProperties": False,
            },
            "minItems": 1,
        },
    },
    "required": ["clinicians", "programs"],
    "additionalProperties": False,
}


class _Problems:
    def __init__(self, file: Path, document: YamlDocument | None) -> None:
        self.file = file
        self.document = document
        self.items: list[ConfigProblem] = []

    def add(self, path: KeyPath, message: str, *, file: Path | None = None) -> None:
        if file is not None or self.document is None:
            where = SourceLocation(file or self.file, None)
        else:
            where = self.document.locate(path)
        self.items.append(RosterProblem(where.file, where.line, dotted(path), message))


def load_roster(path: Path) -> Roster:
    """The roster at ``path``, or :class:`RosterError` listing every problem."""
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = "is not UTF-8 text" if isinstance(err, UnicodeDecodeError) else "cannot be read"
        raise RosterError([RosterProblem(path, None, "", f"roster file {why}")]) from None
    return parse_roster(text, path)


def parse_roster(text: str, file: Path) -> Roster:
    """The roster written in ``text`` (read from ``file``; other files are relative to it)."""
    yaml_problems: list[Any] = []
    document = parse_yaml_text(text, file, yaml_problems)
    if document is None:
        raise RosterError(
            [RosterProblem(p.location.file, p.location.line, "", p.message) for p in yaml_problems]
        )
    problems = _Problems(file, document)
    for error in Draft202012Validator(ROSTER_SCHEMA).iter_errors(document.value):
        for key_path, message in schema_problems(error, document):
            if "address" in key_path:
                # A pager address is a phone number or a mail address: never in a message,
                # which reaches the log on a reload (schema messages quote what YAML read).
                message = "must be text: write the address in quotes (its value is not shown)"
            problems.add(key_path, message)
    if problems.items:
        raise RosterError(problems.items)
    raw = document.value
    zone = ZoneInfo("UTC")
    if "timezone" in raw:
        try:
            zone = ZoneInfo(raw["timezone"])
        except (ZoneInfoNotFoundError, ValueError):
            problems.add(("timezone",), f"unknown time zone {raw['timezone']!r}")
    programs: dict[str, Program] = {}
    program_ids = [p["id"] for p in raw["programs"]]
    clinician_ids = {c["id"] for c in raw["clinicians"]}
    clinicians: dict[str, Clinician] = {}
    unit_owners: dict[str, str] = {}
    for n, item in enumerate(raw["clinicians"]):
        at: KeyPath = ("clinicians", n)
        if item["id"] in clinicians:
            problems.add((*at, "id"), f"clinician id {item['id']!r} is used twice")
        for m, unit in enumerate(item.get("units", ())):
            owner = unit_owners.setdefault(unit.casefold(), item["id"])
            if owner != item["id"] or unit.casefold() in (u.casefold() for u in item["units"][:m]):
                problems.add((*at, "units", m), f"unit {unit!r} is already {owner!r}'s")
        if item["program"] not in program_ids:
            problems.add((*at, "program"), f"there is no program {item['program']!r}")
        clinicians[item["id"]] = Clinician(
            id=item["id"],
            display_name=item["name"],
            program=item["program"],
            skills=frozenset(item.get("skills", ())),
            endpoints=tuple(Endpoint(e["gateway"], e["address"]) for e in item["endpoints"]),
            units=tuple(item.get("units", ())),
        )
    for n, item in enumerate(raw["programs"]):
        at = ("programs", n)
        if item["id"] in programs:
            problems.add((*at, "id"), f"program id {item['id']!r} is used twice")
        programs[item["id"]] = _program(item, at, file.parent, zone, clinician_ids, problems)
    if problems.items:
        raise RosterError(problems.items)
    return Roster(file=file, clinicians=clinicians, programs=programs, unit_clinicians=unit_owners)


def _program(
    item: dict[str, Any],
    at: KeyPath,
    base: Path,
    zone: ZoneInfo,
    clinician_ids: set[str],
    problems: _Problems,
) -> Program:
    geometries: list[BaseGeometry] = []
    for n, spec in enumerate(item["zones"]):
        where: KeyPath = (*at, "zones", n)
        if "file" in spec:
            geometries.extend(load_zone_file(base / spec["file"], where, problems))
        else:
            geometry = geometry_of(spec, where, problems)
            if geometry is not None:
                geometries.append(geometry)
    zones = shapely.union_all(geometries) if geometries else None
    if zones is not None:
        shapely.prepare(zones)
    supervisors: list[SupervisorTarget] = []
    for n, member in enumerate(item.get("supervisors", ())):
        if isinstance(member, str):
            if member not in clinician_ids:
                problems.add((*at, "supervisors", n), f"there is no clinician {member!r}")
            supervisors.append(SupervisorTarget(member, None))
        else:
            supervisors.append(
                SupervisorTarget(None, Endpoint(member["gateway"], member["address"]))
            )
    steps = tuple(
        EscalationStep(s["action"], float(s.get("wait_minutes", 0)))
        for s in item.get("escalation", DEFAULT_ESCALATION)
    )
    on_call = item.get("on_call", {})
    schedules = []
    for n, name in enumerate(on_call.get("ical", ())):
        schedule = load_ical(base / name, (*at, "on_call", "ical", n), clinician_ids, problems)
        if schedule is not None:
            schedules.append(schedule)
    shifts = []
    for n, spec in enumerate(on_call.get("shifts", ())):
        where = (*at, "on_call", "shifts", n)
        for m, cid in enumerate(spec["clinicians"]):
            if cid not in clinician_ids:
                problems.add((*where, "clinicians", m), f"there is no clinician {cid!r}")
        shifts.append(
            WeeklyShift(
                clinicians=frozenset(spec["clinicians"]),
                days=frozenset(DAYS.index(d) for d in spec.get("days", DAYS)),
                start=time.fromisoformat(spec["start"]),
                end=time.fromisoformat(spec["end"]),
                zone=zone,
            )
        )
    return Program(
        id=item["id"],
        zones=zones,
        supervisors=tuple(supervisors),
        dispatch=tuple(Endpoint(e["gateway"], e["address"]) for e in item.get("dispatch", ())),
        escalation=steps,
        schedules=tuple(schedules),
        shifts=tuple(shifts),
    )


def geometry_of(
    spec: Any, at: KeyPath, problems: _Problems, file: Path | None = None
) -> BaseGeometry | None:
    """A valid Polygon or MultiPolygon from a GeoJSON geometry object, or None (and a problem)."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in ("Polygon", "MultiPolygon"):
        problems.add(at, f"a zone must be a Polygon or MultiPolygon, not {_kind(kind)}", file=file)
        return None
    try:
        geometry = shape(spec)
    except Exception:  # shapely raises a variety of errors on malformed coordinates
        problems.add(at, f"the {kind} coordinates are malformed", file=file)
        return None
    if geometry.is_empty or not geometry.is_valid:
        reason = (
            "is empty" if geometry.is_empty else f"is invalid ({shapely.is_valid_reason(geometry)})"
        )
        problems.add(at, f"the {kind} {reason}", file=file)
        return None
    return geometry


def _kind(kind: Any) -> str:
    return repr(kind) if isinstance(kind, str) and len(kind) < 40 else "that"


def load_zone_file(file: Path, at: KeyPath, problems: _Problems) -> list[BaseGeometry]:
    """The polygons of a GeoJSON file: a geometry, a Feature or a FeatureCollection."""
    try:
        if file.stat().st_size > MAX_ZONE_FILE_BYTES:
            problems.add(at, f"zone file {file} is larger than {MAX_ZONE_FILE_BYTES} bytes")
            return []
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError:
        problems.add(at, f"zone file {file} cannot be read")
        return []
    except (UnicodeDecodeError, ValueError) as err:
        line = getattr(err, "lineno", None)
        problems.items.append(RosterProblem(file, line, "", "not a valid GeoJSON (JSON) file"))
        return []
    return geometries_of_geojson(data, file, problems)


def geometries_of_geojson(data: Any, file: Path, problems: _Problems) -> list[BaseGeometry]:
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            problems.add(("features",), "a FeatureCollection needs a list of features", file=file)
            return []
        items: Sequence[tuple[KeyPath, Any]] = [
            (("features", n, "geometry"), f.get("geometry") if isinstance(f, dict) else None)
            for n, f in enumerate(features)
        ]
    elif kind == "Feature":
        items = [(("geometry",), data.get("geometry"))]
    else:
        items = [((), data)]
    out = []
    if not items:
        # An empty FeatureCollection covers nothing: a zone that can never match is a mistake.
        problems.add(("features",), "a FeatureCollection needs at least one feature", file=file)
    for where, spec in items:
        geometry = geometry_of(spec, where, problems, file=file)
        if geometry is not None:
            out.append(geometry)
    return out


def load_ical(
    file: Path, at: KeyPath, clinician_ids: Iterable[str], problems: _Problems
) -> IcalSchedule | None:
    try:
        if file.stat().st_size > MAX_ICAL_FILE_BYTES:
            problems.add(at, f"calendar {file} is larger than {MAX_ICAL_FILE_BYTES} bytes")
            return None
        data = file.read_bytes()
    except OSError:
        problems.add(at, f"calendar {file} cannot be read")
        return None
    calendar = parse_ical(data, file, problems)
    if calendar is None:
        return None
    known = set(clinician_ids)
    for event in calendar.walk("VEVENT"):
        unknown = sorted(ical_event_clinicians(event) - known)
        if unknown:
            uid = str(event.get("UID", "?"))[:80]
            problems.add(
                at, f"calendar {file}: event {uid!r} names unknown clinician ids {unknown}"
            )
    return IcalSchedule(file, calendar)


def parse_ical(data: bytes, file: Path, problems: _Problems) -> icalendar.Calendar | None:
    """A calendar whose recurrences can be expanded, or None (and a problem)."""
    try:
        calendar = icalendar.Calendar.from_ical(data)
        # Expand once now: a bad RRULE or date must fail at load, not at dispatch time.
        recurring_ical_events.of(calendar).at(datetime(2000, 1, 1).date())
    except Exception as err:  # icalendar raises ValueError, KeyError, TypeError, ...
        problems.items.append(
            RosterProblem(file, None, "", f"not a valid iCalendar file ({type(err).__name__})")
        )
        return None
    if not isinstance(calendar, icalendar.Calendar):
        problems.items.append(RosterProblem(file, None, "", "not a VCALENDAR"))
        return None
    return calendar
