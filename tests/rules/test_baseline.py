from datetime import UTC, datetime

import pytest

from corespond.daemon.decision import Response
from corespond.daemon.snapshot import Caution, IncidentStatus, Note, Person, Snapshot
from corespond.rules.baseline import BaselineClassifier

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def snap(**kw: object) -> Snapshot:
    base = {"incident_id": "inc-1", "updated_at": T0}
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


@pytest.fixture
def classifier() -> BaselineClassifier:
    return BaselineClassifier()


def test_apco_type_decides_category_and_response(classifier: BaselineClassifier) -> None:
    d = classifier.classify(snap(apco_type="EDP"))
    assert (d.behavioral_health, d.category) == (True, "mental-health")
    assert d.response is Response.CLINICIAN
    assert d.rules == ("apco.edp",)
    assert d.ruleset == classifier.version


def test_local_call_type_words(classifier: BaselineClassifier) -> None:
    d = classifier.classify(snap(call_type="SUICIDAL SUBJECT"))
    assert d.category == "suicide"
    [ev] = d.evidence
    assert (ev.field, ev.start, ev.end, ev.text) == ("call_type", 0, 6, "suicid")


def test_weapon_in_narrative_puts_police_first(classifier: BaselineClassifier) -> None:
    d = classifier.classify(
        snap(apco_type="MNTL", notes=(Note("SUBJ states he has a knife in his bag"),))
    )
    assert d.response is Response.POLICE
    ev = next(e for e in d.evidence if e.field == "narrative")
    assert "SUBJ states he has a knife in his bag"[ev.start : ev.end] == "knife"


def test_negated_weapon_does_not(classifier: BaselineClassifier) -> None:
    d = classifier.classify(snap(apco_type="SUICTHRT", notes=(Note("no weapons seen"),)))
    assert d.response is Response.CO_RESPONSE


def test_weapon_caution(classifier: BaselineClassifier) -> None:
    d = classifier.classify(snap(apco_type="EDP", cautions=(Caution("Weapon", "high"),)))
    assert d.response is Response.POLICE


def test_mental_state_alone_is_behavioral(classifier: BaselineClassifier) -> None:
    d = classifier.classify(snap(persons=(Person(mental_state="Agitated"),)))
    assert d.behavioral_health and d.category == "mental-health"


def test_closed_call_needs_no_one(classifier: BaselineClassifier) -> None:
    d = classifier.classify(snap(apco_type="EDP", status=IncidentStatus.CLOSED))
    assert d.behavioral_health and d.response is Response.NONE


def test_other_calls_are_not_behavioral(classifier: BaselineClassifier) -> None:
    d = classifier.classify(snap(apco_type="TRAFFIC", call_type="TRAFFIC COLLISION",
                                 notes=(Note("driver has a gun rack in the truck"),)))
    assert not d.behavioral_health and d.response is Response.NONE and d.rules == ()
