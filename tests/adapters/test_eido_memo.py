"""The EIDO parser's shortcuts (orjson's value first, remembered persons, locations and HTML
notes) give exactly what the long way gives: the same snapshot, or the same rejection with its
pointer."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corespond.adapters import eido, pidflo
from corespond.adapters.eido import (
    EidoFormat,
    eido_document,
    html_to_text,
    load_json,
    snapshot_from_eido,
)
from corespond.daemon.demo import incident_lifecycles
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import Snapshot
from tests.adapters.eido_cases import (
    DROP,
    VALID,
    encode,
    fixture,
    json_values,
    paths,
    replaced,
    snapshots,
)

FORMAT = EidoFormat()
Answer = Snapshot | tuple[str, str, str | None]


def answer(parse: Any, message: bytes) -> Answer:
    try:
        return parse(message)  # type: ignore[no-any-return]
    except RejectedMessage as err:
        return (err.code, err.reason, err.where)


def long_way(message: bytes) -> Answer:
    """The exact decoder, and nothing remembered from earlier messages."""
    eido._recent_persons.clear()
    eido._recent_nc_texts.clear()
    eido._recent_notes.clear()
    eido._recent_units.clear()
    pidflo._recent_location.cache_clear()
    eido._recent_html_text.cache_clear()
    return answer(lambda m: snapshot_from_eido(load_json(m)), message)


def same_after(before: list[bytes], message: bytes) -> None:
    """``message`` parsed the short way, after ``before`` warmed the memories, answers as the
    long way does."""
    eido._recent_persons.clear()
    eido._recent_nc_texts.clear()
    eido._recent_notes.clear()
    eido._recent_units.clear()
    for earlier in before:
        answer(FORMAT.parse, earlier)
    short = answer(FORMAT.parse, message)
    assert short == long_way(message)


def test_demo_incidents_parse_as_the_long_way() -> None:
    # The demo's (and bench/ingest.py's) incidents, in order: every update of an incident
    # repeats its persons and its location, so most of these take the remembered details.
    start = datetime(2026, 11, 1, tzinfo=UTC)
    messages = [
        json.dumps(eido_document(snap)).encode()
        for lifecycle in incident_lifecycles(random.Random(3), 40, start)
        for snap in lifecycle
    ]
    eido._recent_persons.clear()
    eido._recent_nc_texts.clear()
    eido._recent_notes.clear()
    eido._recent_units.clear()
    short = [answer(FORMAT.parse, m) for m in messages]
    assert eido._recent_nc_texts  # the shortcuts (the typed path's) were taken
    assert eido._recent_notes and eido._recent_units
    assert short == [long_way(m) for m in messages]
    assert all(isinstance(s, Snapshot) for s in short)


def test_fixtures_parse_as_the_long_way() -> None:
    for name in VALID:
        same_after([encode(fixture(n)) for n in VALID], encode(fixture(name)))


def _person_doc(nc: Any) -> bytes:
    doc = fixture("bh-open.json")
    doc["personComponent"] = [
        {"personIncidentRoleRegistryText": ["Patient"], "ncPersonComponent": nc}
    ]
    return encode(doc)


def test_null_is_never_a_key_for_remembered_details() -> None:
    # orjson writes inf (json reads 1e999 as inf) and None both as null.
    with_none = _person_doc({"mentalState": [None]})
    with_inf = _person_doc({"mentalState": ["MARK"]}).replace(b'"MARK"', b"1e999")
    assert isinstance(answer(FORMAT.parse, with_none), Snapshot)
    assert answer(FORMAT.parse, with_inf) == (
        "invalid-field",
        "must be a string or a NIEM text object",
        "/personComponent/0/ncPersonComponent/mentalState/0",
    )


def test_a_remembered_person_takes_each_messages_roles() -> None:
    # The same ncPersonComponent in another role, then in the first one again: each
    # message's person has its own roles, and the details remembered from the first.
    nc = {"mentalState": ["MARK"], "personFullName": ["A Person"]}
    first = _person_doc(nc)
    other = first.replace(b'"Patient"', b'"Caller"')
    assert other != first
    same_after([first], other)
    same_after([first, other], first)
    caller, patient = FORMAT.parse(other), FORMAT.parse(first)
    assert caller.persons[0].roles == ("Caller",) and patient.persons[0].roles == ("Patient",)
    assert caller.persons[0].mental_state == patient.persons[0].mental_state == "MARK"


def test_an_integer_beyond_64_bits_is_read_exactly() -> None:
    doc = fixture("bh-open.json")
    doc["incidentComponent"]["incidentCommonPriorityNumber"] = 2**70
    snap = FORMAT.parse(encode(doc))
    assert snap.priority == str(2**70)
    doc["incidentComponent"]["incidentCommonPriorityNumber"] = 1.5
    assert answer(FORMAT.parse, encode(doc))[:1] == ("invalid-field",)


@pytest.mark.parametrize(
    ("field", "value", "other", "changed"),
    [
        # A unit's $id is read only without a name, its internal type only without a common
        # one, its primary status only without a secondary one.
        ("emergencyResourceName", " ", "$id", "urn:emergency:uid:eidodatacomponent:other:x"),
        ("emergencyResourceTypeCommonRegistryText", "", "emergencyResourceTypeInternalText", "X"),
        ("secondaryUnitStatusRegistryText", [], "primaryUnitStatusRegistryText", "Available"),
        ("secondaryUnitStatusRegistryText", ["EnRoute"], "secondaryUnitStatusRegistryText",
         ["EnRoute", "OnScene"]),
    ],
)  # fmt: skip
def test_remembered_units_read_what_they_depend_on(
    field: str, value: Any, other: str, changed: Any
) -> None:
    doc = fixture("bh-open.json")
    unit = doc["emergencyResourceComponent"][0]
    unit[field] = value
    before = encode(doc)
    unit[other] = changed
    same_after([before], encode(doc))
    assert FORMAT.parse(before) != FORMAT.parse(encode(doc))


def test_remembered_notes_keep_their_time() -> None:
    doc = fixture("bh-open.json")
    before = encode(doc)
    for note in doc["notesComponent"]:
        note["lastUpdateTimeStamp"] = "2026-03-14T23:59:00Z"
    same_after([before], encode(doc))


@settings(max_examples=200, deadline=None)
@given(snapshots(), snapshots())
def test_snapshots_parse_as_the_long_way(first: Snapshot, second: Snapshot) -> None:
    one, two = (json.dumps(eido_document(s)).encode() for s in (first, second))
    same_after([one], two)


@settings(max_examples=300, deadline=None)
@given(json_values, st.data())
def test_changed_person_parses_as_the_long_way(value: Any, data: st.DataObject) -> None:
    # A person seen before, then the same person with one value replaced or dropped.
    nc = fixture("bh-open.json")["personComponent"][0]["ncPersonComponent"]
    path = data.draw(st.sampled_from(paths(nc)[1:]))
    changed = replaced(nc, path, DROP if data.draw(st.booleans()) and len(path) == 1 else value)
    same_after([_person_doc(nc)], _person_doc(changed))


@settings(max_examples=300, deadline=None)
@given(json_values, st.data())
def test_changed_document_parses_as_the_long_way(value: Any, data: st.DataObject) -> None:
    doc = fixture(data.draw(st.sampled_from(VALID)))
    path = data.draw(st.sampled_from(paths(doc)[1:]))
    same_after([encode(doc)], encode(replaced(doc, path, value)))


def _html_notes(doc: Any) -> Any:
    """``doc`` with each note as a CAD writes HTML5: a paragraph, entities, a break."""
    for note in doc.get("notesComponent", ()):
        text = note["notesActionComments"]
        note["notesActionComments"] = f"<p>{text} &amp; <b>more</b><br>line</p><!-- x -->"
    return doc


def test_html_notes_parse_as_the_long_way() -> None:
    # Every update of an incident repeats its notes: all but the first reading of each note
    # are remembered, and every snapshot still equals the long way's.
    start = datetime(2026, 11, 1, tzinfo=UTC)
    messages = [
        json.dumps(_html_notes(eido_document(snap))).encode()
        for lifecycle in incident_lifecycles(random.Random(5), 20, start)
        for snap in lifecycle
    ]
    eido._recent_html_text.cache_clear()
    short = [answer(FORMAT.parse, m) for m in messages]
    assert eido._recent_html_text.cache_info().hits > 0
    assert short == [long_way(m) for m in messages]
    assert all(isinstance(s, Snapshot) and s.notes for s in short)


_HTML_BITS = st.sampled_from(
    ["<p>", "</p>", "<br>", "<b>", "</b>", "<script>", "</script>", "<!--", "-->", "&amp;",
     "&", "<", ">", "x", "é", " ", "\n", "\x00", "\x0b", "\ud800", "<?pi?>", "<div>"]
)  # fmt: skip
html_texts = st.one_of(st.text(), st.lists(_HTML_BITS, max_size=12).map("".join))


def _note_answer(html: str, where: str) -> str | tuple[str, str, str | None]:
    try:
        return html_to_text(html, where)
    except RejectedMessage as err:
        return (err.code, err.reason, err.where)


@settings(max_examples=300, deadline=None)
@given(html_texts, html_texts)
def test_remembered_notes_read_as_the_long_way(first: str, second: str) -> None:
    # Read cold, then again warm under another pointer: the same text, or the same rejection
    # with the pointer of the message at hand.
    eido._recent_html_text.cache_clear()
    cold = [_note_answer(h, f"/notesComponent/{i}") for i, h in enumerate((first, second))]
    warm = [_note_answer(h, f"/notesComponent/{i}") for i, h in enumerate((first, second))]
    moved = _note_answer(first, "/notesComponent/9")
    assert warm == cold
    if isinstance(cold[0], tuple):
        assert moved == (*cold[0][:2], "/notesComponent/9")
    else:
        assert moved == cold[0]
