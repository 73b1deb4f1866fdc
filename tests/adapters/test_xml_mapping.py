"""XPath mapping files: loading (every problem at once), parsing, agreement with New World."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from corespond.adapters.newworld import NewWorldFormat
from corespond.adapters.xml_mapping import (
    MappedXmlFormat,
    MappingError,
    load_mapping,
    mapping_from_yaml,
)
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import (
    Caution,
    Disposition,
    GeoPoint,
    IncidentStatus,
    Location,
    Note,
    Person,
    Unit,
)

ROOT = Path(__file__).parent.parent.parent
MAPPINGS = ROOT / "config" / "mappings"
FIXTURES = ROOT / "tests" / "fixtures"
SPILLMAN = MappedXmlFormat(load_mapping(MAPPINGS / "example-spillman-like.yaml"))
NS = "urn:example:spillman-like:cad-export:3"


def mapped(name: str) -> bytes:
    return (FIXTURES / "mapped" / name).read_bytes()


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def inline(text: str, *, timezone: str | None = None) -> MappedXmlFormat:
    return MappedXmlFormat(mapping_from_yaml(text, Path("inline.yaml")), timezone=timezone)


SMALL = """
namespaces: {v: "urn:example:v"}
root: /v:Export
fields:
  incident_id: v:Id
  updated_at: v:Time
  status: v:State
  opened_at: v:Opened
  lat: v:Lat
  lon: v:Lon
status_map: {O: active, C: closed}
notes: {each: v:Note, text: ., time: "@at"}
"""


def small(body: str) -> bytes:
    return f'<v:Export xmlns:v="urn:example:v">{body}</v:Export>'.encode()


def rejected(fmt: MappedXmlFormat, message: bytes) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as info:
        fmt.parse(message)
    return info.value


# --- the shipped example ------------------------------------------------------------------------


def test_spillman_like_open() -> None:
    snap = SPILLMAN.parse(mapped("spillman-like-open.xml"))
    assert snap.incident_id == "2026-000311"
    assert snap.incident_number == "DPD26-01873"
    # Local Mountain time (MDT in March 2026, UTC-6) without a zone, to UTC.
    assert snap.updated_at == utc("2026-03-14T21:44:58")
    assert snap.opened_at == utc("2026-03-14T21:31:07")
    assert snap.closed_at is None
    assert snap.status is IncidentStatus.ACTIVE  # DISP through the status_map
    assert (snap.call_type, snap.call_type_code, snap.priority) == ("SUICIDAL SUBJECT", "SUIC", "1")
    assert (snap.agency, snap.zone) == ("CO9990000", "D3")
    assert snap.location == Location(
        GeoPoint(40.00871, -105.29012), "77 Fictional St Apt 4", "Demoville", "CO"
    )
    assert snap.cautions == (Caution("WEAPON ACCESS", "high"),)
    assert snap.units == (Unit("CIT2", "CRISIS", "ENRT"), Unit("3B12", "PATROL", "DISP"))
    assert snap.notes[0].text.count("\n") == 1  # a comment's two lines, joined
    assert snap.notes[0].time == utc("2026-03-14T21:31:50")
    assert snap.persons == (
        Person(("RP",), "Morgan Sample", "1979-05-02", "720-555-0163"),
        Person(("SUBJ",), "Emery Placeholder", "2001-09-17", None, "DISTRAUGHT, CRYING"),
    )


def test_spillman_like_closed() -> None:
    snap = SPILLMAN.parse(mapped("spillman-like-closed.xml"))
    assert snap.status is IncidentStatus.CLOSED
    assert snap.closed_at == snap.updated_at == utc("2026-03-14T22:32:15")
    assert snap.dispositions == (
        Disposition("16", "TRANSPORT/ESCORT GIVEN"),
        Disposition("15", "REFERRED TO PARTNER AGENCY"),
    )
    assert "CAF\u00c9 PATIO" in snap.narrative  # ISO-8859-1 as declared


@pytest.mark.parametrize("path", sorted(MAPPINGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_mapping_loads(path: Path) -> None:
    assert load_mapping(path).fields["incident_id"].text


# --- the generic mapper agrees with the New World parser ----------------------------------------


@pytest.mark.parametrize("name", ["bh-1-dispatch.xml", "bh-2-enroute.xml", "bh-3-closed.xml"])
def test_newworld_mapping_agrees_with_the_native_parser(name: str) -> None:
    message = (FIXTURES / "newworld" / name).read_bytes()
    generic = MappedXmlFormat(load_mapping(MAPPINGS / "newworld-callexport.yaml"))
    assert generic.parse(message) == NewWorldFormat().parse(message)


@pytest.mark.parametrize(
    "name", ["bad-wrong-namespace.xml", "bad-invalid-lat.xml", "bad-time.xml",
             "bad-not-well-formed.xml", "bad-encoding.xml", "billion-laughs.xml"],
)  # fmt: skip
def test_newworld_mapping_rejects_what_the_native_parser_rejects(name: str) -> None:
    message = (FIXTURES / "newworld" / name).read_bytes()
    generic = MappedXmlFormat(load_mapping(MAPPINGS / "newworld-callexport.yaml"))
    with pytest.raises(RejectedMessage) as native:
        NewWorldFormat().parse(message)
    assert rejected(generic, message).code == native.value.code


# --- loading ------------------------------------------------------------------------------------


def test_every_problem_in_a_mapping_is_reported_at_once() -> None:
    with pytest.raises(MappingError) as info:
        load_mapping(FIXTURES / "mapped" / "bad-mapping.yaml")
    found = {(p.location.line, p.key) for p in info.value.problems}
    assert found == {
        (5, "time_format"),
        (6, "timezone"),
        (9, "status_map.GONE"),
        (10, "fields.updated_at"),  # missing: reported at its section
        (10, "fields"),  # lat without lon
        (12, "fields.call_type"),
        (13, "fields.call_kind"),
        (14, "fields.zone"),
        (15, "fields.priority"),
        (17, "units.id"),
        (20, "units.colour"),
        (21, "bogus"),
    }
    text = str(info.value)
    assert "bad-mapping.yaml:14: fields.zone: invalid XPath: Undefined namespace prefix" in text
    assert "put it in quotes" in text


def test_yaml_syntax_error_has_a_line() -> None:
    with pytest.raises(MappingError) as info:
        mapping_from_yaml("fields:\n  incident_id: [unclosed\n", Path("broken.yaml"))
    assert info.value.problems[0].location.line is not None


def test_unreadable_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="cannot read"):
        load_mapping(tmp_path / "absent.yaml")


def test_minimal_mapping_requirements() -> None:
    with pytest.raises(MappingError) as info:
        mapping_from_yaml("namespaces: {'': 'urn:x'}\n", Path("m.yaml"))
    keys = {p.key for p in info.value.problems}
    assert keys == {"namespaces.", "root", "fields"}


# --- parsing rules ------------------------------------------------------------------------------


def test_several_nodes_text_takes_first_time_takes_latest() -> None:
    fmt = inline(SMALL)
    snap = fmt.parse(small(
        "<v:Id>A-1</v:Id><v:Id>A-2</v:Id>"
        "<v:Time>2026-03-14T10:00:00Z</v:Time><v:Time>2026-03-14T12:00:00Z</v:Time>"
        "<v:Time>2026-03-14T11:00:00Z</v:Time>"
    ))  # fmt: skip
    assert snap.incident_id == "A-1"
    assert snap.updated_at == utc("2026-03-14T12:00:00")


def test_timezone_precedence() -> None:
    body = small("<v:Id>1</v:Id><v:Time>2026-01-10 08:00:00</v:Time>")
    assert inline(SMALL).parse(body).updated_at == utc("2026-01-10T08:00:00")
    assert inline(SMALL, timezone="America/Chicago").parse(body).updated_at == utc(
        "2026-01-10T14:00:00"
    )
    own = inline(SMALL + "timezone: America/Denver\n", timezone="America/Chicago")
    assert own.parse(body).updated_at == utc("2026-01-10T15:00:00")


@pytest.mark.parametrize(
    ("state", "status"),
    [("O", IncidentStatus.ACTIVE), ("c", IncidentStatus.CLOSED), ("Cancelled",
     IncidentStatus.CANCELLED), ("", IncidentStatus.ACTIVE)],
)  # fmt: skip
def test_status_map(state: str, status: IncidentStatus) -> None:
    body = small(f"<v:Id>1</v:Id><v:Time>2026-01-10T08:00:00Z</v:Time><v:State>{state}</v:State>")
    assert inline(SMALL).parse(body).status is status


@pytest.mark.parametrize(
    ("body", "code", "where"),
    [
        ("<v:Time>2026-01-10T08:00:00Z</v:Time>", "missing-field", "fields.incident_id"),
        ("<v:Id>1</v:Id>", "missing-field", "fields.updated_at"),
        ("<v:Id>1</v:Id><v:Time>yesterday</v:Time>", "invalid-field", "/Export/Time"),
        ("<v:Id>1</v:Id><v:Time>2026-01-10T08:00:00Z</v:Time><v:State>Z</v:State>",
         "invalid-field", "/Export/State"),
        ("<v:Id>1</v:Id><v:Time>2026-01-10T08:00:00Z</v:Time><v:Lat>40</v:Lat>",
         "invalid-field", "/Export/Lat"),
        ("<v:Id>1</v:Id><v:Time>2026-01-10T08:00:00Z</v:Time><v:Lat>95</v:Lat><v:Lon>1</v:Lon>",
         "invalid-field", "/Export/Lat"),
        ('<v:Id>1</v:Id><v:Time>2026-01-10T08:00:00Z</v:Time><v:Note at="noon">x</v:Note>',
         "invalid-field", "/Export/Note/@at"),
    ],
)  # fmt: skip
def test_message_errors(body: str, code: str, where: str) -> None:
    err = rejected(inline(SMALL), small(body))
    assert (err.code, err.where) == (code, where)


def test_wrong_namespace_and_wrong_root() -> None:
    fmt = inline(SMALL)
    assert rejected(fmt, b'<Export xmlns="urn:other"/>').code == "wrong-namespace"
    assert rejected(fmt, b'<v:Import xmlns:v="urn:example:v"/>').code == "unsupported"


def test_each_must_select_elements() -> None:
    fmt = inline(SMALL.replace("each: v:Note", "each: v:Note/@at"))
    body = small('<v:Id>1</v:Id><v:Time>2026-01-10T08:00:00Z</v:Time><v:Note at="x">y</v:Note>')
    assert rejected(fmt, body).code == "unsupported"


def test_expressions_may_return_strings_numbers_and_booleans() -> None:
    extra = "  priority: count(v:Note)\n  call_type: concat('K-', v:Id)\n  zone: boolean(v:Zone)\n"
    fmt = inline(SMALL.replace("  lon: v:Lon\n", "  lon: v:Lon\n" + extra))
    body = small("<v:Id>7</v:Id><v:Time>2026-01-10T08:00:00Z</v:Time><v:Note>a</v:Note>")
    snap = fmt.parse(body)
    assert (snap.priority, snap.call_type, snap.zone) == ("1", "K-7", "false")
    assert snap.notes == (Note("a"),)


def test_nil_nodes_are_no_value() -> None:
    body = small(
        '<v:Id xmlns:i="http://www.w3.org/2001/XMLSchema-instance" i:nil="true">9</v:Id>'
        "<v:Time>2026-01-10T08:00:00Z</v:Time>"
    )
    assert rejected(inline(SMALL), body).code == "missing-field"


def test_dtd_is_refused() -> None:
    body = b'<!DOCTYPE v:Export [<!ENTITY x SYSTEM "file:///etc/hostname">]>' + small("&x;")
    assert rejected(inline(SMALL), body).code == "unsupported"


# --- fuzzing ------------------------------------------------------------------------------------

GOOD = [mapped("spillman-like-open.xml"), mapped("spillman-like-closed.xml")]


def parse_or_reject(message: bytes) -> None:
    try:
        SPILLMAN.parse(message)
    except RejectedMessage as err:
        assert "Placeholder" not in str(err) and "555-01" not in str(err)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    parse_or_reject(data)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(GOOD), st.data())
def test_fuzz_byte_mutations(document: bytes, data: st.DataObject) -> None:
    mutated = bytearray(document)
    for _ in range(data.draw(st.integers(1, 6))):
        if not mutated:
            break
        where = data.draw(st.integers(0, len(mutated) - 1))
        if data.draw(st.booleans()):
            mutated[where] = data.draw(st.integers(0, 255))
        else:
            del mutated[where : where + data.draw(st.integers(1, 40))]
    parse_or_reject(bytes(mutated))


ODD = st.sampled_from(["", "13/45/2026 99:99:99", "03/14/2026 15:31:07", "nan", "-200", "1e999",
                       "OPEN", "open", "GONE"]) | st.text(max_size=15)  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(GOOD), st.data())
def test_fuzz_value_mutations(document: bytes, data: st.DataObject) -> None:
    root = etree.fromstring(document)
    elements = list(root.iter(etree.Element))
    for _ in range(data.draw(st.integers(1, 6))):
        element = data.draw(st.sampled_from(elements))
        if element.attrib and data.draw(st.booleans()):
            name = data.draw(st.sampled_from(sorted(element.attrib)))
            element.set(name, data.draw(ODD.filter(_xml_safe)))
        elif len(element) == 0:
            element.text = data.draw(ODD.filter(_xml_safe))
        elif element.getparent() is not None:
            element.getparent().remove(element)
            elements = list(root.iter(etree.Element))
    parse_or_reject(etree.tostring(root))


def _xml_safe(text: str) -> bool:
    try:
        etree.Element("x").text = text
    except ValueError:
        return False
    return True
