"""Shared builders for the EIDO and PIDF-LO tests: fixtures, PHI markers, strategies."""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

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

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "eido"
VALID = ("bh-open.json", "bh-update.json", "bh-close.json", "traffic.json")

# Protected text in the fixtures that must never show up in a rejection reason.
PHI = (
    "Testy", "McTestface", "Placeholder", "555-0142", "5550142", "1987-03-14",
    "Imaginary", "Invented", "Suicidal", "depression", "brother", "handgun",
    "goodbye", "bedroom", "NECK PAIN", "Lakeview", "café", "caf",
)  # fmt: skip


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fixture_bytes(name))
    return doc


def encode(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode()


def assert_no_phi(text: str) -> None:
    for marker in PHI:
        assert marker not in text, f"rejection text quotes message content: {marker!r}"


# --- JSON mutations ----------------------------------------------------------------------------


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``value`` (object keys and array indexes)."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += paths(item, (*prefix, i))
    return out


def replaced(doc: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of ``doc`` with the value at ``path`` replaced (``DROP`` deletes it)."""
    if not path:
        return new
    copy: Any = dict(doc) if isinstance(doc, dict) else list(doc)
    head = path[0]
    if len(path) == 1 and new is DROP:
        del copy[head]
    else:
        copy[head] = replaced(copy[head], path[1:], new)
    return copy


DROP = object()

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


# --- snapshots EIDO can carry ------------------------------------------------------------------

# Printable text that survives JSON, XML and HTML (no control characters, no surrogates).
_chars = st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs"))
words = st.text(_chars, min_size=1, max_size=24).map(lambda s: " ".join(s.split())).filter(bool)
codes = st.text(string.ascii_uppercase + string.digits + "-", min_size=1, max_size=10)
times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
note_texts = st.lists(words, min_size=1, max_size=3).map("\n".join)

locations = st.builds(
    Location,
    point=st.none()
    | st.builds(
        GeoPoint,
        st.floats(-90, 90, allow_nan=False),
        st.floats(-180, 180, allow_nan=False),
    ),
    address=st.none() | words | st.tuples(st.integers(1, 99999), words).map("{0[0]} {0[1]}".format),
    city=st.none() | words,
    state=st.none() | codes,
)
persons = st.builds(
    Person,
    roles=st.lists(st.sampled_from(["Caller", "Patient", "Witness", "Suspect"]), max_size=2).map(
        tuple
    ),
    name=st.none() | words,
    birth_date=st.none() | st.dates().map(str),
    phone=st.none() | st.integers(100, 199).map("555-555-0{}".format),
    mental_state=st.none() | words,
)
unit_types = st.sampled_from(["Police", "CrisisInterventionUnit", "Ambulance"])
unit_statuses = st.sampled_from(["Available", "NotAvailable", "EnRoute", "OnScene"])
units = st.builds(Unit, id=codes, type=st.none() | unit_types, status=st.none() | unit_statuses)
complete_units = st.builds(Unit, id=codes, type=unit_types, status=unit_statuses)


@st.composite
def snapshots(draw: st.DrawFn, *, known_units: bool = False) -> Snapshot:
    """Snapshots EIDO can carry; ``known_units``: every unit has a type and a status (EIDO
    requires both)."""
    updated = draw(times)
    status = draw(st.sampled_from(IncidentStatus))
    notes = draw(st.lists(st.builds(Note, note_texts, times), max_size=3))
    return Snapshot(
        incident_id=draw(codes.map("urn:emergency:uid:incidentid:{}:psap.test.invalid".format)),
        updated_at=updated,
        status=status,
        incident_number=draw(st.none() | codes),
        call_type=draw(st.none() | words),
        call_type_code=draw(st.none() | codes),
        apco_type=draw(st.sampled_from(["SUICTHRT", "EDP", "MNTL", "MVA", "WELFARE"])),
        priority=draw(st.none() | st.integers(0, 9).map(str) | st.sampled_from(["P1", "01", "E"])),
        agency=draw(st.none() | st.just("police.test.invalid")),
        zone=draw(st.none() | codes),
        opened_at=draw(st.none() | times),
        closed_at=(
            draw(st.none() | st.just(updated - timedelta(minutes=1)))
            if status is IncidentStatus.CLOSED
            else None
        ),
        location=draw(st.none() | locations),
        units=tuple(
            draw(
                st.lists(
                    complete_units if known_units else units,
                    max_size=3,
                    unique_by=lambda u: u.id,
                )
            )
        ),
        cautions=tuple(
            draw(
                st.lists(
                    st.builds(Caution, words, st.none() | st.sampled_from(["highest", "low"])),
                    max_size=2,
                )
            )
        ),
        dispositions=tuple(
            draw(st.lists(st.builds(Disposition, codes, st.none() | words), max_size=2))
        ),
        notes=tuple(sorted(notes, key=lambda n: n.time or updated)),
        persons=tuple(draw(st.lists(persons, max_size=2))),
    )
