"""The TCP feed protocol over StringTransport, iosim and one real loopback connection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock as TaskClock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connectedServerAndClient

from corespond.adapters.framing import make_deframer
from corespond.adapters.tcp_feed import TcpFeedFactory, TcpFeedProtocol, peer_name
from corespond.daemon.clock import Clock
from corespond.daemon.ingest import Accepted, Origin, Outcome, Rejected, SnapshotState

ACK, NAK = b"\x06", b"\x15"
PEER = IPv4Address("TCP", "192.0.2.7", 40001)
LINES = [b'{"id":"CAD-%d","caller":"Testy McTestface"}' % i for i in range(3)]


def accepted(n: int = 1) -> list[Outcome]:
    return [Accepted(f"inc-{n}", n, SnapshotState.NEW)]


def rejected() -> list[Outcome]:
    return [Rejected("malformed-json", "expected a value at line 1 column 1")]


@dataclass
class FakeIngest:
    """Records each payload and hands back a Deferred the test fires when it likes."""

    calls: list[tuple[bytes, Origin]] = field(default_factory=list)
    pending: list[Deferred[Sequence[Outcome]]] = field(default_factory=list)

    def __call__(self, payload: bytes, origin: Origin) -> Deferred[Sequence[Outcome]]:
        self.calls.append((payload, origin))
        d: Deferred[Sequence[Outcome]] = Deferred()
        self.pending.append(d)
        return d

    @property
    def payloads(self) -> list[bytes]:
        return [p for p, _ in self.calls]


@dataclass
class Rig:
    factory: TcpFeedFactory
    proto: TcpFeedProtocol
    transport: StringTransport
    ingest: FakeIngest
    time: TaskClock


def rig(
    framing: str = "newline",
    *,
    ack: str = "ack-nak",
    max_bytes: int = 1000,
    idle: float | None = None,
    max_in_flight: int = 1000,
) -> Rig:
    time = TaskClock()
    ingest = FakeIngest()
    factory = TcpFeedFactory(
        ingest,
        feed="cad-test",
        framing=framing,
        ack=ack,
        max_message_bytes=max_bytes,
        clock=Clock(time),
        idle_timeout=idle,
        max_in_flight=max_in_flight,
    )
    proto = factory.buildProtocol(PEER)
    assert proto is not None
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    return Rig(factory, proto, transport, ingest, time)


def send(r: Rig, data: bytes, *, bytewise: bool) -> None:
    if bytewise:
        for i in range(len(data)):
            r.proto.dataReceived(data[i : i + 1])
    else:
        r.proto.dataReceived(data)


@pytest.mark.parametrize("bytewise", [False, True])
def test_acks_go_out_in_message_order(bytewise: bool) -> None:
    r = rig()
    send(r, b"".join(line + b"\r\n" for line in LINES), bytewise=bytewise)
    assert r.ingest.payloads == LINES
    assert {o for _, o in r.ingest.calls} == {Origin("cad-test", peer="192.0.2.7:40001")}
    assert r.proto.in_flight == 3
    r.ingest.pending[2].callback(accepted(3))
    r.ingest.pending[1].callback(accepted(2))
    assert r.transport.value() == b""  # the first is still owed
    r.ingest.pending[0].callback(rejected())
    assert r.transport.value() == b"\x15\n\x06\n\x06\n"
    assert r.proto.in_flight == 0
    assert not r.transport.disconnecting


class CountingTransport(StringTransport):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def test_answers_ready_together_go_out_in_one_write() -> None:
    r = rig("stx-etx")
    transport = CountingTransport(peerAddress=PEER)
    r.proto.makeConnection(transport)
    r.proto.dataReceived(b"\x02a\x03\x02b\x03\x02c\x03\x02\x03\x02d\x03")
    r.ingest.pending[1].callback(accepted(2))
    r.ingest.pending[2].callback(rejected())
    assert transport.writes == []
    r.ingest.pending[0].callback(accepted(1))  # a, b, c and the keep-alive are answered
    assert transport.writes == [b"\x06\x06\x15\x06"]
    r.ingest.pending[3].callback(accepted(4))
    assert transport.writes == [b"\x06\x06\x15\x06", b"\x06"]


def test_answers_before_a_failed_ingest_are_written_then_the_connection_closes() -> None:
    r = rig("stx-etx")
    transport = CountingTransport(peerAddress=PEER)
    r.proto.makeConnection(transport)
    r.proto.dataReceived(b"\x02a\x03\x02b\x03\x02c\x03")
    r.ingest.pending[1].errback(Failure(RuntimeError("store down")))
    r.ingest.pending[2].callback(accepted(3))
    r.ingest.pending[0].callback(accepted(1))
    assert transport.writes == [b"\x06"] and transport.disconnecting


@dataclass
class GroupIngest(FakeIngest):
    """A FakeIngest that also takes the frames of one read together (``many``)."""

    groups: list[tuple[list[bytes], Deferred[list[Any]]]] = field(default_factory=list)

    def many(self, payloads: Sequence[bytes], origin: Origin) -> Deferred[list[Any]]:
        d: Deferred[list[Any]] = Deferred()
        self.groups.append((list(payloads), d))
        return d


def group_rig() -> tuple[Rig, GroupIngest]:
    r = rig("stx-etx")
    ingest = GroupIngest()
    r.factory.ingest, r.factory.ingest_many = ingest, ingest.many
    return r, ingest


def test_the_frames_of_one_read_go_in_together_and_are_answered_in_order() -> None:
    r, ingest = group_rig()
    r.proto.dataReceived(b"\x02a\x03\x02\x03\x02b\x03")
    r.proto.dataReceived(b"\x02c\x03")  # one frame: the single way
    r.proto.dataReceived(b"\x02d\x03\x02e")
    assert [p for p, _ in ingest.groups] == [[b"a", b"b"]]
    assert ingest.payloads == [b"c", b"d"]
    ingest.pending[0].callback(accepted(3))
    assert r.transport.value() == b""
    ingest.groups[0][1].callback([accepted(1), rejected()])
    assert r.transport.value() == b"\x06\x06\x15\x06"  # a, the keep-alive, b, c
    assert (r.proto.accepted, r.proto.rejected, r.proto.messages) == (2, 1, 4)


def test_a_failure_in_a_group_answers_those_before_it_and_closes() -> None:
    r, ingest = group_rig()
    r.proto.dataReceived(b"\x02a\x03\x02b\x03\x02c\x03")
    failure = Failure(RuntimeError("disk full"))
    ingest.groups[0][1].callback([accepted(1), failure, accepted(3)])
    assert r.transport.value() == b"\x06" and r.transport.disconnecting
    r2, ingest2 = group_rig()
    r2.proto.dataReceived(b"\x02a\x03\x02b\x03")
    ingest2.groups[0][1].errback(failure)
    assert r2.transport.value() == b"" and r2.transport.disconnecting
    assert r2.factory.unanswered == 0


def test_ack_only_when_every_outcome_accepted() -> None:
    r = rig()
    r.proto.dataReceived(b"one\ntwo\nthree\n")
    r.ingest.pending[0].callback(accepted(1) + rejected())
    r.ingest.pending[1].callback([])
    r.ingest.pending[2].callback(accepted(1) + accepted(2))
    assert r.transport.value() == b"\x15\n\x15\n\x06\n"


@pytest.mark.parametrize("bytewise", [False, True])
def test_stx_etx_bare_ack_garbage_and_framing_errors_in_order(bytewise: bool) -> None:
    r = rig("stx-etx", max_bytes=10)
    wire = b"\r\nnoise\x02first\x03\x02" + b"L" * 50 + b"\x03\x02\x03\x02second\x03"
    send(r, wire, bytewise=bytewise)
    assert r.ingest.payloads == [b"first", b"second"]
    assert r.transport.value() == b""  # the oversize NAK waits for "first"
    r.ingest.pending[0].callback(accepted())
    # first: ACK; oversize: NAK; empty frame (keep-alive): ACK; second still owed
    assert r.transport.value() == ACK + NAK + ACK
    r.ingest.pending[1].callback(accepted())
    assert r.transport.value() == ACK + NAK + ACK + ACK
    assert r.proto.deframer.discarded == len(b"\r\nnoise")


def test_vt_fs_cr_ack_is_framed() -> None:
    r = rig("vt-fs-cr")
    r.proto.dataReceived(b"\x0bMSH|^~\\&|CAD\x1c\r\x0bMSH|2\x1c\r")
    r.ingest.pending[0].callback(accepted())
    r.ingest.pending[1].callback(rejected())
    assert r.transport.value() == b"\x0b\x06\x1c\r\x0b\x15\x1c\r"


def test_ack_none_writes_nothing() -> None:
    r = rig(ack="none")
    r.proto.dataReceived(b"one\ntwo\n")
    r.ingest.pending[0].callback(accepted())
    r.ingest.pending[1].callback(rejected())
    assert r.transport.value() == b""
    assert not r.transport.disconnecting


def test_ingest_failure_is_not_acked_and_closes() -> None:
    r = rig()
    with capture_logs() as logs:
        r.proto.dataReceived(b"one\ntwo\nthree\n")
        r.ingest.pending[1].errback(RuntimeError("database is locked"))
        r.proto.dataReceived(b"four\n")  # after the failure: not taken
        assert r.ingest.payloads == [b"one", b"two", b"three"]
        assert not r.transport.disconnecting  # "one" is still owed its answer
        r.ingest.pending[0].callback(accepted())
    assert r.transport.value() == b"\x06\n"  # "one" answered; nothing for "two" or after
    assert r.transport.disconnecting
    assert any(e["event"] == "feed.tcp.ingest.failed" for e in logs)
    r.proto.connectionLost(Failure(ConnectionDone()))
    r.ingest.pending[2].callback(accepted())
    assert r.transport.value() == b"\x06\n"
    assert r.factory.unanswered == 0


def test_ingest_raising_synchronously_counts_as_failure() -> None:
    def broken(payload: bytes, origin: Origin) -> Deferred[Sequence[Outcome]]:
        raise RuntimeError("bug")

    r = rig()
    r.factory.ingest = broken
    r.proto.dataReceived(b"one\ntwo\n")
    assert r.transport.value() == b""
    assert r.transport.disconnecting


@pytest.mark.parametrize("bytewise", [False, True])
def test_connection_framing_answers_after_half_close(bytewise: bool) -> None:
    r = rig("connection")
    payload = b"\n".join(LINES)
    send(r, payload, bytewise=bytewise)
    assert r.ingest.calls == []
    r.proto.readConnectionLost()  # the sender shut down its write side
    assert r.ingest.payloads == [payload]
    assert not r.transport.disconnecting
    r.ingest.pending[0].callback(accepted())
    assert r.transport.value() == ACK
    assert r.transport.disconnecting


def test_connection_framing_oversize_naks_and_closes_at_once() -> None:
    r = rig("connection", max_bytes=16)
    r.proto.dataReceived(b"A" * 10)
    r.proto.dataReceived(b"A" * 10)
    assert r.transport.value() == NAK
    assert r.transport.disconnecting
    r.proto.dataReceived(b"A" * 10)
    r.proto.readConnectionLost()
    assert r.ingest.calls == []
    assert r.transport.value() == NAK


def test_newline_half_close_takes_last_line_then_closes() -> None:
    r = rig()
    r.proto.dataReceived(b"one\ntwo")
    r.proto.readConnectionLost()
    assert r.ingest.payloads == [b"one", b"two"]
    r.ingest.pending[0].callback(accepted())
    assert not r.transport.disconnecting
    r.ingest.pending[1].callback(accepted())
    assert r.transport.value() == b"\x06\n\x06\n"
    assert r.transport.disconnecting


def test_unclean_close_drops_the_partial_frame() -> None:
    r = rig()
    r.proto.dataReceived(b"one\ntw")
    r.proto.connectionLost(Failure(ConnectionLost()))
    assert r.ingest.payloads == [b"one"]
    r.ingest.pending[0].callback(accepted())
    assert r.transport.value() == b""  # gone: nothing can be written
    assert r.factory.unanswered == 0


def test_clean_close_without_half_close_still_ingests_the_last_frame() -> None:
    # TLS: a close_notify arrives as connectionLost(ConnectionDone), no readConnectionLost.
    r = rig("connection")
    r.proto.dataReceived(b"whole message")
    r.proto.connectionLost(Failure(ConnectionDone()))
    assert r.ingest.payloads == [b"whole message"]


def test_back_pressure_pauses_and_resumes() -> None:
    r = rig(max_in_flight=4)
    r.proto.dataReceived(b"1\n2\n3\n4\n")
    assert r.transport.producerState == "producing"
    r.proto.dataReceived(b"5\n")
    assert r.transport.producerState == "paused"
    r.ingest.pending[0].callback(accepted())
    r.ingest.pending[1].callback(accepted())
    assert r.transport.producerState == "paused"  # 3 owed: above half of the limit
    r.ingest.pending[2].callback(accepted())
    assert r.transport.producerState == "producing"
    assert r.transport.value() == b"\x06\n" * 3


def test_idle_timeout_through_the_clock() -> None:
    r = rig(idle=30.0)
    r.time.advance(29)
    r.proto.dataReceived(b"one\n")  # activity resets the timer
    r.time.advance(29)
    assert not r.transport.disconnecting
    r.time.advance(2)  # idle, but "one" is still owed an answer: keep the connection
    assert not r.transport.disconnecting
    r.ingest.pending[0].callback(accepted())
    r.time.advance(30)
    assert r.transport.disconnecting
    r.proto.connectionLost(Failure(ConnectionDone()))
    assert r.time.getDelayedCalls() == []


def test_drain_answers_in_flight_then_closes_and_refuses_new_connections() -> None:
    r = rig()
    r.proto.dataReceived(b"one\ntwo\npart")
    drained = r.factory.drain()
    assert not drained.called
    assert r.transport.producerState == "paused"
    r.proto.dataReceived(b"ial\nthree\n")  # already in a buffer: not taken any more
    assert r.ingest.payloads == [b"one", b"two"]
    r.ingest.pending[1].callback(accepted())
    r.ingest.pending[0].callback(accepted())
    assert drained.called
    assert r.transport.value() == b"\x06\n\x06\n"
    assert r.transport.disconnecting
    assert r.factory.buildProtocol(PEER) is None


def test_drain_with_nothing_in_flight_fires_at_once() -> None:
    r = rig()
    assert r.factory.drain().called
    assert r.transport.disconnecting


def test_logs_never_carry_payload_bytes() -> None:
    with capture_logs() as logs:
        r = rig(max_bytes=20)
        r.proto.dataReceived(b"Testy McTestface 555-0142 at 12 Nowhere Ln\n{}\n")
        r.ingest.pending[0].callback(rejected())
        r.proto.connectionLost(Failure(ConnectionDone()))
    text = repr(logs)
    assert "Testy" not in text and "555-0142" not in text
    events = [e["event"] for e in logs]
    assert events[0] == "feed.tcp.connection.made"
    assert "feed.tcp.frame.rejected" in events
    lost = next(e for e in logs if e["event"] == "feed.tcp.connection.lost")
    assert lost["peer"] == "192.0.2.7:40001"
    assert (lost["messages"], lost["rejected"], lost["framing_errors"]) == (1, 1, 1)


def test_bad_settings_are_refused() -> None:
    clock = Clock(TaskClock())
    with pytest.raises(ValueError):
        TcpFeedFactory(
            FakeIngest(),
            feed="f",
            framing="length-prefix",
            ack="none",
            max_message_bytes=10,
            clock=clock,
            idle_timeout=None,
        )
    with pytest.raises(ValueError):
        TcpFeedFactory(
            FakeIngest(),
            feed="f",
            framing="newline",
            ack="yes",
            max_message_bytes=10,
            clock=clock,
            idle_timeout=None,
        )


def test_peer_name_brackets_ipv6() -> None:
    from twisted.internet.address import IPv6Address

    assert peer_name(IPv6Address("TCP", "::1", 9)) == "[::1]:9"


@settings(max_examples=150, deadline=None)
@given(
    framing=st.sampled_from(["newline", "stx-etx", "vt-fs-cr", "connection"]),
    chunks=st.lists(
        st.binary(max_size=40) | st.sampled_from([b"\x02", b"\x03", b"\x0b", b"\x1c\r", b"\n"]),
        max_size=30,
    ),
    verdicts=st.lists(st.booleans(), max_size=40),
)
def test_fuzz_any_bytes_only_ever_get_acks_or_naks(
    framing: str, chunks: list[bytes], verdicts: list[bool]
) -> None:
    r = rig(framing, max_bytes=16)
    for chunk in chunks:
        r.proto.dataReceived(chunk)
    r.proto.readConnectionLost()
    for i, d in enumerate(r.ingest.pending):
        ok = verdicts[i] if i < len(verdicts) else True
        d.callback(accepted() if ok else rejected())
    assert r.proto.in_flight == 0 and r.factory.unanswered == 0
    answers = (
        make_deframer("newline", 10).feed(r.transport.value())
        if framing == "newline"
        else [bytes([b]) for b in r.transport.value() if b in (6, 0x15)]
    )
    assert all(a in (ACK, NAK) for a in answers)
    assert r.transport.disconnecting


# Real protocols on both ends: a sender that frames messages and reads the answers.


class StxSender(Protocol):
    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.answers = b""
        self.lost = False

    def connectionMade(self) -> None:
        transport: Any = self.transport
        for m in self.messages:
            transport.write(b"\x02" + m + b"\x03")

    def dataReceived(self, data: bytes) -> None:
        self.answers += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost = True


def test_iosim_sender_and_listener_talk() -> None:
    time = TaskClock()

    def ingest(payload: bytes, origin: Origin) -> Deferred[Sequence[Outcome]]:
        return succeed(rejected() if payload == b"bad" else accepted())

    factory = TcpFeedFactory(
        ingest,
        feed="cad-stx",
        framing="stx-etx",
        ack="ack-nak",
        max_message_bytes=100,
        clock=Clock(time),
        idle_timeout=5.0,
    )

    def server_transport(p: Any) -> Any:
        return FakeTransport(p, isServer=True, peerAddress=PEER)

    client, server, pump = connectedServerAndClient(
        lambda: factory.buildProtocol(PEER),
        lambda: StxSender([b"good", b"bad", b"good again"]),
        serverTransportFactory=server_transport,
    )
    pump.flush()
    assert client.answers == ACK + NAK + ACK
    assert factory.connections == {server}
    time.advance(5)  # idle
    pump.flush()
    assert client.lost
    assert factory.connections == set()


def test_ingest_failure_does_not_leak_an_unhandled_error() -> None:
    r = rig()
    r.factory.ingest = lambda payload, origin: fail(RuntimeError("store down"))
    r.proto.dataReceived(b"one\n")
    assert r.transport.disconnecting
    assert r.factory.unanswered == 0


# One real loopback connection, to show the half-close of a one-message-per-connection sender.


class HalfCloser(Protocol):
    def __init__(self, message: bytes, answered: Deferred[bytes]) -> None:
        self.message = message
        self.answered = answered
        self.received = b""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.message)
        transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.answered.callback(self.received)


def test_real_tcp_half_close_gets_its_answer() -> None:
    from twisted.internet.selectreactor import SelectReactor

    reactor = SelectReactor()  # a private reactor, not the global one
    ingest = FakeIngest()
    factory = TcpFeedFactory(
        ingest,
        feed="cad-adi",
        framing="connection",
        ack="ack-nak",
        max_message_bytes=1000,
        clock=Clock(reactor),
        idle_timeout=None,
    )
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    answered: Deferred[bytes] = Deferred()
    client_factory: Any = ClientFactory.forProtocol(
        lambda: HalfCloser(b"<html>report</html>", answered)
    )
    reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory)
    try:
        for _ in range(500):  # I/O turns, not a timer: stops as soon as the work is done
            if ingest.pending:
                break
            reactor.iterate(0.01)
        assert ingest.payloads == [b"<html>report</html>"]
        ingest.pending[0].callback(accepted())
        for _ in range(500):
            if answered.called:
                break
            reactor.iterate(0.01)
        assert answered.called
        assert answered.result == ACK
    finally:
        port.stopListening()
        for _ in range(5):
            reactor.iterate(0)


class NoDelayTransport(StringTransport):
    no_delay: bool | None = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


def test_answers_are_not_held_back_by_nagle() -> None:
    """An ACK is one small segment the sender waits for; Nagle would hold it for the sender's
    delayed ACK of the previous answer (10 ms latency at 100 messages/s, measured)."""
    factory = rig().factory
    proto = factory.buildProtocol(PEER)
    assert proto is not None
    transport = NoDelayTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    assert transport.no_delay is True
