"""MLLP client and server protocols, byte by byte and all at once, on a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from corespond.adapters.framing import FramingError
from corespond.adapters.hl7_referral import Hl7Reply, build_ack, parse_reply
from corespond.adapters.mllp import (
    AckTimeout,
    ConnectionDropped,
    MLLPClientProtocol,
    MLLPServerProtocol,
    frame,
)

MSG = b"MSH|^~\\&|CORESPOND|C|R|F|20270115||REF^I12^REF_I12|CR1|P|2.5.1\rPID|1\r"


def ack(control_id: str, code: str = "AA") -> bytes:
    reply = Hl7Reply("REF", "I12", control_id, "2.5.1")
    return frame(build_ack(reply, code, "A" + control_id, datetime(2027, 1, 1, tzinfo=UTC)))


def client() -> tuple[MLLPClientProtocol, StringTransport, Clock]:
    clock = Clock()
    proto = MLLPClientProtocol(clock)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def results(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


@pytest.mark.parametrize("one_byte_at_a_time", [False, True])
def test_the_matching_ack_completes(one_byte_at_a_time: bool) -> None:
    proto, transport, _ = client()
    got = results(proto.send(MSG, "CR1", 5))
    assert transport.value() == b"\x0b" + MSG + b"\x1c\r"
    data = ack("CR1")
    chunks = [data[i : i + 1] for i in range(len(data))] if one_byte_at_a_time else [data]
    for chunk in chunks:
        proto.dataReceived(chunk)
    assert isinstance(got[0], Hl7Reply) and got[0].ack_code == "AA"
    assert not proto.busy


def test_other_acks_are_ignored_and_one_in_flight() -> None:
    proto, _, _ = client()
    got = results(proto.send(MSG, "CR2", 5))
    proto.dataReceived(ack("CR1") + frame(b"garbage") + ack("CR1", "AE"))
    assert got == [] and proto.ignored == 3
    with pytest.raises(RuntimeError, match="one message in flight"):
        proto.send(MSG, "CR3", 5)
    proto.dataReceived(ack("CR2"))
    assert got[0].acked_control_id == "CR2"
    proto.dataReceived(ack("CR2"))  # a second ACK with nothing in flight
    assert proto.ignored == 4


def test_timeout_aborts_the_connection_and_a_late_ack_changes_nothing() -> None:
    proto, transport, clock = client()
    got = results(proto.send(MSG, "CR1", 5))
    clock.advance(4.9)
    assert got == []
    clock.advance(0.1)
    assert isinstance(got[0], Failure) and got[0].check(AckTimeout)
    assert transport.disconnecting or getattr(transport, "disconnected", False)
    proto.dataReceived(ack("CR1"))
    assert proto.ignored == 1 and len(got) == 1


def test_each_message_has_its_own_timeout_on_the_one_timer() -> None:
    """The connection's one timer is moved to each message's send: an ACK just before the
    first message's timeout never cuts the next message's wait short, and an idle
    connection's timer firing with nothing in flight changes nothing."""
    proto, transport, clock = client()
    first = results(proto.send(MSG, "CR1", 5))
    clock.advance(4.5)
    proto.dataReceived(ack("CR1"))
    assert isinstance(first[0], Hl7Reply) and len(clock.getDelayedCalls()) == 1
    second = results(proto.send(MSG, "CR2", 5))
    assert len(clock.getDelayedCalls()) == 1  # the same timer, moved
    clock.advance(4.9)  # 9.4 s since the first send: past its timeout, not the second's
    assert second == [] and not transport.disconnecting
    clock.advance(0.1)
    assert isinstance(second[0], Failure) and second[0].check(AckTimeout)
    assert transport.disconnecting
    # Idle: the timer of an answered message fires with nothing in flight.
    proto2, transport2, clock2 = client()
    answered = results(proto2.send(MSG, "CR3", 5))
    proto2.dataReceived(ack("CR3"))
    clock2.advance(10)
    assert len(answered) == 1 and not transport2.disconnecting and not proto2.busy
    got = results(proto2.send(MSG, "CR4", 5))
    proto2.dataReceived(ack("CR4"))
    assert isinstance(got[0], Hl7Reply)
    proto2.close()
    assert clock2.getDelayedCalls() == []


def test_dropped_before_the_ack() -> None:
    proto, _, clock = client()
    got = results(proto.send(MSG, "CR1", 5))
    proto.connectionLost(Failure(ConnectionDropped()))
    assert got[0].check(ConnectionDropped)
    assert clock.getDelayedCalls() == []  # the timeout is cancelled
    with pytest.raises(ConnectionDropped):
        proto.send(MSG, "CR2", 5)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_client_input(data: bytes) -> None:
    proto, _, _ = client()
    got = results(proto.send(MSG, "CR1", 5))
    proto.dataReceived(data)
    assert got == [] or isinstance(got[0], Hl7Reply)


# --- server ------------------------------------------------------------------------------------


def server(handler: Any, limit: int = 1000) -> tuple[MLLPServerProtocol, StringTransport]:
    proto = MLLPServerProtocol(handler, limit)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_server_answers_in_order_after_the_handler() -> None:
    pending: list[tuple[bytes | FramingError, Deferred[bytes | None]]] = []

    def handler(item: bytes | FramingError, peer: str | None) -> Deferred[bytes | None]:
        d: Deferred[bytes | None] = Deferred()
        pending.append((item, d))
        return d

    proto, transport = server(handler)
    proto.dataReceived(frame(b"one") + frame(b"two"))
    assert [item for item, _ in pending] == [b"one"]  # one at a time
    assert transport.value() == b""  # nothing answered before the handler's commit
    pending[0][1].callback(b"ack-one")
    assert [item for item, _ in pending] == [b"one", b"two"]
    pending[1][1].callback(None)  # no reply (an ACK is never acknowledged)
    assert transport.value() == frame(b"ack-one")


def test_server_oversize_frame_goes_to_the_handler_as_an_error() -> None:
    seen: list[Any] = []
    proto, transport = server(lambda item, peer: seen.append(item) or succeed(b"AR"), limit=10)
    proto.dataReceived(frame(b"x" * 50) + frame(b"ok"))
    assert isinstance(seen[0], FramingError) and seen[0].code == "oversize"
    assert seen[1] == b"ok"
    assert transport.value() == frame(b"AR") * 2


def test_server_handler_failure_closes_without_answer() -> None:
    def handler(item: Any, peer: Any) -> Deferred[bytes | None]:
        d: Deferred[bytes | None] = Deferred()
        d.errback(RuntimeError("store down"))
        return d

    proto, transport = server(handler)
    proto.dataReceived(frame(b"one") + frame(b"two"))
    assert transport.value() == b"" and transport.disconnecting


def test_parse_of_what_the_server_received_is_not_its_job() -> None:
    got: list[Any] = []
    proto, _ = server(lambda item, peer: got.append(item) or succeed(None))
    proto.dataReceived(b"noise" + frame(MSG))
    assert got == [MSG] and parse_reply(got[0]).control_id == "CR1"


def test_server_pauses_a_sender_that_outruns_the_store() -> None:
    pending: list[Deferred[bytes | None]] = []

    def handler(item: Any, peer: Any) -> Deferred[bytes | None]:
        d: Deferred[bytes | None] = Deferred()
        pending.append(d)
        return d

    proto, transport = server(handler)
    proto.dataReceived(frame(b"m") * 100)
    assert transport.producerState == "paused"
    while transport.producerState == "paused":
        pending[-1].callback(b"ok")
    assert len(pending) > 60 and transport.producerState == "producing"
