"""The ack page in a real headless Chromium on a phone-sized viewport, over a real socket."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from corespond.daemon.clock import Clock
from corespond.daemon.pager import PageAnswer
from corespond.daemon.responders import PageView
from corespond.daemon.web import build_web_site, link_signer
from tests.browser import PHONE_VIEWPORT, ServedReactor, browser, free_port, served
from tests.daemon.web.desks import DictDesks, page_view
from tests.daemon.web.rig import web_config

__all__ = ["browser", "served"]  # the fixtures, imported for pytest

pytestmark = pytest.mark.browser

EXPECTED_TEXT = """Page C1445-2
Welfare check
Location
1400 block of Main St
Incident
24-001234
Paged
03:12 MST, 27 Nov
Status
Waiting for your answer
Accept
Decline
En route"""


# Every wait has a deadline and blocks on an event; nothing sleeps.
DEADLINE = 30.0


@dataclass
class SignallingDesks(DictDesks):
    """Sets ``answered`` when an answer is recorded, for the test thread to wait on."""

    answered: threading.Event = field(default_factory=threading.Event)

    def answer(
        self, page_ref: str, clinician_id: str, answer: PageAnswer, via: str
    ) -> Deferred[PageView]:
        d = super().answer(page_ref, clinician_id, answer, via)
        self.answered.set()
        return d


def serve_ack_site(served: ServedReactor) -> tuple[str, SignallingDesks, Any]:
    port = free_port()
    config = web_config(public_url=f"http://127.0.0.1:{port}")
    desks = SignallingDesks()
    desks.pages["C1445-2"] = page_view()
    site = build_web_site(config, desks, desks, clock=Clock(served.reactor), reactor=served.reactor)
    served.listen(site, port)
    token = link_signer(config).sign("C1445-2", "clin-7", served.reactor.seconds())
    return f"http://127.0.0.1:{port}/ack/{token}", desks, site


def test_tapping_accept_on_a_phone(browser: Any, served: ServedReactor, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    url, desks, _site = serve_ack_site(served)
    browser.get(url)
    assert browser.execute_script("return [window.innerWidth, window.innerHeight]") == list(
        PHONE_VIEWPORT
    )
    # What is shown, and nothing else.
    assert browser.find_element(By.TAG_NAME, "body").text == EXPECTED_TEXT
    assert browser.title == "Page C1445-2"
    buttons = browser.find_elements(By.TAG_NAME, "button")
    assert [b.text for b in buttons] == ["Accept", "Decline", "En route"]
    for button in buttons:
        rect = button.rect
        assert rect["height"] >= 64 and rect["width"] >= 300  # big enough for a thumb
    # The inline style applied: the CSP allowed it by its hash (a refused style leaves the
    # buttons at their tiny default size, and Chromium logs the violation).
    background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(11, 11, 11)"
    browser.save_screenshot(str(tmp_path / "ack-page.png"))

    buttons[0].click()  # Accept

    assert desks.answered.wait(DEADLINE)
    assert served.call(lambda: list(desks.answers)) == [
        ("C1445-2", "clin-7", PageAnswer.ACCEPT, "ack-page")
    ]
    # chromedriver finishes the pending navigation (the POST's answer) before it looks again.
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "You accepted this page." in body
    assert "Status\nAccepted" in body
    assert [b.text for b in browser.find_elements(By.TAG_NAME, "button")] == [
        "En route",
        "On scene",
    ]
    browser.save_screenshot(str(tmp_path / "ack-page-accepted.png"))
    assert (tmp_path / "ack-page.png").stat().st_size > 1000
    console = [e["message"] for e in browser.get_log("browser")]
    assert not [m for m in console if "Content Security Policy" in m], console


def test_forged_and_expired_links_show_nothing_in_the_browser(
    browser: Any, served: ServedReactor
) -> None:
    from selenium.webdriver.common.by import By

    url, _desks, _site = serve_ack_site(served)
    browser.get(url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB"))
    text = browser.find_element(By.TAG_NAME, "body").text
    assert text == "This link is not valid.\nAnswer by pager or call dispatch."
    base = url.rsplit("/ack/", 1)[0]
    config = web_config(public_url=base)
    stale = link_signer(config).sign("C1445-2", "clin-7", served.reactor.seconds() - 3600)
    browser.get(f"{base}/ack/{stale}")
    text = browser.find_element(By.TAG_NAME, "body").text
    assert text == "This link has expired.\nAnswer by pager or call dispatch."
    assert browser.find_elements(By.TAG_NAME, "form") == []
