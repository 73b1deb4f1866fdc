"""Tyler New World CallExport XML: mapping, errors, safety, round trips and fuzzing."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from corespond.adapters import xml_safety
from corespond.adapters.newworld import NAMESPACE, NewWorldFormat, newworld_document
from corespond.daemon.demo import incident_lifecycles
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import (
    Disposition,
    GeoPoint,
    IncidentStatus,
    Location,
    Note,
    Person,
    Snapshot,
    Unit,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "newworld"
FMT = NewWorldFormat()
# Protected content in the fixtures that must never show up in an error.
PHI = ("McTestface", "555-01", "KITCHEN", "Imaginary", "1961-07-04", "HEARING VOICES")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def at(hms: str) -> datetime:
    return datetime.fromisoformat(f"2026-03-14T{hms}+00:00")


def call(body: str, *, head: str = "") -> bytes:
    """A small CallExport document around ``body``."""
    return (
        f'<?xml version="1.0" encoding="utf-8"?>{head}'
        f'<Call xmlns:i="http://www.w3.org/2001/XMLSchema-instance" xmlns="{NAMESPACE}">'
        f"{body}</Call>"
    ).encode()


MINIMAL = "<CallId>77</CallId><CreateDateTime>2026-03-14 21:02:11Z</CreateDateTime>"


def rejected(message: bytes, fmt: NewWorldFormat = FMT) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as info:
        fmt.parse(message)
    return info.value


# --- the behavioral-health call over its life ---------------------------------------------------


def test_dispatch_snapshot() -> None:
    snap = FMT.parse(fixture("bh-1-dispatch.xml"))
    assert snap.incident_id == "581204"
    assert snap.incident_number == "26004471"
    assert snap.updated_at == at("21:05:40")  # the unit's dispatch: the latest time anywhere
    assert snap.opened_at == at("21:02:11")
    assert snap.closed_at is None
    assert snap.status is IncidentStatus.ACTIVE
    assert (snap.call_type_code, snap.call_type) == ("EDP", "EMOTIONALLY DISTURBED PERSON")
    assert snap.apco_type is None
    assert (snap.priority, snap.agency, snap.zone) == ("2", "CO9990000", "D2")
    assert snap.location == Location(
        point=GeoPoint(40.012345, -105.281234),
        address="1428 Imaginary Ave",
        city="Demoville",
        state="CO",
    )
    assert snap.units == (Unit("CR12", "CRISIS", "DISP"),)
    assert snap.dispositions == () and snap.cautions == ()
    # NatureOfCall is the call-taker's free text: the first, protected, note.
    assert snap.notes[0] == Note("SON YELLING, HEARING VOICES", at("21:02:11"))
    assert [n.time for n in snap.notes[1:]] == [at("21:02:48"), at("21:03:30"), at("21:04:05")]
    assert snap.persons == (
        Person(("Caller",), "Testy McTestface", "1961-07-04", "303-555-0142"),
        Person(("Subject",), "Sample Q McTestface", "1994-11-23", "303-555-0187"),
    )


def test_enroute_snapshot_mentions_the_knife() -> None:
    snap = FMT.parse(fixture("bh-2-enroute.xml"))
    assert snap.updated_at == at("21:08:02")  # the narrative entry is the latest change
    assert snap.priority == "1"
    assert snap.units == (Unit("CR12", "CRISIS", "ENRT"), Unit("2A31", "PATROL", "ENRT"))
    assert "KNIFE" in snap.notes[-1].text
    assert snap.status is IncidentStatus.ACTIVE


def test_closed_snapshot() -> None:
    snap = FMT.parse(fixture("bh-3-closed.xml"))
    assert snap.status is IncidentStatus.CLOSED
    assert snap.closed_at == snap.updated_at == at("21:58:30")
    assert snap.dispositions == (Disposition("REF", "REFERRED TO MOBILE CRISIS / BH PROVIDER"),)
    assert [u.status for u in snap.units] == ["AVAIL", "AVAIL"]
    assert len(snap.notes) == 7


def test_snapshots_of_one_call_share_the_id_and_move_forward() -> None:
    snaps = [FMT.parse(fixture(f"bh-{n}.xml")) for n in ("1-dispatch", "2-enroute", "3-closed")]
    assert {s.incident_id for s in snaps} == {"581204"}
    assert snaps[0].updated_at < snaps[1].updated_at < snaps[2].updated_at


def test_non_behavioral_call_with_two_agencies() -> None:
    snap = FMT.parse(fixture("non-bh-collision.xml"))
    # The first AgencyContext (Fire) is primary unless the feed names one.
    assert (snap.call_type_code, snap.call_type, snap.agency, snap.zone) == (
        "MVA", "MOTOR VEHICLE ACCIDENT", "CO99901", "Q3",
    )  # fmt: skip
    police = NewWorldFormat(agency_type="police").parse(fixture("non-bh-collision.xml"))
    assert (police.call_type_code, police.call_type, police.agency, police.zone) == (
        "TC", "TRAFFIC COLLISION", "CO9990000", "D4",
    )  # fmt: skip
    # E7 has stage times but no UnitLog: its status comes from the latest stage.
    assert snap.units == (Unit("E7", "ENGINE", "EnRoute"), Unit("2A14", "PATROL", "DISP"))
    assert snap.persons == (
        Person(("Reporting Party", "Caller"), "Casey Mockingbird", None, "720-555-0119"),
    )
    assert snap.location is not None and snap.location.address == "Synthetic Blvd / Invented Rd"


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code", "where"),
    [
        ("bad-wrong-namespace.xml", "wrong-namespace", "/Call"),
        ("bad-not-well-formed.xml", "malformed-xml", "line 132, column 91"),
        ("bad-invalid-lat.xml", "invalid-field", "/Call/Location/LatitudeY"),
        ("bad-time.xml", "invalid-field", "/Call/Narratives/Narrative[2]/CreateDateTime"),
        ("bad-encoding.xml", "bad-encoding", "line 132, column 65"),
        ("billion-laughs.xml", "unsupported", None),
        ("external-entity.xml", "unsupported", None),
    ],
)
def test_bad_fixtures_are_rejected_precisely(name: str, code: str, where: str | None) -> None:
    err = rejected(fixture(name))
    assert (err.code, err.where) == (code, where)
    for secret in PHI:
        assert secret not in str(err)


def test_entity_attacks_are_neutralised_even_past_the_byte_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the DOCTYPE byte check, the parser still expands and fetches nothing."""
    monkeypatch.setattr(xml_safety, "_DOCTYPE_MARKERS", ())
    for name in ("billion-laughs.xml", "external-entity.xml"):
        started = time.process_time()
        err = rejected(fixture(name))
        assert err.code in ("unsupported", "malformed-xml")
        assert time.process_time() - started < 5  # generous: expansion would take far longer
        assert "root:" not in str(err)


@pytest.mark.parametrize(
    ("body", "code", "where"),
    [
        ("<CreateDateTime>2026-03-14 21:02:11Z</CreateDateTime>", "missing-field", "/Call/CallId"),
        ('<CallId i:nil="true"/><CreateDateTime>2026-03-14 21:02:11Z</CreateDateTime>',
         "missing-field", "/Call/CallId"),
        ("<CallId>77</CallId>", "missing-field", "/Call/CreateDateTime"),
        (MINIMAL + "<ClosedFlag>maybe</ClosedFlag>", "invalid-field", "/Call/ClosedFlag"),
        (MINIMAL + "<Location><LatitudeY>40.1</LatitudeY></Location>", "invalid-field",
         "/Call/Location/LatitudeY"),
        (MINIMAL + "<Location><LatitudeY>40.1</LatitudeY><LongitudeX>east</LongitudeX></Location>",
         "invalid-field", "/Call/Location/LatitudeY"),
        (MINIMAL + "<CloseDateTime>1850-01-01 00:00:00Z</CloseDateTime>", "invalid-field",
         "/Call/CloseDateTime"),
        (MINIMAL + "<Persons><Person><PrimaryCallerFlag>si</PrimaryCallerFlag></Person></Persons>",
         "invalid-field", "/Call/Persons/Person/PrimaryCallerFlag"),
    ],
)  # fmt: skip
def test_field_errors(body: str, code: str, where: str) -> None:
    err = rejected(call(body))
    assert (err.code, err.where) == (code, where)


def test_wrong_root_in_the_right_namespace() -> None:
    message = f'<CallList xmlns="{NAMESPACE}"><Call/></CallList>'.encode()
    assert rejected(message).code == "unsupported"


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"not xml at all",
        b"<Call",
        b'{"id": "not xml"}',
        b'<?xml version="1.0" encoding="no-such-encoding"?><Call/>',
        b'<?xml version="1.0" encoding="utf-16"?><Call/>',
        b"<Call>\x00</Call>",
        b"<a>" * 5000 + b"</a>" * 5000,  # deeper than libxml2's limit
    ],
)
def test_garbage_is_rejected(message: bytes) -> None:
    assert rejected(message).code in ("malformed-xml", "bad-encoding")


def test_declared_encoding_that_lies_is_bad_encoding() -> None:
    assert rejected(b'<?xml version="1.0" encoding="utf-16"?><Call/>').code == "bad-encoding"
    assert rejected(b'<?xml version="1.0" encoding="bogus-8"?><Call/>').code == "bad-encoding"


def test_utf16_with_bom_and_latin1_declared_are_read() -> None:
    text = fixture("bh-1-dispatch.xml").decode().replace('encoding="utf-8"', 'encoding="utf-16"')
    assert FMT.parse(text.encode("utf-16")) == FMT.parse(fixture("bh-1-dispatch.xml"))
    latin = (
        text.replace('encoding="utf-16"', 'encoding="iso-8859-1"')
        .replace("Demoville", "Demoville Caf\u00e9")
        .encode("latin-1")
    )
    location = FMT.parse(latin).location
    assert location is not None and location.city == "Demoville Caf\u00e9"


# --- values -------------------------------------------------------------------------------------


def test_nil_and_empty_elements_are_no_value() -> None:
    snap = FMT.parse(
        call(MINIMAL + '<CallNumber i:nil="true"/><Location><City> </City></Location>')
    )
    assert snap.incident_number is None
    assert snap.location is None


@pytest.mark.parametrize(
    ("written", "zone", "utc"),
    [
        ("2026-03-14 21:02:11Z", "UTC", "2026-03-14T21:02:11"),
        ("2026-03-14T21:02:11Z", "UTC", "2026-03-14T21:02:11"),
        ("2026-03-14T15:02:11-06:00", "UTC", "2026-03-14T21:02:11"),
        ("2026-03-14T21:02:11.1234567", "UTC", "2026-03-14T21:02:11.123456"),
        ("2026-03-14 15:02:11", "America/Denver", "2026-03-14T21:02:11"),  # MDT, UTC-6
        ("2026-01-14 14:02:11", "America/Denver", "2026-01-14T21:02:11"),  # MST, UTC-7
        ("2026-01-14 14:02:11Z", "America/Denver", "2026-01-14T14:02:11"),  # a zone wins
    ],
)
def test_times(written: str, zone: str, utc: str) -> None:
    fmt = NewWorldFormat(timezone=zone)
    snap = fmt.parse(call(f"<CallId>1</CallId><CreateDateTime>{written}</CreateDateTime>"))
    assert snap.opened_at == datetime.fromisoformat(utc).replace(tzinfo=UTC)


def test_unknown_timezone_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="IANA"):
        NewWorldFormat(timezone="Mountain Standard Time")


def test_zero_point_is_not_geocoded() -> None:
    body = MINIMAL + "<Location><LatitudeY>0</LatitudeY><LongitudeX>0.0</LongitudeX></Location>"
    assert FMT.parse(call(body)).location is None


def test_address_built_from_parts_when_full_address_is_nil() -> None:
    body = MINIMAL + (
        '<Location><FullAddress i:nil="true"/><HouseNumber>12</HouseNumber>'
        "<PrefixDirectional>N</PrefixDirectional><StreetName>Invented</StreetName>"
        "<StreetType>Rd</StreetType></Location>"
    )
    location = FMT.parse(call(body)).location
    assert location is not None and location.address == "12 N Invented Rd"


def unit_xml(inner: str) -> str:
    return (
        MINIMAL + f"<AssignedUnits><Unit><UnitNumber>M4</UnitNumber>{inner}</Unit></AssignedUnits>"
    )


@pytest.mark.parametrize(
    ("inner", "status"),
    [
        ("", None),
        ("<DispatchDateTime>2026-03-14 21:05:00Z</DispatchDateTime>", "Dispatched"),
        # equal stage times: the later stage wins
        ("<DispatchDateTime>2026-03-14 21:05:00Z</DispatchDateTime>"
         "<EnrouteDateTime>2026-03-14 21:05:00Z</EnrouteDateTime>", "EnRoute"),
        # a UnitLog at the same time as the latest stage: the CAD's own word wins
        ("<ArriveDateTime>2026-03-14 21:09:00Z</ArriveDateTime><UnitLogs><UnitLog>"
         "<DateTime>2026-03-14 21:09:00Z</DateTime><Status>ONSC</Status></UnitLog></UnitLogs>",
         "ONSC"),
        # a stage later than every UnitLog entry wins
        ("<ClearDateTime>2026-03-14 21:30:00Z</ClearDateTime><UnitLogs><UnitLog>"
         "<DateTime>2026-03-14 21:09:00Z</DateTime><Status>ONSC</Status></UnitLog></UnitLogs>",
         "Cleared"),
        # UnitLog entries without times: the last one, when nothing has a time
        ("<UnitLogs><UnitLog><Status>DISP</Status></UnitLog>"
         "<UnitLog><Status>ENRT</Status></UnitLog></UnitLogs>", "ENRT"),
    ],
)  # fmt: skip
def test_unit_status(inner: str, status: str | None) -> None:
    assert FMT.parse(call(unit_xml(inner))).units == (Unit("M4", None, status),)


def test_unit_without_number_is_skipped() -> None:
    body = MINIMAL + "<AssignedUnits><Unit><Type>ENGINE</Type></Unit></AssignedUnits>"
    assert FMT.parse(call(body)).units == ()


def test_caller_fields_become_a_person_when_no_person_is_the_caller() -> None:
    body = MINIMAL + "<CallerName>Riley Example</CallerName><CallerPhone>555-0100</CallerPhone>"
    snap = FMT.parse(call(body))
    assert snap.persons == (Person(("Caller",), "Riley Example", None, "555-0100"),)


def test_nature_of_call_repeated_by_a_narrative_is_one_note() -> None:
    body = MINIMAL + (
        "<NatureOfCall>WELFARE CHECK</NatureOfCall><Narratives><Narrative>"
        "<CreateDateTime>2026-03-14 21:03:00Z</CreateDateTime><Text>WELFARE CHECK</Text>"
        "</Narrative></Narratives>"
    )
    assert FMT.parse(call(body)).notes == (Note("WELFARE CHECK", at("21:03:00")),)


def test_split_keeps_the_payload_whole() -> None:
    assert FMT.split(b"<Call/>") == [b"<Call/>"]


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bh-1-dispatch.xml", "bh-2-enroute.xml", "bh-3-closed.xml",
                                  "non-bh-collision.xml"])  # fmt: skip
def test_fixture_round_trip(name: str) -> None:
    snap = FMT.parse(fixture(name))
    again = FMT.parse(newworld_document(snap))
    if name.startswith("non-bh"):
        # The writer names one agency (Police) and its ORI; compare what it can hold.
        again = replace(again, agency=snap.agency, zone=snap.zone)
    assert again == snap


def test_demo_lifecycles_round_trip() -> None:
    start = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    for lifecycle in incident_lifecycles(random.Random(7), 12, start):
        for snap in lifecycle:
            expected = replace(snap, apco_type=None, cautions=())
            assert FMT.parse(newworld_document(snap)) == expected


WORD = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefgh0123456789-'/."), min_size=1,
               max_size=12)  # fmt: skip
PHRASE = st.lists(WORD, min_size=1, max_size=5).map(" ".join)
FREE_TEXT = (
    st.text(
        st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp"))
        | st.sampled_from("\n\t"),
        min_size=1,
        max_size=60,
    )
    .map(str.strip)
    .filter(bool)
)
BASE = datetime(2026, 3, 14, 21, 0, tzinfo=UTC)
OFFSET = st.integers(0, 10_000).map(lambda s: timedelta(seconds=s))
MICRO = st.integers(0, 10_000_000).map(lambda us: timedelta(microseconds=us))


@st.composite
def new_world_snapshots(draw: st.DrawFn) -> Snapshot:
    """Snapshots New World can hold: no APCO type, cautions or mental state; a single role,
    optionally plus Caller; ``updated_at`` carried by a unit, a disposition or the latest time."""
    opened = BASE + draw(OFFSET)
    note_times = sorted(opened + draw(OFFSET) for _ in range(draw(st.integers(0, 3))))
    notes = tuple(Note(draw(FREE_TEXT), t) for t in note_times)
    status = draw(st.sampled_from(IncidentStatus))
    units = tuple(
        Unit(draw(WORD), draw(st.none() | WORD),
             draw(st.none() | st.sampled_from(["EnRoute", "OnScene", "Cleared", "ENRT", "AVAIL"])))
        for _ in range(draw(st.integers(0, 3)))
    )  # fmt: skip
    dispositions = tuple(
        Disposition(draw(WORD), draw(st.none() | PHRASE)) for _ in range(draw(st.integers(0, 2)))
    )
    latest = max([opened, *note_times])
    carried = any(u.status for u in units) or bool(dispositions)
    updated = latest + draw(MICRO) if carried else latest
    closed_at = None
    if status is not IncidentStatus.ACTIVE and draw(st.booleans()):
        updated = closed_at = updated + draw(MICRO)
    roles = draw(st.sampled_from([(), ("Subject",), ("Caller",), ("Witness", "Caller")]))
    persons = tuple(
        Person(roles, draw(PHRASE), draw(st.none() | st.just("1990-02-28")),
               draw(st.none() | st.just("303-555-0199")))
        for _ in range(draw(st.integers(0, 2)))
    )  # fmt: skip
    location = draw(
        st.none()
        | st.builds(
            Location,
            point=st.none() | st.builds(GeoPoint, st.floats(1, 89), st.floats(-179, -1)),
            address=st.none() | PHRASE,
            city=st.none() | PHRASE,
            state=st.none() | st.just("CO"),
        ).filter(lambda loc: loc != Location())
    )
    return Snapshot(
        incident_id=draw(WORD),
        updated_at=updated,
        status=status,
        incident_number=draw(st.none() | WORD),
        call_type=draw(st.none() | PHRASE),
        call_type_code=draw(st.none() | WORD),
        priority=draw(st.none() | st.sampled_from("1234")),
        agency=draw(st.none() | WORD),
        zone=draw(st.none() | WORD),
        opened_at=opened,
        closed_at=closed_at,
        location=location,
        units=units,
        dispositions=dispositions,
        notes=notes,
        persons=persons,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(new_world_snapshots())
def test_round_trip_property(snap: Snapshot) -> None:
    assert FMT.parse(newworld_document(snap)) == snap


# --- fuzzing: nothing but RejectedMessage escapes -----------------------------------------------


def parse_or_reject(message: bytes) -> None:
    try:
        FMT.parse(message)
    except RejectedMessage as err:
        assert err.code
        assert "McTestface" not in str(err)


GOOD = [fixture(n) for n in ("bh-1-dispatch.xml", "bh-2-enroute.xml", "bh-3-closed.xml",
                             "non-bh-collision.xml")]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data: bytes) -> None:
    parse_or_reject(data)


INSERTS = [b"<", b">", b"&", b'"', b"\xff", b"</Call>", b"<!DOCTYPE x>"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(GOOD), st.data())
def test_fuzz_byte_mutations(document: bytes, data: st.DataObject) -> None:
    mutated = bytearray(document)
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.integers(0, len(mutated) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if action == "flip":
            mutated[where] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del mutated[where]
        elif action == "insert":
            mutated[where:where] = data.draw(st.sampled_from(INSERTS))
        else:
            del mutated[where:]
        if not mutated:
            break
    parse_or_reject(bytes(mutated))


ODD_VALUES = st.sampled_from([
    "", " ", "true", "false", "nan", "inf", "-0", "1e309", "99999999999999999999",
    "2026-03-14 21:02:11Z", "2026-02-30 10:00:00Z", "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00", "24:00", "\u00e9\u00e8", "-91", "181", "1,5",
])  # fmt: skip
ODD_VALUES |= st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(GOOD), st.data())
def test_fuzz_value_mutations(document: bytes, data: st.DataObject) -> None:
    """Well-formed documents with odd values in random elements (and nil, and removals)."""
    root = etree.fromstring(document)
    elements = [e for e in root.iter(etree.Element) if len(e) == 0]
    for _ in range(data.draw(st.integers(1, 6))):
        element = data.draw(st.sampled_from(elements))
        action = data.draw(st.sampled_from(["text", "nil", "remove"]))
        if action == "text":
            element.text = data.draw(ODD_VALUES)
        elif action == "nil":
            element.set(xml_safety.XSI_NIL, data.draw(st.sampled_from(["true", "false", "x"])))
        elif element.getparent() is not None:
            element.getparent().remove(element)
    parse_or_reject(etree.tostring(root))
