"""corespond incident JSON lines: splitting, parsing, precise errors, round trips, fuzzing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corespond.adapters.corespond_json import CorespondJsonFormat
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
    format_time,
    snapshot_to_json,
)

FMT = CorespondJsonFormat()
OPENED = datetime(2026, 3, 14, 21, 2, 11, tzinfo=UTC)
SNAPSHOT = Snapshot(
    incident_id="urn:emergency:uid:incidentid:581204:psap.demo.invalid",
    updated_at=OPENED + timedelta(minutes=6),
    incident_number="26-004471",
    call_type="EMOTIONALLY DISTURBED PERSON",
    call_type_code="EDP",
    apco_type="EDP",
    priority="2",
    agency="police.demo.invalid",
    zone="D2",
    opened_at=OPENED,
    location=Location(GeoPoint(40.012345, -105.281234), "1428 Imaginary Ave", "Demoville", "CO"),
    units=(Unit("CR12", "CrisisInterventionUnit", "EnRoute"),),
    cautions=(Caution("Weapon", "high"),),
    dispositions=(Disposition("15", "Referred to partner agency"),),
    notes=(Note("RP states son hearing voices, holding a kitchen knife", OPENED),),
    persons=(Person(("Caller",), "Testy McTestface", "1961-07-04", "303-555-0142", "anxious"),),
)
LINE = json.dumps(snapshot_to_json(SNAPSHOT)).encode()


def rejected(message: bytes) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as info:
        FMT.parse(message)
    err = info.value
    for secret in (b"McTestface", b"555-0142", b"kitchen", b"Imaginary"):
        assert secret.decode() not in str(err)
    return err


def test_name() -> None:
    assert FMT.name == "jsonl"


def test_parse_one_line() -> None:
    assert FMT.parse(LINE) == SNAPSHOT


@pytest.mark.parametrize(
    ("payload", "lines"),
    [
        (b"", []),
        (b"\n\n \r\n\t\n", []),
        (b"a", [b"a"]),
        (b"a\nb\n", [b"a", b"b"]),
        (b"a\r\nb\r\n", [b"a", b"b"]),
        (b"a\n\n  \nb", [b"a", b"b"]),
        (b"\xef\xbb\xbfa\nb", [b"a", b"b"]),
        (b"a\rb\n", [b"a\rb"]),  # a lone CR is not a line end
    ],
)
def test_split(payload: bytes, lines: list[bytes]) -> None:
    assert FMT.split(payload) == lines


def test_split_then_parse_each_line_on_its_own() -> None:
    other = json.dumps(snapshot_to_json(SNAPSHOT) | {"id": "urn:x:2"}).encode()
    payload = LINE + b"\r\n" + b'{"id": "broken"\r\n' + b"\r\n" + other + b"\r\n"
    results: list[Any] = []
    for line in FMT.split(payload):
        try:
            results.append(FMT.parse(line).incident_id)
        except RejectedMessage as err:
            results.append(err.code)
    assert results == [SNAPSHOT.incident_id, "malformed-json", "urn:x:2"]


def test_pretty_printed_object_is_one_message() -> None:
    assert FMT.parse(json.dumps(snapshot_to_json(SNAPSHOT), indent=2).encode()) == SNAPSHOT


def test_bom_is_ignored() -> None:
    assert FMT.parse(b"\xef\xbb\xbf" + LINE) == SNAPSHOT


@pytest.mark.parametrize(
    ("message", "code", "where"),
    [
        (b'{"id": "Testy McTestface \xff"}', "bad-encoding", "byte 26"),
        (b"not json", "malformed-json", "line 1, column 1"),
        (b'{"id": "x", "updated_at": }', "malformed-json", "line 1, column 27"),
        (b'{"id": "x", "updated_at": "2026-03-14T21:02:11Z", "priority": NaN}',
         "malformed-json", None),
        (b'{"id": "x", "id": "y", "updated_at": "2026-03-14T21:02:11Z"}', "malformed-json", None),
        (b"[" * 100_000 + b"]" * 100_000, "malformed-json", None),
        (b'{"id": ' + b"9" * 5000 + b"}", "malformed-json", None),
        (b'{"updated_at": "2026-03-14T21:02:11Z"}', "missing-field", "/id"),
        (b'{"id": "x"}', "missing-field", "/updated_at"),
        (b'{"id": "x", "updated_at": "14/03/2026"}', "invalid-field", "/updated_at"),
        (b'{"id": "x", "updated_at": "2026-03-14T21:02:11Z", "status": "open"}', "invalid-field",
         "/status"),
        (b'{"id": "x", "updated_at": "2026-03-14T21:02:11Z", "caller": "Testy McTestface"}',
         "unknown-field", "/caller"),
        (b'{"id": "x", "updated_at": "2026-03-14T21:02:11Z", "location": {"lat": 1' + b"0" * 400
         + b', "lon": 1}}', "invalid-field", "/location"),
        (b'{"id": "x", "updated_at": "2026-03-14T21:02:11Z", "location": {"lat": 91, "lon": 1}}',
         "invalid-field", "/location"),
        (b'{"id": "x", "updated_at": "2026-03-14T21:02:11Z", "notes": [{"time": "2026-03-14"}]}',
         "missing-field", "/notes/0/text"),
        (b'["kitchen knife"]', "invalid-field", "/"),
        (b'"Testy McTestface"', "invalid-field", "/"),
    ],
)  # fmt: skip
def test_errors(message: bytes, code: str, where: str | None) -> None:
    err = rejected(message)
    assert (err.code, err.where) == (code, where)


# --- round trip ---------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30).map(str.strip)
NONEMPTY = TEXT.filter(bool)
MAYBE = st.none() | NONEMPTY
TIMES = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    location = draw(
        st.none()
        | st.builds(
            Location,
            point=st.none() | st.builds(GeoPoint, st.floats(-90, 90), st.floats(-180, 180)),
            address=MAYBE,
            city=MAYBE,
            state=MAYBE,
        )
    )
    return Snapshot(
        incident_id=draw(NONEMPTY),
        updated_at=draw(TIMES),
        status=draw(st.sampled_from(IncidentStatus)),
        incident_number=draw(MAYBE),
        call_type=draw(MAYBE),
        call_type_code=draw(MAYBE),
        apco_type=draw(MAYBE),
        priority=draw(MAYBE),
        agency=draw(MAYBE),
        zone=draw(MAYBE),
        opened_at=draw(st.none() | TIMES),
        closed_at=draw(st.none() | TIMES),
        location=location,
        units=tuple(draw(st.lists(st.builds(Unit, NONEMPTY, MAYBE, MAYBE), max_size=3))),
        cautions=tuple(draw(st.lists(st.builds(Caution, NONEMPTY, MAYBE), max_size=2))),
        dispositions=tuple(draw(st.lists(st.builds(Disposition, NONEMPTY, MAYBE), max_size=2))),
        notes=tuple(draw(st.lists(st.builds(Note, NONEMPTY, st.none() | TIMES), max_size=3))),
        persons=tuple(
            draw(
                st.lists(
                    st.builds(
                        Person, st.lists(TEXT, max_size=2).map(tuple), MAYBE, MAYBE, MAYBE, MAYBE
                    ),
                    max_size=2,
                )
            )
        ),
    )


@settings(max_examples=100, deadline=None)
@given(snapshots())
def test_round_trip(snap: Snapshot) -> None:
    line = json.dumps(snapshot_to_json(snap), ensure_ascii=False).encode()
    assert FMT.split(line + b"\r\n") == [line]
    assert FMT.parse(line) == snap


# --- fuzzing ------------------------------------------------------------------------------------


def parse_or_reject(message: bytes) -> None:
    try:
        FMT.parse(message)
    except RejectedMessage as err:
        assert "McTestface" not in str(err)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    parse_or_reject(data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=10,
)
KEYS = st.sampled_from([*sorted(snapshot_to_json(SNAPSHOT)), "lat", "lon", "text", "time"])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_field_values(data: st.DataObject) -> None:
    """Valid incidents with fields (top-level and nested) replaced by arbitrary JSON values."""
    obj = json.loads(LINE)
    for _ in range(data.draw(st.integers(1, 4))):
        target: Any = obj
        key = data.draw(KEYS)
        if isinstance(obj.get("location"), dict) and key in ("lat", "lon"):
            target = obj["location"]
        if key in ("text", "time") and isinstance(obj.get("notes"), list) and obj["notes"]:
            target = obj["notes"][0] if isinstance(obj["notes"][0], dict) else obj
        target[key] = data.draw(JSON_VALUES)
    parse_or_reject(json.dumps(obj).encode())


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fuzz_byte_mutations(data: st.DataObject) -> None:
    mutated = bytearray(LINE)
    for _ in range(data.draw(st.integers(1, 5))):
        if not mutated:
            break
        where = data.draw(st.integers(0, len(mutated) - 1))
        if data.draw(st.booleans()):
            mutated[where] = data.draw(st.integers(0, 255))
        else:
            del mutated[where : where + data.draw(st.integers(1, 20))]
    parse_or_reject(bytes(mutated))


def test_times_format_the_same_instant_the_same_way_every_time() -> None:
    new_york = ZoneInfo("America/New_York")
    # 01:30 happens twice on 2026-11-01 in New York; the two compare equal as datetimes.
    first = datetime(2026, 11, 1, 1, 30, tzinfo=new_york)
    second = first.replace(fold=1)
    assert first == second
    assert format_time(first) == "2026-11-01T05:30:00Z"
    assert format_time(second) == "2026-11-01T06:30:00Z"
    in_utc = datetime(2026, 11, 1, 5, 30, 0, 250000, tzinfo=UTC)
    assert [format_time(in_utc) for _ in range(2)] == ["2026-11-01T05:30:00.250000Z"] * 2
    assert format_time(in_utc.replace(tzinfo=None)) == "2026-11-01T05:30:00.250000Z"  # naive
    assert format_time(None) is None
