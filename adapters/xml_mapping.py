"""Any vendor's XML, mapped to a snapshot by a YAML file of XPath expressions: no code.

A mapping file (``config/mappings/*.yaml``) says where each snapshot field is::

    namespaces: {v: "urn:example:vendor"}   # XPath 1.0 has no default namespace: use prefixes
    root: /v:Export                         # must select the document's root element
    time_format: "%m/%d/%Y %H:%M:%S"        # or iso (the default)
    timezone: America/Denver                # for times written without a zone
    status_map: {OPEN: active, CLOSED: closed, CXL: cancelled}
    fields:                                 # evaluated with the root element as context
      incident_id: v:Incident/@callId       # required
      updated_at: v:Incident/v:LastModified # required
      call_type: v:Incident/v:Nature
      ...                                   # status, incident_number, call_type_code, apco_type,
                                            # priority, agency, zone, opened_at, closed_at, lat,
                                            # lon, address, city, state
    notes: {each: //v:Comment, text: v:Line, time: "@at"}     # parts relative to each node
    persons: {each: ..., roles: ..., name: ..., birth_date: ..., phone: ..., mental_state: ...}
    units: {each: ..., id: ..., type: ..., status: ...}
    cautions: {each: ..., type: ..., severity: ...}
    dispositions: {each: ..., code: ..., text: ...}

Every expression is XPath 1.0 (EXSLT included, as lxml provides it) and may return nodes, a
string, a number or a boolean. A node's value is its text, trimmed; an empty or ``xsi:nil``
node is no value. When an expression selects several nodes, a text field takes the first, a
time field the latest (so ``updated_at: //*[contains(name(), 'Time')]`` means "the latest time
anywhere"), ``roles`` takes them all and a note's ``text`` joins them with newlines.

``status`` goes through ``status_map`` (exact, then case-insensitive); without an entry, the
words active, closed and cancelled are taken as they are, and anything else is rejected.

:func:`load_mapping` compiles and tries every expression at load time and reports every problem
in the file at once, each with its file, line and key path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lxml import etree

from corespond.adapters.cad_values import ISO, TimeReader, cad_point, check_time_format, time_zone
from corespond.adapters.xml_safety import element_path, is_nil, local_name, parse_untrusted_xml
from corespond.daemon.errors import RejectedMessage, SafeMessage
from corespond.daemon.snapshot import (
    Caution,
    Disposition,
    IncidentStatus,
    Location,
    Note,
    Person,
    Snapshot,
    Unit,
)
from corespond.daemon.yaml_source import SourceLocation, YamlDocument, YamlProblem, parse_yaml_text

FIELDS = (
    "incident_id", "updated_at", "status", "incident_number", "call_type", "call_type_code",
    "apco_type", "priority", "agency", "zone", "opened_at", "closed_at", "lat", "lon", "address",
    "city", "state",
)  # fmt: skip
REQUIRED_FIELDS = ("incident_id", "updated_at")
TIME_FIELDS = frozenset({"updated_at", "opened_at", "closed_at"})
# Each repeated group: its parts, and the parts it cannot do without.
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "notes": (("each", "text", "time"), ("each", "text")),
    "persons": (("each", "roles", "name", "birth_date", "phone", "mental_state"), ("each",)),
    "units": (("each", "id", "type", "status"), ("each", "id")),
    "cautions": (("each", "type", "severity"), ("each", "type")),
    "dispositions": (("each", "code", "text"), ("each", "code")),
}
TOP_KEYS = ("description", "namespaces", "root", "time_format", "timezone", "status_map",
            "fields", *GROUPS)  # fmt: skip
STATUS_WORDS = {
    "active": IncidentStatus.ACTIVE,
    "closed": IncidentStatus.CLOSED,
    "cancelled": IncidentStatus.CANCELLED,
    "canceled": IncidentStatus.CANCELLED,
}

# --- the compiled mapping ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledXPath:
    key: str  # where in the mapping file: "fields.call_type", "notes.each"
    text: str
    xpath: etree.XPath

    def evaluate(self, context: etree._Element) -> Any:
        try:
            return self.xpath(context)
        except etree.XPathError:
            raise RejectedMessage(
                "unsupported", "the mapping's XPath failed on this document", self.key
            ) from None


@dataclass(frozen=True, slots=True)
class Group:
    each: CompiledXPath
    parts: Mapping[str, CompiledXPath]


@dataclass(frozen=True)
class XmlMapping:
    """A loaded, compiled mapping file."""

    source: str
    namespaces: Mapping[str, str]
    root: CompiledXPath
    fields: Mapping[str, CompiledXPath]
    groups: Mapping[str, Group] = field(default_factory=dict)
    status_map: Mapping[str, IncidentStatus] = field(default_factory=dict)
    time_format: str = ISO
    timezone: str | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class MappingProblem:
    location: SourceLocation
    key: str
    message: str

    def __str__(self) -> str:
        key = f" {self.key}:" if self.key else ""
        return f"{self.location}:{key} {self.message}"


class MappingError(SafeMessage, Exception):
    """A mapping file that cannot be used; ``problems`` holds every problem found."""

    def __init__(self, problems: list[MappingProblem]) -> None:
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) in the mapping file:\n" + "\n".join(map(str, problems))
        )


# --- loading -----------------------------------------------------------------------------------


def load_mapping(path: Path | str) -> XmlMapping:
    """The mapping file at ``path``, compiled; raises :class:`MappingError` with every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else err.strerror
        raise MappingError(
            [MappingProblem(SourceLocation(path, None), "", f"cannot read the file: {reason}")]
        ) from None
    return mapping_from_yaml(text, path)


def mapping_from_yaml(text: str, file: Path) -> XmlMapping:
    """A mapping from YAML text; ``file`` names it in problems."""
    yaml_problems: list[YamlProblem] = []
    document = parse_yaml_text(text, file, yaml_problems)
    if document is None:
        raise MappingError([MappingProblem(p.location, "", p.message) for p in yaml_problems])
    return _Loader(document, file).load()


class _Loader:
    def __init__(self, document: YamlDocument, file: Path) -> None:
        self.doc = document
        self.file = file
        self.problems: list[MappingProblem] = []
        self.namespaces: dict[str, str] = {}
        self._probe = etree.Element("corespond-mapping-probe")

    def problem(self, path: tuple[str | int, ...], message: str) -> None:
        key = ".".join(str(p) for p in path)
        self.problems.append(MappingProblem(self.doc.locate(path), key, message))

    def text_value(self, path: tuple[str | int, ...], value: Any) -> str | None:
        if isinstance(value, str) and value.strip():
            return value.strip()
        retyped = self.doc.retyped.get(path)
        if retyped is not None:
            self.problem(path, f"must be text, not {retyped.describe()}: put it in quotes")
        else:
            self.problem(path, "must be non-empty text")
        return None

    def load(self) -> XmlMapping:
        top = self.doc.value
        for key in top:
            if key not in TOP_KEYS:
                self.problem((key,), f"unknown key (expected one of: {', '.join(TOP_KEYS)})")
        self.namespaces = self.load_namespaces(top.get("namespaces"))
        root = self.compile(("root",), top.get("root"), required=True)
        time_format = self.load_time_format(top.get("time_format"))
        timezone = self.load_timezone(top.get("timezone"))
        status_map = self.load_status_map(top.get("status_map"))
        fields = self.load_fields(top.get("fields"))
        groups = {name: g for name in GROUPS if (g := self.load_group(name, top.get(name)))}
        description = top.get("description")
        if self.problems:
            self.problems.sort(key=lambda p: p.location.line or 0)
            raise MappingError(self.problems)
        assert root is not None
        return XmlMapping(
            source=str(self.file),
            namespaces=self.namespaces,
            root=root,
            fields=fields,
            groups=groups,
            status_map=status_map,
            time_format=time_format,
            timezone=timezone,
            description=description if isinstance(description, str) else None,
        )

    def load_namespaces(self, value: Any) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(("namespaces",), "must be a mapping of prefix: namespace URI")
            return {}
        out: dict[str, str] = {}
        for prefix, uri in value.items():
            path = ("namespaces", prefix)
            if not prefix.isidentifier() or ":" in prefix:
                self.problem(path, "a prefix must be a plain name (letters, digits, _)")
                continue
            text = self.text_value(path, uri)
            if text is not None:
                out[prefix] = text
        return out

    def load_time_format(self, value: Any) -> str:
        if value is None:
            return ISO
        text = self.text_value(("time_format",), value)
        if text is None:
            return ISO
        why = check_time_format(text)
        if why is not None:
            self.problem(("time_format",), why)
        return text

    def load_timezone(self, value: Any) -> str | None:
        if value is None:
            return None
        text = self.text_value(("timezone",), value)
        if text is None:
            return None
        try:
            time_zone(text)
        except ValueError as err:
            self.problem(("timezone",), str(err))
        return text

    def load_status_map(self, value: Any) -> dict[str, IncidentStatus]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(("status_map",), "must be a mapping of source value: status")
            return {}
        out: dict[str, IncidentStatus] = {}
        for source, status in value.items():
            word = status.strip().casefold() if isinstance(status, str) else None
            if word not in STATUS_WORDS:
                self.problem(("status_map", source), "must be active, closed or cancelled")
                continue
            out[source] = STATUS_WORDS[word]
        return out

    def load_fields(self, value: Any) -> dict[str, CompiledXPath]:
        if not isinstance(value, dict):
            self.problem(("fields",), "must be a mapping of snapshot field: XPath "
                                      "(incident_id and updated_at at least)")  # fmt: skip
            return {}
        out: dict[str, CompiledXPath] = {}
        for name, expression in value.items():
            if name not in FIELDS:
                expected = ", ".join(FIELDS)
                self.problem(("fields", name), f"unknown field (expected one of: {expected})")
                continue
            compiled = self.compile(("fields", name), expression)
            if compiled is not None:
                out[name] = compiled
        for name in REQUIRED_FIELDS:
            if name not in value:
                self.problem(("fields", name), "is required")
        if ("lat" in value) != ("lon" in value):
            self.problem(("fields",), "lat and lon go together: give both or neither")
        return out

    def load_group(self, name: str, value: Any) -> Group | None:
        if value is None:
            return None
        parts, required = GROUPS[name]
        if not isinstance(value, dict):
            self.problem((name,), f"must be a mapping with keys {', '.join(parts)}")
            return None
        for key in value:
            if key not in parts:
                self.problem((name, key), f"unknown key (expected one of: {', '.join(parts)})")
        for key in required:
            if key not in value:
                self.problem((name, key), "is required")
        each = self.compile((name, "each"), value.get("each")) if "each" in value else None
        compiled = {
            key: c
            for key in parts[1:]
            if key in value and (c := self.compile((name, key), value[key])) is not None
        }
        if each is None or any(key not in compiled for key in required[1:]):
            return None
        return Group(each=each, parts=compiled)

    def compile(
        self, path: tuple[str | int, ...], value: Any, *, required: bool = False
    ) -> CompiledXPath | None:
        if value is None and not required:
            return None
        if value is None:
            self.problem(path, "is required")
            return None
        text = self.text_value(path, value)
        if text is None:
            return None
        try:
            xpath = etree.XPath(text, namespaces=self.namespaces)
        except etree.XPathSyntaxError as err:
            self.problem(path, f"invalid XPath: {err}")
            return None
        try:
            # Unknown prefixes and functions only show when an expression runs.
            xpath(self._probe)
        except etree.XPathError as err:
            self.problem(path, f"invalid XPath: {err}")
            return None
        return CompiledXPath(".".join(str(p) for p in path), text, xpath)


# --- parsing -----------------------------------------------------------------------------------


class MappedXmlFormat:
    """XML read through an :class:`XmlMapping`."""

    name = "xml-mapped"

    def __init__(self, mapping: XmlMapping, *, timezone: str | None = None) -> None:
        """The mapping file's own ``timezone`` wins: it is written for one CAD. ``timezone``
        (the feed's) applies when the mapping names none."""
        self.mapping = mapping
        zone_name = mapping.timezone or timezone or "UTC"
        self.times = TimeReader(zone=time_zone(zone_name), time_format=mapping.time_format)

    def split(self, payload: bytes) -> list[bytes]:
        return [payload]

    def parse(self, message: bytes) -> Snapshot:
        """The snapshot in ``message``; raises :class:`RejectedMessage`."""
        root = parse_untrusted_xml(message)
        self._check_root(root)
        m = self.mapping
        read = _Reader(self.times)

        def text(name: str) -> str | None:
            compiled = m.fields.get(name)
            return None if compiled is None else read.first(compiled, root)

        def time(name: str) -> datetime | None:
            compiled = m.fields.get(name)
            return None if compiled is None else read.latest_time(compiled, root)

        incident_id = text("incident_id")
        if incident_id is None:
            raise RejectedMessage("missing-field", "no incident id", m.fields["incident_id"].key)
        updated_at = time("updated_at")
        if updated_at is None:
            raise RejectedMessage("missing-field", "no update time", m.fields["updated_at"].key)
        return Snapshot(
            incident_id=incident_id,
            updated_at=updated_at,
            status=self._status(read, root),
            incident_number=text("incident_number"),
            call_type=text("call_type"),
            call_type_code=text("call_type_code"),
            apco_type=text("apco_type"),
            priority=text("priority"),
            agency=text("agency"),
            zone=text("zone"),
            opened_at=time("opened_at"),
            closed_at=time("closed_at"),
            location=self._location(read, root),
            units=tuple(self._units(read, root)),
            cautions=tuple(self._cautions(read, root)),
            dispositions=tuple(self._dispositions(read, root)),
            notes=tuple(self._notes(read, root)),
            persons=tuple(self._persons(read, root)),
        )

    def _check_root(self, root: etree._Element) -> None:
        result = self.mapping.root.evaluate(root)
        if isinstance(result, list) and any(item is root for item in result):
            return
        if result is True:
            return
        namespace = etree.QName(root).namespace
        if namespace not in self.mapping.namespaces.values():
            raise RejectedMessage(
                "wrong-namespace", "the root element is not in a namespace the mapping names",
                "/" + local_name(root),
            )  # fmt: skip
        raise RejectedMessage("unsupported", "the root element does not match the mapping's root",
                              "/" + local_name(root))  # fmt: skip

    def _status(self, read: _Reader, root: etree._Element) -> IncidentStatus:
        compiled = self.mapping.fields.get("status")
        found = None if compiled is None else read.first_with_where(compiled, root)
        if found is None:
            return IncidentStatus.ACTIVE
        value, where = found
        status_map = self.mapping.status_map
        if value in status_map:
            return status_map[value]
        folded = value.casefold()
        for source, status in status_map.items():
            if source.casefold() == folded:
                return status
        if folded in STATUS_WORDS:
            return STATUS_WORDS[folded]
        raise RejectedMessage(
            "invalid-field", "the status is not one the mapping's status_map knows", where
        )

    def _location(self, read: _Reader, root: etree._Element) -> Location | None:
        fields = self.mapping.fields

        def text(name: str) -> str | None:
            return read.first(fields[name], root) if name in fields else None

        point = None
        if "lat" in fields:
            lat = read.first_with_where(fields["lat"], root)
            lon = read.first_with_where(fields["lon"], root)
            where = lat[1] if lat else lon[1] if lon else fields["lat"].key
            point = cad_point(lat[0] if lat else None, lon[0] if lon else None, where)
        address, city, state = text("address"), text("city"), text("state")
        if point is None and address is None and city is None and state is None:
            return None
        return Location(point=point, address=address, city=city, state=state)

    def _each(self, name: str, read: _Reader, root: etree._Element) -> list[tuple[Group, Any]]:
        group = self.mapping.groups.get(name)
        if group is None:
            return []
        nodes = group.each.evaluate(root)
        if not isinstance(nodes, list) or not all(isinstance(n, etree._Element) for n in nodes):
            raise RejectedMessage("unsupported", "the mapping's each must select elements",
                                  group.each.key)  # fmt: skip
        return [(group, node) for node in nodes]

    def _part(self, read: _Reader, group: Group, part: str, node: Any) -> str | None:
        compiled = group.parts.get(part)
        return None if compiled is None else read.first(compiled, node)

    def _notes(self, read: _Reader, root: etree._Element) -> list[Note]:
        notes = []
        for group, node in self._each("notes", read, root):
            lines = [value for value, _ in read.strings(group.parts["text"], node)]
            if not lines:
                continue
            when = group.parts.get("time")
            notes.append(Note("\n".join(lines), read.latest_time(when, node) if when else None))
        return notes

    def _persons(self, read: _Reader, root: etree._Element) -> list[Person]:
        persons = []
        for group, node in self._each("persons", read, root):
            roles_path = group.parts.get("roles")
            roles = [value for value, _ in read.strings(roles_path, node)] if roles_path else []
            person = Person(
                roles=tuple(dict.fromkeys(roles)),
                name=self._part(read, group, "name", node),
                birth_date=self._part(read, group, "birth_date", node),
                phone=self._part(read, group, "phone", node),
                mental_state=self._part(read, group, "mental_state", node),
            )
            if person != Person():
                persons.append(person)
        return persons

    def _units(self, read: _Reader, root: etree._Element) -> list[Unit]:
        return [
            Unit(unit_id, self._part(read, g, "type", n), self._part(read, g, "status", n))
            for g, n in self._each("units", read, root)
            if (unit_id := self._part(read, g, "id", n)) is not None
        ]

    def _cautions(self, read: _Reader, root: etree._Element) -> list[Caution]:
        return [
            Caution(kind, self._part(read, g, "severity", n))
            for g, n in self._each("cautions", read, root)
            if (kind := self._part(read, g, "type", n)) is not None
        ]

    def _dispositions(self, read: _Reader, root: etree._Element) -> list[Disposition]:
        return [
            Disposition(code, self._part(read, g, "text", n))
            for g, n in self._each("dispositions", read, root)
            if (code := self._part(read, g, "code", n)) is not None
        ]


@dataclass(frozen=True, slots=True)
class _Reader:
    times: TimeReader

    def strings(self, compiled: CompiledXPath, context: Any) -> list[tuple[str, Any]]:
        """Every value the expression gives, trimmed and non-empty, with the node it came from
        (for :func:`_where`)."""
        return list(_strings(compiled.evaluate(context)))

    def first_with_where(self, compiled: CompiledXPath, context: Any) -> tuple[str, str] | None:
        found = self.strings(compiled, context)
        return (found[0][0], _where(found[0][1], compiled.key)) if found else None

    def first(self, compiled: CompiledXPath, context: Any) -> str | None:
        found = self.strings(compiled, context)
        return found[0][0] if found else None

    def latest_time(self, compiled: CompiledXPath, context: Any) -> datetime | None:
        times = []
        for value, origin in self.strings(compiled, context):
            try:
                times.append(self.times.parse(value, ""))
            except RejectedMessage as err:
                raise RejectedMessage(err.code, err.reason, _where(origin, compiled.key)) from None
        return max(times) if times else None


def _strings(result: Any) -> list[tuple[str, Any]]:
    if isinstance(result, bool):
        return [("true" if result else "false", None)]
    if isinstance(result, float):
        if not math.isfinite(result):
            return []
        return [(str(int(result)) if result.is_integer() else repr(result), None)]
    if isinstance(result, str):
        value = result.strip()
        return [(value, result)] if value else []
    out: list[tuple[str, Any]] = []
    if isinstance(result, list):
        for item in result:
            if isinstance(item, etree._Element):
                if is_nil(item):
                    continue
                value = "".join(item.itertext())
            elif isinstance(item, str):
                value = str(item)
            else:  # namespace nodes
                continue
            value = value.strip()
            if value:
                out.append((value, item))
    return out


def _where(origin: Any, key: str) -> str:
    """Where a value came from: its element or attribute, else the mapping key."""
    if isinstance(origin, etree._Element):
        return element_path(origin)
    getparent = getattr(origin, "getparent", None)
    parent = getparent() if getparent is not None else None
    if parent is None:
        return key
    if getattr(origin, "is_attribute", False):
        attribute = etree.QName(getattr(origin, "attrname", "") or "_").localname
        return f"{element_path(parent)}/@{attribute}"
    return element_path(parent)
