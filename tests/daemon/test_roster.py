"""The roster: zones (holes, multipolygons), on-call schedules across DST, and precise errors."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from corespond.daemon.dispatcher import Fix
from corespond.daemon.roster import RosterError, load_roster, parse_roster

FIXTURES = Path(__file__).parent.parent / "fixtures" / "paging"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def roster():  # type: ignore[no-untyped-def]
    return load_roster(FIXTURES / "roster.yaml")


def test_clinicians_and_programs(roster) -> None:  # type: ignore[no-untyped-def]
    assert list(roster.programs) == ["metro", "county"]
    one = roster.clinicians["c-101"]
    assert one.program == "metro" and one.skills == {"adult"}
    assert [e.gateway for e in one.endpoints] == ["wctp", "sms"]  # in order of preference
    assert "Test Clinician" not in repr(one)  # display names stay out of reprs (and logs)
    metro = roster.programs["metro"]
    assert [s.action for s in metro.escalation] == ["page", "page", "supervisor", "dispatch"]
    assert metro.supervisors[0].clinician_id == "s-900"
    assert metro.supervisors[1].endpoint is not None


def test_zones_with_holes_and_multipolygons(roster) -> None:  # type: ignore[no-untyped-def]
    metro, county = roster.programs["metro"], roster.programs["county"]
    assert metro.covers(30.25, -97.75)
    assert not metro.covers(30.30, -97.70)  # in the hole
    assert metro.covers(30.28, -97.70)  # on the hole's edge: counts as covered
    assert not metro.covers(30.50, -97.75)
    assert county.covers(30.1, -98.0) and county.covers(30.1, -97.4)  # both parts
    assert not county.covers(30.1, -97.7)  # between them
    assert [p.id for p in roster.programs_covering(30.25, -97.75)] == ["metro"]
    # The last point's answer is kept: asked again, about others and back, each its own.
    for lat, lon, ids in [
        (30.25, -97.75, ["metro"]), (30.30, -97.70, []), (30.1, -98.0, ["county"]),
        (30.1, -98.0, ["county"]), (30.25, -97.75, ["metro"]),
    ]:  # fmt: skip
        found = roster.programs_covering(lat, lon)
        assert [p.id for p in found] == ids
        found.clear()  # the caller's own list


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        # Saturday 7 March, 07:30 CST: before the day shift; county's Friday night shift runs.
        ("2026-03-07T13:30", {"c-201", "s-900"}),
        ("2026-03-07T14:30", {"c-101", "c-102", "s-900"}),  # 08:30 CST
        # Monday 9 March, after the switch to CDT on the 8th: 13:30 UTC is 08:30 local.
        ("2026-03-09T13:30", {"c-101", "c-102", "s-900"}),
        ("2026-03-09T12:30", {"s-900"}),  # 07:30 CDT: not yet (Sunday-night shift is off)
        ("2026-03-10T15:00", {"s-900"}),  # EXDATE: no day shift on the 10th
        ("2026-03-11T15:00", {"s-900"}),  # overridden to start at noon...
        ("2026-03-11T17:30", {"c-103", "s-900"}),  # ...with a different clinician
        ("2026-03-10T02:00", {"c-201", "s-900"}),  # Monday 21:00 CDT: county night shift
    ],
)
def test_on_call_across_dst_with_overrides(roster, moment: str, expected: set[str]) -> None:  # type: ignore[no-untyped-def]
    assert roster.on_call(utc(moment)) == expected
    # The dispatcher's arrays say the same.
    table = roster.table
    assert set(table.ids[table.on_call(utc(moment))].tolist()) == expected


@given(st.data())
def test_positions_since_are_the_positions_of_the_new_fixes(roster, data) -> None:  # type: ignore[no-untyped-def]
    """The positions kept from the last read, updated for the Fix objects that changed, are
    those made from the new fixes alone; unchanged ones are the very same objects."""
    table = roster.table
    ids = [*roster.clinicians, "not-in-roster"]
    at = utc("2026-03-09T15:00:00")

    def fix(n: int) -> Fix:
        return Fix(30.0 + n / 100, -97.0 - n / 100, at + timedelta(seconds=n))

    old = {cid: fix(n) for n, cid in enumerate(ids) if data.draw(st.booleans())}
    new = {
        cid: (fix(n + 50) if data.draw(st.booleans()) else f)
        for n, (cid, f) in enumerate(old.items())
        if data.draw(st.integers(0, 9))  # now and then one the new read lacks
    }
    new |= {cid: fix(n + 99) for n, cid in enumerate(ids) if data.draw(st.integers(0, 4)) == 0}
    before = table.positions(old)
    since = table.positions_since(before, old, new)
    expected = table.positions(new)
    for name in ("has_fix", "lat", "lon", "fixed_at"):
        assert np.array_equal(getattr(since, name), getattr(expected, name), equal_nan=True)
    if new == old and all(new[cid] is old[cid] for cid in old):
        assert since is before
    assert np.array_equal(before.lat, table.positions(old).lat, equal_nan=True)  # untouched


def write_roster(tmp_path: Path, text: str) -> Path:
    for name in ("metro.ics", "metro.geojson"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    path = tmp_path / "roster.yaml"
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(RosterError) as caught:
        load_roster(path)
    return [str(p) for p in caught.value.problems]


def test_an_unquoted_phone_number_is_never_repeated_in_a_problem(tmp_path: Path) -> None:
    """YAML reads +15550001234 as a number; the problem says to quote it without quoting it
    (roster problems reach the log on a SIGHUP reload)."""
    path = write_roster(
        tmp_path,
        """\
clinicians:
  - id: c-1
    name: Test Person
    program: metro
    endpoints: [{gateway: sms, address: +15550001234}]
programs:
  - id: metro
    zones: [{file: metro.geojson}]
""",
    )
    [problem] = problems_of(path)
    assert "clinicians[0].endpoints[0].address" in problem and "in quotes" in problem
    assert "5550001234" not in problem


def test_every_problem_with_file_and_line(tmp_path: Path) -> None:
    path = write_roster(
        tmp_path,
        """\
clinicians:
  - id: c-1
    name: Test Person
    program: nowhere
    endpoints: [{gateway: wctp, address: "1"}]
  - id: c-1
    name: Test Person Again
    program: metro
    endpoints: [{gateway: wctp, address: "2"}]
programs:
  - id: metro
    zones:
      - {type: Polygon, coordinates: [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}
      - file: missing.geojson
    supervisors: [c-9]
    escalation: [{action: page, wait_minutes: -1}]
""",
    )
    found = problems_of(path)
    assert (
        f"{path}:16: at 'programs[0].escalation[0].wait_minutes': must be at least 0; got -1"
        in found
    )
    assert len(found) == 1  # the schema error stops the rest; fix it and see them all
    path.write_text(path.read_text().replace("wait_minutes: -1", "wait_minutes: 1"))
    found = problems_of(path)
    assert f"{path}:4: at 'clinicians[0].program': there is no program 'nowhere'" in found
    assert f"{path}:6: at 'clinicians[1].id': clinician id 'c-1' is used twice" in found
    assert any(
        p.startswith(f"{path}:13: at 'programs[0].zones[0]': the Polygon is invalid") for p in found
    )
    assert any("missing.geojson cannot be read" in p and ":14:" in p for p in found)
    assert f"{path}:15: at 'programs[0].supervisors[0]': there is no clinician 'c-9'" in found
    assert not any("Test Person" in p or "address" in p for p in found)


def test_bad_calendar_and_unknown_ids(tmp_path: Path) -> None:
    path = write_roster(
        tmp_path,
        """\
clinicians:
  - {id: c-101, name: A, program: metro, endpoints: [{gateway: w, address: "1"}]}
programs:
  - id: metro
    zones: [{file: metro.geojson}]
    on_call: {ical: [metro.ics, broken.ics]}
""",
    )
    (tmp_path / "broken.ics").write_text("BEGIN:VCALENDAR\nBEGIN:VEVENT\nDTSTART:garbage\n")
    found = problems_of(path)
    assert any("unknown clinician ids ['c-102']" in p for p in found)
    assert any(
        p.startswith(f"{tmp_path / 'broken.ics'}: not a valid iCalendar file") for p in found
    )


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_any_text_is_a_roster_or_a_roster_error(text: str) -> None:
    try:
        parse_roster(text, FIXTURES / "fuzz.yaml")
    except RosterError as err:
        assert err.problems


geo_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(["type", "coordinates", "features", "geometry", "Polygon"]),
            inner,
            max_size=3,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300)
@given(geo_values, st.sampled_from(["Polygon", "MultiPolygon", "Feature", "FeatureCollection"]))
@example({"features": []}, "FeatureCollection")  # found by hypothesis: no zone, no problem
def test_any_geojson_is_zones_or_problems(value: object, kind: str) -> None:
    from corespond.daemon.roster import _Problems, geometries_of_geojson

    if isinstance(value, dict):
        value = {**value, "type": kind}
    problems = _Problems(Path("zone.geojson"), None)
    zones = geometries_of_geojson(value, Path("zone.geojson"), problems)
    assert zones or problems.items


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_calendar_bytes_are_a_calendar_or_a_problem(data: bytes) -> None:
    from corespond.daemon.roster import _Problems, parse_ical

    problems = _Problems(Path("x.ics"), None)
    calendar = parse_ical(b"BEGIN:VCALENDAR\r\n" + data, Path("x.ics"), problems)
    assert (calendar is None) == bool(problems.items)
