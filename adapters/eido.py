"""NENA EIDO (NENA-STA-021.1b, JSON) to and from :class:`Snapshot`.

An EIDO is the whole state of one incident as its sender knows it (NENA-STA-021.1b section 2),
which is exactly a :class:`Snapshot`. What we read, and from where:

=====================  =========================================================================
snapshot               EIDO
=====================  =========================================================================
incident_id            ``$id`` (the Incident Tracking Identifier)
updated_at             ``lastUpdateTimeStamp``
agency                 the ``agencyComponent`` with ``incidentOwningAgencyIndicator``, else the
                       first one, else ``updatedByAgencyReference``
apco_type              ``incidentComponent.incidentTypeCommonRegistryText``
call_type_code/_type   ``incidentTypeInternalCode`` / ``incidentTypeInternalText``
status                 ``incidentStatusCommonRegistryText[]`` read in order, the last of
                       Closed/Cancelled/ReOpened/Active wins (so ``["Closed", "ReOpened"]`` is
                       active and ``["ReOpened", "Closed"]`` closed); none of them: active
priority               ``incidentCommonPriorityNumber``, else ``incidentPriorityInternalText``
zone                   ``beatOrDispatchGroupText``
incident_number        ``internalIncidentId``
dispositions           ``dispositionComponent[]``: code, description (else category) text
opened_at              the earliest ``callComponent[].callStartTimestamp``
closed_at              when closed: the incident component's ``lastUpdateTimeStamp`` (when the
                       status last changed), else the EIDO's
location               the ``locationComponent`` with a ``locationByValue`` (PIDF-LO) of the
                       preferred type: CurrentIncident, InitialIncident, Caller, RoutingLocation,
                       Investigation, Other, TowerLocation, Staging; never UnitLocation
notes                  ``notesComponent[]``: ``notesActionComments`` (HTML5) as plain text,
                       time = the note's ``lastUpdateTimeStamp``; oldest first
persons                ``personComponent[]``: roles, and from the NIEM ``ncPersonComponent``
                       the name, birth date, home (else work) telephone and mental state
units                  ``emergencyResourceComponent[]``: ``emergencyResourceName`` (else
                       ``$id``), type, last secondary status (else the primary one)
cautions               ``cautionComponent[]`` (021.1.1 draft): common (else internal) type text,
                       ``cautionSeverity``
=====================  =========================================================================

Fields we do not read are tolerated whatever they hold (senders add their own); a field we read
with the wrong JSON type is rejected with a JSON pointer to it. The spec's required fields are
enforced where we use them (``$id``, ``lastUpdateTimeStamp``, ``eidoVersion`` = "1.0",
``agencyComponent``, the incident type, the note text, the location type, the disposition code,
the person roles).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Final

import lxml.html
import msgspec
import orjson
from lxml import etree

from corespond.adapters.pidflo import parse_pidf_lo, pidf_lo_document
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import (
    Caution,
    Disposition,
    IncidentStatus,
    Location,
    Note,
    Person,
    Snapshot,
    Unit,
    format_time,
    parse_time,
)

EIDO_VERSION: Final = "1.0"
DEFAULT_AGENCY_ID: Final = "corespond.invalid"
JSON_LD_CONTEXT: Final = {"@vocab": "./JSON-LD_Contexts/EmergencyIncidentDataObjectType.jsonld"}

# Location types by preference for "where the incident is" (lower wins).
LOCATION_PREFERENCE: Final = {
    "currentincident": 0,
    "initialincident": 1,
    "caller": 2,
    "routinglocation": 3,
    "investigation": 4,
    "other": 4,
    "towerlocation": 5,
    "staging": 6,
}
_OTHER_LOCATION = 4
_NOT_THE_INCIDENT = frozenset({"unitlocation"})  # where a unit is, not where the call is

_STATUS_WORDS: Final = {
    "closed": IncidentStatus.CLOSED,
    "cancelled": IncidentStatus.CANCELLED,
    "canceled": IncidentStatus.CANCELLED,
    "reopened": IncidentStatus.ACTIVE,
    "active": IncidentStatus.ACTIVE,
}
_STATUS_TEXT: Final = {
    IncidentStatus.ACTIVE: "Active",
    IncidentStatus.CLOSED: "Closed",
    IncidentStatus.CANCELLED: "Cancelled",
}
PRIMARY_UNIT_STATUSES: Final = ("Available", "ConditionallyAvailable", "NotAvailable")

# Block elements end a line in the plain-text form of an HTML5 note.
_BLOCK_TAGS: Final = frozenset({
    "address", "article", "aside", "blockquote", "dd", "div", "dl", "dt", "figcaption", "figure",
    "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p",
    "pre", "section", "table", "tbody", "thead", "tfoot", "tr", "ul",
})  # fmt: skip
_SKIPPED_TAGS: Final = frozenset({"script", "style", "template", "head", "title"})
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NIEM_VALUE_KEYS: Final = frozenset({"value", "@context"})  # a bare NIEM value object
_NIEM_DEPTH = 8  # NIEM wraps values in lists and objects; real nesting is 3 or 4 levels

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_local = threading.local()


class EidoFormat:
    """NENA EIDO JSON, one EIDO per message."""

    name = "eido"

    def split(self, payload: bytes) -> list[bytes]:
        return [payload]

    def parse(self, message: bytes) -> Snapshot:
        try:
            return _typed_snapshot(message)
        except _GIVE_UP:
            return self.parse_untyped(message)

    def parse_untyped(self, message: bytes) -> Snapshot:
        """The full mapping alone: every rejection with its precise reason and pointer."""
        # load_json scans every byte for a run of 19 digits (4 us of a 4 KB message) because
        # orjson reads an integer beyond 64 bits as a float. The only number an EIDO's mapping
        # reads is incidentCommonPriorityNumber, and it accepts only an int there: a float read
        # from such an integer can only make the mapping reject. So orjson's value is mapped
        # first, and only a rejected message with such a digit run is decided again from the
        # exact decoder's value (every other message reads the same from both).
        doc = _load_json_lenient(message)
        if doc is _NOT_DECODED:
            return snapshot_from_eido(load_json(message))
        try:
            return snapshot_from_eido(doc)
        except RejectedMessage:
            if _LONG_DIGIT_RUN in message.translate(_DIGITS_AS_ZERO):
                return snapshot_from_eido(load_json(message))
            raise


# --- bytes to JSON -----------------------------------------------------------------------------


def load_json(message: bytes) -> Any:
    """The JSON value in ``message`` (UTF-8, a BOM tolerated); RejectedMessage otherwise."""
    if message.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RejectedMessage("bad-encoding", "UTF-16 byte order mark: EIDO must be UTF-8", "/")
    offset = 3 if message.startswith(b"\xef\xbb\xbf") else 0
    # orjson decodes a 4 KB EIDO in about half of json's time (32 -> 17 us). It takes a subset
    # of what json takes (strict UTF-8, no lone surrogate escapes, no NaN) and gives the same
    # value for it, with one exception: it reads an integer beyond 64 bits as a float. So a
    # message with a run of 19 or more digits anywhere (4 us to look for) goes the way below,
    # as does anything orjson refuses; that way accepts or rejects it precisely, as before.
    # (One deliberate difference: valid JSON nested between Python's recursion limit, about
    # 1,000 levels, and orjson's 1,024 is now read instead of refused as too deep.)
    if _LONG_DIGIT_RUN not in message.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(message[offset:] if offset else message)
        except orjson.JSONDecodeError:
            pass
    try:
        text = message[offset:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise RejectedMessage(
            "bad-encoding", f"not valid UTF-8 at byte {err.start + offset}", "/"
        ) from None
    try:
        if text.startswith("\ufeff"):  # a second BOM: json.loads refuses it the same way
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _DECODER.decode(text)
    except json.JSONDecodeError as err:
        # err.msg is a fixed phrase; anything after a colon could quote the input.
        what = err.msg.split(":")[0].removesuffix(" at")
        raise RejectedMessage(
            "malformed-json",
            f"{what} at line {err.lineno} column {err.colno}",
            f"line {err.lineno}, column {err.colno}",
        ) from None
    except RecursionError:
        raise RejectedMessage("malformed-json", "JSON nested too deeply", "/") from None
    except ValueError:  # e.g. an integer longer than Python's digit limit
        raise RejectedMessage("malformed-json", "JSON number out of range", "/") from None


_NOT_DECODED: Final = object()


def _load_json_lenient(message: bytes) -> Any:
    """orjson's value of ``message`` (integers beyond 64 bits read as floats), or
    ``_NOT_DECODED`` for anything load_json must decide (a byte order mark, what orjson
    refuses)."""
    if message.startswith((b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf")):
        return _NOT_DECODED
    try:
        return orjson.loads(message)
    except orjson.JSONDecodeError:
        return _NOT_DECODED


def _reject_constant(name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


# One decoder for all messages (json.loads(..., parse_constant=...) would build one per call);
# decoders keep no state between calls, so threads may share it.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_DIGIT_RUN: Final = b"0" * 19  # the shortest integer that may not fit 64 bits


# --- JSON to Snapshot --------------------------------------------------------------------------


def snapshot_from_eido(doc: Any) -> Snapshot:
    """Validate and map one decoded EIDO. Raises :class:`RejectedMessage` only."""
    if not _is_object(doc):
        raise RejectedMessage("invalid-field", "an EIDO must be a JSON object", "/")
    version = doc.get("eidoVersion")
    if version is None and "EIDOVersion" in doc:
        raise RejectedMessage(
            "unsupported", "pre-standard draft EIDO (EIDOVersion): only eidoVersion 1.0", "/"
        )
    version = _text(doc, "eidoVersion", "", required=True)
    if version != EIDO_VERSION:
        raise RejectedMessage("unsupported", "eidoVersion must be 1.0", "/eidoVersion")
    incident_id = _text(doc, "$id", "", required=True)
    updated_at = _time(doc, "lastUpdateTimeStamp", "", required=True)
    assert incident_id is not None and updated_at is not None
    agency = _agency(doc)

    fields: dict[str, Any] = {}
    incident = doc.get("incidentComponent")
    status = IncidentStatus.ACTIVE
    if incident is not None:
        if not _is_object(incident):
            raise RejectedMessage("invalid-field", "must be an object", "/incidentComponent")
        status, fields = _incident(incident, "/incidentComponent")
    closed_at = None
    if status is IncidentStatus.CLOSED:
        assert incident is not None
        closed_at = _time(incident, "lastUpdateTimeStamp", "/incidentComponent") or updated_at

    return Snapshot(
        incident_id=incident_id,
        updated_at=updated_at,
        status=status,
        agency=agency,
        opened_at=_opened_at(doc),
        closed_at=closed_at,
        location=_location(doc),
        units=tuple(_unit(u, w) for w, u in _components(doc, "emergencyResourceComponent")),
        cautions=tuple(_caution(c, w) for w, c in _components(doc, "cautionComponent")),
        notes=_notes(doc),
        persons=tuple(_person(p, w) for w, p in _components(doc, "personComponent")),
        **fields,
    )


def _agency(doc: Mapping[str, Any]) -> str | None:
    agencies = list(_components(doc, "agencyComponent", required=True))
    owning = [(w, a) for w, a in agencies if _bool(a, "incidentOwningAgencyIndicator", w) is True]
    for where, agency in owning or agencies[:1]:
        found = _text(agency, "$id", where, required=True)
        if found:
            return found
    return _reference(doc, "updatedByAgencyReference", "")


def _incident(incident: Mapping[str, Any], where: str) -> tuple[IncidentStatus, dict[str, Any]]:
    priority_number = incident.get("incidentCommonPriorityNumber")
    priority: str | None
    if priority_number is not None:
        if isinstance(priority_number, bool) or not isinstance(priority_number, int):
            raise RejectedMessage(
                "invalid-field", "must be an integer", f"{where}/incidentCommonPriorityNumber"
            )
        priority = str(priority_number)
    else:
        priority = _text(incident, "incidentPriorityInternalText", where)
    status = IncidentStatus.ACTIVE
    for word in _texts(incident, "incidentStatusCommonRegistryText", where):
        status = _STATUS_WORDS.get(word.lower(), status)
    dispositions = tuple(
        Disposition(
            code=_text(d, "dispositionCommonRegistryCode", w, required=True) or "",
            text=_text(d, "dispositionDescriptionText", w)
            or _text(d, "dispositionCategoryText", w),
        )
        for w, d in _components(incident, "dispositionComponent", where=where)
    )
    return status, {
        "apco_type": _text(incident, "incidentTypeCommonRegistryText", where, required=True),
        "call_type_code": _text(incident, "incidentTypeInternalCode", where),
        "call_type": _text(incident, "incidentTypeInternalText", where),
        "priority": priority,
        "zone": _text(incident, "beatOrDispatchGroupText", where),
        "incident_number": _text(incident, "internalIncidentId", where),
        "dispositions": dispositions,
    }


def _opened_at(doc: Mapping[str, Any]) -> datetime | None:
    starts = [
        t
        for w, call in _components(doc, "callComponent")
        if (t := _time(call, "callStartTimestamp", w)) is not None
    ]
    return min(starts, default=None)


def _location(doc: Mapping[str, Any]) -> Location | None:
    best: tuple[int, int, str, str] | None = None
    for index, (where, component) in enumerate(_components(doc, "locationComponent")):
        kind = _text(component, "locationTypeDescriptionRegistryText", where, required=True)
        assert kind is not None
        value = _text(component, "locationByValue", where, strip=False)
        if value is None or not value.strip() or kind.lower() in _NOT_THE_INCIDENT:
            continue  # by reference only: nothing to dereference here
        rank = LOCATION_PREFERENCE.get(kind.lower(), _OTHER_LOCATION)
        if best is None or (rank, index) < best[:2]:
            best = (rank, index, value, f"{where}/locationByValue")
    if best is None:
        return None
    return parse_pidf_lo(best[2], best[3])


def _notes(doc: Mapping[str, Any]) -> tuple[Note, ...]:
    notes = []
    for where, component in _components(doc, "notesComponent"):
        html = _text(
            component, "notesActionComments", where, required=True, nonempty=False, strip=False
        )
        time = _time(component, "lastUpdateTimeStamp", where, required=True)
        text = html_to_text(html or "", f"{where}/notesActionComments")
        if text:
            notes.append(Note(text=text, time=time))
    # Arrays carry no order in EIDO; the narrative reads oldest first (stable for equal times).
    notes.sort(key=_note_time)
    return tuple(notes)


def _note_time(note: Note) -> datetime:
    return note.time or _EPOCH


def html_to_text(html: str, where: str) -> str:
    """Plain text of an HTML5 fragment: tags dropped, entities decoded, one line per ``<br>``,
    paragraph or other block (raw line breaks kept too: many CADs send plain text here), runs
    of blanks collapsed, empty lines dropped."""
    if "<" not in html and "&" not in html:
        return _lines(html)  # under 1 us: cheaper than remembering it
    text = _recent_html_text(html)
    if text is None:
        raise RejectedMessage("invalid-field", "note is not parseable HTML", where)
    return text


# Every EIDO carries the incident's whole state, so each update repeats every note the incident
# has so far, verbatim: without this, an incident's k-th update parses k-1 notes again with
# lxml (40-45 us each). Keyed by the note's exact string (a pure function of it); bounded, so
# only the notes of recent incidents stay (each note is a key of its own: with five notes an
# incident, this covers about a fifth of the incidents that pidflo's location cache of the same
# size covers). None (cached too) means "not parseable HTML": the
# rejection's pointer is added by the caller, for this message. lru_cache is thread-safe.
@functools.lru_cache(maxsize=4096)
def _recent_html_text(html: str) -> str | None:
    return _html_text(html)


def _html_text(html: str) -> str | None:
    """:func:`html_to_text` of HTML, the long way (lxml); None when lxml cannot parse it."""
    try:
        root = lxml.html.fragment_fromstring(
            _XML_ILLEGAL.sub("", html), create_parent="div", parser=_html_parser()
        )
    except (etree.ParserError, etree.XMLSyntaxError, ValueError):
        return None
    parts: list[str] = []
    skipping = 0
    for event, element in etree.iterwalk(root, events=("start", "end")):
        tag = element.tag if isinstance(element.tag, str) else ""
        if event == "start":
            if tag in _SKIPPED_TAGS:
                skipping += 1
            elif tag == "br" or tag in _BLOCK_TAGS:
                parts.append("\n")
            if not skipping and tag and element.text:
                parts.append(element.text)
        else:
            if tag in _SKIPPED_TAGS:
                skipping -= 1
            elif tag in _BLOCK_TAGS:
                parts.append("\n")
            if not skipping and element.tail and element is not root:
                parts.append(element.tail)
    return _lines("".join(parts))


def _lines(text: str) -> str:
    lines = text.splitlines()
    if len(lines) == 1:  # the usual note: one line
        return " ".join(lines[0].split())
    cleaned = (" ".join(line.split()) for line in lines)
    return "\n".join(line for line in cleaned if line)


def _html_parser() -> lxml.html.HTMLParser:
    parser: lxml.html.HTMLParser | None = getattr(_local, "html_parser", None)
    if parser is None:
        parser = lxml.html.HTMLParser(
            remove_comments=True, remove_pis=True, no_network=True, default_doctype=False
        )
        _local.html_parser = parser
    return parser


def _person(component: Mapping[str, Any], where: str) -> Person:
    roles = tuple(_texts(component, "personIncidentRoleRegistryText", where, required=True))
    nc = component.get("ncPersonComponent")
    if nc is None:
        return Person(roles=roles)
    where = f"{where}/ncPersonComponent"
    if not _is_object(nc):
        raise RejectedMessage("invalid-field", "must be an object", where)
    # Every update of an incident repeats its persons, and reading NIEM's nested lists is
    # the dearest part of an EIDO after its location (about 12 of the 15 us a person took).
    # The details are a pure function of the ncPersonComponent's JSON value, and orjson writes
    # a different value as a different key (1, 1.0 and true differ; the same value in another
    # key order is only a miss) except that it writes null for None, NaN and the infinities
    # (json reads 1e999 as inf): a key holding null is not used. So a recent value's details
    # are reused. Failures are not remembered (their pointer is this message's); a value
    # orjson cannot write (a lone surrogate, an integer beyond 64 bits, deep nesting) is read
    # the long way.
    try:
        key = orjson.dumps(nc)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        key = b"null"
    if b"null" in key:
        return Person(roles, *_person_details(nc, where))
    details = _recent_persons.get(key)
    if details is None:
        details = _person_details(nc, where)
        if len(_recent_persons) >= _PERSONS_REMEMBERED:
            _recent_persons.clear()  # bounded; what stays warm is the incidents of the moment
        _recent_persons[key] = details
    return Person(roles, *details)


_PersonDetails = tuple[str | None, str | None, str | None, str | None]
_PERSONS_REMEMBERED: Final = 1024
# Plain dict operations, atomic under the GIL: parses on other threads may share it.
_recent_persons: dict[bytes, _PersonDetails] = {}


def _person_details(nc: Mapping[str, Any], where: str) -> _PersonDetails:
    """Name, birth date, telephone and mental state of a NIEM ``ncPersonComponent``."""
    return (
        _person_name(nc.get("name"), f"{where}/name"),
        _birth_date(nc.get("birthDate"), f"{where}/birthDate"),
        _phone(nc, where),
        _joined(nc.get("mentalState"), f"{where}/mentalState"),
    )


def _person_name(value: Any, where: str) -> str | None:
    for w, name in _niem_items(value, where):
        if isinstance(name, str):
            return _clean(name, w).strip() or None
        if not _is_object(name):
            raise RejectedMessage("invalid-field", "a person name must be an object", w)
        full = _niem_text(name.get("personFullName"), f"{w}/personFullName")
        if full:
            return full
        parts = [
            _niem_text(name.get(key), f"{w}/{key}")
            for key in ("personGivenName", "personMiddleName", "personSurName")
        ]
        joined = " ".join(p for p in parts if p)
        if joined:
            return joined
    return None


def _birth_date(value: Any, where: str) -> str | None:
    for w, date in _niem_items(value, where):
        if _is_object(date) and "value" not in date:
            for key in ("date", "time", "yearMonth", "year"):
                found = _niem_text(date.get(key), f"{w}/{key}")
                if found:
                    return found
            continue
        found = _niem_text(date, w)
        if found:
            return found
    return None


def _phone(nc: Mapping[str, Any], where: str) -> str | None:
    for key in ("homeContactInformation", "employmentContactInformation"):
        contacts = nc.get(key)
        if contacts is None:
            continue
        for w, contact in _niem_items(contacts, f"{where}/{key}"):
            if not _is_object(contact):
                raise RejectedMessage("invalid-field", "contact information must be an object", w)
            for tw, number in _niem_items(
                contact.get("contactTelephoneNumber"), f"{w}/contactTelephoneNumber"
            ):
                found = _telephone(number, tw)
                if found:
                    return found
    return None


def _telephone(number: Any, where: str) -> str | None:
    if not _is_object(number) or number.keys() <= _NIEM_VALUE_KEYS:
        return _niem_text(number, where)
    for fw, full in _niem_items(number.get("full"), f"{where}/full"):
        if _is_object(full) and "telephoneNumberFullID" in full:
            found = _niem_text(full["telephoneNumberFullID"], f"{fw}/telephoneNumberFullID")
        else:
            found = _niem_text(full, fw)
        if found:
            return found
    for nw, nanp in _niem_items(number.get("NANP"), f"{where}/NANP"):
        if not _is_object(nanp):
            raise RejectedMessage("invalid-field", "must be an object", nw)
        parts = [
            _niem_text(nanp.get(k), f"{nw}/{k}")
            for k in ("telephoneAreaCodeID", "telephoneExchangeID", "telephoneLineID")
        ]
        if all(parts):
            return "-".join(p for p in parts if p)
    for iw, intl in _niem_items(number.get("international"), f"{where}/international"):
        if not _is_object(intl):
            raise RejectedMessage("invalid-field", "must be an object", iw)
        country = _niem_text(intl.get("telephoneCountryCodeID"), f"{iw}/telephoneCountryCodeID")
        rest = _niem_text(intl.get("telephoneNumberID"), f"{iw}/telephoneNumberID")
        if rest:
            return f"+{country} {rest}" if country else rest
    return None


def _joined(value: Any, where: str) -> str | None:
    if value is None:
        return None
    texts = [t for w, item in _niem_items(value, where) if (t := _niem_text(item, w))]
    return "; ".join(texts) or None


def _unit(component: Mapping[str, Any], where: str) -> Unit:
    name = _text(component, "emergencyResourceName", where) or _text(component, "$id", where)
    if not name:
        raise RejectedMessage(
            "missing-field", "a resource needs emergencyResourceName or $id", where
        )
    secondary = _texts(component, "secondaryUnitStatusRegistryText", where)
    return Unit(
        id=name,
        type=_text(component, "emergencyResourceTypeCommonRegistryText", where)
        or _text(component, "emergencyResourceTypeInternalText", where),
        status=unit_status(
            secondary, lambda: _text(component, "primaryUnitStatusRegistryText", where)
        ),
    )


def unit_status(secondary: Sequence[str], primary: Callable[[], str | None]) -> str | None:
    """A resource's status, the one rule for every reader of EIDO units (the incident parse,
    both ways, and :mod:`corespond.adapters.eido_units`): its last non-blank
    ``secondaryUnitStatusRegistryText`` (``Dispatched``, ``EnRoute``, ``OnScene``...), else its
    ``primaryUnitStatusRegistryText``. ``primary`` is read only when there is no secondary
    status, so a bad primary value next to a good secondary one is never looked at."""
    return secondary[-1] if secondary else primary()


def _caution(component: Mapping[str, Any], where: str) -> Caution:
    kind = _text(component, "cautionTypeCommonRegistryText", where) or _text(
        component, "cautionTypeInternalText", where
    )
    if not kind:
        raise RejectedMessage(
            "missing-field",
            "a caution needs cautionTypeCommonRegistryText or cautionTypeInternalText",
            where,
        )
    return Caution(type=kind, severity=_text(component, "cautionSeverity", where))


# --- typed access with JSON pointers -----------------------------------------------------------


def _is_object(value: Any) -> bool:
    # json.loads gives plain dicts; the ABC check (slow) is for other mappings passed in.
    return type(value) is dict or isinstance(value, Mapping)


def _components(
    obj: Mapping[str, Any], key: str, *, where: str = "", required: bool = False
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(pointer, object)`` for each item of the array ``key``."""
    value = obj.get(key)
    if value is None:
        if required:
            raise RejectedMessage("missing-field", "required field is missing", f"{where}/{key}")
        return
    if not isinstance(value, list):
        raise RejectedMessage("invalid-field", "must be an array", f"{where}/{key}")
    for i, item in enumerate(value):
        if not _is_object(item):
            raise RejectedMessage("invalid-field", "must be an object", f"{where}/{key}/{i}")
        yield f"{where}/{key}/{i}", item


def _clean(text: str, where: str) -> str:
    # Lone surrogates (legal in JSON escapes) and NUL cannot be stored or encoded downstream.
    # An ASCII string holds no surrogate: skip the regex for the common case.
    if not text.isascii() and _SURROGATE.search(text):
        raise RejectedMessage("invalid-field", "string holds an unpaired UTF-16 surrogate", where)
    if "\x00" in text:
        raise RejectedMessage("invalid-field", "string holds a NUL character", where)
    return text


def _text(
    obj: Mapping[str, Any],
    key: str,
    where: str,
    *,
    required: bool = False,
    nonempty: bool | None = None,
    strip: bool = True,
) -> str | None:
    """The string at ``key``; ``required`` means present, ``nonempty`` (default: as
    ``required``) that it holds more than blanks."""
    value = obj.get(key)
    if value is None:
        if required:
            raise RejectedMessage("missing-field", "required field is missing", f"{where}/{key}")
        return None
    if not isinstance(value, str):
        raise RejectedMessage("invalid-field", "must be a string", f"{where}/{key}")
    # The pointer is built only for an error: this runs for every string in every message.
    if "\x00" in value or not value.isascii():
        _clean(value, f"{where}/{key}")
    text = value.strip() if strip else value
    if (required if nonempty is None else nonempty) and not (text if strip else text.strip()):
        raise RejectedMessage("missing-field", "required field is empty", f"{where}/{key}")
    return text or None


def _texts(obj: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> list[str]:
    value = obj.get(key)
    if value is None:
        if required:
            raise RejectedMessage("missing-field", "required field is missing", f"{where}/{key}")
        return []
    if not isinstance(value, list):
        raise RejectedMessage("invalid-field", "must be an array of strings", f"{where}/{key}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise RejectedMessage("invalid-field", "must be a string", f"{where}/{key}/{i}")
        if "\x00" in item or not item.isascii():
            _clean(item, f"{where}/{key}/{i}")
        text = item.strip()
        if text:
            out.append(text)
    return out


def _time(
    obj: Mapping[str, Any], key: str, where: str, *, required: bool = False
) -> datetime | None:
    text = _text(obj, key, where, required=required)
    if not text:
        return None
    return _recent_time(text) or parse_time(text, f"{where}/{key}")  # the latter raises


# Updates of one incident repeat most of its timestamps (call start, notes): parse each once.
@functools.lru_cache(maxsize=1024)
def _recent_time(text: str) -> datetime | None:
    """``parse_time(text)``; None when it would be rejected (errors are not cached)."""
    try:
        return parse_time(text, "")
    except RejectedMessage:
        return None


def _bool(obj: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, bool):
        raise RejectedMessage("invalid-field", "must be true or false", f"{where}/{key}")
    return value


def _reference(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not _is_object(value):
        raise RejectedMessage("invalid-field", "must be a reference object", f"{where}/{key}")
    return _text(value, "$ref", f"{where}/{key}")


def _niem_items(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """NIEM JSON makes nearly every property an array; senders often send one bare item."""
    if value is None:
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            if item is not None:
                yield f"{where}/{i}", item
    else:
        yield where, value


def _niem_text(value: Any, where: str) -> str | None:
    """The first text in a NIEM value: ``"x"``, ``{"value": "x"}`` or a list of those."""
    try:
        return _niem_text_unchecked(value, 0)
    except _Recheck:
        # Something to reject (or a non-ASCII string to check): walk again with pointers.
        return _niem_text_checked(value, where, 0)


class _Recheck(Exception):
    """Raised by the pointer-less fast path where the checked walk may have to reject."""


def _niem_text_unchecked(value: Any, depth: int) -> str | None:
    # Same walk as _niem_text_checked, without building a JSON pointer at every step.
    if value is None:
        return None
    if depth > _NIEM_DEPTH:
        raise _Recheck
    if isinstance(value, str):
        if "\x00" in value or not value.isascii():
            raise _Recheck
        return value.strip() or None
    if isinstance(value, list):
        for item in value:
            found = _niem_text_unchecked(item, depth + 1)
            if found:
                return found
        return None
    if _is_object(value) and "value" in value:
        return _niem_text_unchecked(value["value"], depth + 1)
    raise _Recheck


def _niem_text_checked(value: Any, where: str, depth: int) -> str | None:
    if value is None:
        return None
    if depth > _NIEM_DEPTH:
        raise RejectedMessage("invalid-field", "NIEM value nested too deeply", where)
    if isinstance(value, str):
        return _clean(value, where).strip() or None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _niem_text_checked(item, f"{where}/{i}", depth + 1)
            if found:
                return found
        return None
    if _is_object(value) and "value" in value:
        return _niem_text_checked(value["value"], f"{where}/value", depth + 1)
    raise RejectedMessage("invalid-field", "must be a string or a NIEM text object", where)


# --- typed decode: the common shape in one pass ------------------------------------------------
#
# msgspec decodes straight into the fields the mapping reads, checks their JSON types on the way
# and skips everything else without building it (a 4 KB EIDO: about 5 us, against orjson's 15
# for the whole tree). Anything the typed path does not accept as it stands (a JSON type it does
# not expect, a missing or blank required field, a NUL, a lone surrogate, bytes that are not
# UTF-8, HTML that does not parse, a bad PIDF-LO) makes it give up, and the pointer-carrying
# mapping above decides the message from scratch: rejections stay exactly as precise as they
# were, and the typed path only ever accepts a message that the full one accepts with the same
# snapshot (tests/adapters/test_eido_typed.py compares them on fixtures and hypothesis
# documents). The Structs are stricter than the mapping about fields it does not always read
# (an unowned agency's $id, say); such a message just takes the long way.


class _Ref(msgspec.Struct, gc=False):
    ref: str | None = msgspec.field(default=None, name="$ref")


class _Agency(msgspec.Struct, rename="camel", gc=False):
    id: str | None = msgspec.field(default=None, name="$id")
    incident_owning_agency_indicator: bool | None = None


class _Disposition(msgspec.Struct, rename="camel", gc=False):
    disposition_common_registry_code: str | None = None
    disposition_description_text: str | None = None
    disposition_category_text: str | None = None


class _Incident(msgspec.Struct, rename="camel", gc=False):
    last_update_time_stamp: str | None = None
    incident_common_priority_number: int | None = None
    incident_priority_internal_text: str | None = None
    incident_status_common_registry_text: list[str] | None = None
    incident_type_common_registry_text: str | None = None
    incident_type_internal_code: str | None = None
    incident_type_internal_text: str | None = None
    beat_or_dispatch_group_text: str | None = None
    internal_incident_id: str | None = None
    disposition_component: list[_Disposition] | None = None


class _Call(msgspec.Struct, rename="camel", gc=False):
    call_start_timestamp: str | None = None


class _LocationComponent(msgspec.Struct, rename="camel", gc=False):
    location_type_description_registry_text: str | None = None
    location_by_value: str | None = None


class _NoteComponent(msgspec.Struct, rename="camel", gc=False):
    notes_action_comments: str | None = None
    last_update_time_stamp: str | None = None


class _PersonComponent(msgspec.Struct, rename="camel", gc=False):
    person_incident_role_registry_text: list[str] | None = None
    # The NIEM part as its JSON text: the key of the person cache, decoded only on a miss.
    nc_person_component: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class _Resource(msgspec.Struct, rename="camel", gc=False):
    id: str | None = msgspec.field(default=None, name="$id")
    emergency_resource_name: str | None = None
    emergency_resource_type_common_registry_text: str | None = None
    emergency_resource_type_internal_text: str | None = None
    primary_unit_status_registry_text: str | None = None
    secondary_unit_status_registry_text: list[str] | None = None


class _CautionComponent(msgspec.Struct, rename="camel", gc=False):
    caution_type_common_registry_text: str | None = None
    caution_type_internal_text: str | None = None
    caution_severity: str | None = None


class _Eido(msgspec.Struct, rename="camel", gc=False):
    id: str | None = msgspec.field(default=None, name="$id")
    eido_version: str | None = None
    last_update_time_stamp: str | None = None
    updated_by_agency_reference: _Ref | None = None
    agency_component: list[_Agency] | None = None
    incident_component: _Incident | None = None
    call_component: list[_Call] | None = None
    location_component: list[_LocationComponent] | None = None
    notes_component: list[_NoteComponent] | None = None
    person_component: list[_PersonComponent] | None = None
    emergency_resource_component: list[_Resource] | None = None
    caution_component: list[_CautionComponent] | None = None


# Decoders keep no state between calls: threads may share one.
_TYPED_DECODER: Final = msgspec.json.Decoder(_Eido)


class _Untyped(Exception):
    """The typed path gives up: the full mapping decides the message."""


# Whatever the typed path raises to give up: its own signal, a type msgspec did not expect,
# JSON it refuses, bytes that are not UTF-8 (UnicodeDecodeError), an integer too long for str()
# (ValueError), or a rejection by a helper it shares with the full mapping (whose pointer would
# lack this message's context).
_GIVE_UP: Final = (_Untyped, msgspec.MsgspecError, RejectedMessage, ValueError, RecursionError)


def _typed_snapshot(message: bytes) -> Snapshot:
    """The snapshot in ``message`` when it has the common shape; raises one of ``_GIVE_UP``
    otherwise. Mirrors :func:`snapshot_from_eido` check for check."""
    if not message.isascii():
        # msgspec skips the strings of fields it does not read without checking their UTF-8.
        message.decode("utf-8")
    if message.find(b"\\u0000") >= 0:
        # The only way a NUL gets into a JSON string (raw control characters are malformed
        # JSON): without it, no string below needs a NUL check. msgspec never yields a lone
        # surrogate either (it refuses the escape), but a non-ASCII string is still checked.
        # (find, not ``in``: bytes.__contains__ first tries its argument as an integer and
        # formats the TypeError that refuses it, about 1,800 instructions a message.)
        raise _Untyped
    doc = _TYPED_DECODER.decode(message)
    if _typed_text(doc.eido_version, required=True) != EIDO_VERSION:
        raise _Untyped
    incident_id = _typed_text(doc.id, required=True)
    updated_at = _typed_time(doc.last_update_time_stamp, required=True)
    assert incident_id is not None and updated_at is not None

    incident = doc.incident_component
    closed_at = None
    if incident is None:
        status, number, call_type, code, apco, priority, zone, dispositions = _NO_INCIDENT
    else:
        status, number, call_type, code, apco, priority, zone, dispositions = _typed_incident(
            incident
        )
        if status is IncidentStatus.CLOSED:
            closed_at = _typed_time(incident.last_update_time_stamp) or updated_at

    starts = [
        t for call in doc.call_component or () if (t := _typed_time(call.call_start_timestamp))
    ]
    units = doc.emergency_resource_component
    cautions = doc.caution_component
    persons = doc.person_component
    # Positional, in Snapshot's field order (keywords cost about a third more to bind).
    return Snapshot(
        incident_id,
        updated_at,
        status,
        number,
        call_type,
        code,
        apco,
        priority,
        _typed_agency(doc),
        zone,
        min(starts, default=None),
        closed_at,
        _typed_location(doc.location_component),
        tuple([_typed_unit(u) for u in units]) if units else (),
        tuple([_typed_caution(c) for c in cautions]) if cautions else (),
        dispositions,
        _typed_notes(doc.notes_component),
        tuple([_typed_person(p) for p in persons]) if persons else (),
    )


def _typed_text(value: str | None, *, required: bool = False) -> str | None:
    """:func:`_text` for a value whose type msgspec checked; gives up where that rejects."""
    if value is None:
        if required:
            raise _Untyped
        return None
    if not value.isascii() and _SURROGATE.search(value):
        raise _Untyped
    text = value.strip()
    if not text:
        if required:
            raise _Untyped
        return None
    return text


def _typed_raw_text(value: str | None) -> str | None:
    """:func:`_text` with ``strip=False``: the value itself, checked, None when empty."""
    if value is not None and not value.isascii() and _SURROGATE.search(value):
        raise _Untyped
    return value or None


def _typed_texts(values: list[str] | None) -> list[str]:
    if not values:
        return []
    # An ASCII string needs no surrogate check: _typed_text's way without its call.
    return [t for v in values if (t := v.strip() if v.isascii() else _typed_text(v))]


def _typed_time(value: str | None, *, required: bool = False) -> datetime | None:
    if value is not None and value.isascii():
        text: str | None = value.strip()  # _typed_text's way for ASCII, without its call
    else:
        text = _typed_text(value, required=required)
    if not text:
        if required:
            raise _Untyped
        return None
    found = _recent_time(text)
    if found is None:
        raise _Untyped
    return found


def _typed_agency(doc: _Eido) -> str | None:
    agencies = doc.agency_component
    if agencies is None:
        raise _Untyped
    owning = [a for a in agencies if a.incident_owning_agency_indicator is True]
    for agency in owning or agencies[:1]:
        return _typed_text(agency.id, required=True)
    ref = doc.updated_by_agency_reference
    return None if ref is None else _typed_text(ref.ref)


_NO_INCIDENT: Final = (IncidentStatus.ACTIVE, None, None, None, None, None, None, ())


def _typed_incident(
    incident: _Incident,
) -> tuple[IncidentStatus, str | None, str | None, str | None, str | None, str | None,
           str | None, tuple[Disposition, ...]]:  # fmt: skip
    """Status, then the Snapshot's fields in its own order from incident_number to
    priority, then zone and the dispositions."""
    number = incident.incident_common_priority_number
    priority: str | None
    if number is not None:
        priority = str(number)
    else:
        priority = _typed_text(incident.incident_priority_internal_text)
    status = IncidentStatus.ACTIVE
    for word in _typed_texts(incident.incident_status_common_registry_text):
        status = _STATUS_WORDS.get(word.lower(), status)
    dispositions = tuple([
        Disposition(
            _typed_text(d.disposition_common_registry_code, required=True) or "",
            _typed_text(d.disposition_description_text)
            or _typed_text(d.disposition_category_text),
        )
        for d in incident.disposition_component or ()
    ])  # fmt: skip
    return (
        status,
        _typed_text(incident.internal_incident_id),
        _typed_text(incident.incident_type_internal_text),
        _typed_text(incident.incident_type_internal_code),
        _typed_text(incident.incident_type_common_registry_text, required=True),
        priority,
        _typed_text(incident.beat_or_dispatch_group_text),
        dispositions,
    )


def _typed_location(components: list[_LocationComponent] | None) -> Location | None:
    best: tuple[int, int, str] | None = None
    for index, component in enumerate(components or ()):
        kind = _typed_text(component.location_type_description_registry_text, required=True)
        assert kind is not None
        value = _typed_raw_text(component.location_by_value)
        if value is None or not value.strip() or kind.lower() in _NOT_THE_INCIDENT:
            continue
        rank = LOCATION_PREFERENCE.get(kind.lower(), _OTHER_LOCATION)
        if best is None or (rank, index) < best[:2]:
            best = (rank, index, value)
    if best is None:
        return None
    return parse_pidf_lo(best[2], "")


def _typed_notes(components: list[_NoteComponent] | None) -> tuple[Note, ...]:
    if not components:
        return ()
    notes = []
    recent = _recent_notes
    for component in components:
        html = component.notes_action_comments
        if html is None:
            raise _Untyped
        key = (html, component.last_update_time_stamp)
        note = recent.get(key, _NO_NOTE)
        if note is _NO_NOTE:
            note = _typed_note(html, key[1])
            if len(recent) >= _NOTES_REMEMBERED:
                recent.clear()
            recent[key] = note
        if note is not None:
            notes.append(note)
    if len(notes) > 1:
        notes.sort(key=_note_time)
    return tuple(notes)


def _typed_note(html: str, stamp: str | None) -> Note | None:
    """The note of one component (None when its text is blank); gives up as the typed path
    does."""
    text = html_to_text(_typed_raw_text(html) or "", "")
    time = _typed_time(stamp, required=True)
    return Note(text, time) if text else None


# Every update of an incident repeats its notes verbatim: a note is a pure function of its
# text and its time stamp (the two strings), so a recent one is not mapped again. Only notes
# the typed path took are kept (giving up raises before the store); bounded like the others.
_recent_notes: dict[tuple[str, str | None], Note | None] = {}
_NOTES_REMEMBERED: Final = 4096
_NO_NOTE: Final = Note("")


def _typed_person(component: _PersonComponent) -> Person:
    if component.person_incident_role_registry_text is None:
        raise _Untyped
    roles = tuple(_typed_texts(component.person_incident_role_registry_text))
    raw = component.nc_person_component
    if not raw:
        return Person(roles=roles)
    key = bytes(raw)
    if key == b"null":
        return Person(roles=roles)
    known = _recent_nc_texts.get(key)
    if known is None:
        if not key.startswith(b"{"):
            raise _Untyped  # not an object: the full mapping says so
        try:
            nc = orjson.loads(key)
        except orjson.JSONDecodeError:
            raise _Untyped from None
        known = Person(roles, *_person_details(nc, ""))
        if len(_recent_nc_texts) >= _PERSONS_REMEMBERED:
            _recent_nc_texts.clear()
        _recent_nc_texts[key] = known
    elif known.roles != roles:  # the same details in another role: a Person of its own
        return replace(known, roles=roles)
    # Persons are immutable: the one made for these roles and details is shared, as units
    # are (building one, about 4.5k instructions, was most of a remembered person's cost).
    return known


# The person of the exact JSON text of its ncPersonComponent, with the roles it was last
# seen in (plain dict operations, atomic under the GIL). orjson's value of that text maps to
# the same details as json's: the two differ only on numbers, and any number the details
# reach is rejected either way.
_recent_nc_texts: dict[bytes, Person] = {}


def _typed_unit(component: _Resource) -> Unit:
    # A few dozen units in a handful of statuses make up a feed's resources, whichever
    # incident they are on: the unit is a pure function of the fields below (the $id only
    # when there is no name, the internal type only without a common one), so a recent one
    # is not mapped again.
    name = component.emergency_resource_name
    kind = component.emergency_resource_type_common_registry_text
    secondary = component.secondary_unit_status_registry_text
    key = (
        name,
        None if name and name.strip() else component.id,
        kind,
        None if kind and kind.strip() else component.emergency_resource_type_internal_text,
        component.primary_unit_status_registry_text,
        tuple(secondary) if secondary else None,
    )
    unit = _recent_units.get(key)
    if unit is None:
        unit = _mapped_unit(component)
        if len(_recent_units) >= _UNITS_REMEMBERED:
            _recent_units.clear()
        _recent_units[key] = unit
    return unit


def _mapped_unit(component: _Resource) -> Unit:
    name = _typed_text(component.emergency_resource_name) or _typed_text(component.id)
    if not name:
        raise _Untyped
    secondary = _typed_texts(component.secondary_unit_status_registry_text)
    return Unit(
        id=name,
        type=_typed_text(component.emergency_resource_type_common_registry_text)
        or _typed_text(component.emergency_resource_type_internal_text),
        status=unit_status(
            secondary, lambda: _typed_text(component.primary_unit_status_registry_text)
        ),
    )


_recent_units: dict[tuple[object, ...], Unit] = {}
_UNITS_REMEMBERED: Final = 4096


def _typed_caution(component: _CautionComponent) -> Caution:
    kind = _typed_text(component.caution_type_common_registry_text) or _typed_text(
        component.caution_type_internal_text
    )
    if not kind:
        raise _Untyped
    return Caution(type=kind, severity=_typed_text(component.caution_severity))


# --- Snapshot to JSON --------------------------------------------------------------------------


def eido_document(snapshot: Snapshot, *, agency_id: str = DEFAULT_AGENCY_ID) -> dict[str, Any]:
    """A valid EIDO 1.0 for ``snapshot``, sent by ``agency_id``.

    ``EidoFormat().parse(json.dumps(eido_document(s)).encode()) == s`` for everything EIDO
    carries. What it cannot carry: a snapshot without ``agency`` comes back with ``agency_id``;
    ``closed_at`` exists only while closed; a caution without severity comes back "normal";
    note and address whitespace is normalized; a unit without type or status lacks those
    spec-required fields.
    The output is deterministic (component ids are derived from the incident id), so the same
    snapshot always gives the same document. Raises ``ValueError`` when the snapshot has
    incident data but no ``apco_type``: EIDO requires the common incident type.
    """
    sender = {"$ref": agency_id}
    owner = snapshot.agency or agency_id

    def prologue(kind: str, key: object, time: datetime | None = None) -> dict[str, Any]:
        digest = hashlib.sha256(f"{snapshot.incident_id}|{kind}|{key}".encode()).hexdigest()
        return {
            "$id": f"urn:emergency:uid:eidodatacomponent:{digest[:16]}:{agency_id}",
            "lastUpdateTimeStamp": _stamp(time or snapshot.updated_at),
            "updatedByAgencyReference": sender,
        }

    agencies = [
        {
            "$id": owner,
            "lastUpdateTimeStamp": _stamp(snapshot.updated_at),
            "updatedByAgencyReference": sender,
            "agencyRoleDescriptionRegistryText": ["Dispatching"],
            "agencyType": ["psap"],
            "incidentOwningAgencyIndicator": snapshot.agency is not None,
        }
    ]
    if owner != agency_id:
        agencies.append(
            {
                "$id": agency_id,
                "lastUpdateTimeStamp": _stamp(snapshot.updated_at),
                "updatedByAgencyReference": sender,
                "agencyRoleDescriptionRegistryText": ["CallReceiving"],
                "agencyType": ["psap"],
            }
        )
    doc: dict[str, Any] = {
        "$id": snapshot.incident_id,
        "lastUpdateTimeStamp": _stamp(snapshot.updated_at),
        "updatedByAgencyReference": sender,
        "eidoVersion": EIDO_VERSION,
        "issuingElementIdentification": agency_id,
        "agencyComponent": agencies,
    }
    incident = _incident_document(snapshot, prologue)
    if incident is not None:
        doc["incidentComponent"] = incident
    if snapshot.opened_at is not None:
        doc["callComponent"] = [
            {
                **prologue("call", 0, snapshot.opened_at),
                "standardPrimaryCallType": "emergency",
                "direction": "incoming",
                "callStartTimestamp": _stamp(snapshot.opened_at),
                "callStateRegistryText": "callEnd",
            }
        ]
    if snapshot.location is not None:
        doc["locationComponent"] = [
            {
                **prologue("location", "incident"),
                "locationTypeDescriptionRegistryText": "CurrentIncident",
                "locationByValue": pidf_lo_document(snapshot.location),
            }
        ]
    if snapshot.notes:
        doc["notesComponent"] = [
            {
                **prologue("note", i, note.time),
                "notesActionComments": text_to_html(note.text),
            }
            for i, note in enumerate(snapshot.notes)
        ]
    if snapshot.persons:
        doc["personComponent"] = [
            _person_document(person, prologue("person", i))
            for i, person in enumerate(snapshot.persons)
        ]
    if snapshot.units:
        doc["emergencyResourceComponent"] = [
            _unit_document(unit, prologue("unit", unit.id)) for unit in snapshot.units
        ]
    if snapshot.cautions:
        doc["cautionComponent"] = [
            {
                **prologue("caution", i),
                "cautionTypeInternalText": caution.type,
                "cautionTypeCommonRegistryText": caution.type,
                "cautionSeverity": caution.severity or "normal",  # required by the spec
            }
            for i, caution in enumerate(snapshot.cautions)
        ]
    doc["@context"] = JSON_LD_CONTEXT
    return doc


def _stamp(value: datetime) -> str:
    text = format_time(value)
    assert text is not None
    return text


def _incident_document(snapshot: Snapshot, prologue: Any) -> dict[str, Any] | None:
    carried = (
        snapshot.apco_type, snapshot.call_type_code, snapshot.call_type, snapshot.priority,
        snapshot.zone, snapshot.incident_number, snapshot.dispositions or None,
        None if snapshot.status is IncidentStatus.ACTIVE else snapshot.status,
    )  # fmt: skip
    if all(v is None for v in carried):
        return None
    if snapshot.apco_type is None:
        raise ValueError("EIDO needs an APCO common incident type (snapshot.apco_type)")
    changed = snapshot.updated_at
    if snapshot.status is IncidentStatus.CLOSED and snapshot.closed_at is not None:
        changed = snapshot.closed_at
    incident: dict[str, Any] = {
        **prologue("incident", 0, changed),
        "incidentTypeCommonRegistryText": snapshot.apco_type,
        "incidentStatusCommonRegistryText": [_STATUS_TEXT[snapshot.status]],
    }
    optional = {
        "incidentTypeInternalCode": snapshot.call_type_code,
        "incidentTypeInternalText": snapshot.call_type,
        "internalIncidentId": snapshot.incident_number,
        "beatOrDispatchGroupText": snapshot.zone,
    }
    incident.update({k: v for k, v in optional.items() if v is not None})
    if snapshot.priority is not None:
        number = _int32(snapshot.priority)
        if number is not None:
            incident["incidentCommonPriorityNumber"] = number
        else:
            incident["incidentPriorityInternalText"] = snapshot.priority
    if snapshot.dispositions:
        incident["dispositionComponent"] = [
            {
                **prologue("disposition", i),
                "dispositionCommonRegistryCode": d.code,
                "dispositionPrimaryIndicator": i == 0,
                **({"dispositionDescriptionText": d.text} if d.text else {}),
            }
            for i, d in enumerate(snapshot.dispositions)
        ]
    return incident


def _int32(text: str) -> int | None:
    """The integer ``text`` spells exactly (so "01" stays text), within int32."""
    if not re.fullmatch(r"-?(0|[1-9][0-9]{0,9})", text):
        return None
    number = int(text)
    return number if -(2**31) <= number < 2**31 else None


def text_to_html(text: str) -> str:
    """Plain text as an HTML5 fragment: escaped, one ``<br>`` per line break."""
    escaped = (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
    return "<br>".join(escaped.splitlines())


def _person_document(person: Person, prologue: dict[str, Any]) -> dict[str, Any]:
    nc: dict[str, Any] = {}
    if person.name:
        nc["name"] = [{"personFullName": [{"value": person.name}]}]
    if person.birth_date:
        nc["birthDate"] = [{"date": [{"value": person.birth_date}]}]
    if person.phone:
        nc["homeContactInformation"] = [
            {
                "contactTelephoneNumber": [
                    {"full": [{"telephoneNumberFullID": [{"value": person.phone}]}]}
                ]
            }
        ]
    if person.mental_state:
        nc["mentalState"] = [{"value": person.mental_state}]
    out = {**prologue, "personIncidentRoleRegistryText": list(person.roles)}
    if nc:
        out["ncPersonComponent"] = nc
    return out


def _unit_document(unit: Unit, prologue: dict[str, Any]) -> dict[str, Any]:
    # EIDO has no "unknown" type or status: a unit without them is written without those
    # (spec-required) fields rather than with invented values.
    out: dict[str, Any] = {**prologue, "emergencyResourceName": unit.id}
    if unit.type:
        out["emergencyResourceTypeCommonRegistryText"] = unit.type
    out["resourceAttributeRegistryText"] = []
    if unit.status in PRIMARY_UNIT_STATUSES:
        out["primaryUnitStatusRegistryText"] = unit.status
        out["secondaryUnitStatusRegistryText"] = []
    elif unit.status:
        out["primaryUnitStatusRegistryText"] = "NotAvailable"
        out["secondaryUnitStatusRegistryText"] = [unit.status]
    out["agentReference"] = []
    return out


__all__ = [
    "DEFAULT_AGENCY_ID",
    "EidoFormat",
    "eido_document",
    "html_to_text",
    "load_json",
    "snapshot_from_eido",
    "text_to_html",
    "unit_status",
]
