"""EIDO JSON: every field mapping, every rejection, the writer round trip, fuzzing."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corespond.adapters.eido import (
    DEFAULT_AGENCY_ID,
    EidoFormat,
    eido_document,
    html_to_text,
    load_json,
    text_to_html,
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
    Snapshot,
    Unit,
)
from tests.adapters.eido_cases import (
    DROP,
    VALID,
    assert_no_phi,
    encode,
    fixture,
    fixture_bytes,
    json_values,
    paths,
    replaced,
    snapshots,
)

FORMAT = EidoFormat()


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def parse(doc: Any) -> Snapshot:
    return FORMAT.parse(encode(doc))


def rejected(message: bytes) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as info:
        FORMAT.parse(message)
    assert_no_phi(str(info.value))
    return info.value


def minimal(**extra: Any) -> dict[str, Any]:
    return {
        "$id": "urn:emergency:uid:incidentid:1:psap.test.invalid",
        "lastUpdateTimeStamp": "2026-03-14T21:00:00.0-05:00",
        "eidoVersion": "1.0",
        "agencyComponent": [],
        **extra,
    }


def incident(**fields: Any) -> dict[str, Any]:
    return minimal(incidentComponent={"incidentTypeCommonRegistryText": "EDP", **fields})


# --- the fixtures, field by field --------------------------------------------------------------


def test_format_identity_and_split() -> None:
    assert FORMAT.name == "eido"
    assert FORMAT.split(b"{}") == [b"{}"]


def test_behavioral_health_open() -> None:
    snap = FORMAT.parse(fixture_bytes("bh-open.json"))
    assert snap.incident_id == "urn:emergency:uid:incidentid:7f3e21a9c04:psap.lakeview.invalid"
    assert snap.updated_at == datetime(2026, 3, 15, 2, 6, 37, 482000, tzinfo=UTC)
    assert snap.status is IncidentStatus.ACTIVE
    assert snap.apco_type == "SUICTHRT"
    assert (snap.call_type_code, snap.call_type) == ("SUICID", "SUICIDAL SUBJECT")
    assert snap.priority == "2"  # the common priority number wins over the internal text
    assert snap.zone == "B3"
    assert snap.incident_number == "LV26-004512"
    assert snap.agency == "police.lakeview.invalid"  # the owning agency, not the first one
    assert snap.opened_at == utc("2026-03-14T21:02:11-05:00")
    assert snap.closed_at is None
    # CurrentIncident beats the Caller location listed before it.
    assert snap.location == Location(
        GeoPoint(41.50125, -93.60441), "1207 B N Imaginary Ave, Apt 3", "Lakeview", "ZZ"
    )
    assert snap.units == (Unit("CR-12", "CrisisInterventionUnit", "Dispatched"),)
    assert snap.cautions == ()
    assert snap.dispositions == ()
    assert snap.notes == (
        Note(
            "RP states her brother texted that he wants to end his life & said goodbye.\n"
            "Subject is home alone. No weapons mentioned.",
            utc("2026-03-14T21:03:55-05:00"),
        ),
        Note(
            'Caller advised to stay on the line\nCrisis line notified\nSubject "not answering" '
            "his phone",
            utc("2026-03-14T21:05:30-05:00"),
        ),
    )
    assert snap.persons == (
        Person(("Caller", "ReportingParty"), "Testy McTestface", None, "555-555-0142", None),
        Person(
            ("Patient", "PersonOfInterest"),
            "Pat Q. Placeholder",
            "1987-03-14",
            "555-555-0177",
            "Suicidal ideation; history of depression",
        ),
    )
    assert snap.mental_states == ("Suicidal ideation; history of depression",)


def test_behavioral_health_update_brings_weapon_and_caution() -> None:
    snap = FORMAT.parse(fixture_bytes("bh-update.json"))
    assert snap.status is IncidentStatus.ACTIVE
    assert "handgun in the bedroom & has been drinking" in snap.narrative
    assert snap.cautions == (Caution("Weapon", "highest"),)
    assert snap.units == (
        Unit("CR-12", "CrisisInterventionUnit", "EnRoute"),
        Unit("2A31", "Police", "EnRoute"),
    )


def test_behavioral_health_close() -> None:
    snap = FORMAT.parse(fixture_bytes("bh-close.json"))
    assert snap.status is IncidentStatus.CLOSED
    # When the incident component last changed, not when the EIDO was sent.
    assert snap.closed_at == utc("2026-03-14T22:18:45-05:00")
    assert snap.updated_at == utc("2026-03-14T22:19:02.331-05:00")
    assert snap.dispositions == (
        Disposition("15", "Referred to mobile crisis follow-up"),
        Disposition("16", "Transport"),  # no description: the category text
    )
    assert {u.status for u in snap.units} == {"Cleared"}
    assert snap.notes[-1].text == (
        "Firearm secured by family member\nSubject transported voluntarily for evaluation"
    )


def test_traffic_crash() -> None:
    snap = FORMAT.parse(fixture_bytes("traffic.json"))
    assert snap.apco_type == "MVAINJY"
    assert snap.priority == "P1"
    assert snap.agency == "psap.lakeview.invalid"  # no owner flagged: the first agency
    assert snap.opened_at == utc("2026-03-15T07:40:51.6-05:00")  # earliest of two calls
    # UnitLocation is never the incident's location, even when it is the only other one.
    assert snap.location == Location(
        GeoPoint(41.47702, -93.65518), "Invented Rd, at mile marker 12", "Lakeview", "ZZ"
    )
    assert snap.notes[0].text == "2 VEH, 1 DRIVER C/O NECK PAIN\nBLOCKING NB LANE"
    assert snap.units == (
        Unit("urn:emergency:uid:eidodatacomponent:res-m7:psap.lakeview.invalid", "Ambulance",
             "NotAvailable"),
    )  # fmt: skip
    assert snap.persons == (Person(("Caller",)),)


def test_no_incident_component_like_the_call_transfer_sample() -> None:
    snap = parse(minimal(updatedByAgencyReference={"$ref": "psap.test.invalid"}))
    assert snap.status is IncidentStatus.ACTIVE
    assert snap.apco_type is None
    assert snap.agency == "psap.test.invalid"  # no agencies listed: the updating agency
    assert snap.location is None


# --- individual mappings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], IncidentStatus.ACTIVE),
        (["ResourcesAssigned"], IncidentStatus.ACTIVE),
        (["Active", "Closed"], IncidentStatus.CLOSED),
        (["closed"], IncidentStatus.CLOSED),
        (["Cancelled"], IncidentStatus.CANCELLED),
        (["Closed", "ReOpened"], IncidentStatus.ACTIVE),
        (["Closed", "ReOpened", "ResourcesEnroute"], IncidentStatus.ACTIVE),
        (["ReOpened", "Closed"], IncidentStatus.CLOSED),
        (["Closed", "StructureCleared"], IncidentStatus.CLOSED),
    ],
)
def test_status_last_deciding_value_wins(statuses: list[str], expected: IncidentStatus) -> None:
    snap = parse(incident(incidentStatusCommonRegistryText=statuses))
    assert snap.status is expected
    if expected is IncidentStatus.CLOSED:
        assert snap.closed_at == snap.updated_at  # no component timestamp: the EIDO's


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"incidentCommonPriorityNumber": 3}, "3"),
        ({"incidentPriorityInternalText": " P2 "}, "P2"),
        ({"incidentCommonPriorityNumber": 0, "incidentPriorityInternalText": "HOT"}, "0"),
        ({}, None),
    ],
)
def test_priority(fields: dict[str, Any], expected: str | None) -> None:
    assert parse(incident(**fields)).priority == expected


def test_agency_choice() -> None:
    agencies = [{"$id": "a.invalid"}, {"$id": "b.invalid", "incidentOwningAgencyIndicator": True}]
    assert parse(minimal(agencyComponent=agencies)).agency == "b.invalid"
    assert parse(minimal(agencyComponent=agencies[:1])).agency == "a.invalid"
    assert parse(minimal()).agency is None


def pidf(city: str) -> str:
    return (
        '<presence xmlns="urn:ietf:params:xml:ns:pidf" '
        'xmlns:gp="urn:ietf:params:xml:ns:pidf:geopriv10" entity="pres:x@y.invalid">'
        '<tuple id="t"><status><gp:geopriv><gp:location-info>'
        f'<civicAddress xmlns="urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr"><A3>{city}</A3>'
        "</civicAddress></gp:location-info></gp:geopriv></status></tuple></presence>"
    )


def located(*kinds: str) -> dict[str, Any]:
    return minimal(
        locationComponent=[
            {"locationTypeDescriptionRegistryText": kind, "locationByValue": pidf(kind)}
            for kind in kinds
        ]
    )


@pytest.mark.parametrize(
    ("kinds", "chosen"),
    [
        (["Caller", "InitialIncident", "CurrentIncident"], "CurrentIncident"),
        (["Caller", "InitialIncident"], "InitialIncident"),
        (["Staging", "Caller"], "Caller"),
        (["Staging", "RoutingLocation"], "RoutingLocation"),
        (["Other", "Investigation"], "Other"),
        (["TowerLocation", "SomethingNew"], "SomethingNew"),
        (["UnitLocation", "Staging"], "Staging"),
    ],
)
def test_location_preference(kinds: list[str], chosen: str) -> None:
    location = parse(located(*kinds)).location
    assert location is not None
    assert location.city == chosen


def test_location_by_reference_or_unit_only_is_no_location() -> None:
    doc = minimal(
        locationComponent=[
            {
                "locationTypeDescriptionRegistryText": "Caller",
                "locationByReferenceUrl": "https://x",
            },
            {"locationTypeDescriptionRegistryText": "CurrentIncident", "locationByValue": " "},
            {"locationTypeDescriptionRegistryText": "UnitLocation", "locationByValue": pidf("U")},
        ]
    )
    assert parse(doc).location is None


def test_caller_location_when_no_incident_location() -> None:
    doc = fixture("bh-open.json")
    del doc["locationComponent"][1]  # CurrentIncident: Caller (a GeoShape circle) is next
    assert parse(doc).location == Location(GeoPoint(41.50131, -93.60452))


def test_only_the_chosen_pidf_lo_is_parsed() -> None:
    doc = located("CurrentIncident", "Caller")
    doc["locationComponent"][1]["locationByValue"] = "<presence"
    assert parse(doc).location == Location(city="CurrentIncident")


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("plain words", "plain words"),
        ("line one\r\nline two\n\n  line three  ", "line one\nline two\nline three"),
        ("a<br>b<br/>c<BR />d", "a\nb\nc\nd"),
        ("<p>one</p><p>two &amp; three</p>", "one\ntwo & three"),
        ("<div><b>bold</b> and <i>it</i></div>tail", "bold and it\ntail"),
        ("&lt;not a tag&gt; &quot;q&quot; &#39;s&#39; &eacute;", "<not a tag> \"q\" 's' é"),
        ("x&nbsp;&nbsp;y", "x y"),
        ("<ul><li>one</li><li>two</li></ul>", "one\ntwo"),
        ("<script>alert(1)</script>visible<style>p{}</style>", "visible"),
        ("<!-- hidden -->shown", "shown"),
        ("<html><body><p>doc</p></body></html>", "doc"),
        ("a < b and c > d", "a < b and c > d"),
        ("<p></p><br><br>", ""),
        ("bad\x01control<br>ok", "badcontrol\nok"),
    ],
)
def test_notes_html_to_text(html: str, text: str) -> None:
    assert html_to_text(html, "/notesComponent/0/notesActionComments") == text


def test_notes_are_sorted_oldest_first_and_empty_ones_dropped() -> None:
    doc = minimal(
        notesComponent=[
            {"notesActionComments": "second", "lastUpdateTimeStamp": "2026-03-14T21:05:00Z"},
            {"notesActionComments": "<p> </p>", "lastUpdateTimeStamp": "2026-03-14T21:06:00Z"},
            {"notesActionComments": "first", "lastUpdateTimeStamp": "2026-03-14T21:05:00+01:00"},
        ]
    )
    assert parse(doc).narrative == "first\nsecond"


@pytest.mark.parametrize(
    ("nc", "expected"),
    [
        ({"name": [{"personFullName": [{"value": "Testy McTestface"}]}]},
         {"name": "Testy McTestface"}),
        ({"name": {"personFullName": "Testy McTestface"}}, {"name": "Testy McTestface"}),
        ({"name": "Testy McTestface"}, {"name": "Testy McTestface"}),
        (
            {"name": [{"personGivenName": {"value": "Testy"}, "personSurName": ["McTestface"]}]},
            {"name": "Testy McTestface"},
        ),
        ({"birthDate": [{"date": [{"value": "1990-01-02"}]}]}, {"birth_date": "1990-01-02"}),
        ({"birthDate": {"date": "1990-01-02"}}, {"birth_date": "1990-01-02"}),
        ({"birthDate": [{"year": [{"value": "1990"}]}]}, {"birth_date": "1990"}),
        ({"birthDate": "1990-01-02"}, {"birth_date": "1990-01-02"}),
        ({"mentalState": [{"value": "agitated"}, {"value": "paranoid"}]},
         {"mental_state": "agitated; paranoid"}),
        ({"mentalState": "agitated"}, {"mental_state": "agitated"}),
        (
            {"homeContactInformation": [{"contactTelephoneNumber": [
                {"full": [{"telephoneNumberFullID": [{"value": "555-555-0101"}]}]}]}]},
            {"phone": "555-555-0101"},
        ),
        (
            {"homeContactInformation": {"contactTelephoneNumber": {"full": "555-555-0102"}}},
            {"phone": "555-555-0102"},
        ),
        (
            {"employmentContactInformation": [{"contactTelephoneNumber": [{"NANP": [{
                "telephoneAreaCodeID": "555", "telephoneExchangeID": "555",
                "telephoneLineID": "0103"}]}]}]},
            {"phone": "555-555-0103"},
        ),
        (
            {"homeContactInformation": [{"contactTelephoneNumber": [{"international": [{
                "telephoneCountryCodeID": "1", "telephoneNumberID": "5555550104"}]}]}]},
            {"phone": "+1 5555550104"},
        ),
        ({"homeContactInformation": [{"contactTelephoneNumber": ["555-555-0105"]}]},
         {"phone": "555-555-0105"}),
        ({"sex": [{"value": "F"}], "unknownNiemThing": {"deep": [1, 2]}}, {}),
    ],
)  # fmt: skip
def test_person_niem_shapes(nc: dict[str, Any], expected: dict[str, str]) -> None:
    doc = minimal(
        personComponent=[{"personIncidentRoleRegistryText": ["Patient"], "ncPersonComponent": nc}]
    )
    assert parse(doc).persons == (Person(roles=("Patient",), **expected),)


@pytest.mark.parametrize(
    ("component", "unit"),
    [
        ({"$id": "x1", "emergencyResourceName": "M7"}, Unit("M7")),
        ({"$id": "x1"}, Unit("x1")),
        (
            {"$id": "x", "emergencyResourceTypeInternalText": "CRT",
             "primaryUnitStatusRegistryText": "Available"},
            Unit("x", "CRT", "Available"),
        ),
        (
            {"$id": "x", "emergencyResourceTypeCommonRegistryText": "Police",
             "emergencyResourceTypeInternalText": "PATROL",
             "primaryUnitStatusRegistryText": "NotAvailable",
             "secondaryUnitStatusRegistryText": ["Dispatched", "OnScene"]},
            Unit("x", "Police", "OnScene"),
        ),
    ],
)  # fmt: skip
def test_units(component: dict[str, Any], unit: Unit) -> None:
    assert parse(minimal(emergencyResourceComponent=[component])).units == (unit,)


def test_cautions_fall_back_to_internal_text() -> None:
    doc = minimal(
        cautionComponent=[
            {"cautionTypeInternalText": "DOG ON PREMISES"},
            {"cautionTypeCommonRegistryText": "Weapon", "cautionTypeInternalText": "GUN",
             "cautionSeverity": "high"},
        ]
    )  # fmt: skip
    assert parse(doc).cautions == (Caution("DOG ON PREMISES"), Caution("Weapon", "high"))


def test_timestamps_with_any_fraction_and_offset() -> None:
    doc = minimal(lastUpdateTimeStamp="2021-04-30T14:40:00.123456789-04:00")
    assert parse(doc).updated_at == datetime(2021, 4, 30, 18, 40, 0, 123456, tzinfo=UTC)
    assert parse(minimal(lastUpdateTimeStamp="2021-04-30T18:40:00.0")).updated_at.tzinfo is UTC


def test_extra_and_unknown_fields_are_tolerated() -> None:
    doc = incident(vendorThing=[1, {"x": None}], incidentStatusInternalText=["WHATEVER"])
    doc["issuingElementIdentification"] = 7  # not read: its type does not matter to us
    doc["x-cad"] = {"nested": {"deeper": [True]}}
    assert parse(doc).apco_type == "EDP"


def test_byte_order_mark_is_tolerated() -> None:
    assert FORMAT.parse(b"\xef\xbb\xbf" + encode(minimal())).incident_id.endswith(
        "1:psap.test.invalid"
    )


# --- rejections --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code", "where"),
    [
        ("bad-malformed.json", "malformed-json", "line 205, column 64"),
        ("bad-latin1.json", "bad-encoding", "/"),
        ("bad-missing-id.json", "missing-field", "/$id"),
        ("bad-wrong-types.json", "invalid-field",
         "/incidentComponent/incidentStatusCommonRegistryText"),
        ("bad-pidf-missing-gt.json", "bad-pidf-lo", "/locationComponent/1/locationByValue"),
        ("bad-pidf-undeclared-prefix.json", "bad-pidf-lo", "/locationComponent/1/locationByValue"),
    ],
)  # fmt: skip
def test_bad_fixtures(name: str, code: str, where: str) -> None:
    err = rejected(fixture_bytes(name))
    assert (err.code, err.where) == (code, where)


def test_bad_encoding_names_the_byte() -> None:
    raw = fixture_bytes("bad-latin1.json")
    err = rejected(raw)
    assert err.reason == f"not valid UTF-8 at byte {raw.index(b'caf') + 3}"
    err = rejected(b"\xef\xbb\xbf" + raw)
    assert err.reason == f"not valid UTF-8 at byte {raw.index(b'caf') + 6}"
    assert rejected("{}".encode("utf-16")).code == "bad-encoding"


def test_malformed_json_says_line_and_column() -> None:
    err = rejected(b'{\n  "$id": "Testy McTestface",\n  "x": [1, 2,,]\n}')
    assert err.code == "malformed-json"
    assert err.reason == "Expecting value at line 3 column 14"


# Any JSON value, with what orjson refuses and json takes made likely: lone surrogates (as
# escapes), integers beyond 64 bits, deep-ish nesting.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec=None) | st.sampled_from("\ud800\udfff\x00\ufeff")),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(JSON_VALUES, st.booleans(), st.booleans())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_load_json_reads_what_json_reads(value: Any, ascii_only: bool, bom: bool) -> None:
    """The orjson fast path gives exactly json's value, and falls back where it refuses."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    try:
        message = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate without ASCII escapes: not UTF-8 at all
        assert load_json_rejects(text.encode("utf-8", "surrogatepass"), "bad-encoding")
        return
    if bom:
        message = b"\xef\xbb\xbf" + message
    assert repr(load_json(message)) == repr(json.loads(text))


def load_json_rejects(message: bytes, code: str) -> bool:
    with pytest.raises(RejectedMessage) as info:
        load_json(message)
    return info.value.code == code


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"", "malformed-json"),
        (b"[" * 100_000, "malformed-json"),
        (b'{"a": NaN}', "malformed-json"),
        (b'{"a": -Infinity}', "malformed-json"),
        (b'{"a": ' + b"9" * 5000 + b"}", "malformed-json"),
        (b'"just a string"', "invalid-field"),
        (b"[]", "invalid-field"),
    ],
)
def test_hostile_json(message: bytes, code: str) -> None:
    assert rejected(message).code == code


@pytest.mark.parametrize(
    ("change", "code", "where"),
    [
        ({"eidoVersion": DROP}, "missing-field", "/eidoVersion"),
        ({"eidoVersion": "2.0"}, "unsupported", "/eidoVersion"),
        ({"eidoVersion": 1.0}, "invalid-field", "/eidoVersion"),
        ({"eidoVersion": DROP, "EIDOVersion": "1.0"}, "unsupported", "/"),
        ({"$id": ""}, "missing-field", "/$id"),
        ({"$id": 12}, "invalid-field", "/$id"),
        ({"$id": "a\ud800b"}, "invalid-field", "/$id"),
        ({"$id": "a\x00b"}, "invalid-field", "/$id"),
        ({"lastUpdateTimeStamp": DROP}, "missing-field", "/lastUpdateTimeStamp"),
        ({"lastUpdateTimeStamp": "yesterday"}, "invalid-field", "/lastUpdateTimeStamp"),
        ({"lastUpdateTimeStamp": "0001-01-01T00:00:00Z"}, "invalid-field", "/lastUpdateTimeStamp"),
        ({"agencyComponent": DROP}, "missing-field", "/agencyComponent"),
        ({"agencyComponent": {}}, "invalid-field", "/agencyComponent"),
        ({"agencyComponent": ["psap"]}, "invalid-field", "/agencyComponent/0"),
        ({"agencyComponent": [{}]}, "missing-field", "/agencyComponent/0/$id"),
        (
            {"agencyComponent": [{"$id": "a", "incidentOwningAgencyIndicator": "yes"}]},
            "invalid-field",
            "/agencyComponent/0/incidentOwningAgencyIndicator",
        ),
        ({"updatedByAgencyReference": "psap"}, "invalid-field", "/updatedByAgencyReference"),
        ({"incidentComponent": []}, "invalid-field", "/incidentComponent"),
        ({"incidentComponent": {}}, "missing-field",
         "/incidentComponent/incidentTypeCommonRegistryText"),
        ({"incidentComponent": {"incidentTypeCommonRegistryText": ["EDP"]}}, "invalid-field",
         "/incidentComponent/incidentTypeCommonRegistryText"),
        ({"incidentComponent": {"incidentTypeCommonRegistryText": "EDP",
                                "incidentCommonPriorityNumber": "2"}},
         "invalid-field", "/incidentComponent/incidentCommonPriorityNumber"),
        ({"incidentComponent": {"incidentTypeCommonRegistryText": "EDP",
                                "incidentCommonPriorityNumber": True}},
         "invalid-field", "/incidentComponent/incidentCommonPriorityNumber"),
        ({"incidentComponent": {"incidentTypeCommonRegistryText": "EDP",
                                "incidentStatusCommonRegistryText": ["Active", 3]}},
         "invalid-field", "/incidentComponent/incidentStatusCommonRegistryText/1"),
        ({"incidentComponent": {"incidentTypeCommonRegistryText": "EDP",
                                "dispositionComponent": [{"dispositionDescriptionText": "x"}]}},
         "missing-field",
         "/incidentComponent/dispositionComponent/0/dispositionCommonRegistryCode"),
        ({"callComponent": [{"callStartTimestamp": "noon"}]}, "invalid-field",
         "/callComponent/0/callStartTimestamp"),
        ({"locationComponent": [{"locationByValue": "<presence/>"}]}, "missing-field",
         "/locationComponent/0/locationTypeDescriptionRegistryText"),
        ({"locationComponent": [{"locationTypeDescriptionRegistryText": "Caller",
                                 "locationByValue": {"xml": 1}}]},
         "invalid-field", "/locationComponent/0/locationByValue"),
        ({"notesComponent": [{"lastUpdateTimeStamp": "2026-01-01T00:00:00Z"}]}, "missing-field",
         "/notesComponent/0/notesActionComments"),
        ({"notesComponent": [{"notesActionComments": "Testy McTestface"}]}, "missing-field",
         "/notesComponent/0/lastUpdateTimeStamp"),
        ({"notesComponent": [{"notesActionComments": ["x"],
                              "lastUpdateTimeStamp": "2026-01-01T00:00:00Z"}]},
         "invalid-field", "/notesComponent/0/notesActionComments"),
        ({"personComponent": [{}]}, "missing-field",
         "/personComponent/0/personIncidentRoleRegistryText"),
        ({"personComponent": [{"personIncidentRoleRegistryText": "Caller"}]}, "invalid-field",
         "/personComponent/0/personIncidentRoleRegistryText"),
        ({"personComponent": [{"personIncidentRoleRegistryText": [],
                               "ncPersonComponent": "Testy McTestface"}]},
         "invalid-field", "/personComponent/0/ncPersonComponent"),
        ({"personComponent": [{"personIncidentRoleRegistryText": [],
                               "ncPersonComponent": {"name": [42]}}]},
         "invalid-field", "/personComponent/0/ncPersonComponent/name/0"),
        ({"personComponent": [{"personIncidentRoleRegistryText": [],
                               "ncPersonComponent": {"mentalState": [{"value": 3}]}}]},
         "invalid-field", "/personComponent/0/ncPersonComponent/mentalState/0/value"),
        ({"personComponent": [{"personIncidentRoleRegistryText": [],
                               "ncPersonComponent": {"homeContactInformation": ["555-555-0142"]}}]},
         "invalid-field", "/personComponent/0/ncPersonComponent/homeContactInformation/0"),
        ({"personComponent": [{"personIncidentRoleRegistryText": [],
                               "ncPersonComponent": {"mentalState": [[[[[[[[[["x"]]]]]]]]]]}}]},
         "invalid-field", "/personComponent/0/ncPersonComponent/mentalState" + "/0" * 10),
        ({"emergencyResourceComponent": [{"primaryUnitStatusRegistryText": "Available"}]},
         "missing-field", "/emergencyResourceComponent/0"),
        ({"emergencyResourceComponent": [{"$id": "x",
                                          "secondaryUnitStatusRegistryText": "OnScene"}]},
         "invalid-field", "/emergencyResourceComponent/0/secondaryUnitStatusRegistryText"),
        ({"cautionComponent": [{"cautionSeverity": "high"}]}, "missing-field",
         "/cautionComponent/0"),
        ({"cautionComponent": [{"cautionTypeInternalText": 5}]}, "invalid-field",
         "/cautionComponent/0/cautionTypeInternalText"),
    ],
)  # fmt: skip
def test_rejections(change: dict[str, Any], code: str, where: str) -> None:
    doc = minimal()
    for key, value in change.items():
        if value is DROP:
            del doc[key]
        else:
            doc[key] = value
    err = rejected(json.dumps(doc).encode())  # ASCII escapes: lone surrogates survive
    assert (err.code, err.where) == (code, where)


def test_reasons_never_quote_content() -> None:
    doc = fixture("bh-open.json")
    probes: list[Any] = [{"value": "Testy McTestface"}, ["555-0142"], "Imaginary"]
    for path in paths(doc):
        for probe in probes:
            try:
                parse(replaced(doc, path, probe))
            except RejectedMessage as err:
                assert_no_phi(str(err))
                assert_no_phi(json.dumps(err.as_json()))


# --- the writer --------------------------------------------------------------------------------


def expected_back(snap: Snapshot) -> Snapshot:
    """What EIDO can carry of ``snap``."""
    closed_at = None
    if snap.status is IncidentStatus.CLOSED:
        closed_at = snap.closed_at or snap.updated_at
    cautions = tuple(replace(c, severity=c.severity or "normal") for c in snap.cautions)
    return replace(
        snap, agency=snap.agency or DEFAULT_AGENCY_ID, closed_at=closed_at, cautions=cautions
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots())
def test_round_trip(snap: Snapshot) -> None:
    body = json.dumps(eido_document(snap)).encode()
    assert FORMAT.parse(body) == expected_back(snap)


@pytest.mark.parametrize("name", VALID)
def test_fixture_snapshots_round_trip_through_the_writer(name: str) -> None:
    snap = FORMAT.parse(fixture_bytes(name))
    again = parse(eido_document(snap))
    assert again == snap


def test_writer_is_deterministic_and_uses_agency_id() -> None:
    snap = FORMAT.parse(fixture_bytes("bh-close.json"))
    one = eido_document(snap, agency_id="psap.test.invalid")
    assert one == eido_document(snap, agency_id="psap.test.invalid")
    assert one["updatedByAgencyReference"] == {"$ref": "psap.test.invalid"}
    assert one["eidoVersion"] == "1.0"
    assert [a["$id"] for a in one["agencyComponent"]] == [
        "police.lakeview.invalid",
        "psap.test.invalid",
    ]
    assert all(":psap.test.invalid" in c["$id"] for c in one["notesComponent"])


def test_writer_needs_an_apco_type_for_incident_data() -> None:
    snap = Snapshot("i", datetime(2026, 1, 1, tzinfo=UTC), call_type="WELFARE CHECK")
    with pytest.raises(ValueError, match="apco_type"):
        eido_document(snap)
    bare = Snapshot("i", datetime(2026, 1, 1, tzinfo=UTC))
    assert "incidentComponent" not in eido_document(bare)


def test_text_to_html_escapes() -> None:
    assert text_to_html('a < b & "c"\nnext') == "a &lt; b &amp; &quot;c&quot;<br>next"


# shared/ lies beside the checkout, for developers and CI alike.
SCHEMA = Path(__file__).resolve().parents[3] / "shared" / "reference" / "nena" / "eido-openapi.yaml"


@pytest.mark.skipif(not SCHEMA.exists(), reason="NENA EIDO schema (reference copy) not present")
@settings(max_examples=25, deadline=None)
@given(snapshots(known_units=True))
def test_writer_output_validates_against_the_nena_schema(snap: Snapshot) -> None:
    validator = _eido_validator()
    errors = sorted(validator.iter_errors(eido_document(snap)), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:3]]


_validator_cache: list[Any] = []


def _without_niem(node: Any) -> Any:
    """The schema with its NIEM component references (files not in the reference copy)
    replaced by "anything"."""
    if isinstance(node, dict):
        if str(node.get("$ref", "")).startswith("NIEMComponents/"):
            return {}
        return {k: _without_niem(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_without_niem(v) for v in node]
    return node


def _eido_validator() -> Any:
    if _validator_cache:
        return _validator_cache[0]
    import yaml
    from jsonschema import Draft4Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    spec = _without_niem(yaml.safe_load(SCHEMA.read_text()))
    registry: Registry[Any] = Registry().with_resource(
        "urn:eido", Resource.from_contents(spec, default_specification=DRAFT4)
    )
    schema = {"$ref": "urn:eido#/components/schemas/EmergencyIncidentDataObjectType"}
    validator = Draft4Validator(schema, registry=registry)
    _validator_cache.append(validator)
    return validator


# --- fuzzing: only RejectedMessage escapes -----------------------------------------------------


def only_rejections(message: bytes) -> None:
    try:
        FORMAT.parse(message)
    except RejectedMessage as err:
        assert err.code in {
            "malformed-json", "bad-encoding", "bad-pidf-lo", "missing-field", "invalid-field",
            "unsupported",
        }  # fmt: skip
        assert_no_phi(str(err))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(message: bytes) -> None:
    only_rejections(message)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_random_json(value: Any) -> None:
    only_rejections(json.dumps(value).encode())


@settings(max_examples=200, deadline=None)
@given(json_values, st.data())
def test_fuzz_random_json_at_eido_keys(value: Any, data: st.DataObject) -> None:
    doc = fixture(data.draw(st.sampled_from(VALID)))
    path = data.draw(st.sampled_from(paths(doc)[1:]))
    only_rejections(encode(replaced(doc, path, value)))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_fixtures(data: st.DataObject) -> None:
    doc: Any = fixture(data.draw(st.sampled_from(VALID)))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths(doc)[1:]))
        action = data.draw(st.sampled_from(["drop", "swap", "empty"]))
        if action == "drop":
            doc = replaced(doc, path, DROP)
        elif action == "swap":
            doc = replaced(doc, path, data.draw(st.sampled_from([None, 0, 1.5, True, "", [], {}])))
        else:
            doc = replaced(doc, path, "" if data.draw(st.booleans()) else [{}])
    only_rejections(encode(doc))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_truncated_and_flipped_bytes(data: st.DataObject) -> None:
    raw = bytearray(fixture_bytes(data.draw(st.sampled_from(VALID))))
    cut = data.draw(st.integers(0, len(raw)))
    raw = raw[:cut]
    for _ in range(data.draw(st.integers(0, 3))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    only_rejections(bytes(raw))


# --- fast paths give the same answers as the checked ones --------------------------------------


def _with_person(nc: dict[str, Any]) -> dict[str, Any]:
    return minimal(
        personComponent=[{"personIncidentRoleRegistryText": ["Patient"], "ncPersonComponent": nc}]
    )


def test_non_ascii_niem_text_is_read() -> None:
    nc = {"name": [{"personFullName": [{"value": " Sào Tëst "}]}], "mentalState": ["Ängstlich"]}
    person = parse(_with_person(nc)).persons[0]
    assert (person.name, person.mental_state) == ("Sào Tëst", "Ängstlich")


@pytest.mark.parametrize(
    ("nc", "where"),
    [
        ({"name": [{"personFullName": [{"value": "a\ud800"}]}]},
         "/name/0/personFullName/0/value"),
        ({"birthDate": [{"date": [{"value": "1990\x00"}]}]}, "/birthDate/0/date/0/value"),
        ({"mentalState": ["calm", {"value": ["x\udfff"]}]}, "/mentalState/1/value/0"),
    ],
)  # fmt: skip
def test_bad_characters_deep_in_niem_values_are_pointed_at(nc: dict[str, Any], where: str) -> None:
    err = rejected(json.dumps(_with_person(nc)).encode())
    person = "/personComponent/0/ncPersonComponent"
    assert (err.code, err.where) == ("invalid-field", person + where)


def test_repeated_timestamps_and_locations_parse_the_same_and_fail_in_place() -> None:
    doc = located("CurrentIncident")
    doc["notesComponent"] = [
        {"notesActionComments": "a", "lastUpdateTimeStamp": "2026-03-14T21:00:00Z"},
        {"notesActionComments": "b", "lastUpdateTimeStamp": "2026-03-14T21:00:00Z"},
    ]
    assert parse(doc) == parse(json.loads(json.dumps(doc)))
    doc["notesComponent"][1]["lastUpdateTimeStamp"] = "2026-13-14T21:00:00Z"
    for _ in range(2):  # a rejected value is not remembered as good
        err = rejected(encode(doc))
        assert (err.code, err.where) == ("invalid-field", "/notesComponent/1/lastUpdateTimeStamp")
    doc["notesComponent"].pop()
    doc["locationComponent"].append(
        {"locationTypeDescriptionRegistryText": "Caller", "locationByValue": "<presence/>"}
    )
    doc["locationComponent"][0]["locationTypeDescriptionRegistryText"] = "Staging"
    err = rejected(encode(doc))
    assert (err.code, err.where) == ("bad-pidf-lo", "/locationComponent/1/locationByValue")


def test_multi_line_and_single_line_notes() -> None:
    texts = ["  one   line  ", "two\r\n\n  lines ", " \u2028 "]
    doc = minimal(
        notesComponent=[
            {"notesActionComments": text, "lastUpdateTimeStamp": f"2026-03-14T21:0{i}Z"}
            for i, text in enumerate(texts)
        ]
    )
    assert parse(doc).narrative == "one line\ntwo\nlines"
