"""The encounter form: its parsing (pure, fuzzed), and the page over the real paging core and
store (SQLite and PostgreSQL), driven over StringTransport."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from corespond.daemon.encounters import (
    ACTIONS,
    AGE_BANDS,
    DEMOGRAPHICS_SOURCES,
    DESTINATION_TYPES,
    DISPOSITIONS,
    GENDERS,
    HOUSING,
    PRESENTING_ISSUES,
    RACE_ETHNICITY,
    VETERAN,
)
from corespond.daemon.pager import PageAnswer
from corespond.daemon.signed_links import ENCOUNTER_PURPOSE
from corespond.daemon.web import encounter_link_signer
from corespond.daemon.web.encounter_form import (
    FORM_STYLE,
    changes_from_form,
    form_from_encounter,
    wants_completion,
)
from corespond.daemon.web.forms import problems_by_field
from tests.daemon.test_escalation import World, roster, world
from tests.daemon.web.encounter_rig import (
    CLINICIAN,
    CUSTOM_FIELDS,
    FORM_HEADERS,
    PAGE,
    ack_token,
    encounter_token,
    form_body,
    form_site,
    paged_incident,
    received_at,
    stored_encounter,
    taken_page,
)
from tests.daemon.web.rig import PEER, PUBLIC_URL, Response, parse, raw, web_config

__all__ = ["roster", "world"]  # fixtures, imported for pytest

ZONE = ZoneInfo("America/Denver")


# --- parsing -------------------------------------------------------------------------------------


def _subset(values: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(values), unique=True)


def _maybe(values: tuple[str, ...]) -> st.SearchStrategy[str | None]:
    return st.none() | st.sampled_from(values)


TRI = st.none() | st.booleans()
# Times the form shows to the second, in a zone with DST: not the hour a fall-back repeats.
TIMES = st.none() | st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
).map(lambda t: t.replace(microsecond=0)).filter(
    lambda t: t.astimezone(ZONE).replace(tzinfo=None).replace(tzinfo=ZONE).astimezone(UTC) == t
)

ENCOUNTER_VALUES = st.fixed_dictionaries(
    {
        "disposition": _maybe(DISPOSITIONS),
        "destination_type": _maybe(DESTINATION_TYPES),
        "demographics_source": _maybe(DEMOGRAPHICS_SOURCES),
        "gender": _maybe(GENDERS),
        "age_band": _maybe(AGE_BANDS),
        "veteran": _maybe(VETERAN),
        "housing": _maybe(HOUSING),
        "presenting_issues": _subset(PRESENTING_ISSUES),
        "actions": _subset(ACTIONS),
        "race_ethnicity": _subset(RACE_ETHNICITY),
        "bh_nexus_confirmed": TRI,
        "would_have_been_arrest": TRI,
        "would_have_been_ed": TRI,
        "use_of_force": TRI,
        "injury_subject": TRI,
        "injury_officer": TRI,
        "weapon_present": TRI,
        "cleared_at": TIMES,
        "officer_cleared_at": TIMES,
        "language": st.none() | st.sampled_from(("en", "es", "zh-Hant", "unknown")),
        "custom": st.fixed_dictionaries(
            {
                "follow_up_days": st.none() | st.integers(0, 30),
                "peer_present": TRI,
                "services": st.none() | _subset(("food", "shelter", "detox")).filter(bool),
                "risk": _maybe(("low", "moderate", "high")),
                "next_contact": st.none() | st.dates().map(lambda d: d.isoformat()),
                "distance_km": st.none()
                | st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
            }
        ),
    }
)


@settings(max_examples=200, deadline=None)
@given(ENCOUNTER_VALUES)
def test_a_stored_encounter_shown_and_posted_back_changes_nothing(values: dict[str, Any]) -> None:
    form = form_from_encounter(values, CUSTOM_FIELDS, ZONE)
    changes, problems = changes_from_form(form, CUSTOM_FIELDS, ZONE)
    assert problems == []
    expected = dict(values)
    for name in ("cleared_at", "officer_cleared_at"):
        at = values[name]
        expected[name] = at.isoformat() if at is not None else None
    assert changes == expected


FORM_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ("disposition", "cleared_at", "custom.follow_up_days", "custom.distance_km",
             "custom.peer_present", "use_of_force", "race_ethnicity", "language", "action",
             "custom.services", "x")
        ) | FORM_TEXT,
        st.lists(FORM_TEXT, max_size=3),
        max_size=8,
    )
)  # fmt: skip
def test_any_posted_form_parses_to_changes_or_problems(form: dict[str, list[str]]) -> None:
    changes, problems = changes_from_form(form, CUSTOM_FIELDS, ZONE)
    assert isinstance(changes, dict)
    for where, reason in problems:
        # A reason comes from a closed set: it never quotes what was typed, and the field it
        # names is one of the form's own.
        assert reason in FORM_REASONS, reason
        assert where == "form" or where in form, where


FORM_REASONS = {
    "was sent more than once",
    "must be yes, no or not recorded",
    "must be a date and time",
    "must be a local date and time",
    "must be a whole number",
    "must be a number",
    "has fields this form does not have: open the link again",
}


def test_what_only_the_form_can_see_is_a_problem_of_its_field() -> None:
    form = form_from_encounter({}, CUSTOM_FIELDS, ZONE)
    form.update(
        {
            "cleared_at": ["yesterday"],
            "custom.follow_up_days": ["three"],
            "custom.distance_km": ["inf"],
            "use_of_force": ["maybe"],
            "gender": ["woman", "man"],
            "sneaky": ["1"],
        }
    )
    _changes, problems = changes_from_form(form, CUSTOM_FIELDS, ZONE)
    assert problems_by_field(problems) == {
        "gender": ["was sent more than once"],
        "use_of_force": ["must be yes, no or not recorded"],
        "cleared_at": ["must be a date and time"],
        "custom.follow_up_days": ["must be a whole number"],
        "custom.distance_km": ["must be a number"],
        "form": ["has fields this form does not have: open the link again"],
    }


def test_local_times_are_read_in_the_sites_zone_and_unticked_lists_are_empty() -> None:
    form = form_from_encounter({}, CUSTOM_FIELDS, ZONE)
    form["cleared_at"] = ["2026-11-27T03:15"]
    form["action"] = ["complete"]
    changes, problems = changes_from_form(form, CUSTOM_FIELDS, ZONE)
    assert problems == [] and wants_completion(form)
    assert changes["cleared_at"] == "2026-11-27T10:15:00+00:00"  # MST is UTC-7
    assert changes["presenting_issues"] == [] and changes["custom"]["services"] is None
    assert problems_by_field([("race_ethnicity[2]", "r"), ("", "top")]) == {
        "race_ethnicity": ["r"],
        "": ["top"],
    }


# --- the page, over the real paging core and store ------------------------------------------------


def request(site: Any, method: str, path: str, body: bytes = b"",
            headers: Any = ()) -> Response:  # fmt: skip
    from twisted.internet.testing import StringTransport

    proto = site.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    proto.dataReceived(raw(method, path, body, headers))
    return parse(transport.value())


def test_the_ack_page_of_a_taken_call_links_to_the_encounter_form(w: World) -> None:
    site, _desk = form_site(w)
    paged_incident(w)
    incident_only = request(site, "GET", f"/ack/{ack_token(w)}")
    assert incident_only.status == 200
    assert "Complete the encounter" not in incident_only.text  # not taken yet
    result = w.service.answer(PAGE, CLINICIAN, PageAnswer.ACCEPT, "ack-page")
    assert result.called
    got = request(site, "GET", f"/ack/{ack_token(w)}")
    assert got.status == 200 and "Complete the encounter" in got.text
    assert "Refer to a provider" not in got.text  # this daemon sends no referrals
    (url,) = re.findall(r'href="([^"]+)"', got.text)
    assert url.startswith(f"{PUBLIC_URL}/encounter/v1.")
    token = url.rsplit("/", 1)[1]
    claims = encounter_link_signer(web_config()).verify(token, w.reactor.seconds())
    assert (claims.page_ref, claims.clinician_id) == (PAGE, CLINICIAN)
    # The encounter link outlives the ack link (3 days against 1 hour here).
    assert claims.expires == int(w.reactor.seconds()) + 259_200


def test_the_clinician_fills_in_and_completes_the_encounter(w: World) -> None:
    taken_page(w)
    site, _desk = form_site(w)
    token = encounter_token(w)
    shown = request(site, "GET", f"/encounter/{token}")
    assert shown.status == 200
    assert shown.headers[b"content-security-policy"] == FORM_STYLE.csp.encode()
    assert "<script" not in shown.text
    assert "Incident 2026-001445 · Page C1445-1" in shown.text
    assert 'name="custom.follow_up_days" type=number' in shown.text
    assert "(required to complete)" in shown.text
    cleared = (received_at(w) + timedelta(minutes=50)).astimezone(ZoneInfo("America/Denver"))
    form = form_from_encounter({}, CUSTOM_FIELDS, ZONE)
    form.update(
        {
            "bh_nexus_confirmed": ["yes"],
            "presenting_issues": ["suicidal", "substance"],
            "actions": ["assessment", "safety_plan"],
            "disposition": ["voluntary_transport"],
            "destination_type": ["crisis_center"],
            "would_have_been_ed": ["yes"],
            "use_of_force": ["no"],
            "demographics_source": ["self_reported"],
            "race_ethnicity": ["asian", "white"],
            "age_band": ["25_34"],
            "language": ["es"],
            "cleared_at": [cleared.strftime("%Y-%m-%dT%H:%M")],
            "custom.follow_up_days": ["7"],
            "custom.services": ["food", "detox"],
            "custom.peer_present": ["yes"],
            "action": ["complete"],
        }
    )
    with capture_logs() as logs:
        got = request(site, "POST", f"/encounter/{token}", form_body(token, form), FORM_HEADERS)
    assert got.status == 200, got.text
    assert "Saved and completed." in got.text
    row = stored_encounter(w)
    assert row["status"] == "completed" and row["completed_at"] is not None
    assert row["disposition"] == "voluntary_transport"
    assert row["destination_type"] == "crisis_center"
    assert row["race_ethnicity"] == ["asian", "white"] and row["race_group"] == "multiracial"
    assert row["presenting_issues"] == ["suicidal", "substance"]
    assert row["service_on_scene"] is True and row["would_have_been_ed"] is True
    assert row["use_of_force"] is False and row["would_have_been_arrest"] is None
    assert row["custom"] == {
        "follow_up_days": 7, "peer_present": True, "services": ["food", "detox"],
        "risk": None, "next_contact": None, "distance_km": None,
    }  # fmt: skip
    assert row["cleared_at"].replace(tzinfo=UTC) == cleared.astimezone(UTC).replace(
        second=0, microsecond=0
    )
    assert row["on_scene_seconds"] is None  # nobody said "on scene": no duration invented
    saved = [e for e in logs if e["event"] == "web.encounter.saved"]
    assert saved and saved[0]["encounter_id"] == row["id"]
    # The page shows what is stored: posting it again changes nothing.
    assert 'value="asian" checked' in got.text and "Status</dt><dd>Completed" in got.text


def test_problems_are_shown_beside_their_fields_and_nothing_is_saved(w: World) -> None:
    taken_page(w)
    site, _desk = form_site(w)
    token = encounter_token(w)
    before = stored_encounter(w)
    form = form_from_encounter({}, CUSTOM_FIELDS, ZONE)
    form.update(
        {
            "disposition": ["resolved_on_scene"],
            "destination_type": ["ed"],  # only a transport has one
            "race_ethnicity": ["declined", "white"],
            "language": ["ZQXLANGUAGE!"],
            "action": ["complete"],
        }
    )
    with capture_logs() as logs:
        got = request(site, "POST", f"/encounter/{token}", form_body(token, form), FORM_HEADERS)
    assert got.status == 422
    for field in ("destination_type", "race_ethnicity", "language", "bh_nexus_confirmed",
                  "custom-follow_up_days"):  # fmt: skip
        assert f'id="f-{field}-problem"' in got.text, field
    assert "Not saved: 5 problems below." in got.text
    assert stored_encounter(w) == before
    # What was typed is shown back to the clinician, escaped, and never logged.
    assert 'value="ZQXLANGUAGE!"' in got.text
    assert not any("ZQXLANGUAGE" in str(e) for e in logs)
    (invalid,) = [e for e in logs if e["event"] == "web.encounter.invalid"]
    assert invalid["count"] == 5

    # A problem only the form sees (a number that is not one) stops the save too.
    form = form_from_encounter({}, CUSTOM_FIELDS, ZONE)
    form["custom.follow_up_days"] = ["soon"]
    got = request(site, "POST", f"/encounter/{token}", form_body(token, form), FORM_HEADERS)
    assert got.status == 422 and 'id="f-custom-follow_up_days-problem"' in got.text
    assert stored_encounter(w) == before


def test_only_the_clinician_who_took_the_call_opens_its_encounter(w: World) -> None:
    site, _desk = form_site(w)
    paged_incident(w)  # paged, not yet taken
    token = encounter_token(w)
    got = request(site, "GET", f"/encounter/{token}")
    assert got.status == 404 and "opens no encounter" in got.text
    w.service.answer(PAGE, CLINICIAN, PageAnswer.ON_SCENE, "ack-page")
    assert request(site, "GET", f"/encounter/{token}").status == 404  # on scene needs accept
    w.service.answer(PAGE, CLINICIAN, PageAnswer.ACCEPT, "ack-page")
    assert request(site, "GET", f"/encounter/{token}").status == 200
    # Another clinician's link for the same page, another page, an ack link, a forged one.
    assert request(site, "GET", f"/encounter/{encounter_token(w, 'c-102')}").status == 404
    assert request(site, "GET", f"/encounter/{encounter_token(w, page='C1445-9')}").status == 404
    assert request(site, "GET", f"/encounter/{ack_token(w)}").status == 404
    assert request(site, "GET", f"/ack/{token}").status == 404
    assert request(site, "GET", f"/encounter/{token[:-2]}AA").status == 404
    assert request(site, "GET", f"/encounter/{token}/other").status == 404
    assert request(site, "GET", f"/encounter/{token}/referral").status == 404  # referrals off
    # Expiry is honoured.
    w.reactor.advance(259_200)
    got = request(site, "GET", f"/encounter/{token}")
    assert got.status == 410 and "expired" in got.text


def test_posts_from_elsewhere_or_without_the_nonce_are_refused(w: World) -> None:
    taken_page(w)
    site, _desk = form_site(w)
    token = encounter_token(w)
    before = stored_encounter(w)
    form = form_from_encounter({}, CUSTOM_FIELDS, ZONE)
    form["disposition"] = ["arrest"]
    body = form_body(token, form)
    cross = [("Content-Type", "application/x-www-form-urlencoded"),
             ("Origin", "https://evil.example")]  # fmt: skip
    assert request(site, "POST", f"/encounter/{token}", body, cross).status == 403
    other_token = encounter_token(w, "c-102")
    wrong_nonce = form_body(other_token, form)
    assert request(site, "POST", f"/encounter/{token}", wrong_nonce, FORM_HEADERS).status == 403
    json_type = [("Content-Type", "application/json"), ("Origin", PUBLIC_URL)]
    assert request(site, "POST", f"/encounter/{token}", body, json_type).status == 415
    assert stored_encounter(w) == before
    got = request(site, "POST", f"/encounter/{token}", body, FORM_HEADERS)
    assert got.status == 200 and stored_encounter(w)["disposition"] == "arrest"


def test_the_api_and_the_form_save_through_the_same_desk(w: World) -> None:
    taken_page(w)
    seen: list[tuple[int, str | None]] = []

    def hook(conn: Any, row: Any, now: Any) -> None:
        seen.append((row["id"], row["disposition"]))

    site, desk = form_site(w, hooks=(hook,))
    token = encounter_token(w)
    form = form_from_encounter({}, CUSTOM_FIELDS, ZONE)
    form["disposition"] = ["refused"]
    request(site, "POST", f"/encounter/{token}", form_body(token, form), FORM_HEADERS)
    eid = stored_encounter(w)["id"]
    done: list[Any] = []
    desk.update(eid, {"disposition": "citation"}, False).addCallback(done.append)
    assert done == [{"id": eid, "status": "open"}]
    assert seen == [(eid, "refused"), (eid, "citation")]


def test_the_encounter_signer_is_its_own() -> None:
    signer = encounter_link_signer(web_config())
    assert signer.purpose == ENCOUNTER_PURPOSE
