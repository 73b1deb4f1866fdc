"""The referral form beside the encounter form: parsing (pure, fuzzed) and the page over the
real paging core, store and referral code (hl7apy build, outbox), on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from structlog.testing import capture_logs
from twisted.internet.defer import Deferred, maybeDeferred

from corespond.adapters.hl7_referral import Person
from corespond.daemon.encounter_desk import PageEncounter
from corespond.daemon.referrals import (
    create_referral,
    person_of_incident,
    record_consent,
)
from corespond.daemon.store.tables import referral_messages, referrals
from corespond.daemon.web import encounter_link_signer
from corespond.daemon.web.referral_form import (
    ReferralDesk,
    form_from_person,
    hold_text,
    referral_pages,
    request_from_form,
)
from tests.daemon.referral_rig import config as referrals_config
from tests.daemon.referral_rig import provider
from tests.daemon.test_escalation import World, roster, world
from tests.daemon.web.encounter_rig import (
    CLINICIAN,
    FORM_HEADERS,
    PAGE,
    ack_token,
    encounter_token,
    form_site,
    taken_page,
)
from tests.daemon.web.rig import web_config
from tests.daemon.web.test_encounter_form import request

__all__ = ["roster", "world"]  # fixtures, imported for pytest

FOUND = PageEncounter(7, PAGE, CLINICIAN, "2026-001445", "metro", "Z9", {})
CONFIG = referrals_config(
    provider("csu", service_types=("crisis-stabilization", "outpatient")),
    provider("detox-west", service_types=("detox",)),
)
GOOD = {
    "provider": ["csu"],
    "service_type": ["crisis-stabilization"],
    "urgency": ["asap"],
    "summary": ["Calm now.\r\nAgrees to a bed tonight."],
    "family": ["Example"],
    "given": ["ZQXPERSON"],
    "birth_date": ["1990-01-01"],
    "sex": ["F"],
    "phone": ["555-0100"],
    "street": [""],
    "city": ["Testville"],
    "state": ["TX"],
    "postal_code": [""],
    "consent_ref": [""],
    "confirmed": ["yes"],
}


# --- parsing -------------------------------------------------------------------------------------


def test_a_form_becomes_the_request_the_api_would_make() -> None:
    wanted, problems = request_from_form(GOOD, FOUND, CLINICIAN)
    assert problems == [] and wanted is not None
    assert (wanted.incident_ref, wanted.referring_clinician, wanted.program, wanted.region) == (
        "2026-001445", CLINICIAN, "metro", "Z9",
    )  # fmt: skip
    assert (wanted.provider, wanted.service_type, wanted.urgency) == (
        "csu", "crisis-stabilization", "asap",
    )  # fmt: skip
    assert wanted.summary == "Calm now.\nAgrees to a bed tonight."  # browsers send CRLF
    assert wanted.person == Person(
        family="Example", given="ZQXPERSON", birth_date="1990-01-01", sex="F", phone="555-0100",
        city="Testville", state="TX",
    )  # fmt: skip
    assert wanted.part2 is False and wanted.consent_ref is None


def test_every_problem_names_its_field() -> None:
    form = {**GOOD, "provider": [""], "urgency": ["whenever"], "sex": ["X"], "confirmed": [],
            "summary": ["a\x00b"], "part2": ["yes", "yes"], "extra": ["1"]}  # fmt: skip
    wanted, problems = request_from_form(form, FOUND, CLINICIAN)
    assert wanted is None
    assert dict(problems) == {
        "form": "has fields this form does not have: open the link again",
        "provider": "is required",
        "urgency": "must be one of stat, asap, routine",
        "summary": "summary holds control characters",
        "sex": "must be F, M, O or U",
        "part2": "was sent more than once",
        "confirmed": "confirm the person's details before referring",
    }


FORM_TEXT = st.text(st.characters(codec="utf-8"), max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from((*GOOD, "part2", "x")) | st.text(max_size=5),
        st.lists(FORM_TEXT, max_size=2),
        max_size=10,
    )
)
def test_any_posted_form_gives_a_request_or_problems(form: dict[str, list[str]]) -> None:
    wanted, problems = request_from_form({**GOOD, **form}, FOUND, CLINICIAN)
    assert (wanted is None) == bool(problems)
    for _where, reason in problems:
        # From a closed set of texts: nothing typed is ever quoted.
        assert any(re.fullmatch(pattern, reason) for pattern in REFERRAL_REASONS), reason


REFERRAL_REASONS = (
    "has fields this form does not have: open the link again",
    "was sent more than once",
    "is required",
    r"[a-z_]+ must be at most \d+ characters",
    r"[a-z_]+ holds control characters",
    "must be one of stat, asap, routine",
    "must be F, M, O or U",
    "confirm the person's details before referring",
    "is not one this server sent: open the link again",
)


def test_the_person_as_recorded_fills_the_form_and_hold_reasons_read_plainly() -> None:
    form = form_from_person(Person(family="Example", birth_date="19900101"))
    assert form["family"] == ["Example"] and form["birth_date"] == ["1990-01-01"]
    assert form["given"] == [""] and form["urgency"] == ["routine"]
    assert form_from_person(None)["family"] == [""]
    text = hold_text("part2-no-consent: a Part 2 referral needs --consent")
    assert "42 CFR Part 2" in text and "--consent" not in text
    assert "needs a consent reference" in text


# --- the page ------------------------------------------------------------------------------------


def referral_desk(w: World) -> ReferralDesk:
    """The referral code the service runs, inline: person lookup and create_referral."""

    def person_of(incident_ref: str) -> Deferred[tuple[Person, str | None] | None]:
        def look() -> tuple[Person, str | None] | None:
            with w.engine.connect() as conn:
                return person_of_incident(conn, incident_ref)

        return maybeDeferred(look)

    def create(wanted: Any) -> Deferred[Any]:
        return maybeDeferred(create_referral, w.engine, CONFIG, wanted, datetime.now(UTC))

    return ReferralDesk(CONFIG, person_of, create)


def post_body(token: str, form: dict[str, list[str]]) -> bytes:
    nonce = encounter_link_signer(web_config()).form_nonce(token)
    return urlencode({"nonce": nonce, **form}, doseq=True).encode()


def stored_referrals(w: World) -> list[dict[str, Any]]:
    with w.engine.connect() as conn:
        rows = conn.execute(select(referrals).order_by(referrals.c.id)).mappings()
        return [dict(r) for r in rows]


def test_the_clinician_refers_from_the_encounter(w: World) -> None:
    taken_page(w)
    site, _desk = form_site(w, referral_page=referral_pages(referral_desk(w)))
    ack = request(site, "GET", f"/ack/{ack_token(w)}")
    links = re.findall(r'href="([^"]+)"', ack.text)
    assert [u.rsplit("/", 1)[1] for u in links][1] == "referral"
    token = encounter_token(w)
    assert 'href="https://corespond.example.test/encounter/' in request(
        site, "GET", f"/encounter/{token}").text  # fmt: skip
    with capture_logs() as logs:
        shown = request(site, "GET", f"/encounter/{token}/referral")
    assert shown.status == 200 and "<script" not in shown.text
    # The person as recorded on the incident, to confirm (the test snapshot's "person").
    assert 'name="given" type=text value="ZQXPERSON"' in shown.text
    assert 'name="family" type=text value="Example"' in shown.text
    assert '<option value="detox">detox</option>' in shown.text
    with capture_logs() as more:
        got = request(site, "POST", f"/encounter/{token}/referral", post_body(token, GOOD),
                      FORM_HEADERS)  # fmt: skip
    assert got.status == 201, got.text
    (row,) = stored_referrals(w)
    assert re.search(rf"Referral {row['ref']} created", got.text)
    assert (row["state"], row["provider"], row["service_type"], row["urgency"]) == (
        "queued", "csu", "crisis-stabilization", "asap",
    )  # fmt: skip
    assert (row["incident_ref"], row["referring_clinician"], row["program"]) == (
        "2026-001445", CLINICIAN, "metro",
    )  # fmt: skip
    assert row["person"]["given"] == "ZQXPERSON" and row["summary"].startswith("Calm now.\n")
    with w.engine.connect() as conn:
        (message,) = conn.execute(select(referral_messages.c.message)).scalars()
    assert b"REF^I12" in message and b"ZQXPERSON" in message
    # Nothing of the person or the summary reaches a log line.
    assert not any("ZQXPERSON" in str(e) or "bed tonight" in str(e) for e in logs + more)
    assert [e["event"] for e in more if e["event"].startswith("web.")] == ["web.referral.created"]


def test_a_part2_referral_without_consent_is_held_and_says_why(w: World) -> None:
    taken_page(w)
    site, _desk = form_site(w, referral_page=referral_pages(referral_desk(w)))
    token = encounter_token(w)
    part2 = {**GOOD, "provider": ["detox-west"], "service_type": ["detox"], "part2": ["yes"]}
    got = request(site, "POST", f"/encounter/{token}/referral", post_body(token, part2),
                  FORM_HEADERS)  # fmt: skip
    assert got.status == 201 and "is held" in got.text
    assert "Held, not sent: 42 CFR Part 2" in got.text
    (row,) = stored_referrals(w)
    assert row["state"] == "held" and row["hold_reason"].startswith("part2-no-consent")
    # With a consent that covers the provider for treatment it is queued.
    with w.engine.begin() as conn:
        record_consent(conn, "CONSENT-1", "detox-west", datetime.now(UTC))
    covered = {**part2, "consent_ref": ["CONSENT-1"]}
    got = request(site, "POST", f"/encounter/{token}/referral", post_body(token, covered),
                  FORM_HEADERS)  # fmt: skip
    assert got.status == 201 and stored_referrals(w)[-1]["state"] == "queued"


def test_sending_the_same_form_twice_makes_one_referral(w: World) -> None:
    """Two taps on "Send referral" post the form's submission nonce twice: the second answers
    with the referral the first made. A form served again carries a new nonce."""
    taken_page(w)
    site, _desk = form_site(w, referral_page=referral_pages(referral_desk(w)))
    token = encounter_token(w)
    shown = request(site, "GET", f"/encounter/{token}/referral")
    [submission] = re.findall(r'name=submission value="([^"]+)"', shown.text)
    [another] = re.findall(r'name=submission value="([^"]+)"',
                           request(site, "GET", f"/encounter/{token}/referral").text)  # fmt: skip
    assert submission != another
    form = {**GOOD, "submission": [submission]}
    first = request(site, "POST", f"/encounter/{token}/referral", post_body(token, form),
                    FORM_HEADERS)  # fmt: skip
    again = request(site, "POST", f"/encounter/{token}/referral", post_body(token, form),
                    FORM_HEADERS)  # fmt: skip
    (row,) = stored_referrals(w)
    assert first.status == again.status == 201
    assert f"Referral {row['ref']} created" in first.text and "already sent" not in first.text
    assert f"Referral {row['ref']} created" in again.text and "already sent" in again.text
    # The same nonce with other contents is refused, and says so without quoting them.
    changed = {**form, "summary": ["ZQXOTHER summary"]}
    refused = request(site, "POST", f"/encounter/{token}/referral", post_body(token, changed),
                      FORM_HEADERS)  # fmt: skip
    assert refused.status == 422 and "idempotency key was used for another request" in refused.text
    assert "ZQXOTHER" not in refused.text.split("</textarea>")[-1]
    # Another form (its own nonce) makes another referral; a forged nonce makes none.
    request(site, "POST", f"/encounter/{token}/referral",
            post_body(token, {**GOOD, "submission": [another]}), FORM_HEADERS)  # fmt: skip
    forged = request(site, "POST", f"/encounter/{token}/referral",
                     post_body(token, {**GOOD, "submission": ["<x>"]}), FORM_HEADERS)  # fmt: skip
    assert forged.status == 422 and "open the link again" in forged.text
    assert len(stored_referrals(w)) == 2


def test_refused_referrals_show_why_and_create_nothing(w: World) -> None:
    taken_page(w)
    site, _desk = form_site(w, referral_page=referral_pages(referral_desk(w)))
    token = encounter_token(w)
    unconfirmed = {**GOOD, "confirmed": []}
    got = request(site, "POST", f"/encounter/{token}/referral", post_body(token, unconfirmed),
                  FORM_HEADERS)  # fmt: skip
    assert got.status == 422 and 'id="f-confirmed-problem"' in got.text
    assert 'value="ZQXPERSON"' in got.text  # what was typed stays on the form
    wrong_service = {**GOOD, "service_type": ["detox"]}
    got = request(site, "POST", f"/encounter/{token}/referral", post_body(token, wrong_service),
                  FORM_HEADERS)  # fmt: skip
    assert got.status == 422 and "provider csu does not take service type detox" in got.text
    cross = [("Content-Type", "application/x-www-form-urlencoded"),
             ("Origin", "https://evil.example")]  # fmt: skip
    got = request(site, "POST", f"/encounter/{token}/referral", post_body(token, GOOD), cross)
    assert got.status == 403
    other = encounter_token(w, "c-102")
    assert request(site, "GET", f"/encounter/{other}/referral").status == 404
    got = request(site, "POST", f"/encounter/{other}/referral", post_body(other, GOOD),
                  FORM_HEADERS)  # fmt: skip
    assert got.status == 404
    assert request(site, "GET", f"/encounter/{token}/referral/x").status == 404
    assert stored_referrals(w) == []
