"""The encounter form in a real headless Chromium at 390x844, over a real socket, on the real
paging core and store: accept on the ack page, follow its link, fill in and complete the
encounter, and find it stored."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from twisted.internet.defer import Deferred

from corespond.daemon.clock import Clock
from corespond.daemon.encounter_desk import EncounterDesk, FormSave
from corespond.daemon.responders import PageView
from corespond.daemon.web import build_web_site, link_signer
from tests.browser import PHONE_VIEWPORT, ServedReactor, browser, free_port, served
from tests.daemon.test_escalation import World, inline, roster, world
from tests.daemon.web.encounter_rig import (
    CLINICIAN,
    OUTCOMES,
    PAGE,
    paged_incident,
    received_at,
    stored_encounter,
    taken_page,
)
from tests.daemon.web.rig import web_config

__all__ = ["browser", "roster", "served", "world"]  # fixtures, imported for pytest

pytestmark = [pytest.mark.browser, pytest.mark.parametrize("backend", ["sqlite"])]


# Every wait has a deadline and blocks on an event; nothing sleeps.
DEADLINE = 30.0


class SignallingPages:
    """The paging core's page desk, setting ``answered`` when an answer is taken."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.answered = threading.Event()

    def view(self, page_ref: str) -> Deferred[PageView | None]:
        return self.service.view(page_ref)

    def answer(self, *args: Any) -> Deferred[PageView]:
        d = self.service.answer(*args)
        self.answered.set()
        return d


class SignallingDesk(EncounterDesk):
    """Sets ``posted`` when the form posts a save, for the test thread to wait on."""

    posted = threading.Event()

    def update_for_page(self, *args: Any, **kw: Any) -> Deferred[FormSave]:
        d = super().update_for_page(*args, **kw)
        self.posted.set()
        return d


def posted(event: threading.Event) -> None:
    """Wait until the server took the post; chromedriver then waits for its answer."""
    assert event.wait(DEADLINE)
    event.clear()


def serve(
    w: World, served: ServedReactor, **site_kw: Any
) -> tuple[str, SignallingPages, SignallingDesk]:
    """The daemon's site on the test's reactor; the ack link of page C1445-1 to c-101."""
    port = free_port()
    config = web_config(public_url=f"http://127.0.0.1:{port}")
    desk = SignallingDesk(w.engine, OUTCOMES, clock=Clock(w.reactor), run_in_thread=inline)
    desk.posted = threading.Event()
    pages = SignallingPages(w.service)
    site = build_web_site(
        config, pages, w.service, clock=Clock(w.reactor), reactor=served.reactor,
        encounter_desk=desk, custom_fields=OUTCOMES.custom_fields, **site_kw,
    )  # fmt: skip
    served.listen(site, port)
    token = link_signer(config).sign(PAGE, CLINICIAN, w.reactor.seconds())
    return f"http://127.0.0.1:{port}/ack/{token}", pages, desk


def test_accept_then_complete_the_encounter_on_a_phone(
    browser: Any, served: ServedReactor, w: World, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    paged_incident(w)
    url, pages, desk = serve(w, served)
    browser.get(url)
    browser.find_element(By.CSS_SELECTOR, "button.accept").click()
    posted(pages.answered)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "You accepted this page." in body
    link = browser.find_element(By.LINK_TEXT, "Complete the encounter")
    browser.get(link.get_attribute("href"))

    assert browser.title == "Encounter 2026-001445"
    assert browser.execute_script("return [window.innerWidth, window.innerHeight]") == list(
        PHONE_VIEWPORT
    )
    # Phone-sized: nothing wider than the screen, controls big enough for a thumb.
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
    disposition = browser.find_element(By.ID, "f-disposition")
    assert disposition.rect["height"] >= 44 and disposition.rect["width"] >= 300
    background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(11, 11, 11)"  # the style applied: the CSP allowed its hash
    browser.save_screenshot(str(tmp_path / "encounter-form.png"))

    # First try to complete without the required answers: shown beside their fields.
    browser.find_element(By.CSS_SELECTOR, "button.complete").click()
    posted(desk.posted)
    problem = browser.find_element(By.ID, "f-disposition-problem")
    assert problem.text == "is required to complete"
    assert browser.find_element(By.ID, "f-custom-follow_up_days-problem").text == (
        "is required to complete"
    )
    assert stored_encounter(w)["status"] == "open"

    Select(browser.find_element(By.ID, "f-bh_nexus_confirmed")).select_by_visible_text("Yes")
    for value in ("psychosis", "homelessness"):
        browser.find_element(By.CSS_SELECTOR, f"input[name=presenting_issues][value={value}]"
                             ).click()  # fmt: skip
    browser.find_element(By.CSS_SELECTOR, "input[name=actions][value=de_escalation]").click()
    Select(browser.find_element(By.ID, "f-disposition")).select_by_value("voluntary_transport")
    Select(browser.find_element(By.ID, "f-destination_type")).select_by_visible_text(
        "Emergency department"
    )
    Select(browser.find_element(By.ID, "f-would_have_been_arrest")).select_by_value("yes")
    Select(browser.find_element(By.ID, "f-use_of_force")).select_by_value("no")
    Select(browser.find_element(By.ID, "f-demographics_source")).select_by_value("observed")
    browser.find_element(By.CSS_SELECTOR, "input[name=race_ethnicity][value=unknown]").click()
    Select(browser.find_element(By.ID, "f-gender")).select_by_value("declined")
    Select(browser.find_element(By.ID, "f-age_band")).select_by_visible_text("45 to 54")
    Select(browser.find_element(By.ID, "f-housing")).select_by_value("unsheltered")
    language = browser.find_element(By.ID, "f-language")
    language.clear()
    language.send_keys("en")
    cleared = (received_at(w) + timedelta(minutes=42)).astimezone(ZoneInfo("America/Denver"))
    # A datetime-local control takes typed digits field by field; its value is what a
    # phone's picker would set, so the test sets it the same way.
    browser.execute_script(
        "arguments[0].value = arguments[1]",
        browser.find_element(By.ID, "f-cleared_at"),
        cleared.strftime("%Y-%m-%dT%H:%M"),
    )
    follow_up = browser.find_element(By.ID, "f-custom-follow_up_days")
    follow_up.send_keys("3")
    browser.find_element(By.CSS_SELECTOR, "input[name='custom.services'][value=shelter]").click()
    browser.find_element(By.CSS_SELECTOR, "button.complete").click()
    posted(desk.posted)

    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Saved and completed." in body, body
    browser.save_screenshot(str(tmp_path / "encounter-saved.png"))
    row = stored_encounter(w)
    assert row["status"] == "completed"
    assert row["bh_nexus_confirmed"] is True
    assert row["presenting_issues"] == ["psychosis", "homelessness"]
    assert row["actions"] == ["de_escalation"] and row["service_on_scene"] is True
    assert (row["disposition"], row["destination_type"]) == ("voluntary_transport", "ed")
    assert row["would_have_been_arrest"] is True and row["use_of_force"] is False
    assert row["demographics_source"] == "observed"
    assert row["race_ethnicity"] == ["unknown"] and row["race_group"] == "unknown"
    assert (row["gender"], row["age_band"], row["housing"]) == ("declined", "45_54",
                                                               "unsheltered")  # fmt: skip
    assert row["language"] == "en"
    assert row["cleared_at"].strftime("%Y-%m-%d %H:%M") == cleared.astimezone(
        ZoneInfo("UTC")
    ).strftime("%Y-%m-%d %H:%M")
    assert row["custom"]["follow_up_days"] == 3 and row["custom"]["services"] == ["shelter"]
    console = [e["message"] for e in browser.get_log("browser")]
    assert not [m for m in console if "Content Security Policy" in m], console
    assert (tmp_path / "encounter-form.png").stat().st_size > 1000


def test_refer_from_the_encounter_on_a_phone(
    browser: Any, served: ServedReactor, w: World, tmp_path: Path
) -> None:
    """Through the real referral service (its thread pool and worker on the served reactor):
    a Part 2 referral without consent is held, and the page says why; two taps on "Send
    referral" make one referral."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from twisted.internet.defer import ensureDeferred

    from corespond.daemon.referrals import ReferralService
    from corespond.daemon.web.referral_form import ReferralDesk, referral_pages
    from tests.daemon.referral_rig import config, provider

    service = ReferralService(
        w.engine, served.reactor,
        config(provider("csu", service_types=("crisis-stabilization",)),
               provider("detox-west", service_types=("detox",))),
    )  # fmt: skip
    created = threading.Event()

    def create(wanted: Any) -> Deferred[Any]:
        return service.create(wanted).addCallback(lambda r: (created.set(), r)[1])

    served.call(service.start)
    try:
        taken_page(w)
        desk = ReferralDesk(service.config, service.person_of, create)
        url, _pages, _desk = serve(w, served, referral_page=referral_pages(desk))
        browser.get(url)
        browser.get(browser.find_element(By.LINK_TEXT, "Refer to a provider").get_attribute("href"))
        assert browser.title == "Referral 2026-001445"
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        # The person as recorded on the incident, shown to be confirmed.
        assert browser.find_element(By.ID, "f-given").get_attribute("value") == "ZQXPERSON"
        Select(browser.find_element(By.ID, "f-provider")).select_by_value("detox-west")
        Select(browser.find_element(By.ID, "f-service_type")).select_by_value("detox")
        Select(browser.find_element(By.ID, "f-urgency")).select_by_visible_text("Immediately")
        browser.find_element(By.ID, "f-summary").send_keys("Withdrawal risk.\nWants detox.")
        phone = browser.find_element(By.ID, "f-phone")
        assert phone.get_attribute("value") == "555-0100"
        phone.clear()
        phone.send_keys("555-0199")  # the clinician corrects what was recorded
        browser.find_element(By.CSS_SELECTOR, "input[name=part2][value=yes]").click()
        browser.find_element(By.CSS_SELECTOR, "input[name=confirmed][value=yes]").click()
        browser.save_screenshot(str(tmp_path / "referral-form.png"))
        # Tapped twice: one referral (the form's submission nonce is its idempotency key).
        ActionChains(browser).double_click(
            browser.find_element(By.CSS_SELECTOR, "button.complete")
        ).perform()
        assert created.wait(DEADLINE)
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "is held" in body and "Held, not sent: 42 CFR Part 2" in body, body
        browser.save_screenshot(str(tmp_path / "referral-held.png"))
        with w.engine.connect() as conn:
            from sqlalchemy import select

            from corespond.daemon.store.tables import referrals

            (row,) = conn.execute(select(referrals)).mappings()
        assert (row["state"], row["provider"], row["urgency"], row["part2"]) == (
            "held", "detox-west", "stat", True,
        )  # fmt: skip
        assert row["hold_reason"].startswith("part2-no-consent")
        assert row["summary"] == "Withdrawal risk.\nWants detox."
        assert row["person"]["phone"] == "555-0199"
        assert row["referring_clinician"] == CLINICIAN
    finally:
        served.call(lambda: ensureDeferred(service.stop()))
