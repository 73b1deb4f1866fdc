"""EIDO unit locations and statuses: which unit is where and since when, what status the CAD
gave it and when, every rejection with its pointer, and fuzzing (random bytes, random JSON, and
the real sample with any value replaced)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from corespond.adapters.eido import snapshot_from_eido
from corespond.adapters.eido_units import (
    NONE,
    UnitLocations,
    UnitStatus,
    unit_locations,
    unit_locations_of_message,
)
from corespond.adapters.pidflo import pidf_lo_document
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import GeoPoint, Location

SAMPLE = Path(__file__).parent.parent / "fixtures" / "eido" / "bh-update.json"
CR12_LOC = "urn:emergency:uid:eidodatacomponent:loc-unit-cr12:psap.lakeview.invalid"
P2A31_LOC = "urn:emergency:uid:eidodatacomponent:loc-unit-2a31:psap.lakeview.invalid"


def unit_location(
    location_id: str, lat: float, lon: float, stamp: str | None = "2026-03-14T21:12:30-05:00"
) -> dict[str, Any]:
    component: dict[str, Any] = {
        "$id": location_id,
        "updatedByAgencyReference": {"$ref": "police.lakeview.invalid"},
        "locationTypeDescriptionRegistryText": "UnitLocation",
        "locationByValue": pidf_lo_document(Location(GeoPoint(lat, lon))),
    }
    if stamp is not None:
        component["lastUpdateTimeStamp"] = stamp
    return component


def eido_with_units() -> dict[str, Any]:
    """The sample EIDO, its two units (CR-12, 2A31) placed by UnitLocation components."""
    doc: dict[str, Any] = json.loads(SAMPLE.read_text())
    doc["locationComponent"] += [
        unit_location(CR12_LOC, 41.8801, -87.6302),
        unit_location(P2A31_LOC, 41.89, -87.64, stamp=None),
    ]
    cr12, p2a31 = doc["emergencyResourceComponent"]
    cr12["unitLocationReference"] = {"$ref": CR12_LOC}
    p2a31["unitLocationReference"] = {"$ref": P2A31_LOC}
    return doc


def message(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_each_unit_with_its_position_and_the_time_the_eido_gives() -> None:
    found = unit_locations_of_message(message(eido_with_units()))
    assert found.problems == ()
    cr12, p2a31 = found.fixes
    assert (cr12.unit, cr12.latitude, cr12.longitude) == ("CR-12", 41.8801, -87.6302)
    assert cr12.fixed_at == datetime(2026, 3, 15, 2, 12, 30, tzinfo=UTC)  # the location's time
    assert cr12.where == "/emergencyResourceComponent/0"
    # No time on the location: the resource's lastUpdateTimeStamp.
    assert p2a31.unit == "2A31"
    assert p2a31.fixed_at == datetime(2026, 3, 15, 2, 11, 4, 917000, tzinfo=UTC)


def test_the_eidos_own_time_when_neither_component_has_one() -> None:
    doc = eido_with_units()
    del doc["emergencyResourceComponent"][1]["lastUpdateTimeStamp"]
    (_, p2a31) = unit_locations(doc).fixes
    assert p2a31.fixed_at == snapshot_from_eido(doc).updated_at


def test_the_incident_is_read_as_before() -> None:
    plain = snapshot_from_eido(json.loads(SAMPLE.read_text()))
    assert snapshot_from_eido(eido_with_units()) == plain  # a unit's location is not the call's


def test_no_reference_no_point_or_no_marker_give_nothing() -> None:
    assert unit_locations_of_message(SAMPLE.read_bytes()) is NONE  # no unitLocationReference
    plain = unit_locations(json.loads(SAMPLE.read_text()))
    assert (plain.fixes, plain.problems) == ((), ())
    doc = eido_with_units()
    doc["locationComponent"][-2]["locationByValue"] = pidf_lo_document(
        Location(address="1 Synthetic Way", city="Testville")
    )
    del doc["locationComponent"][-1]["locationByValue"]  # by reference only
    found = unit_locations(doc)
    assert (found.fixes, found.problems) == ((), ())


SAMPLE_TIME = datetime(2026, 3, 15, 2, 11, 4, 917000, tzinfo=UTC)


def test_each_units_status_is_its_last_secondary_word_at_the_resources_time() -> None:
    doc = json.loads(SAMPLE.read_text())
    # Not read unless asked: most EIDOs name no unit anybody rides as.
    assert unit_locations_of_message(message(doc)) is NONE
    found = unit_locations_of_message(message(doc), statuses=True)
    assert found.statuses == (
        UnitStatus("CR-12", "EnRoute", SAMPLE_TIME, None, "/emergencyResourceComponent/0"),
        UnitStatus("2A31", "EnRoute", SAMPLE_TIME, None, "/emergencyResourceComponent/1"),
    )
    cr12, p2a31 = doc["emergencyResourceComponent"]
    cr12.update(secondaryUnitStatusRegistryText=[], primaryUnitStatusRegistryText="Available",
                lastUpdateTimeStamp="2026-03-14T21:30:00-05:00", activeOnIncidentId="urn:x")
    del p2a31["secondaryUnitStatusRegistryText"], p2a31["primaryUnitStatusRegistryText"]
    del p2a31["lastUpdateTimeStamp"]
    [status] = unit_locations(doc).statuses  # 2A31 has no status: none, and no error
    assert (status.unit, status.status, status.active_on) == ("CR-12", "Available", "urn:x")
    assert status.at == datetime(2026, 3, 15, 2, 30, tzinfo=UTC)
    del cr12["lastUpdateTimeStamp"]  # the EIDO's own time
    assert unit_locations(doc).statuses[0].at == SAMPLE_TIME


def test_a_bad_unit_is_a_problem_with_its_pointer_and_the_others_still_count() -> None:
    doc = eido_with_units()
    doc["locationComponent"][-2]["locationByValue"] = "<presence"
    found = unit_locations(doc)
    (problem,) = found.problems
    assert problem.code == "bad-pidf-lo"
    assert problem.where == "/locationComponent/3/locationByValue"
    assert [f.unit for f in found.fixes] == ["2A31"]


def test_every_rejection_names_where() -> None:
    cases: list[tuple[Any, str, str]] = [
        (lambda d: d["emergencyResourceComponent"][0].update(unitLocationReference="x"),
         "invalid-field", "/emergencyResourceComponent/0/unitLocationReference"),
        (lambda d: d["emergencyResourceComponent"][0].update(unitLocationReference={}),
         "missing-field", "/emergencyResourceComponent/0/unitLocationReference/$ref"),
        (lambda d: d["emergencyResourceComponent"][0].update(
            unitLocationReference={"$ref": "urn:nowhere"}),
         "invalid-field", "/emergencyResourceComponent/0/unitLocationReference/$ref"),
        (lambda d: d["emergencyResourceComponent"][0].update(emergencyResourceName=7),
         "invalid-field", "/emergencyResourceComponent/0/emergencyResourceName"),
        (lambda d: d["emergencyResourceComponent"][0].update(emergencyResourceName="U" * 65),
         "invalid-field", "/emergencyResourceComponent/0/emergencyResourceName"),
        (lambda d: d["locationComponent"][3].update(lastUpdateTimeStamp="yesterday"),
         "invalid-field", "/locationComponent/3/lastUpdateTimeStamp"),
        (lambda d: d["emergencyResourceComponent"][0].update(emergencyResourceName="A\x00"),
         "invalid-field", "/emergencyResourceComponent/0/emergencyResourceName"),
        (lambda d: d["emergencyResourceComponent"][0].update(secondaryUnitStatusRegistryText="x"),
         "invalid-field", "/emergencyResourceComponent/0/secondaryUnitStatusRegistryText"),
        (lambda d: d["emergencyResourceComponent"][0].update(
            secondaryUnitStatusRegistryText=["EnRoute", 3]),
         "invalid-field", "/emergencyResourceComponent/0/secondaryUnitStatusRegistryText/1"),
        (lambda d: d["emergencyResourceComponent"][0].update(
            secondaryUnitStatusRegistryText=["S" * 65]),
         "invalid-field", "/emergencyResourceComponent/0/secondaryUnitStatusRegistryText"),
        (lambda d: d["emergencyResourceComponent"][0].update(activeOnIncidentId=["urn:x"]),
         "invalid-field", "/emergencyResourceComponent/0/activeOnIncidentId"),
        (lambda d: d["emergencyResourceComponent"][0].update(lastUpdateTimeStamp="soon"),
         "invalid-field", "/emergencyResourceComponent/0/lastUpdateTimeStamp"),
    ]  # fmt: skip
    for change, code, where in cases:
        doc = eido_with_units()
        change(doc)
        found = unit_locations(doc)
        assert [(p.code, p.where) for p in found.problems] == [(code, where)], where
        assert [f.unit for f in found.fixes] == ["2A31"]
        assert [s.unit for s in found.statuses] == ["2A31"]
    for whole, where in (
        ({"emergencyResourceComponent": {}, "x": MARKER_TEXT}, "/emergencyResourceComponent"),
        ({"locationComponent": [3]}, "/locationComponent/0"),
        ({"lastUpdateTimeStamp": 5}, "/lastUpdateTimeStamp"),
    ):
        (problem,) = unit_locations(whole).problems
        assert problem.where == where
    (problem,) = unit_locations_of_message(b'{"unitLocationReference": ').problems
    assert problem.code == "malformed-json"
    (problem,) = unit_locations_of_message(b'["unitLocationReference"]').problems
    assert (problem.code, problem.where) == ("invalid-field", "/")


MARKER_TEXT = "unitLocationReference"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)  # fmt: skip


def _paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*at, i))
    return out


BASE = eido_with_units()
PATHS = [p for p in _paths(BASE) if p]


def _check(found: UnitLocations) -> None:
    assert isinstance(found, UnitLocations)
    for problem in found.problems:
        assert problem.code and problem.reason
    for fix in found.fixes:
        assert -90 <= fix.latitude <= 90 and -180 <= fix.longitude <= 180
        assert fix.fixed_at.tzinfo is not None and 0 < len(fix.unit) <= 64
    for status in found.statuses:
        assert 0 < len(status.unit) <= 64 and 0 < len(status.status) <= 64
        assert status.at is None or status.at.tzinfo is not None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PATHS), json_values)
def test_fuzz_the_sample_with_any_value_replaced(path: tuple[Any, ...], value: Any) -> None:
    doc = copy.deepcopy(BASE)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    _check(unit_locations_of_message(message(doc), statuses=True))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check(unit_locations_of_message(b'{"unitLocationReference":' + data))
    _check(unit_locations_of_message(data, statuses=True))


RESOURCE_KEYS = ["emergencyResourceName", "$id", "primaryUnitStatusRegistryText",
                 "secondaryUnitStatusRegistryText", "lastUpdateTimeStamp", "activeOnIncidentId"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(RESOURCE_KEYS), json_values | st.lists(
    st.sampled_from(["EnRoute", "OnScene", "", " ", "\x00"]), max_size=3), max_size=6),
    max_size=3))  # fmt: skip
def test_fuzz_random_resources(resources: list[dict[str, Any]]) -> None:
    _check(unit_locations({"emergencyResourceComponent": resources}))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([
    "emergencyResourceComponent", "locationComponent", "lastUpdateTimeStamp", "$id",
]), json_values, max_size=4))  # fmt: skip
def test_fuzz_random_documents(doc: dict[str, Any]) -> None:
    _check(unit_locations(doc))


_STATUS_WORDS = st.sampled_from(["EnRoute", "OnScene", "Available", "", " ", " Cleared "])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({"emergencyResourceName": st.sampled_from(["CR-12", "2A31"])},
    optional={
        "primaryUnitStatusRegistryText": _STATUS_WORDS | json_values,
        "secondaryUnitStatusRegistryText": st.lists(_STATUS_WORDS, max_size=3) | json_values,
    }), max_size=3))  # fmt: skip
def test_statuses_follow_the_incident_parses_rule(resources: list[dict[str, Any]]) -> None:
    # Whatever the incident parse accepts, the unit reader gives each resource the status the
    # parsed snapshot's unit has (one rule, eido.unit_status), or none where the unit has none.
    doc: dict[str, Any] = json.loads(SAMPLE.read_text())
    doc["emergencyResourceComponent"] = resources
    try:
        json.dumps(resources, allow_nan=False)
    except ValueError:
        return  # an infinite float: no JSON message carries one (both readers refuse it)
    try:
        units = snapshot_from_eido(copy.deepcopy(doc)).units
    except RejectedMessage:
        return
    found = unit_locations_of_message(message(doc), statuses=True)
    assert not found.problems
    by_where = {s.where: s.status for s in found.statuses}
    expected = {f"/emergencyResourceComponent/{i}": u.status for i, u in enumerate(units)}
    assert by_where == {w: s for w, s in expected.items() if s is not None}
