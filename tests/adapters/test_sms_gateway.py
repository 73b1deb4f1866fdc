"""The Twilio-shaped SMS gateway: sends to a fake Messages API over loopback, signed callbacks
posted over loopback, the signature checked against Twilio's published example."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock as TaskClock
from twisted.web.resource import Resource
from twisted.web.server import Site

from corespond.adapters.http_client import make_agent, request
from corespond.adapters.sms_gateway import (
    SmsCallbackResource,
    SmsPager,
    event_for_form,
    twilio_signature,
)
from corespond.daemon.clock import Clock
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.pager import DeliveryState, PageAnswer, PageMessage, PagerError
from tests.adapters.carriers import FakeMessagesApi
from tests.adapters.loopback import Loopback
from tests.adapters.pager_events import RecordingEvents, RecordingQuarantine

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
SID = "AC" + "0" * 32
TOKEN = "auth-token-for-tests"
PAGE = PageMessage("C1445-2", "att-1", "+15555550100", "C1445-2 Welfare check, 400 blk Main St",
                   link="https://corespond.example/p/abc")  # fmt: skip


def test_twilio_published_example() -> None:
    params = {"CallSid": ["CA1234567890ABCDE"], "Caller": ["+12349013030"], "Digits": ["1234"],
              "From": ["+12349013030"], "To": ["+18005551212"]}  # fmt: skip
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twilio_signature(url, params, "12345") == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def sms_rig(lb: Loopback) -> tuple[SmsPager, FakeMessagesApi, TaskClock]:
    api = FakeMessagesApi()
    port = lb.listen(Site(api, reactor=lb.reactor))
    agent, pool = make_agent(lb.reactor)
    lb.cleanups.append(pool.closeCachedConnections)
    timeouts = TaskClock()
    pager = SmsPager(
        "sms-main", agent=agent, reactor=timeouts, base_url=f"http://127.0.0.1:{port}",
        account_sid=SID, auth_secret=TOKEN, sender="+15555550199",
        status_callback="https://corespond.example/gateways/sms-main", timeout=5,
    )  # fmt: skip
    return pager, api, timeouts


def test_send_posts_the_messages_form_with_basic_auth(loopback: Loopback) -> None:
    pager, api, _ = sms_rig(loopback)
    result = loopback.until(pager.submit(PAGE))
    assert result.gateway == "sms-main" and result.gateway_id == "SM" + "a" * 32
    ((path, form, auth),) = api.posts
    assert path == f"/2010-04-01/Accounts/{SID}/Messages.json".encode()
    assert auth == b"Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode())
    assert form["To"] == ["+15555550100"] and form["From"] == ["+15555550199"]
    assert form["StatusCallback"] == ["https://corespond.example/gateways/sms-main"]
    assert form["Body"] == [
        "C1445-2 Welfare check, 400 blk Main St\nhttps://corespond.example/p/abc\n"
        "Reply 1=Accept 2=Decline 3=En route (C1445-2)"
    ]


@pytest.mark.parametrize(("mode", "retryable", "says"),
                         [("bad-number", False, "HTTP 400 code 21211"), ("429", True, "HTTP 429"),
                          ("500", True, "HTTP 500")])  # fmt: skip
def test_send_failures(loopback: Loopback, mode: str, retryable: bool, says: str) -> None:
    pager, api, _ = sms_rig(loopback)
    api.mode = mode
    with pytest.raises(PagerError) as caught:
        loopback.until(pager.submit(PAGE))
    assert caught.value.retryable is retryable and says in str(caught.value)
    assert "+1555" not in str(caught.value)  # the gateway's message quotes the number


def test_send_times_out(loopback: Loopback) -> None:
    pager, api, timeouts = sms_rig(loopback)
    api.mode = "hang"
    d = pager.submit(PAGE)
    loopback.until_true(lambda: api.posts)
    timeouts.advance(5)
    with pytest.raises(PagerError) as caught:
        loopback.until(d)
    assert caught.value.retryable and "timeout" in str(caught.value)


# --- callbacks -----------------------------------------------------------------------------------

PUBLIC_URL = "https://corespond.example/gateways/sms-main"


def callback_rig(
    lb: Loopback, events: RecordingEvents, quarantine: RecordingQuarantine | None = None
) -> str:
    clock = TaskClock()
    clock.advance(NOW.timestamp())
    root = Resource()
    resource = SmsCallbackResource("sms-main", events, Clock(clock), auth_token=TOKEN,
                                   public_url=PUBLIC_URL, quarantine=quarantine)  # fmt: skip
    root.putChild(b"sms", resource)
    port = lb.listen(Site(root, reactor=lb.reactor))
    return f"http://127.0.0.1:{port}/sms"


def post_form(lb: Loopback, url: str, form: dict[str, str], signature: str | None) -> int:
    agent, pool = make_agent(lb.reactor)
    lb.cleanups.append(pool.closeCachedConnections)
    headers = {b"content-type": b"application/x-www-form-urlencoded"}
    if signature is not None:
        headers[b"x-twilio-signature"] = signature.encode()
    answer = lb.until(request(agent, lb.reactor, b"POST", url, headers=headers, timeout=30,
                              body=urlencode(form).encode()))  # fmt: skip
    return answer.code


def signed(form: dict[str, str], token: str = TOKEN, url: str = PUBLIC_URL) -> str:
    return twilio_signature(url, {k: [v] for k, v in form.items()}, token)


INBOUND = {"MessageSid": "SM" + "b" * 32, "AccountSid": SID, "From": "+15555550100",
           "To": "+15555550199", "Body": "1 C1445-2", "SmsStatus": "received",
           "NumMedia": "0", "ApiVersion": "2010-04-01"}  # fmt: skip
STATUS = {"MessageSid": "SM" + "a" * 32, "MessageStatus": "undelivered", "ErrorCode": "30003",
          "AccountSid": SID, "To": "+15555550100"}  # fmt: skip


def test_signed_reply_reaches_the_core(loopback: Loopback) -> None:
    events = RecordingEvents()
    url = callback_rig(loopback, events)
    assert post_form(loopback, url, INBOUND, signed(INBOUND)) == 200
    (reply,) = events.replies
    assert reply.answer is PageAnswer.ACCEPT and reply.page_ref == "C1445-2"
    assert reply.sender == "+15555550100" and reply.text == "1 C1445-2"
    assert reply.received_at == NOW


def test_signed_status_callback_is_a_receipt(loopback: Loopback) -> None:
    events = RecordingEvents()
    url = callback_rig(loopback, events)
    assert post_form(loopback, url, STATUS, signed(STATUS)) == 200
    (receipt,) = events.receipts
    assert receipt.gateway_id == "SM" + "a" * 32
    assert receipt.state is DeliveryState.FAILED and receipt.detail == "30003"


@pytest.mark.parametrize(
    "signature",
    [None, "", signed(INBOUND, token="wrong"), signed(INBOUND, url="https://evil.example/x"),
     signed({**INBOUND, "Body": "2"}), signed(INBOUND)[:-1]],
)  # fmt: skip
def test_unsigned_or_forged_callbacks_get_403_and_record_nothing(
    loopback: Loopback, signature: str | None
) -> None:
    events = RecordingEvents()
    url = callback_rig(loopback, events)
    assert post_form(loopback, url, INBOUND, signature) == 403
    assert not events.replies and not events.receipts


def test_a_failed_commit_gets_503(loopback: Loopback) -> None:
    events = RecordingEvents(fail_next=1)
    url = callback_rig(loopback, events)
    assert post_form(loopback, url, STATUS, signed(STATUS)) == 503
    assert post_form(loopback, url, STATUS, signed(STATUS)) == 200


def test_signed_but_meaningless_form_gets_400(loopback: Loopback) -> None:
    events = RecordingEvents()
    quarantine = RecordingQuarantine()
    url = callback_rig(loopback, events, quarantine)
    form = {"MessageSid": "SM1", "MessageStatus": "exploded"}
    assert post_form(loopback, url, form, signed(form)) == 400
    (kept,) = quarantine.records
    assert kept.raw == urlencode(form).encode() and kept.code == "invalid-field"
    assert kept.where == "MessageStatus" and kept.format == "sms-callback"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["MessageSid", "SmsSid", "MessageStatus", "SmsStatus",
                                        "Body", "From", "ErrorCode", "X"]),
                       st.text(max_size=40), max_size=6))  # fmt: skip
def test_fuzz_callback_forms_are_events_or_precise_rejections(form: dict[str, str]) -> None:
    clock = TaskClock()
    try:
        event_for_form({k: [v] for k, v in form.items()}, "sms", Clock(clock))
    except RejectedMessage as err:
        assert err.code in ("missing-field", "invalid-field") and err.where
