"""WCTP 1.3: the submit built and parsed by a fake carrier over real loopback HTTP(S), its
confirmations and failures, the callback resource and the poller, and the parsers fuzzed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree
from twisted.internet.task import Clock as TaskClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import Site

from corespond.adapters.http_client import PinnedTrustPolicy, make_agent
from corespond.adapters.tls import TlsFileError, server_tls_options
from corespond.adapters.wctp import (
    WctpCallbackResource,
    WctpPager,
    WctpPoller,
    build_submit_request,
    parse_confirmation,
    parse_inbound,
    parse_poll_response,
    parse_wctp,
    retryable_code,
)
from corespond.daemon.clock import Clock
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.pager import (
    DeliveryState,
    PageAnswer,
    PageMessage,
    PagerError,
    Reply,
    Submitted,
)
from tests.adapters.carriers import DOCTYPE, FakeCarrier, reply_xml, status_xml, wctp
from tests.adapters.loopback import Loopback
from tests.adapters.pager_events import RecordingEvents, RecordingQuarantine
from tests.adapters.tlsfiles import make_pki

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
PAGE = PageMessage(
    page_ref="C1445-2",
    attempt_id="att-7f3a",
    address="5550100",
    text="C1445-2 Welfare check, 400 blk Main St",
    link="https://corespond.example/p/abc",
)


@dataclass
class CarrierRig:
    lb: Loopback
    carrier: FakeCarrier
    url: str
    agent: Agent
    timeouts: TaskClock
    pager: WctpPager


def carrier_rig(lb: Loopback) -> CarrierRig:
    carrier = FakeCarrier()
    port = lb.listen(Site(carrier, reactor=lb.reactor))
    url = f"http://127.0.0.1:{port}/wctp"
    agent, pool = make_agent(lb.reactor)
    lb.cleanups.append(pool.closeCachedConnections)
    timeouts = TaskClock()
    timeouts.advance(NOW.timestamp())
    pager = WctpPager(
        "wctp-main", agent=agent, clock=Clock(timeouts), reactor=timeouts, url=url,
        sender_id="corespond", security_code="pw-123", timeout=10,
    )  # fmt: skip
    return CarrierRig(lb, carrier, url, agent, timeouts, pager)


def test_submit_sends_multiple_choice_with_our_message_id(loopback: Loopback) -> None:
    rig = carrier_rig(loopback)
    result = loopback.until(rig.pager.submit(PAGE))
    assert result == Submitted("wctp-main", "att-7f3a")
    (op,) = rig.carrier.submits
    header = op.find("wctp-SubmitHeader")
    assert header.find("wctp-Originator").get("senderID") == "corespond"
    assert header.find("wctp-Originator").get("securityCode") == "pw-123"
    control = header.find("wctp-MessageControl")
    assert control.get("messageID") == "att-7f3a"
    assert control.get("allowResponse") == "true"
    assert control.get("notifyWhenDelivered") == "true"
    assert header.find("wctp-Recipient").get("recipientID") == "5550100"
    assert header.get("submitTimestamp") == "2026-11-27T03:00:00"
    mcr = op.find("wctp-Payload/wctp-MCR")
    assert mcr.findtext("wctp-MessageText") == PAGE.text + " " + PAGE.link
    assert [c.text for c in mcr.findall("wctp-Choice")] == ["Accept", "Decline", "En route"]


@pytest.mark.parametrize(
    ("mode", "retryable", "says"),
    [
        ("fail403", False, "WCTP 403"),  # unknown recipient: next endpoint
        ("fail402", False, "WCTP 402"),  # bad security code
        ("fail302", False, "WCTP 302"),
        ("fail304", True, "WCTP 304"),
        ("fail503", True, "WCTP 503"),
        ("fail606", True, "WCTP 606"),
        ("http500", True, "HTTP 500"),
        ("garbage", True, "unreadable confirmation"),
        ("drop", True, "dropped"),
    ],
)
def test_submit_failures_say_whether_to_retry(
    loopback: Loopback, mode: str, retryable: bool, says: str
) -> None:
    rig = carrier_rig(loopback)
    rig.carrier.mode = mode
    with pytest.raises(PagerError) as caught:
        loopback.until(rig.pager.submit(PAGE))
    assert caught.value.retryable is retryable
    assert says in str(caught.value)
    assert caught.value.gateway == "wctp-main"
    assert "Welfare" not in str(caught.value)


def test_submit_times_out_on_its_own_clock(loopback: Loopback) -> None:
    rig = carrier_rig(loopback)
    rig.carrier.mode = "hang"
    d = rig.pager.submit(PAGE)
    loopback.until_true(lambda: rig.carrier.held)
    assert not d.called
    rig.timeouts.advance(9.9)
    assert not d.called
    rig.timeouts.advance(0.2)
    with pytest.raises(PagerError) as caught:
        loopback.until(d)
    assert caught.value.retryable
    assert "timeout" in str(caught.value)


def test_connection_refused_is_retryable(loopback: Loopback) -> None:
    rig = carrier_rig(loopback)
    rig.pager.url = "http://127.0.0.1:1/wctp"
    with pytest.raises(PagerError) as caught:
        loopback.until(rig.pager.submit(PAGE))
    assert caught.value.retryable and "connect" in str(caught.value)


def tls_carrier(lb: Loopback, tmp_path: Path, trust: str) -> CarrierRig:
    """The fake carrier behind TLS (its certificate names 127.0.0.1), the pager trusting
    ``trust``: ``ca`` (the carrier's CA) or ``other`` (a CA that signed nothing here)."""
    pki = make_pki(tmp_path)
    carrier = FakeCarrier()
    server = TLSMemoryBIOFactory(
        server_tls_options(pki.server_cert, pki.server_key), False,
        Site(carrier, reactor=lb.reactor), clock=lb.reactor,
    )  # fmt: skip
    port = lb.listen(server)
    ca = pki.ca_cert if trust == "ca" else pki.other_ca_cert
    agent, pool = make_agent(lb.reactor, tls=PinnedTrustPolicy(ca_file=ca))
    lb.cleanups.append(pool.closeCachedConnections)
    timeouts = TaskClock()
    pager = WctpPager(
        "wctp-main", agent=agent, clock=Clock(timeouts), reactor=timeouts,
        url=f"https://127.0.0.1:{port}/wctp", sender_id="corespond", security_code="pw-123",
        timeout=10,
    )  # fmt: skip
    return CarrierRig(lb, carrier, pager.url, agent, timeouts, pager)


def test_submit_over_tls_to_a_trusted_carrier(loopback: Loopback, tmp_path: Path) -> None:
    rig = tls_carrier(loopback, tmp_path, "ca")
    assert loopback.until(rig.pager.submit(PAGE)) == Submitted("wctp-main", "att-7f3a")
    assert len(rig.carrier.submits) == 1


def test_submit_over_tls_refuses_an_untrusted_carrier(loopback: Loopback, tmp_path: Path) -> None:
    rig = tls_carrier(loopback, tmp_path, "other")
    with pytest.raises(PagerError) as caught:
        loopback.until(rig.pager.submit(PAGE))
    assert caught.value.retryable
    assert not rig.carrier.submits  # nothing was sent to a server we could not verify


def test_tls_policy_builds_our_client_options_per_host(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    policy = PinnedTrustPolicy(ca_file=pki.ca_cert)
    first = policy.creatorForNetloc(b"carrier.example.test", 443)
    assert policy.creatorForNetloc(b"carrier.example.test", 8443) is first
    assert policy.creatorForNetloc(b"other.example.test", 443) is not first
    with pytest.raises(TlsFileError):
        PinnedTrustPolicy(ca_file=tmp_path / "missing.pem").creatorForNetloc(b"x.test", 443)


# --- the callback resource ------------------------------------------------------------------------


def post(lb: Loopback, url: str, body: bytes) -> tuple[int, bytes]:
    from corespond.adapters.http_client import request

    agent, pool = make_agent(lb.reactor)
    lb.cleanups.append(pool.closeCachedConnections)
    answer = lb.until(request(agent, lb.reactor, b"POST", url, body=body, timeout=30,
                              headers={b"content-type": b"text/xml"}))  # fmt: skip
    return answer.code, answer.body


CALLBACK_TOKEN = "cb-token-7"


def callback_rig(
    lb: Loopback, events: RecordingEvents, quarantine: RecordingQuarantine | None = None
) -> str:
    timeouts = TaskClock()
    timeouts.advance(NOW.timestamp())
    root = Resource()
    resource = WctpCallbackResource("wctp-main", events, Clock(timeouts), token=CALLBACK_TOKEN,
                                    quarantine=quarantine)  # fmt: skip
    root.putChild(b"wctp", resource)
    port = lb.listen(Site(root, reactor=lb.reactor))
    return f"http://127.0.0.1:{port}/wctp?token={CALLBACK_TOKEN}"


def test_carrier_pushes_a_reply_and_gets_200_after_the_commit(loopback: Loopback) -> None:
    events = RecordingEvents(hold=[])
    url = callback_rig(loopback, events)
    from corespond.adapters.http_client import request

    agent, pool = make_agent(loopback.reactor)
    loopback.cleanups.append(pool.closeCachedConnections)
    d = request(agent, loopback.reactor, b"POST", url, body=reply_xml(), timeout=30)
    loopback.until_true(lambda: events.hold)
    loopback.turn(10)
    assert not d.called  # nothing acknowledged before the commit
    events.hold[0].callback(None)
    answer = loopback.until(d)
    assert answer.code == 200
    assert parse_confirmation(answer.body).success
    (reply,) = events.replies
    assert reply.answer is PageAnswer.ACCEPT
    assert reply.gateway_id == "att-7f3a" and reply.sender == "5550100"
    assert reply.gateway == "wctp-main" and reply.received_at == NOW


def test_a_failed_commit_is_answered_with_a_failure_the_carrier_retries(
    loopback: Loopback,
) -> None:
    events = RecordingEvents(fail_next=1)
    url = callback_rig(loopback, events)
    code, body = post(loopback, url, status_xml())
    assert code == 200
    confirmation = parse_confirmation(body)
    assert not confirmation.success and confirmation.code == 604
    code, body = post(loopback, url, status_xml(kind="READ"))
    assert parse_confirmation(body).success
    assert [r.state for r in events.receipts] == [DeliveryState.DELIVERED, DeliveryState.READ]


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (b"<wctp-Operation", 301, "malformed-xml"),
        (wctp("<wctp-VersionQuery inquirer='x'/>"), 300, "unsupported"),
        (wctp("<wctp-SubmitRequest><wctp-SubmitHeader/></wctp-SubmitRequest>"), 302,
         "wctp-Originator is required"),
        (wctp("<wctp-StatusInfo><wctp-Notification type='READ'/></wctp-StatusInfo>"), 302,
         "wctp-ResponseHeader is required"),
        (b'<!DOCTYPE x [<!ENTITY a "b">]><wctp-Operation/>', 300, "document type"),
        (status_xml(kind="LOST"), 302, "type must be QUEUED"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_precise_wctp_failure(
    loopback: Loopback, body: bytes, code: int, says: str
) -> None:
    events = RecordingEvents()
    quarantine = RecordingQuarantine()
    url = callback_rig(loopback, events, quarantine)
    status, answer = post(loopback, url, body)
    assert status == 200
    (kept,) = quarantine.records
    assert (kept.feed, kept.format, kept.raw, kept.received_at) == ("wctp-main", "wctp", body, NOW)
    assert kept.origin_name is not None and kept.origin_name.startswith("127.0.0.1:")
    failure = etree.fromstring(answer.replace(DOCTYPE, b"")).find("wctp-Confirmation/wctp-Failure")
    assert failure.get("errorCode") == str(code)
    assert says in failure.get("errorText")
    assert not events.replies and not events.receipts


@pytest.mark.parametrize(
    ("suffix", "headers"),
    [("", {}), ("x", {}), ("", {b"authorization": b"Bearer nope"})],
)
def test_callbacks_without_our_token_are_refused(
    loopback: Loopback, suffix: str, headers: dict[bytes, bytes]
) -> None:
    from corespond.adapters.http_client import request

    events = RecordingEvents()
    url = callback_rig(loopback, events)
    url = url.split("?")[0] + ("?token=" + suffix if suffix else "")
    agent, pool = make_agent(loopback.reactor)
    loopback.cleanups.append(pool.closeCachedConnections)
    answer = loopback.until(request(agent, loopback.reactor, b"POST", url, body=reply_xml(),
                                    headers=headers, timeout=30))  # fmt: skip
    assert answer.code == 403
    assert parse_confirmation(answer.body).code == 402
    assert not events.replies


def test_the_token_may_come_as_a_bearer_header(loopback: Loopback) -> None:
    from corespond.adapters.http_client import request

    events = RecordingEvents()
    url = callback_rig(loopback, events).split("?")[0]
    agent, pool = make_agent(loopback.reactor)
    loopback.cleanups.append(pool.closeCachedConnections)
    answer = loopback.until(request(
        agent, loopback.reactor, b"POST", url, body=reply_xml(), timeout=30,
        headers={b"authorization": f"Bearer {CALLBACK_TOKEN}".encode()},
    ))  # fmt: skip
    assert answer.code == 200 and len(events.replies) == 1


# --- the poller -----------------------------------------------------------------------------------


def test_poller_delivers_and_acknowledges_only_committed_messages(loopback: Loopback) -> None:
    rig = carrier_rig(loopback)
    events = RecordingEvents(fail_next=1)  # the first commit fails: that message comes again
    rig.carrier.queue = [
        ("1", status_xml()[status_xml().index(b"<wctp-StatusInfo"):-len(b"</wctp-Operation>")]),
        ("2", reply_xml(text="2 C1445-2")[
            reply_xml(text="2 C1445-2").index(b"<wctp-MessageReply"):-len(b"</wctp-Operation>")]),
        ("3", b"<wctp-StatusInfo/>"),
    ]  # fmt: skip
    quarantine = RecordingQuarantine()
    poller = WctpPoller(
        "wctp-main", agent=rig.agent, clock=Clock(rig.timeouts), reactor=rig.timeouts,
        url=rig.url, poller_id="corespond", security_code="pw-123", events=events, interval=30,
        quarantine=quarantine,
    )  # fmt: skip
    delay = loopback.until(poller.poll_once())
    assert delay == 30
    assert len(events.receipts) == 1 and len(events.replies) == 1
    reply = events.replies[0]
    assert reply.answer is PageAnswer.DECLINE and reply.page_ref == "C1445-2"
    (kept,) = quarantine.records
    assert kept.code == "missing-field" and b"<wctp-StatusInfo/>" in kept.raw
    assert kept.origin_name == "poll sequenceNo 3"
    loopback.until(poller.poll_once())
    acks = {
        m.get("sequenceNo"): (m[0].tag, m[0].get("errorCode"))
        for m in rig.carrier.polls[1].findall("wctp-MessageReceived")
    }
    assert acks == {
        "1": ("wctp-Failure", "604"),
        "2": ("wctp-Success", None),
        "3": ("wctp-Failure", "302"),
    }
    assert rig.carrier.polls[1].get("securityCode") == "pw-123"
    # Message 1 came back (not acknowledged) and was committed this time.
    assert len(events.receipts) == 2


def test_poller_runs_on_the_injected_clock(loopback: Loopback) -> None:
    rig = carrier_rig(loopback)
    poller = WctpPoller(
        "wctp-main", agent=rig.agent, clock=Clock(rig.timeouts), reactor=rig.timeouts,
        url=rig.url, poller_id="corespond", security_code=None, events=RecordingEvents(),
        interval=30,
    )  # fmt: skip
    poller.start()
    rig.timeouts.advance(0)
    loopback.until_true(lambda: len(rig.carrier.polls) == 1)
    loopback.turn(10)
    # minNextPollInterval="1" (a minute) is longer than our 30 s
    rig.timeouts.advance(59)
    loopback.turn(10)
    assert len(rig.carrier.polls) == 1
    rig.timeouts.advance(1)
    loopback.until_true(lambda: len(rig.carrier.polls) == 2)
    loopback.turn(10)
    loopback.until(poller.stop())
    rig.timeouts.advance(600)
    loopback.turn(10)
    assert len(rig.carrier.polls) == 2


# --- parsers -------------------------------------------------------------------------------------


def test_submit_request_is_valid_against_the_v1r3_structure() -> None:
    body = build_submit_request(PAGE, sender_id="c", security_code=None, now=NOW)
    assert body.startswith(b'<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE wctp-Operation')
    op = parse_wctp(body)
    assert [c.tag for c in op] == ["wctp-SubmitHeader", "wctp-Payload"]
    assert [c.tag for c in op[0]] == ["wctp-Originator", "wctp-MessageControl", "wctp-Recipient"]
    one_way = build_submit_request(PAGE, sender_id="c", security_code=None, now=NOW, two_way=False)
    assert parse_wctp(one_way).find("wctp-Payload/wctp-Alphanumeric") is not None


def test_page_text_is_escaped_not_injected() -> None:
    evil = PageMessage("C1-1", "a1", "555", "x</wctp-MessageText><wctp-Choice>Pwn</wctp-Choice>")
    op = parse_wctp(build_submit_request(evil, sender_id="c", security_code=None, now=NOW))
    assert [c.text for c in op.findall("wctp-Payload/wctp-MCR/wctp-Choice")] == [
        "Accept", "Decline", "En route"
    ]  # fmt: skip


def test_free_text_replies_are_read_by_the_core_words() -> None:
    reply = parse_inbound(parse_wctp(reply_xml(text="en route C1445-2", mcr=False)))
    assert reply.multiple_choice is False  # type: ignore[union-attr]
    from corespond.adapters.wctp import event_for

    event = event_for(reply, "g", NOW)
    assert isinstance(event, Reply)
    assert event.answer is PageAnswer.EN_ROUTE and event.page_ref == "C1445-2"


def test_an_uncorrelated_submit_from_the_carrier_is_a_reply_matched_by_sender() -> None:
    body = wctp(
        '<wctp-SubmitRequest><wctp-SubmitHeader><wctp-Originator senderID="5550100"/>'
        '<wctp-MessageControl messageID="x1"/><wctp-Recipient recipientID="corespond"/>'
        "</wctp-SubmitHeader><wctp-Payload><wctp-Alphanumeric>yes C1445-2</wctp-Alphanumeric>"
        "</wctp-Payload></wctp-SubmitRequest>"
    )
    from corespond.adapters.wctp import event_for

    event = event_for(parse_inbound(parse_wctp(body)), "g", NOW)
    assert isinstance(event, Reply)
    assert (event.answer, event.page_ref, event.sender, event.gateway_id) == (
        PageAnswer.ACCEPT, "C1445-2", "5550100", None
    )  # fmt: skip


def test_status_failure_is_a_failed_receipt_with_the_code() -> None:
    body = wctp(
        '<wctp-StatusInfo><wctp-ResponseHeader responseToMessageID="m9">'
        '<wctp-Originator senderID="c"/><wctp-MessageControl messageID="s"/>'
        '<wctp-Recipient recipientID="r"/></wctp-ResponseHeader>'
        '<wctp-Failure errorCode="403" errorText="unknown recipient"/></wctp-StatusInfo>',
        doctype=False,
    )
    status = parse_inbound(parse_wctp(body))
    assert status.state is DeliveryState.FAILED and status.error_code == "403"  # type: ignore[union-attr]


def test_poll_response_parses_no_messages_and_failures() -> None:
    empty = parse_poll_response(wctp("<wctp-PollResponse><wctp-NoMessages/></wctp-PollResponse>"))
    assert empty.messages == () and empty.failure_code is None
    refused = parse_poll_response(
        wctp('<wctp-PollResponse><wctp-Failure errorCode="402"/></wctp-PollResponse>')
    )
    assert refused.failure_code == 402


def test_result_code_classes() -> None:
    assert [retryable_code(c) for c in (301, 304, 401, 403, 411, 500, 604)] == [
        False, True, False, False, False, True, True
    ]  # fmt: skip


def test_an_internal_subset_doctype_is_refused_even_with_the_wctp_name() -> None:
    body = (b'<!DOCTYPE wctp-Operation SYSTEM "x.dtd" [<!ENTITY e "boom">]>'
            b'<wctp-Operation wctpVersion="1">&e;</wctp-Operation>')  # fmt: skip
    with pytest.raises(RejectedMessage) as caught:
        parse_wctp(body)
    assert caught.value.code == "unsupported"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_only_ever_reject(data: bytes) -> None:
    for parse in (lambda b: parse_inbound(parse_wctp(b)), parse_confirmation, parse_poll_response):
        try:
            parse(data)
        except RejectedMessage as err:
            assert err.code
            assert data[:40] not in str(err).encode() or len(data) < 4


_names = st.sampled_from([
    "wctp-SubmitRequest", "wctp-SubmitHeader", "wctp-MessageReply", "wctp-StatusInfo",
    "wctp-ResponseHeader", "wctp-Payload",
    "wctp-Alphanumeric", "wctp-MCR", "wctp-MessageText", "wctp-Notification", "wctp-Failure",
    "wctp-Originator", "wctp-PollResponse", "wctp-Message", "wctp-Confirmation", "wctp-Success",
])  # fmt: skip
_attrs = st.dictionaries(
    st.sampled_from(["responseToMessageID", "senderID", "type", "errorCode", "successCode",
                     "sequenceNo", "MCRMessageReply", "minNextPollInterval"]),
    st.text(max_size=12),
    max_size=3,
)  # fmt: skip


def _tree(depth: int) -> Any:
    leaf = st.builds(lambda n, a, t: (n, a, t, []), _names, _attrs, st.text(max_size=10))
    if depth == 0:
        return leaf
    return st.builds(lambda n, a, t, kids: (n, a, t, kids), _names, _attrs,
                     st.text(max_size=10), st.lists(_tree(depth - 1), max_size=3))  # fmt: skip


def _xml(node: Any) -> etree._Element:
    name, attrs, text, kids = node
    element = etree.Element(name)
    for k, v in attrs.items():
        element.set(k, "".join(ch for ch in v if ch.isprintable() and ch.isascii()))
    element.text = "".join(ch for ch in text if ch.isprintable() and ch.isascii())
    for kid in kids:
        element.append(_xml(kid))
    return element


@settings(max_examples=300, deadline=None)
@given(_tree(3))
def test_fuzz_wctp_shaped_documents_parse_or_reject_precisely(node: Any) -> None:
    root = etree.Element("wctp-Operation", wctpVersion="wctp-dtd-v1r3")
    root.append(_xml(node))
    body = etree.tostring(root)
    for parse in (lambda b: parse_inbound(parse_wctp(b)), parse_confirmation, parse_poll_response):
        try:
            parse(body)
        except RejectedMessage as err:
            assert err.code in ("missing-field", "invalid-field", "unsupported")
            assert err.where is None or err.where.startswith("/")
