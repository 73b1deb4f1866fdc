"""Encounters and people on SQLite and PostgreSQL: pre-fill, timeline, validated completion,
person linking through the blind index."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from corespond.daemon.config import CustomField, OutcomesConfig
from corespond.daemon.decision import Response
from corespond.daemon.encounters import (
    EncounterInvalid,
    EncounterNotFound,
    Prefill,
    add_referral,
    create_encounter,
    encounter_from_incident,
    race_group,
    record_times,
    update_encounter,
    validate_changes,
)
from corespond.daemon.people import (
    IdentifierInvalid,
    blind_index,
    identifiers_of,
    link_person,
    normalized_name,
)
from corespond.daemon.store.tables import encounters, incidents, person_identifiers, persons
from corespond.daemon.store.writer import write_batch
from tests.daemon.store.records import at, decision, record, snapshot

KEY = b"k" * 40
NOW = datetime(2031, 3, 4, 6, 0, tzinfo=UTC)
RECEIVED = datetime(2031, 3, 4, 5, 0, tzinfo=UTC)
CONFIG = OutcomesConfig(
    person_key=KEY,
    custom_fields=(
        CustomField("insurance", "choice", ("medicaid", "private", "none"), required=True),
        CustomField("visits", "integer", minimum=0, maximum=50),
        CustomField("supports", "multichoice", ("family", "case_manager")),
        CustomField("mou_signed", "boolean"),
        CustomField("follow_up_on", "date"),
    ),
)


def _open(engine: Engine, **prefill: Any) -> int:
    with engine.begin() as conn:
        return create_encounter(
            conn, Prefill(program="co-responder", call_received_at=RECEIVED, **prefill), NOW
        )


def _row(engine: Engine, encounter_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(
            conn.execute(select(encounters).where(encounters.c.id == encounter_id)).mappings().one()
        )


COMPLETE: dict[str, Any] = {
    "bh_nexus_confirmed": True,
    "disposition": "voluntary_transport",
    "destination_type": "crisis_center",
    "presenting_issues": ["suicidal", "substance"],
    "actions": ["de_escalation", "safety_plan"],
    "would_have_been_ed": True,
    "would_have_been_arrest": False,
    "use_of_force": False,
    "demographics_source": "self_reported",
    "race_ethnicity": ["black_african_american", "hispanic_latino"],
    "gender": "woman",
    "age_band": "25_34",
    "veteran": "no",
    "housing": "unsheltered",
    "language": "es",
    "on_scene_at": "2031-03-04T05:20:00+00:00",
    "cleared_at": "2031-03-04T06:05:30+00:00",
    "custom": {"insurance": "medicaid", "visits": 2, "supports": ["family"]},
}


def test_an_incident_becomes_a_prefilled_encounter_once(engine: Engine) -> None:
    with engine.begin() as conn:
        write_batch(
            conn,
            [record(snapshot("ENC-1"), decision(Response.CLINICIAN, category="mental-health"))],
        )
    with engine.begin() as conn:
        incident_id = conn.execute(select(incidents.c.id)).scalar_one()
        first = encounter_from_incident(conn, incident_id, "co-responder", NOW, "clin-7")
        again = encounter_from_incident(conn, incident_id, "co-responder", NOW)
    assert first == again
    row = _row(engine, first)
    assert row["cad_incident_no"] == "NENC-1"
    assert (row["agency"], row["zone"], row["call_type"], row["priority"]) == (
        "FAKEPD", "Z9", "WELFARE CHECK", "2",
    )  # fmt: skip
    assert (row["classifier_response"], row["classifier_category"]) == (
        "clinician",
        "mental-health",
    )
    assert row["call_received_at"] == at(-60)  # CAD's opening time, not when we heard of it
    assert row["call_received_epoch"] == int(row["call_received_at"].timestamp())
    assert row["status"] == "open" and row["clinician"] == "clin-7"
    with engine.begin() as conn, pytest.raises(LookupError):
        encounter_from_incident(conn, 999_999, "co-responder", NOW)


def test_the_timeline_is_filled_by_whoever_knows_it(engine: Engine) -> None:
    eid = _open(engine)
    paged = RECEIVED + timedelta(minutes=3)
    with engine.begin() as conn:
        record_times(conn, eid, {"clinician_paged_at": paged}, NOW)
        # A second page does not move the first page's time; an acknowledgement adds its own.
        record_times(
            conn,
            eid,
            {
                "clinician_paged_at": paged + timedelta(minutes=5),
                "page_ack_at": paged + timedelta(seconds=75),
            },
            NOW,
        )
        record_times(conn, eid, {"on_scene_at": paged + timedelta(minutes=17, seconds=9)}, NOW)
    row = _row(engine, eid)
    assert row["clinician_paged_at"] == paged
    assert row["page_ack_seconds"] == 75
    assert row["response_seconds"] == 17 * 60 + 9
    with engine.begin() as conn:
        record_times(
            conn, eid, {"clinician_paged_at": paged + timedelta(seconds=9)}, NOW, overwrite=True
        )
    assert _row(engine, eid)["response_seconds"] == 17 * 60
    with engine.begin() as conn, pytest.raises(ValueError, match="not timeline"):
        record_times(conn, eid, {"call_received_at": paged}, NOW)
    with engine.begin() as conn, pytest.raises(EncounterNotFound):
        record_times(conn, eid + 1000, {"on_scene_at": paged}, NOW)


def test_a_valid_update_completes_the_encounter(engine: Engine) -> None:
    eid = _open(engine)
    with engine.begin() as conn:
        out = update_encounter(conn, eid, COMPLETE, CONFIG, NOW, complete=True)
    assert out["status"] == "completed" and out["completed_at"] == NOW
    assert out["race_group"] == "multiracial"
    assert out["service_on_scene"] is True
    assert out["on_scene_seconds"] == 45 * 60 + 30
    assert out["custom"] == {"insurance": "medicaid", "visits": 2, "supports": ["family"]}
    # A later partial change keeps the rest, custom fields included.
    with engine.begin() as conn:
        out = update_encounter(conn, eid, {"custom": {"visits": 3}, "actions": []}, CONFIG, NOW)
    assert out["custom"]["insurance"] == "medicaid" and out["custom"]["visits"] == 3
    assert out["service_on_scene"] is False and out["status"] == "completed"


def test_every_problem_is_reported_with_its_field_path(engine: Engine) -> None:
    eid = _open(engine)
    bad = {
        "disposition": "teleported",
        "race_ethnicity": ["white", "martian", "white"],
        "gender": 3,
        "bh_nexus_confirmed": "yes",
        "on_scene_at": "yesterday",
        "cleared_at": "2031-03-04T07:00:00",
        "language": "Klingon!",
        "custom": {"insurance": "gold", "visits": 51, "unknown_thing": 1, "follow_up_on": "3/4"},
        "narrative": "ZQXSECRET she said",
        "person": {"name": "Ann Example"},
    }
    with engine.begin() as conn, pytest.raises(EncounterInvalid) as caught:
        update_encounter(conn, eid, bad, CONFIG, NOW, complete=True)
    where = {w for w, _ in caught.value.problems}
    assert where == {
        "disposition", "race_ethnicity[1]", "race_ethnicity[2]", "gender", "bh_nexus_confirmed",
        "on_scene_at", "cleared_at", "language", "custom.insurance", "custom.visits",
        "custom.unknown_thing", "custom.follow_up_on", "narrative", "person.dob",
    }  # fmt: skip
    assert "ZQXSECRET" not in str(caught.value) and "Ann" not in str(caught.value)
    assert caught.value.as_json()["error"] == "invalid-encounter"
    assert _row(engine, eid)["disposition"] is None  # nothing was written


def test_completion_needs_the_required_fields(engine: Engine) -> None:
    eid = _open(engine)
    with engine.begin() as conn, pytest.raises(EncounterInvalid) as caught:
        update_encounter(
            conn, eid, {"disposition": "voluntary_transport"}, CONFIG, NOW, complete=True
        )
    assert {w for w, _ in caught.value.problems} == {
        "bh_nexus_confirmed", "destination_type", "custom.insurance",
    }  # fmt: skip
    with engine.begin() as conn, pytest.raises(EncounterInvalid) as caught:
        update_encounter(
            conn, eid, {"disposition": "arrest", "destination_type": "ed",
                        "race_ethnicity": ["unknown", "white"],
                        "on_scene_at": "2031-03-04T04:00:00+00:00"}, CONFIG, NOW,
        )  # fmt: skip
    assert {w for w, _ in caught.value.problems} == {
        "destination_type", "race_ethnicity", "on_scene_at",
    }  # fmt: skip


def test_race_groups() -> None:
    assert race_group([]) is None
    assert race_group(["asian"]) == "asian"
    assert race_group(["asian", "white"]) == "multiracial"
    assert race_group(["declined"]) == "declined"


def test_people_are_linked_by_blind_index_never_by_raw_identifiers(engine: Engine) -> None:
    first, second, other = _open(engine), _open(engine), _open(engine)
    person = {"name": "ZQXPERSON Ánn  O'Example", "dob": "1980-02-29", "mrn": "mr-001 23"}
    with engine.begin() as conn:
        a = update_encounter(conn, first, {"person": person}, CONFIG, NOW)
        # Name order, accents, case and punctuation do not matter; the MRN alone also matches.
        b = update_encounter(
            conn, second, {"person": {"name": "o example, ann zqxperson", "dob": "1980-02-29"}},
            CONFIG, NOW,
        )  # fmt: skip
        c = update_encounter(conn, other, {"person": {"mrn": "MR00124"}}, CONFIG, NOW)
    assert a["person_id"] == b["person_id"] != c["person_id"]
    with engine.connect() as conn:
        rows = conn.execute(select(person_identifiers)).mappings().all()
        pseudonyms = conn.execute(select(persons.c.pseudonym)).scalars().all()
    assert {r["kind"] for r in rows} == {"name_dob", "mrn"}
    for r in rows:
        assert r["blind_index"] == blind_index(KEY, r["kind"], r["value"])
        assert "zqxperson" not in r["blind_index"]
    assert all("ZQX" not in p.upper() for p in pseudonyms)
    assert len(pseudonyms) == 2
    # Without a key, linking is refused rather than silently skipped.
    eid = _open(engine)
    with engine.begin() as conn, pytest.raises(EncounterInvalid, match="person linking is off"):
        update_encounter(conn, eid, {"person": {"mrn": "1"}}, OutcomesConfig(), NOW)


def test_conflicting_identifiers_link_to_the_strongest_and_merge_nothing(engine: Engine) -> None:
    with engine.begin() as conn:
        ann = link_person(conn, KEY, {"mrn": "A1"}, NOW)
        bob = link_person(conn, KEY, {"name_dob": "bob|1970-01-01"}, NOW)
        both = link_person(conn, KEY, {"mrn": "A1", "name_dob": "bob|1970-01-01"}, NOW)
        assert link_person(conn, KEY, {}, NOW) is None
    assert ann is not None and bob is not None and both is not None
    assert both.person_id == ann.person_id and both.conflicts == 1 and not both.created
    assert ann.created and ann.pseudonym != bob.pseudonym


def test_identifier_normalization() -> None:
    assert normalized_name("  Zoë  van-Dyke ") == normalized_name("DYKE, ZOE VAN")
    assert identifiers_of({"cad_person_id": " p-12/3 "}) == {"cad_person": "P123"}
    for bad in ({"name": "!!!", "dob": "1990-01-01"}, {"name": "A", "dob": "1990-13-01"},
                {"mrn": 5}, {"ssn": "x"}, {"dob": "1990-01-01"}):  # fmt: skip
        with pytest.raises(IdentifierInvalid) as caught:
            identifiers_of(bad)
        assert "!!!" not in str(caught.value)


def test_referrals_are_validated(engine: Engine) -> None:
    eid = _open(engine)
    with engine.begin() as conn:
        rid = add_referral(conn, eid, "prov-1", NOW, "enrolled", NOW + timedelta(days=3))
        assert rid > 0
        with pytest.raises(EncounterInvalid):
            add_referral(conn, eid, "prov-1", NOW, "vanished")
        with pytest.raises(EncounterInvalid):
            add_referral(conn, eid, "", NOW)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    ["disposition", "race_ethnicity", "custom", "person", "on_scene_at", "language",
     "bh_nexus_confirmed", "actions", "destination_type", "nonsense"]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(FIELDS, JSON, max_size=6) | JSON)
def test_validation_never_fails_on_any_input(changes: Any) -> None:
    """Whatever a form or API client sends gives values or precise problems, never a crash."""
    current = {"call_received_at": RECEIVED, "custom": {}}
    values, _identifiers, problems = validate_changes(changes, CONFIG, current)
    for where, reason in problems:
        assert isinstance(where, str) and isinstance(reason, str)
    assert set(values) <= set(encounters.c.keys())


# --- configuration ----------------------------------------------------------------------------


def _load(tmp_path: Path, outcomes: str) -> Any:
    from corespond.daemon.config import load_config

    path = tmp_path / "corespond.yaml"
    path.write_text(f"state_dir: {tmp_path}\noutcomes:\n{outcomes}")
    return load_config(path)


def test_the_outcomes_section(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("s" * 40 + "\n")
    config = _load(
        tmp_path,
        "  person_key_file: key\n  suppress_below: 5\n"
        "  frequent_utilizer: {threshold: 4}\n"
        "  custom_fields:\n"
        "    insurance: {type: choice, values: [medicaid, none], required: true}\n"
        "    visits: {type: integer, minimum: 0, maximum: 9}\n",
    ).outcomes
    assert config.person_key == b"s" * 40 and config.suppress_below == 5
    assert (config.frequent_utilizer.threshold, config.frequent_utilizer.window_days) == (4, 365)
    assert [f.name for f in config.custom_fields] == ["insurance", "visits"]
    assert config.custom_fields[0].required and config.custom_fields[1].maximum == 9


def test_outcomes_section_errors_name_their_key(tmp_path: Path) -> None:
    from corespond.daemon.config import ConfigError

    (tmp_path / "short").write_text("too short")
    with pytest.raises(ConfigError) as caught:
        _load(
            tmp_path,
            "  person_key_file: short\n"
            "  custom_fields:\n"
            "    disposition: {type: boolean}\n"
            "    level: {type: choice}\n"
            "    flag: {type: boolean, values: [a]}\n"
            "    count: {type: integer, minimum: 5, maximum: 1}\n",
        )
    assert {p.path for p in caught.value.problems} == {
        "outcomes.person_key_file",
        "outcomes.custom_fields.disposition",
        "outcomes.custom_fields.level",
        "outcomes.custom_fields.flag.values",
        "outcomes.custom_fields.count.minimum",
    }
    # Schema errors: a type that is not offered (no free text), a name that is not a key.
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, "  custom_fields:\n    note: {type: text}\n    Bad-Name: {type: boolean}\n")
    paths = {p.path for p in caught.value.problems}
    assert "outcomes.custom_fields.note.type" in paths
    assert any("Bad-Name" in p.path for p in caught.value.problems)


def test_demo_encounters_are_seeded_once(engine: Engine) -> None:
    from corespond.daemon.synthetic_encounters import seed_demo_encounters

    today = NOW.date()
    assert seed_demo_encounters(engine, 300, 3, today) == 300
    assert seed_demo_encounters(engine, 300, 3, today) == 0  # not into a store that has some
    with engine.connect() as conn:
        times = conn.execute(select(encounters.c.call_received_at)).scalars().all()
    assert len(times) == 300
    assert min(times).date() >= today - timedelta(days=92) and max(times).date() <= today


def test_the_export_carries_custom_fields_and_no_identifiers(engine: Engine) -> None:
    from corespond.daemon.encounters import export_encounters

    eid = _open(engine, cad_incident_no="ZQXCAD-77")
    changes = {**COMPLETE, "person": {"name": "ZQXPERSON Doe", "dob": "1990-01-01"}}
    with engine.begin() as conn:
        update_encounter(conn, eid, changes, CONFIG, NOW, complete=True)
    _open(engine)  # another: no person, no custom values
    with engine.connect() as conn:
        rows = list(export_encounters(conn, RECEIVED, NOW, CONFIG.custom_fields))
        pseudonym = conn.execute(select(persons.c.pseudonym)).scalar_one()
    assert len(rows) == 2
    row = next(r for r in rows if r["encounter"] == eid)
    assert row["person"] == pseudonym
    assert row["custom.insurance"] == "medicaid" and row["custom.supports"] == "family"
    assert row["custom.mou_signed"] is None
    assert row["race_ethnicity"] == "black_african_american;hispanic_latino"
    assert "ZQX" not in json.dumps(rows, default=str).upper()
