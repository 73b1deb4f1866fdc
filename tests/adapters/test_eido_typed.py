"""The typed EIDO decode (msgspec, the common shape) against the full mapping it falls back to:
whatever the typed path accepts, it maps to the very snapshot the full mapping gives; whatever
it does not, :meth:`EidoFormat.parse` answers exactly as the full mapping does (the same
snapshot, or the same rejection with its pointer)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corespond.adapters import eido
from corespond.adapters.eido import EidoFormat, eido_document
from corespond.daemon.demo import incident_lifecycles
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import Snapshot
from tests.adapters.eido_cases import (
    DROP,
    FIXTURES,
    VALID,
    encode,
    fixture,
    fixture_bytes,
    json_values,
    paths,
    replaced,
    snapshots,
)

FORMAT = EidoFormat()
Answer = Snapshot | tuple[str, str, str | None]


def typed(message: bytes) -> Snapshot | None:
    """The typed path's snapshot, or None where it gives up."""
    try:
        return eido._typed_snapshot(message)
    except eido._GIVE_UP:
        return None


def answer(parse: Any, message: bytes) -> Answer:
    try:
        return parse(message)  # type: ignore[no-any-return]
    except RejectedMessage as err:
        return (err.code, err.reason, err.where)


def check(message: bytes) -> Snapshot | None:
    """The typed path agrees with the full mapping on ``message``; its answer."""
    full = answer(FORMAT.parse_untyped, message)
    fast = typed(message)
    if fast is not None:
        assert fast == full
        assert repr(fast) == repr(full)  # same types inside too (str, not a subclass)
    assert answer(FORMAT.parse, message) == full
    return fast


def test_every_fixture_answers_as_the_full_mapping() -> None:
    names = sorted(p.name for p in FIXTURES.glob("*.json"))
    assert len(names) >= len(VALID) + 5
    for name in names:
        fast = check(fixture_bytes(name))
        # The shipped valid fixtures are the common shape: the typed path takes them.
        assert (fast is not None) == (name in VALID), name


def test_demo_incidents_take_the_typed_path() -> None:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    messages = [
        json.dumps(eido_document(snap)).encode()
        for lifecycle in incident_lifecycles(random.Random(5), 40, start)
        for snap in lifecycle
    ]
    assert all(check(m) is not None for m in messages)


@pytest.mark.parametrize(
    ("change", "typed_takes_it"),
    [
        # A NUL reaches a string only through this escape: the full mapping decides.
        (lambda d: d.__setitem__("$id", "a\x00b"), False),
        (lambda d: d.__setitem__("someExtension", "a\x00b"), False),
        # Non-ASCII text is fine; a lone surrogate is not (msgspec refuses it).
        (lambda d: d["incidentComponent"].__setitem__("incidentTypeInternalText", "Café"), True),
        (lambda d: d.__setitem__("$id", "\ud800"), False),
        (lambda d: d.__setitem__("someExtension", "\udfff"), False),
        # Types the typed path does not expect, in fields it reads and in fields it may not.
        (lambda d: d["incidentComponent"].__setitem__("incidentCommonPriorityNumber", True), False),
        (lambda d: d["incidentComponent"].__setitem__("incidentCommonPriorityNumber", 1.0), False),
        (lambda d: d["incidentComponent"].__setitem__("incidentCommonPriorityNumber", 2**70), True),
        (lambda d: d["agencyComponent"].append({"$id": 7}), False),
        (lambda d: d.__setitem__("updatedByAgencyReference", "x"), False),
        (lambda d: d["personComponent"][0].__setitem__("ncPersonComponent", "x"), False),
        (lambda d: d["personComponent"][0].__setitem__("ncPersonComponent", None), True),
        (lambda d: d.__setitem__("eidoVersion", " 1.0 "), True),
        (lambda d: d.pop("eidoVersion"), False),
        (lambda d: d.__setitem__("agencyComponent", []), True),
        (lambda d: d.__setitem__("notesComponent", None), True),
    ],
)
def test_edges_of_the_typed_path(change: Any, typed_takes_it: bool) -> None:
    doc = fixture("bh-open.json")
    change(doc)
    message = json.dumps(doc).encode()  # ASCII: non-ASCII text and surrogates as escapes
    assert (check(message) is not None) == typed_takes_it


@pytest.mark.parametrize(
    "message",
    [
        # Bytes that are not UTF-8 where msgspec only skips (it does not check them there).
        fixture_bytes("bh-open.json").replace(b'"@context"', b'"x": "\xff", "@context"'),
        fixture_bytes("bh-open.json").replace(b'"@context"', b'"x": [1e999], "@context"'),
        fixture_bytes("bh-open.json").replace(b'"@context"', b'"x": NaN, "@context"'),
        fixture_bytes("bh-open.json").replace(b'"@context"', b'"$id": "dup", "@context"'),
        fixture_bytes("bh-open.json").replace(b'"@context"', b'"$id": 1, "@context"'),
        b"\xef\xbb\xbf" + fixture_bytes("bh-open.json"),
        fixture_bytes("bh-open.json") + b" x",
        b'{"x":' + b"[" * 1010 + b"]" * 1010 + b"}",
        b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_odd_bytes_answer_as_the_full_mapping(message: bytes) -> None:
    check(message)


@pytest.mark.parametrize("name", VALID)
def test_every_field_dropped_or_blanked_answers_as_the_full_mapping(name: str) -> None:
    # Every path of every valid fixture, dropped, null, blank, wrong-typed: what the typed
    # path must notice (a missing or blank required field) is in here somewhere.
    doc = fixture(name)
    for path in paths(doc)[1:]:
        for new in (DROP, None, "  ", 0):
            check(encode(replaced(doc, path, new)))


@settings(max_examples=200, deadline=None)
@given(snapshots())
def test_snapshots_take_the_typed_path(snap: Snapshot) -> None:
    assert check(json.dumps(eido_document(snap)).encode()) is not None


# Text with what the typed path must hand over: NUL and other controls, lone surrogates.
_tricky_text = st.text(st.characters(categories=("Cc", "Cs", "L", "N", "Zs")), max_size=6)
_tricky_values = json_values | _tricky_text | st.lists(_tricky_text, max_size=3)


@settings(max_examples=500, deadline=None)
@given(_tricky_values, st.data())
def test_changed_documents_answer_as_the_full_mapping(value: Any, data: st.DataObject) -> None:
    doc = fixture(data.draw(st.sampled_from(VALID)))
    path = data.draw(st.sampled_from(paths(doc)[1:]))
    new = DROP if data.draw(st.booleans()) else value
    changed = replaced(doc, path, new)
    ascii_only = data.draw(st.booleans())
    check(json.dumps(changed, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_damaged_bytes_answer_as_the_full_mapping(name: str, data: st.DataObject) -> None:
    message = bytearray(encode(fixture(name)))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(message) - 1))
        how = data.draw(st.sampled_from(("replace", "delete", "insert")))
        byte = data.draw(st.integers(0, 255))
        if how == "replace":
            message[at] = byte
        elif how == "delete":
            del message[at]
        else:
            message.insert(at, byte)
    check(bytes(message))
