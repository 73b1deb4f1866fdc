"""The `gateways:` config section, and build_gateways turning it into working pagers."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock as TaskClock
from twisted.web.server import Site

from corespond.adapters.sms_gateway import SmsCallbackResource
from corespond.adapters.wctp import WctpCallbackResource
from corespond.daemon.clock import Clock
from corespond.daemon.config import ConfigError, load_config
from corespond.daemon.gateways import GatewayQueue, build_gateway_inbound, build_gateways
from corespond.daemon.pager import PageMessage, Submitted
from tests.adapters.carriers import FakeCarrier
from tests.adapters.loopback import Loopback, loopback_fixture
from tests.adapters.pager_events import RecordingEvents, RecordingQuarantine

__all__ = ["loopback_fixture"]  # the fixture, for this module


def write(tmp: Path, text: str) -> Path:
    (tmp / "wctp.code").write_text("code-123\n")
    (tmp / "twilio.token").write_text("tok-secret-9\n")
    path = tmp / "corespond.yaml"
    path.write_text(text)
    return path


FULL = """
gateways:
  wctp-main:
    type: wctp
    url: {url}
    sender_id: corespond
    security_code_file: wctp.code
    callback_token_file: wctp.code
    poll_interval_seconds: 30
    timeout_seconds: 5
    retries: 2
    max_in_flight: 3
    backoff: {{initial_seconds: 1, max_seconds: 8}}
  sms-main:
    type: sms
    account_sid: AC123
    auth_token_file: twilio.token
    from: "+15555550199"
    callback_url: https://corespond.example/gateways/sms-main
  snpp-county:
    type: snpp
    host: snpp.example
  mail-sup:
    type: smtp
    host: smtp.example
    from: corespond@program.example
    starttls: none
"""


def test_a_full_section_parses_to_typed_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL.format(url="https://wctp.example/wctp")))
    wctp, sms, snpp, smtp = config.gateways
    assert (wctp.name, wctp.type, wctp.secret, wctp.retries, wctp.max_in_flight) == (
        "wctp-main", "wctp", "code-123", 2, 3
    )  # fmt: skip
    assert (wctp.backoff_initial_seconds, wctp.backoff_max_seconds) == (1.0, 8.0)
    assert wctp.poll_interval_seconds == 30 and wctp.timeout_seconds == 5
    assert sms.url == "https://api.twilio.com" and sms.secret == "tok-secret-9" and sms.retries == 3
    assert snpp.port == 444 and snpp.tls is None
    assert smtp.port == 587 and smtp.starttls == "none"
    assert "tok-secret-9" not in repr(sms)


@pytest.mark.parametrize(
    ("text", "path", "says"),
    [
        ("gateways:\n  g:\n    type: wctp\n    sender_id: c\n", "gateways.g", "url"),
        ("gateways:\n  g:\n    type: pigeon\n", "gateways.g.type", ""),
        ("gateways:\n  g:\n    type: snpp\n    host: h\n    password: x\n",
         "gateways.g.password", "inline secrets are not allowed"),
        ("gateways:\n  g:\n    type: sms\n    account_sid: A1\n    auth_token_file: nope\n"
         "    from: '+1'\n", "gateways.g.auth_token_file", "cannot read"),
        ("gateways:\n  g:\n    type: sms\n    account_sid: A1\n    auth_token_file: twilio.token\n",
         "gateways.g", "exactly one of from and messaging_service_sid"),
        ("gateways:\n  g:\n    type: wctp\n    url: https://x\n    sender_id: c\n"
         "    backoff: {initial_seconds: 9, max_seconds: 1}\n",
         "gateways.g.backoff.initial_seconds", "greater"),
        ("gateways:\n  g:\n    type: wctp\n    url: http://x\n    sender_id: c\n    tls: {}\n",
         "gateways.g.tls", "https"),
        ("gateways:\n  g:\n    type: smtp\n    host: h\n    from: a@b\n    max_in_flight: 0\n",
         "gateways.g.max_in_flight", ""),
    ],
)  # fmt: skip
def test_errors_name_the_key_path(tmp_path: Path, text: str, path: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert any(p.path == path and says in p.message for p in caught.value.problems), [
        str(p) for p in caught.value.problems
    ]


def test_built_gateways_page_through_a_carrier(tmp_path: Path, loopback: Loopback) -> None:
    carrier = FakeCarrier()
    port = loopback.listen(Site(carrier, reactor=loopback.reactor))
    config = load_config(write(tmp_path, FULL.format(url=f"http://127.0.0.1:{port}/wctp")))
    clock = Clock(loopback.reactor)
    events = RecordingEvents()
    pagers = build_gateways(config.gateways, loopback.reactor, clock, events)
    assert list(pagers) == ["wctp-main", "sms-main", "snpp-county", "mail-sup"]
    assert all(isinstance(p, GatewayQueue) for p in pagers.values())
    assert [p.two_way for p in pagers.values()] == [True, True, False, False]
    wctp = pagers["wctp-main"]
    assert isinstance(wctp, GatewayQueue) and wctp.max_in_flight == 3 and wctp.retries == 2
    page = PageMessage("C1-1", "att-1", "5550100", "C1-1 Welfare check")
    assert loopback.until(wctp.submit(page)) == Submitted("wctp-main", "att-1")
    (submit,) = carrier.submits
    assert submit.find("wctp-SubmitHeader/wctp-Originator").get("securityCode") == "code-123"
    for pager in pagers.values():
        pool = getattr(getattr(pager, "pager", None), "agent", None)
        if pool is not None:
            loopback.cleanups.append(pool._pool.closeCachedConnections)


def test_inbound_side_mounts_callbacks_and_pollers(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL.format(url="https://wctp.example/wctp")))
    timer = TaskClock()
    quarantine = RecordingQuarantine()
    inbound = build_gateway_inbound(config.gateways, timer, Clock(timer), RecordingEvents(),
                                    quarantine=quarantine)  # fmt: skip
    assert sorted(inbound.resources) == ["/gateways/sms-main", "/gateways/wctp-main"]
    assert isinstance(inbound.resources["/gateways/wctp-main"], WctpCallbackResource)
    sms = inbound.resources["/gateways/sms-main"]
    assert isinstance(sms, SmsCallbackResource) and sms.auth_token == "tok-secret-9"
    assert len(inbound.pollers) == 1 and inbound.pollers[0].interval == 30
    assert inbound.pollers[0].quarantine is quarantine and sms.quarantine is quarantine


def test_a_carrier_outage_is_retried_through_the_queue(tmp_path: Path, loopback: Loopback) -> None:
    """The whole outbound path: config -> GatewayQueue -> WctpPager -> carrier answering
    WCTP 604 (system error) once, then accepting; the retry waits on the injected clock."""
    carrier = FakeCarrier()
    carrier.mode = "fail604"
    port = loopback.listen(Site(carrier, reactor=loopback.reactor))
    config = load_config(write(tmp_path, FULL.format(url=f"http://127.0.0.1:{port}/wctp")))
    timer = TaskClock()
    pagers = build_gateways(config.gateways[:1], loopback.reactor, Clock(timer),
                            RecordingEvents(), random=lambda: 1.0)  # fmt: skip
    queue = pagers["wctp-main"]
    assert isinstance(queue, GatewayQueue)
    loopback.cleanups.append(queue.pager.agent._pool.closeCachedConnections)  # type: ignore[attr-defined]
    d = queue.submit(PageMessage("C1-1", "att-1", "5550100", "C1-1 Welfare check"))
    loopback.until_true(lambda: len(carrier.submits) == 1)
    loopback.until_true(lambda: timer.getDelayedCalls() and not queue.in_flight)
    carrier.mode = "ok"
    timer.advance(0.99)  # backoff 1 s (initial_seconds: 1, jitter draw 1.0)
    loopback.turn(20)
    assert len(carrier.submits) == 1
    timer.advance(0.01)
    assert loopback.until(d) == Submitted("wctp-main", "att-1")
    controls = [s.find("wctp-SubmitHeader/wctp-MessageControl") for s in carrier.submits]
    assert [c.get("messageID") for c in controls] == ["att-1", "att-1"]
