"""Tyler New World (Aegis / Enterprise CAD) CallExport XML.

New World's "Enterprise CAD Standard Exporter" writes one XML file per call into a folder every
time the call changes (a unit is dispatched, a unit's status changes, the call is cleared). Each
file is the whole call as it stands: a snapshot. The root is ``Call`` in the namespace
:data:`NAMESPACE`; an absent value is written as ``i:nil="true"``.

How the call maps to a :class:`~corespond.daemon.snapshot.Snapshot`:

========================================  =================================================
New World                                 Snapshot
========================================  =================================================
CallId                                    incident_id (required)
CallNumber                                incident_number
the latest ``*DateTime`` in the document  updated_at (see :meth:`NewWorldFormat.parse`)
CanceledFlag / ClosedFlag                 status cancelled / closed (else active)
CreateDateTime / CloseDateTime            opened_at / closed_at
primary AgencyContext CallType            call_type_code (the local call-type code)
its Incident's TypeDescription            call_type (the code's description)
primary AgencyContext Priority            priority
Location Police/Fire/EmsOri by AgencyType agency (else the AgencyType itself)
Location PoliceBeat (FireQuadrant,        zone
EmsDistrict for Fire and EMS contexts)
Location FullAddress (else its parts),    location (0,0 means "not geocoded")
City, State, LatitudeY, LongitudeX
NatureOfCall, AdditionalInfo, Narratives  notes (protected; in that order)
Persons/Person (+ CallerName/CallerPhone  persons (protected)
when no person is the caller)
AssignedUnits/Unit                        units (status: see :func:`_unit_status`)
Dispositions/CallDisposition Name,        dispositions
Description
========================================  =================================================

``NatureOfCall`` is what the call-taker typed from the caller's words ("MALE YELLING, SAYS HE
HAS A KNIFE"), not a code: it is free text that can hold protected information, so it becomes
the first (protected) note rather than ``call_type``. ``call_type`` is the description New World
keeps beside the agency's call-type code. New World has no cautions and no APCO type; the
pipeline maps the local code to APCO from the code tables.

The "primary" AgencyContext is the first one, or the first of the configured ``agency_type``
(``Police``, ``Fire``, ``EMS``) when a site's feed mixes agencies.

Times: ``2022-12-03 11:10:15Z`` as New World writes them, ISO 8601 with ``T`` and offsets too;
a time written without a zone is read in the feed's ``timezone`` (IANA name, default UTC).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import structlog
from lxml import etree

from corespond.adapters.cad_values import (
    TimeReader,
    cad_flag,
    cad_point,
    format_new_world_time,
    time_zone,
)
from corespond.adapters.xml_safety import (
    XSI_NAMESPACE,
    XSI_NIL,
    element_path,
    is_nil,
    local_name,
    parse_untrusted_xml,
)
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import (
    Disposition,
    IncidentStatus,
    Location,
    Note,
    Person,
    Snapshot,
    Unit,
)

log = structlog.get_logger(__name__)

NAMESPACE = "http://www.newworldsystems.com/Aegis/CAD/Peripheral/CallExport/2011/02"
ROOT = f"{{{NAMESPACE}}}Call"

# A unit's time fields, in the order of its life: on equal times the later stage wins. The
# statuses are the NENA EIDO unit status words, so that every feed speaks the same language.
UNIT_TIMES: tuple[tuple[str, str], ...] = (
    ("AssignedDateTime", "Assigned"),
    ("DispatchDateTime", "Dispatched"),
    ("EnrouteDateTime", "EnRoute"),
    ("StagedDateTime", "Staged"),
    ("ArriveDateTime", "OnScene"),
    ("AtPatientDateTime", "AtPatient"),
    ("TransportDateTime", "Transporting"),
    ("AtHospitalDateTime", "AtHospital"),
    ("DepartHospitalDateTime", "DepartHospital"),
    ("ClearDateTime", "Cleared"),
)
_TIME_BY_STATUS = {status.casefold(): name for name, status in UNIT_TIMES}
ZONE_BY_AGENCY = {"police": "PoliceBeat", "law": "PoliceBeat", "fire": "FireQuadrant",
                  "ems": "EmsDistrict"}  # fmt: skip
ORI_BY_AGENCY = {"police": "PoliceOri", "law": "PoliceOri", "fire": "FireOri", "ems": "EmsOri"}
ADDRESS_PARTS = ("HouseNumber", "HouseNumberSuffix", "PrefixDirectional", "PrefixType",
                 "StreetName", "StreetType", "StreetDirectional")  # fmt: skip
_ISO_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:[T ][0-9:.]+(?:Z|[+-]\d{2}:?\d{2})?)?$")


def _q(name: str) -> str:
    return f"{{{NAMESPACE}}}{name}"


class NewWorldFormat:
    """Tyler New World CallExport XML, one call per file."""

    name = "newworld"

    def __init__(self, *, timezone: str = "UTC", agency_type: str | None = None) -> None:
        """``timezone``: IANA zone for times written without one (ValueError if unknown);
        ``agency_type``: which AgencyContext is primary (``Police``, ``Fire``, ``EMS``...)."""
        self.times = TimeReader(zone=time_zone(timezone))
        self.agency_type = agency_type

    def split(self, payload: bytes) -> list[bytes]:
        return [payload]

    def parse(self, message: bytes) -> Snapshot:
        """The snapshot in one CallExport document; raises :class:`RejectedMessage`.

        ``updated_at`` is the latest timestamp anywhere in the document: New World writes a new
        file on every change but has no "last updated" field, and every change it exports (a
        dispatch, a unit status, a narrative entry, the close) stamps a ``*DateTime`` element.
        Every such element is checked, so a bad time anywhere rejects the file.
        """
        root = parse_untrusted_xml(message)
        if root.tag != ROOT:
            if etree.QName(root).namespace != NAMESPACE:
                raise RejectedMessage(
                    "wrong-namespace",
                    f"the root element must be Call in the namespace {NAMESPACE}",
                    "/" + local_name(root),
                )
            raise RejectedMessage("unsupported", "the root element must be Call",
                                  "/" + local_name(root))  # fmt: skip
        return _CallReader(root, self.times, self.agency_type).snapshot()


class _CallReader:
    def __init__(self, root: etree._Element, times: TimeReader, agency_type: str | None) -> None:
        self.root = root
        self.times = times
        self.agency_type = agency_type
        self._parsed: dict[etree._Element, datetime] = {}

    # --- access --------------------------------------------------------------------------------

    def child(self, parent: etree._Element | None, name: str) -> etree._Element | None:
        if parent is None:
            return None
        found = parent.find(_q(name))
        if found is None or is_nil(found):
            return None
        return found

    def items(self, parent: etree._Element | None, container: str, item: str) -> list[Any]:
        holder = self.child(parent, container)
        return [] if holder is None else [e for e in holder.findall(_q(item)) if not is_nil(e)]

    def text(self, parent: etree._Element | None, name: str) -> str | None:
        found = self.child(parent, name)
        if found is None:
            return None
        value = (found.text or "").strip()
        return value or None

    def time(self, parent: etree._Element | None, name: str) -> datetime | None:
        found = self.child(parent, name)
        return None if found is None else self._time_of(found)

    def _time_of(self, element: etree._Element) -> datetime | None:
        if element in self._parsed:
            return self._parsed[element]
        raw = (element.text or "").strip()
        if not raw or is_nil(element):
            return None
        try:
            value = self.times.parse(raw, "")
        except RejectedMessage as err:
            # The element's path is worked out only for an error: it costs a walk up the tree.
            raise RejectedMessage(err.code, err.reason, element_path(element)) from None
        self._parsed[element] = value
        return value

    def where(self, parent: etree._Element, name: str) -> str:
        return f"{element_path(parent)}/{name}"

    # --- the snapshot --------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        root = self.root
        incident_id = self.text(root, "CallId")
        if incident_id is None:
            raise RejectedMessage("missing-field", "CallId is required", "/Call/CallId")
        updated_at = self.latest_time()
        if updated_at is None:
            raise RejectedMessage("missing-field", "the call has no timestamp at all",
                                  "/Call/CreateDateTime")  # fmt: skip
        context = self.primary_context()
        agency_type = self.text(context, "AgencyType")
        incident = self.incident_for(agency_type)
        call_type_code = self.text(context, "CallType") or self.text(incident, "Type")
        location = self.child(root, "Location")
        kind = (agency_type or "").casefold()
        return Snapshot(
            incident_id=incident_id,
            updated_at=updated_at,
            status=self.status(),
            incident_number=self.text(root, "CallNumber"),
            call_type=self.text(incident, "TypeDescription"),
            call_type_code=call_type_code,
            priority=self.text(context, "Priority"),
            agency=self.text(location, ORI_BY_AGENCY.get(kind, "PoliceOri")) or agency_type,
            zone=self.text(location, ZONE_BY_AGENCY.get(kind, "PoliceBeat"))
            or self.text(location, "PoliceBeat"),
            opened_at=self.time(root, "CreateDateTime"),
            closed_at=self.time(root, "CloseDateTime"),
            location=self.location(location),
            units=tuple(u for u in map(self.unit, self.items(root, "AssignedUnits", "Unit")) if u),
            dispositions=tuple(
                Disposition(code, self.text(d, "Description"))
                for d in self.items(root, "Dispositions", "CallDisposition")
                if (code := self.text(d, "Name")) is not None
            ),
            notes=self.notes(),
            persons=self.persons(),
        )

    def latest_time(self) -> datetime | None:
        latest: datetime | None = None
        for element in self.root.iter(etree.Element):
            if element.tag.startswith(f"{{{NAMESPACE}}}") and element.tag.endswith("DateTime"):
                value = self._time_of(element)
                if value is not None and (latest is None or value > latest):
                    latest = value
        return latest

    def status(self) -> IncidentStatus:
        root = self.root
        if cad_flag(self.text(root, "CanceledFlag"), "/Call/CanceledFlag"):
            return IncidentStatus.CANCELLED
        if cad_flag(self.text(root, "ClosedFlag"), "/Call/ClosedFlag"):
            return IncidentStatus.CLOSED
        return IncidentStatus.ACTIVE

    def primary_context(self) -> etree._Element | None:
        contexts = self.items(self.root, "AgencyContexts", "AgencyContext")
        if self.agency_type is not None:
            wanted = self.agency_type.casefold()
            for context in contexts:
                if (self.text(context, "AgencyType") or "").casefold() == wanted:
                    return context
        return contexts[0] if contexts else None

    def incident_for(self, agency_type: str | None) -> etree._Element | None:
        incidents = self.items(self.root, "Incidents", "Incident")
        for incident in incidents:
            if agency_type and self.text(incident, "AgencyType") == agency_type:
                return incident
        return incidents[0] if incidents else None

    def location(self, element: etree._Element | None) -> Location | None:
        if element is None:
            return None
        address = self.text(element, "FullAddress")
        if address is None:
            parts = [p for name in ADDRESS_PARTS if (p := self.text(element, name))]
            address = " ".join(parts) or None
        point = cad_point(self.text(element, "LatitudeY"), self.text(element, "LongitudeX"),
                          self.where(element, "LatitudeY"))  # fmt: skip
        city, state = self.text(element, "City"), self.text(element, "State")
        if point is None and address is None and city is None and state is None:
            return None
        return Location(point=point, address=address, city=city, state=state)

    def unit(self, element: etree._Element) -> Unit | None:
        number = self.text(element, "UnitNumber")
        if number is None:
            log.debug("cad.newworld.unit.skipped", where=element_path(element))
            return None
        return Unit(id=number, type=self.text(element, "Type"), status=self.unit_status(element))

    def unit_status(self, element: etree._Element) -> str | None:
        """The status of the unit's latest change.

        The candidates are the unit's stage times (``EnrouteDateTime`` means ``EnRoute``...) and
        its UnitLog entries. The latest wins; on equal times a UnitLog entry wins, since it is the
        CAD's own word for the status. A UnitLog without a time counts only when nothing has one.
        """
        best: tuple[datetime, int, str] | None = None
        order = 0
        for name, status in UNIT_TIMES:
            when = self.time(element, name)
            order += 1
            if when is not None and (best is None or (when, order) >= best[:2]):
                best = (when, order, status)
        untimed: str | None = None
        for entry in self.items(element, "UnitLogs", "UnitLog"):
            status_text = self.text(entry, "Status")
            when = self.time(entry, "DateTime")
            order += 1
            if status_text is None:
                continue
            if when is None:
                untimed = status_text
            elif best is None or (when, order) >= best[:2]:
                best = (when, order, status_text)
        if best is not None:
            return best[2]
        return untimed

    def notes(self) -> tuple[Note, ...]:
        opened = self.time(self.root, "CreateDateTime")
        narratives = [
            Note(text, self.time(n, "CreateDateTime"))
            for n in self.items(self.root, "Narratives", "Narrative")
            if (text := self.text(n, "Text")) is not None
        ]
        written = {n.text for n in narratives}
        # Call-taker free text first, unless a narrative entry repeats it.
        leading = [
            Note(text, opened)
            for name in ("NatureOfCall", "AdditionalInfo")
            if (text := self.text(self.root, name)) is not None and text not in written
        ]
        return (*leading, *narratives)

    def persons(self) -> tuple[Person, ...]:
        people: list[Person] = []
        for element in self.items(self.root, "Persons", "Person"):
            roles: list[str] = []
            if (role := self.text(element, "Role")) is not None:
                roles.append(role)
            flag = cad_flag(self.text(element, "PrimaryCallerFlag"),
                            self.where(element, "PrimaryCallerFlag"))  # fmt: skip
            if flag and "Caller" not in roles:
                roles.append("Caller")
            names = [n for key in ("FirstName", "MiddleName", "LastName")
                     if (n := self.text(element, key))]  # fmt: skip
            person = Person(
                roles=tuple(roles),
                name=" ".join(" ".join(names).split()) or None,
                birth_date=_birth_date(self.text(element, "DateOfBirth")),
                phone=self.text(element, "ContactPhone"),
            )
            if person.name or person.phone or person.birth_date or person.roles:
                people.append(person)
        caller_name = self.text(self.root, "CallerName")
        caller_phone = self.text(self.root, "CallerPhone")
        has_caller = any("Caller" in p.roles for p in people)
        if (caller_name or caller_phone) and not has_caller:
            people.insert(0, Person(roles=("Caller",), name=caller_name, phone=caller_phone))
        return tuple(people)


def _birth_date(text: str | None) -> str | None:
    """``YYYY-MM-DD`` when New World wrote a date or a midnight datetime; else as written."""
    if text is None:
        return None
    found = _ISO_DATE.match(text)
    return found.group(1) if found else text


# --- writing -----------------------------------------------------------------------------------

_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def newworld_document(snapshot: Snapshot) -> bytes:
    """A CallExport document for ``snapshot`` (used by the demo and the round-trip tests).

    New World has no "last updated" field, so ``updated_at`` is carried the way New World
    carries it: the time of the change that made the file. Unit stage times, UnitLog entries
    and disposition times are written as ``updated_at``. Reading the document back gives the
    same snapshot, except for what New World cannot hold (``apco_type``, cautions, a person's
    mental state, and an ``updated_at`` later than every time of a snapshot without units or
    dispositions, which reads back as its latest time).
    """
    snap = snapshot
    at = snap.updated_at
    agency_type = "Police" if snap.agency else None
    root = etree.Element(ROOT, nsmap={None: NAMESPACE, "i": XSI_NAMESPACE})
    w = _field
    w(root, "CallId", snap.incident_id)
    w(root, "CallNumber", snap.incident_number)
    w(root, "CallSource", None)
    w(root, "CallerName", None)
    w(root, "CallerPhone", None)
    w(root, "CreateDateTime", snap.opened_at)
    w(root, "CloseDateTime", snap.closed_at)
    w(root, "ClosedFlag", "true" if snap.status is IncidentStatus.CLOSED else "false")
    w(root, "CanceledFlag", "true" if snap.status is IncidentStatus.CANCELLED else "false")
    w(root, "NatureOfCall", None)
    w(root, "AdditionalInfo", None)

    context = etree.SubElement(etree.SubElement(root, _q("AgencyContexts")), _q("AgencyContext"))
    w(context, "AgencyType", agency_type)
    w(context, "CallType", snap.call_type_code)
    w(context, "CreatedDateTime", snap.opened_at)
    w(context, "ClosedDateTime", snap.closed_at)
    w(context, "Priority", snap.priority)

    units = etree.SubElement(root, _q("AssignedUnits"))
    for unit in snap.units:
        element = etree.SubElement(units, _q("Unit"))
        w(element, "UnitNumber", unit.id)
        w(element, "Type", unit.type)
        stage = _TIME_BY_STATUS.get((unit.status or "").casefold())
        for name, _status in UNIT_TIMES:
            w(element, name, at if name == stage else None)
        logs = etree.SubElement(element, _q("UnitLogs"))
        if unit.status is not None and stage is None:
            entry = etree.SubElement(logs, _q("UnitLog"))
            w(entry, "DateTime", at)
            w(entry, "Status", unit.status)

    dispositions = etree.SubElement(root, _q("Dispositions"))
    for disposition in snap.dispositions:
        element = etree.SubElement(dispositions, _q("CallDisposition"))
        w(element, "Name", disposition.code)
        w(element, "Description", disposition.text)
        w(element, "DateTime", at)

    if snap.call_type or snap.call_type_code:
        incident = etree.SubElement(etree.SubElement(root, _q("Incidents")), _q("Incident"))
        w(incident, "Number", snap.incident_number)
        w(incident, "Type", snap.call_type_code)
        w(incident, "TypeDescription", snap.call_type)
        w(incident, "AgencyType", agency_type)
        w(incident, "CreateDateTime", snap.opened_at)

    loc = snap.location
    location = etree.SubElement(root, _q("Location"))
    w(location, "FullAddress", loc.address if loc else None)
    w(location, "City", loc.city if loc else None)
    w(location, "State", loc.state if loc else None)
    w(location, "LatitudeY", repr(loc.point.lat) if loc and loc.point else None)
    w(location, "LongitudeX", repr(loc.point.lon) if loc and loc.point else None)
    w(location, "PoliceBeat", snap.zone)
    w(location, "PoliceOri", snap.agency)

    narratives = etree.SubElement(root, _q("Narratives"))
    for note in snap.notes:
        element = etree.SubElement(narratives, _q("Narrative"))
        w(element, "CreateDateTime", note.time)
        w(element, "CreateUser", None)
        w(element, "Restriction", None)
        w(element, "Text", note.text)
        w(element, "Type", "UserEntry")

    persons = etree.SubElement(root, _q("Persons"))
    for person in snap.persons:
        element = etree.SubElement(persons, _q("Person"))
        first, _, last = (person.name or "").partition(" ")
        w(element, "Role", person.roles[0] if person.roles else None)
        w(element, "PrimaryCallerFlag", "true" if "Caller" in person.roles else "false")
        w(element, "FirstName", first or None)
        w(element, "LastName", last or None)
        w(element, "DateOfBirth", person.birth_date)
        w(element, "ContactPhone", person.phone)
    return etree.tostring(root, xml_declaration=True, encoding="utf-8", pretty_print=True)


def _field(parent: etree._Element, name: str, value: str | datetime | None) -> None:
    element = etree.SubElement(parent, _q(name))
    if value is None:
        element.set(XSI_NIL, "true")
    elif isinstance(value, datetime):
        element.text = format_new_world_time(value)
    else:
        element.text = _NOT_XML.sub("", value)
