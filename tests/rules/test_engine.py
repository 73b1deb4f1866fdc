from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corespond.daemon.decision import Response
from corespond.daemon.snapshot import Caution, IncidentStatus, Note, Person, Snapshot
from corespond.rules.engine import RuleClassifier, field_text
from corespond.rules.loader import load_ruleset
from corespond.rules.samples import incident_snapshot

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
RULESET = load_ruleset()
CLASSIFIER = RuleClassifier(RULESET)


def classify(call_type: str = "MENTAL SUBJECT", narrative: str = "", **kw: object):
    return CLASSIFIER.classify(
        incident_snapshot(dict(call_type=call_type, narrative=narrative, **kw))
    )


@pytest.mark.parametrize(
    "narrative",
    [
        "denies SI",
        "pt denies SI/HI",
        "RP does not think he is suicidal",
        "negative for SI",
        "no hx of suicide attempts",
        "Pt is not suicidal at this time",
        "SI ruled out by crisis line",
    ],
)
def test_negated_suicide_does_not_fire(narrative: str) -> None:
    d = classify("CHECK SUBJECT", narrative)
    assert "bh.narrative.suicide" not in d.rules


@pytest.mark.parametrize(
    "narrative",
    [
        "no weapons seen",
        "RP denies any weapons in the home",
        "negative for HI",
        "weapons: none",
        "subj is non-violent",
        "no increase in agitation",
    ],
)
def test_negated_danger_does_not_escalate(narrative: str) -> None:
    d = classify("MENTAL SUBJECT", narrative)
    assert d.response is Response.CLINICIAN, d.rules


@pytest.mark.parametrize(
    "narrative",
    [
        "states he has a knife",
        "pt denies SI but states he has a knife",
        "no SI; has a gun in waistband",
        "unk if armed",
    ],
)
def test_weapon_fires_outside_negation_scope(narrative: str) -> None:
    d = classify("MENTAL SUBJECT", narrative)
    assert d.response is Response.POLICE and "safety.weapon" in d.rules


def test_pseudo_negation_does_not_negate() -> None:
    d = classify("CHECK SUBJECT", "not only hearing voices but paranoid")
    assert "bh.narrative.mental" in d.rules


def test_negation_window_ends() -> None:
    d = classify("CHECK SUBJECT", "no answer at door for twenty minutes then subj suicidal")
    assert "bh.narrative.suicide" in d.rules


@pytest.mark.parametrize(
    ("call_type", "category"),
    [
        ("SUICIDAL SUBJ", "suicide"),
        ("SUCIDAL SUBJ", "suicide"),
        ("10-96", "mental-health"),
        ("5150", "mental-health"),
        ("EDP", "mental-health"),
        ("PSYC EVAL", "mental-health"),
        ("ETOH SUBJ", "substance"),
        ("OD", "substance"),
        ("WELF CHK", "welfare"),
    ],
)
def test_abbreviations_and_misspellings(call_type: str, category: str) -> None:
    assert classify(call_type).category == category


@pytest.mark.parametrize(
    ("call_type", "response"),
    [
        ("MENTAL SUBJECT", Response.CLINICIAN),
        ("MENTAL - ARMED", Response.POLICE),
        ("EDP WPN", Response.POLICE),
        ("EDP W/WEAPON", Response.POLICE),
        ("MENTAL VIOLENT", Response.POLICE),
        ("SUICIDE THREAT", Response.CO_RESPONSE),
        ("SUICIDE_In Progress", Response.POLICE),
        ("SUICIDE I/P", Response.POLICE),
        ("MENTAL-P1", Response.CO_RESPONSE),
    ],
)
def test_call_type_suffixes_move_the_response(call_type: str, response: Response) -> None:
    assert classify(call_type).response is response


def test_evidence_spans_locate_the_text_in_their_field() -> None:
    snap = Snapshot(
        incident_id="inc-1",
        updated_at=T0,
        call_type="10-96 MENTAL",
        apco_type="EDP",
        notes=(Note("RP callback on file"), Note("Subj says he has a KNIFE, hearing voices")),
        cautions=(Caution("Dog"), Caution("Weapons at location")),
        persons=(Person(mental_state=None), Person(mental_state="Agitated")),
    )
    d = CLASSIFIER.classify(snap)
    assert d.behavioral_health and d.response is Response.POLICE
    fields = {e.field for e in d.evidence}
    assert {"call_type", "apco_type", "narrative", "cautions", "persons"} <= fields
    for e in d.evidence:
        assert field_text(snap, e.field)[e.start : e.end] == e.text
    assert any(e.text == "KNIFE" for e in d.evidence)
    assert any(e.text == "hearing voices" for e in d.evidence)
    assert d.ruleset == CLASSIFIER.version == RULESET.version


def test_closed_call_keeps_category_needs_no_one() -> None:
    d = classify("SUICIDE THREAT", status="closed")
    assert d.behavioral_health and d.category == "suicide" and d.response is Response.NONE
    snap = Snapshot("i", T0, status=IncidentStatus.CANCELLED, apco_type="EDP")
    assert CLASSIFIER.classify(snap).response is Response.NONE


@pytest.mark.parametrize(
    "call_type",
    [
        "DRUG SALES",
        "NARCOTICS ACTIVITY",
        "ASSAULT",
        "TRAFFIC COLLISION",
        "NOISE COMPLAINT",
        "BURGLARY I/P",
        "415E LOUD MUSIC",
        "DUI",
        "DRUNK DRIVER",
        "SHOPLIFTING",
    ],
)
def test_unrelated_calls_are_not_behavioral(call_type: str) -> None:
    d = classify(call_type, "suspect appeared drunk")
    assert not d.behavioral_health and d.response is Response.NONE


def test_not_behavioral_reports_no_rules() -> None:
    d = classify("TRAFFIC STOP", "driver has a gun rack")
    assert (d.behavioral_health, d.category, d.rules, d.evidence) == (False, None, (), ())


def test_mental_state_and_cautions() -> None:
    snap = Snapshot("i", T0, persons=(Person(mental_state="Suicidal"),))
    assert CLASSIFIER.classify(snap).behavioral_health
    snap = Snapshot("i", T0, call_type="WELFARE CHECK", cautions=(Caution("Violent subject"),))
    assert CLASSIFIER.classify(snap).response is Response.POLICE


_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
_words = st.lists(
    st.sampled_from(
        [
            "no",
            "not",
            "SI",
            "denies",
            "knife",
            "suicidal",
            "10-96",
            "5150",
            "I/P",
            "W/",
            "but",
            ".",
            ";",
            "İ",
            "EDP",
            "_",
            "-",
            "non",
            "violent",
            "ruled out",
            "?",
            "\n",
            "ß",
            "ﬁ",
            "918V",
        ]
    ),
    max_size=40,
).map(" ".join)
_field = st.one_of(st.none(), _text, _words)


@settings(max_examples=300, deadline=None)
@given(
    call_type=_field,
    narrative=_field,
    code=_field,
    apco=_field,
    priority=_field,
    caution=_field,
    state=_field,
    closed=st.booleans(),
)
def test_classify_never_raises_and_spans_are_exact(
    call_type: str | None,
    narrative: str | None,
    code: str | None,
    apco: str | None,
    priority: str | None,
    caution: str | None,
    state: str | None,
    closed: bool,
) -> None:
    snap = Snapshot(
        incident_id="fuzz",
        updated_at=T0,
        call_type=call_type,
        call_type_code=code,
        apco_type=apco,
        priority=priority,
        status=IncidentStatus.CLOSED if closed else IncidentStatus.ACTIVE,
        notes=(Note(narrative),) if narrative is not None else (),
        cautions=(Caution(caution),) if caution else (),
        persons=(Person(mental_state=state),) if state else (),
    )
    d = CLASSIFIER.classify(snap)
    assert d.behavioral_health == (d.category is not None)
    for e in d.evidence:
        assert field_text(snap, e.field)[e.start : e.end] == e.text


@settings(max_examples=60, deadline=None)
@given(
    narrative=_words,
    call_types=st.lists(_field, min_size=2, max_size=4),
    closed=st.booleans(),
)
def test_a_remembered_narrative_decides_as_a_fresh_scan(
    narrative: str, call_types: list[str | None], closed: bool
) -> None:
    # Updates of one incident repeat its narrative beside other fields: a classifier that
    # scanned it before decides each as a classifier that never saw it.
    warm = RuleClassifier(RULESET)
    for call_type in call_types:
        snap = Snapshot(
            incident_id="again",
            updated_at=T0,
            call_type=call_type,
            status=IncidentStatus.CLOSED if closed else IncidentStatus.ACTIVE,
            notes=(Note(narrative, T0),),
        )
        assert warm.classify(snap) == RuleClassifier(RULESET).classify(snap)
