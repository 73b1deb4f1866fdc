"""STA-024 subscriber: our autobahn protocols against a real autobahn notifier, in memory.

Connections go through MemoryReactorClock (the feed's real HostnameEndpoint / ClientService /
listenTCP calls are recorded there) and iosim's FakeTransport; time moves only on ``advance``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionRequest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import FakeTransport, IOPump, connect

from corespond.adapters.sta024 import (
    EIDO_MEDIA_TYPE,
    Sta024Feed,
    SubscriberSession,
    Subscription,
    Timing,
    eido_bytes,
)
from corespond.adapters.tls import client_tls_options, server_tls_options
from corespond.daemon.clock import Clock
from corespond.daemon.ingest import Accepted, Origin, Outcome, Rejected, SnapshotState
from tests.adapters.tlsfiles import SERVER_NAME, make_pki

TOKEN = "notifier-token-for-tests"
EIDO_A = {
    "eidoMessageIdentifier": "urn:eido:a",
    "incidentComponent": [{"incidentTrackingIdentifier": "urn:inc:1"}],
    "notesComponent": [{"noteText": "Testy McTestface called from 555-0142"}],
}
EIDO_B = {
    "eidoMessageIdentifier": "urn:eido:b",
    "incidentComponent": [{"incidentTrackingIdentifier": "urn:inc:2"}],
}
REJECTED = Rejected("missing-field", "incidentComponent is required", "/incidentComponent")
PEER: Any = IPv4Address("TCP", "192.0.2.50", 41000)
NO_PINGS = Timing(ping_interval=None)


@dataclass
class FakeIngest:
    calls: list[tuple[bytes, Origin]] = field(default_factory=list)
    pending: list[Deferred[Sequence[Outcome]]] = field(default_factory=list)

    def __call__(self, payload: bytes, origin: Origin) -> Deferred[Sequence[Outcome]]:
        self.calls.append((payload, origin))
        d: Deferred[Sequence[Outcome]] = Deferred()
        self.pending.append(d)
        return d


def accepted(n: int) -> list[Outcome]:
    return [Accepted(f"inc-{n}", n, SnapshotState.NEW)]


class NotifierMixin:
    """A CAD's notifier, as simple as the standard allows: records, and sends what it is told."""

    factory: Any

    def onConnect(self, request: Any) -> None:
        self.factory.handshakes.append(request)

    def onOpen(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.closed_with: int | None = None
        self.factory.connections.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed_with = code if code is not None else -1

    def send(self, message: Any) -> None:
        raw = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.sendMessage(raw, False)  # type: ignore[attr-defined]

    def last(self, kind: str) -> dict[str, Any]:
        bodies = [m[kind] for m in self.received if kind in m]
        assert bodies, f"no {kind} in {list(m for m in self.received)}"
        return bodies[-1]

    def grant(self, sub_id: str = "sub-1", **extra: Any) -> None:
        request = self.last("subscribe")
        self.send(
            {
                "subscribeResponse": {
                    "requestId": request["requestId"],
                    "subscriptionId": sub_id,
                    "statusCode": 200,
                    "statusText": "OK",
                    **extra,
                }
            }
        )


class NotifierServer(NotifierMixin, WebSocketServerProtocol):  # type: ignore[misc]
    pass


class NotifierClient(NotifierMixin, WebSocketClientProtocol):  # type: ignore[misc]
    pass


def _quiet(factory: Any) -> Any:
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, autoPingInterval=0)
    factory.handshakes = []
    factory.connections = []
    factory.noisy = False
    return factory


def notifier_server(reactor: MemoryReactorClock) -> WebSocketServerFactory:
    factory = WebSocketServerFactory("ws://notifier.example.test:8080/eido", reactor=reactor)
    factory.protocol = NotifierServer
    return _quiet(factory)


@dataclass
class Rig:
    reactor: MemoryReactorClock
    feed: Sta024Feed
    ingest: FakeIngest
    notifier: WebSocketServerFactory
    pumps: list[IOPump] = field(default_factory=list)
    tls_server: Any = None

    @property
    def pump(self) -> IOPump:
        return self.pumps[-1]

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def accept(self) -> Any:
        """Complete the feed's latest connection attempt to the notifier."""
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        client = factory.buildProtocol(PEER)
        server_factory: Any = self.notifier
        if self.tls_server is not None:
            notifier: Any = self.notifier
            clock: Any = self.reactor
            server_factory = TLSMemoryBIOFactory(self.tls_server, False, notifier, clock=clock)
        server = server_factory.buildProtocol(PEER)
        self.pumps.append(
            connect(
                server,
                FakeTransport(server, True, peerAddress=PEER),
                client,
                FakeTransport(client, False, peerAddress=PEER),
                clock=self.reactor,
            )
        )
        self.flush()
        connections = self.notifier.connections  # type: ignore[attr-defined]
        return connections[-1] if connections else None

    def session(self) -> SubscriberSession:
        (session,) = self.feed.sessions
        return session


def rig(
    url: str = "ws://notifier.example.test:8080/eido",
    *,
    subscription: Subscription | None = None,
    token: str | None = TOKEN,
    timing: Timing = NO_PINGS,
    **kwargs: Any,
) -> Rig:
    reactor = MemoryReactorClock()
    ingest = FakeIngest()
    feed = Sta024Feed(
        reactor,
        Clock(reactor),
        ingest,
        feed="cad-ws",
        mode="subscribe",
        url=url,
        subscription=subscription or Subscription(expires=3600),
        token=token,
        initial_delay=1.0,
        max_delay=8.0,
        timing=timing,
        **kwargs,
    )
    r = Rig(reactor, feed, ingest, notifier_server(reactor))
    feed.start()
    return r


def subscribed(r: Rig, **grant: Any) -> NotifierServer:
    notifier = r.accept()
    notifier.grant(**grant)
    r.flush()
    return notifier


def event(tid: str = "tx-1", sub: str = "sub-1", eidos: Any = (EIDO_A,)) -> dict[str, Any]:
    return {"event": {"subscriptionId": sub, "transactionId": tid, "notification": list(eidos)}}


# --- subscribing -------------------------------------------------------------------------------


def test_subscribe_message_and_bearer_token() -> None:
    r = rig(subscription=Subscription(expires=600, min_rate=5, max_rate=60))
    notifier = r.accept()
    (handshake,) = r.notifier.handshakes  # type: ignore[attr-defined]
    assert isinstance(handshake, ConnectionRequest)
    assert handshake.headers["authorization"] == f"Bearer {TOKEN}"
    assert handshake.path == "/eido"
    sub = notifier.last("subscribe")
    uuid.UUID(sub.pop("requestId"))
    assert sub == {
        "requestType": "EIDO",
        "requestSubType": "new",
        "requestAccepts": EIDO_MEDIA_TYPE,
        "expires": 600,
        "minRate": 5,
        "maxRate": 60,
    }


def test_single_incident_subscription() -> None:
    msg = Subscription("single", incident_id="urn:inc:9").request("r1")["subscribe"]
    assert msg["requestSubType"] == "single" and msg["incidentId"] == "urn:inc:9"
    with pytest.raises(ValueError, match="incident_id"):
        Subscription("single")
    with pytest.raises(ValueError):
        Subscription("everything")


def test_event_acknowledged_only_after_commit() -> None:
    r = rig()
    notifier = subscribed(r)
    notifier.send(event("tx-1"))
    r.flush()
    assert r.ingest.calls == [
        (eido_bytes(EIDO_A), Origin("cad-ws", peer="192.0.2.50:41000", name="tx-1"))
    ]
    assert [m for m in notifier.received if "eventResponse" in m] == []
    r.ingest.pending[0].callback(accepted(1))
    r.flush()
    assert notifier.last("eventResponse") == {
        "transactionId": "tx-1",
        "statusCode": 200,
        "statusText": "OK",
    }


def test_eido_bytes_are_compact_reserialization() -> None:
    raw = eido_bytes(EIDO_A)
    assert json.loads(raw) == EIDO_A
    assert b", " not in raw and raw.startswith(b'{"eidoMessageIdentifier"')
    assert json.loads(eido_bytes({"x": "\ud800"})) == {"x": "\ud800"}  # lone surrogate survives


def test_two_eidos_in_one_notification() -> None:
    r = rig()
    notifier = subscribed(r)
    notifier.send(event("tx-2", eidos=[EIDO_A, EIDO_B]))
    r.flush()
    assert [p for p, _ in r.ingest.calls] == [eido_bytes(EIDO_A), eido_bytes(EIDO_B)]
    r.ingest.pending[1].callback(accepted(2))
    r.flush()
    assert not any("eventResponse" in m for m in notifier.received)
    r.ingest.pending[0].callback(accepted(1))
    r.flush()
    assert notifier.last("eventResponse")["statusCode"] == 200


def test_rejected_eido_gives_400_naming_it_without_content() -> None:
    r = rig()
    notifier = subscribed(r)
    notifier.send(event("tx-3", eidos=[EIDO_B, EIDO_A]))
    r.flush()
    r.ingest.pending[0].callback(accepted(1))
    r.ingest.pending[1].callback([REJECTED])
    r.flush()
    response = notifier.last("eventResponse")
    assert response["statusCode"] == 400
    assert response["statusText"] == (
        "notification[1]: missing-field: incidentComponent is required (at /incidentComponent)"
    )
    assert "Testy" not in json.dumps(notifier.received)


def test_ingest_failure_gives_503() -> None:
    r = rig()
    notifier = subscribed(r)
    notifier.send(event("tx-4"))
    r.flush()
    r.ingest.pending[0].errback(RuntimeError("disk full"))
    r.flush()
    assert notifier.last("eventResponse")["statusCode"] == 503


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"subscriptionId": "sub-1", "transactionId": "t", "notification": {"a": 1}}, 400),
        ({"subscriptionId": "sub-1", "transactionId": "t", "notification": [EIDO_A, 7]}, 400),
        ({"transactionId": "t", "notification": [EIDO_A]}, 400),
        ({"subscriptionId": "sub-other", "transactionId": "t", "notification": [EIDO_A]}, 481),
        ({"subscriptionId": "sub-1", "transactionId": "t"}, 200),
    ],
)
def test_malformed_event_answered_and_stream_continues(body: dict[str, Any], status: int) -> None:
    r = rig()
    notifier = subscribed(r)
    notifier.send({"event": body})
    r.flush()
    assert notifier.last("eventResponse")["statusCode"] == status
    assert r.ingest.calls == []
    notifier.send(event("tx-next"))
    r.flush()
    assert len(r.ingest.calls) == 1 and notifier.closed_with is None


@pytest.mark.parametrize(
    "raw",
    [
        b"not json at all",
        b'{"event": {"subscriptionId": "sub-1"}}',
        b"[1,2]",
        b'{"a":1,"b":2}',
        b'{"event": 5}',
        b'{"somethingElse": {}}',
        b'{"event": {"transactionId": 5}}',
    ],
)
def test_unanswerable_messages_dropped_connection_stays(raw: bytes) -> None:
    r = rig()
    notifier = subscribed(r)
    with capture_logs() as logs:
        notifier.send(raw)
        r.flush()
    assert not any("eventResponse" in m for m in notifier.received)
    assert any(e["log_level"] == "warning" for e in logs)
    assert all(b"json at all" not in repr(e).encode() for e in logs)
    notifier.send(event("tx-after"))
    r.flush()
    assert len(r.ingest.calls) == 1 and notifier.closed_with is None


def test_binary_garbage_dropped_connection_stays() -> None:
    r = rig()
    notifier = subscribed(r)
    notifier.sendMessage(b"\xff\xfe\x00", True)
    r.flush()
    notifier.send(event("tx-after"))
    r.flush()
    assert len(r.ingest.calls) == 1 and notifier.closed_with is None


def test_push_message_answered_not_implemented() -> None:
    r = rig()
    notifier = subscribed(r)
    notifier.send({"requestForService": {"requestId": "rq-1", "eido": EIDO_A}})
    r.flush()
    assert notifier.last("response") == {
        "requestId": "rq-1",
        "responseCode": 501,
        "responseText": "Not implemented",
    }
    assert r.ingest.calls == []


def test_bytewise_delivery() -> None:
    """The notifier's frames reach us one byte at a time."""
    r = rig()
    notifier = subscribed(r)
    notifier.send(event("tx-b", eidos=[EIDO_A, EIDO_B]))
    pump = r.pump
    data = pump.serverIO.getOutBuffer()
    for i in range(len(data)):
        pump.clientIO.bufferReceived(data[i : i + 1])
    assert len(r.ingest.calls) == 2
    for d in r.ingest.pending:
        d.callback(accepted(1))
    r.flush()
    assert notifier.last("eventResponse")["statusCode"] == 200


# --- failures, reconnects, renewals, terminate ---------------------------------------------


def test_refused_subscription_closes_and_backs_off() -> None:
    r = rig()
    delays = []
    for attempt in range(3):
        notifier = r.accept()
        request = notifier.last("subscribe")
        with capture_logs() as logs:
            notifier.send(
                {
                    "subscribeResponse": {
                        "requestId": request["requestId"],
                        "statusCode": 403,
                        "statusText": "Forbidden",
                    }
                }
            )
            r.flush()
        assert any(e["event"] == "feed.sta024.subscribe.refused" for e in logs)
        assert notifier.closed_with == 1000
        before = len(r.reactor.tcpClients)
        waited = 0.0
        while len(r.reactor.tcpClients) == before:
            r.reactor.advance(0.5)
            waited += 0.5
            assert waited < 60, f"no reconnect on attempt {attempt}"
        delays.append(waited)
    assert delays[0] < delays[1] < delays[2]
    # A granted subscription resets the backoff.
    subscribed_notifier = r.accept()
    subscribed_notifier.grant()
    r.flush()
    assert r.feed.failures == 0


def test_reconnects_after_connection_lost_and_resubscribes() -> None:
    r = rig()
    subscribed(r)
    r.pump.serverIO.loseConnection()
    r.flush()
    assert r.feed.sessions == set()
    r.reactor.advance(1.0)
    notifier = r.accept()
    assert "subscribe" in notifier.received[0]


def test_notifier_closing_is_followed_by_reconnect() -> None:
    r = rig()
    notifier = subscribed(r)
    notifier.sendClose(1000, "restarting")
    r.flush()
    assert r.feed.sessions == set()
    r.reactor.advance(1.0)
    assert "subscribe" in r.accept().received[0]


def test_notifier_that_never_drops_tcp_after_close_is_cut_off() -> None:
    r = rig()
    notifier = subscribed(r)
    r.pump.serverIO.loseConnection = lambda: None
    notifier.dropConnection = lambda abort=False: None  # type: ignore[method-assign]
    notifier.sendClose(1000, "restarting")
    r.flush()
    assert len(r.feed.sessions) == 1
    r.reactor.advance(r.feed.timing.close)
    r.flush()
    assert r.feed.sessions == set()


def test_subscribe_response_timeout_closes() -> None:
    r = rig()
    notifier = r.accept()
    r.reactor.advance(r.feed.timing.subscribe)
    r.flush()
    assert notifier.closed_with == 1000


def test_renewal_before_expiry() -> None:
    r = rig()
    notifier = subscribed(r, expires=100)
    r.reactor.advance(79)
    assert len([m for m in notifier.received if "subscribe" in m]) == 1
    r.reactor.advance(1)
    r.flush()
    renewal = notifier.last("subscribe")
    assert renewal["subscriptionId"] == "sub-1" and "requestType" not in renewal
    notifier.grant(expires=100)
    r.flush()
    assert notifier.closed_with is None


def test_terminate_answered_then_resubscribed() -> None:
    r = rig()
    notifier = subscribed(r)
    notifier.send({"terminate": {"requestId": "term-1", "subscriptionId": "sub-1"}})
    r.flush()
    assert notifier.last("terminateResponse") == {
        "requestId": "term-1",
        "subscriptionId": "sub-1",
        "statusCode": 200,
        "statusText": "OK",
    }
    assert len([m for m in notifier.received if "subscribe" in m]) == 1
    r.reactor.advance(r.feed.initial_delay)
    r.flush()
    second = notifier.last("subscribe")
    assert second["requestType"] == "EIDO" and "subscriptionId" not in second
    notifier.grant("sub-2")
    r.flush()
    notifier.send(event("tx-5", sub="sub-2"))
    r.flush()
    assert len(r.ingest.calls) == 1


def test_terminate_unknown_subscription_481() -> None:
    r = rig()
    notifier = subscribed(r)
    notifier.send({"terminate": {"requestId": "term-2", "subscriptionId": "nope"}})
    r.flush()
    assert notifier.last("terminateResponse")["statusCode"] == 481


def test_handshake_timeout_aborts() -> None:
    r = rig()
    _h, _p, factory, _t, _b = r.reactor.tcpClients[-1]
    client: Any = factory.buildProtocol(PEER)
    transport = FakeTransport(client, False, peerAddress=PEER)
    client.makeConnection(transport)  # a notifier that never answers the upgrade
    r.reactor.advance(r.feed.timing.handshake)
    assert transport.disconnecting


def test_silent_connection_dropped_by_keepalive() -> None:
    r = rig(timing=Timing(ping_interval=10))
    notifier = subscribed(r)
    r.reactor.advance(10)
    r.flush()  # ping answered with pong by autobahn
    assert notifier.closed_with is None
    r.pump.clientIO.bufferReceived = lambda data: None
    for _ in range(3):
        r.reactor.advance(10)
        r.pump.pump()
    assert r.pump.clientIO.disconnecting


# --- stopping ------------------------------------------------------------------------------------


def test_stop_waits_for_in_flight_then_unsubscribes() -> None:
    r = rig()
    notifier = subscribed(r)
    notifier.send(event("tx-6"))
    r.flush()
    stopped: list[object] = []
    r.feed.stop().addBoth(stopped.append)
    r.flush()
    assert stopped == []
    assert not any("unsubscribe" in m for m in notifier.received)
    r.ingest.pending[0].callback(accepted(1))
    r.flush()
    assert notifier.last("eventResponse")["statusCode"] == 200
    unsub = notifier.last("unsubscribe")
    assert unsub["subscriptionId"] == "sub-1"
    notifier.send(
        {
            "unsubscribeResponse": {
                "requestId": unsub["requestId"],
                "subscriptionId": "sub-1",
                "statusCode": 200,
                "statusText": "OK",
            }
        }
    )
    r.flush()
    assert stopped == [None] and notifier.closed_with == 1000
    clients = len(r.reactor.tcpClients)
    r.reactor.advance(120)
    assert len(r.reactor.tcpClients) == clients  # no reconnect after stop


def test_stop_without_unsubscribe_answer_gives_up_on_clock() -> None:
    r = rig()
    notifier = subscribed(r)
    stopped: list[object] = []
    r.feed.stop().addBoth(stopped.append)
    r.flush()
    assert notifier.last("unsubscribe")
    assert stopped == []
    r.reactor.advance(r.feed.timing.unsubscribe)
    r.flush()
    assert stopped == [None]


def test_stop_while_waiting_to_reconnect() -> None:
    r = rig()
    r.accept()
    r.pump.serverIO.loseConnection()
    r.flush()
    stopped = r.feed.stop()
    assert stopped.called
    clients = len(r.reactor.tcpClients)
    r.reactor.advance(120)
    assert len(r.reactor.tcpClients) == clients


def test_drain() -> None:
    r = rig()
    notifier = subscribed(r)
    assert r.feed.drain().called
    notifier.send(event("tx-7"))
    r.flush()
    drained = r.feed.drain()
    assert not drained.called
    r.ingest.pending[0].callback(accepted(1))
    assert drained.called


# --- wss -----------------------------------------------------------------------------------------


def test_wss_with_client_certificate(tmp_path: Any) -> None:
    pki = make_pki(tmp_path)
    r = rig(
        f"wss://{SERVER_NAME}:8443/eido",
        client_tls=client_tls_options(SERVER_NAME, pki.ca_cert, pki.client_cert, pki.client_key),
    )
    r.tls_server = server_tls_options(pki.server_cert, pki.server_key, pki.ca_cert, True)
    notifier = r.accept()
    notifier.grant()
    r.flush()
    notifier.send(event("tx-tls"))
    r.flush()
    r.ingest.pending[0].callback(accepted(1))
    r.flush()
    assert notifier.last("eventResponse")["statusCode"] == 200
    assert notifier.transport.getPeerCertificate().get_subject().CN == "cad-notifier.example.test"


def test_wss_refuses_untrusted_notifier(tmp_path: Any) -> None:
    pki = make_pki(tmp_path)
    r = rig(
        f"wss://{SERVER_NAME}:8443/eido",
        client_tls=client_tls_options(SERVER_NAME, pki.other_ca_cert),
    )
    r.tls_server = server_tls_options(pki.server_cert, pki.server_key)
    r.accept()
    r.flush()
    assert r.notifier.connections == []  # type: ignore[attr-defined]
    assert r.feed.sessions == set()


# --- listen mode ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    host: str = "127.0.0.1"
    port: int = 9000


def listen_rig(token: str | None = TOKEN) -> tuple[MemoryReactorClock, Sta024Feed, FakeIngest]:
    reactor = MemoryReactorClock()
    ingest = FakeIngest()

    def listen(reactor: Any, where: Any, factory: Any) -> Any:
        return reactor.listenTCP(where.port, factory, interface=where.host)

    feed = Sta024Feed(
        reactor,
        Clock(reactor),
        ingest,
        feed="cad-in",
        mode="listen",
        subscription=Subscription(),
        listen_on=Where(),
        listen=listen,
        token=token,
        timing=Timing(ping_interval=None),
    )
    feed.start()
    return reactor, feed, ingest


def notifier_dials(reactor: MemoryReactorClock, token: str | None) -> tuple[Any, IOPump]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    factory = _quiet(
        WebSocketClientFactory(
            "ws://corespond.example.test:9000/", headers=headers, reactor=reactor
        )
    )
    factory.protocol = NotifierClient
    server_factory: Any = reactor.tcpServers[-1][1]
    server = server_factory.buildProtocol(PEER)
    client = factory.buildProtocol(PEER)
    pump = connect(
        server,
        FakeTransport(server, True, peerAddress=PEER),
        client,
        FakeTransport(client, False),
        clock=reactor,
    )
    pump.flush()
    return factory, pump


def test_listen_mode_subscribes_to_the_notifier_that_connects() -> None:
    reactor, feed, ingest = listen_rig()
    factory, pump = notifier_dials(reactor, TOKEN)
    (notifier,) = factory.connections
    notifier.grant()
    pump.flush()
    notifier.send(event())
    pump.flush()
    assert ingest.calls[0][1] == Origin("cad-in", peer="192.0.2.50:41000", name="tx-1")
    ingest.pending[0].callback(accepted(1))
    pump.flush()
    assert notifier.last("eventResponse")["statusCode"] == 200
    stopped: list[object] = []
    feed.stop().addBoth(stopped.append)
    pump.flush()
    unsub = notifier.last("unsubscribe")
    notifier.send(
        {
            "unsubscribeResponse": {
                "requestId": unsub["requestId"],
                "subscriptionId": "sub-1",
                "statusCode": 200,
                "statusText": "OK",
            }
        }
    )
    pump.flush()
    assert stopped == [None]


@pytest.mark.parametrize("token", [None, "wrong"])
def test_listen_mode_refuses_notifier_without_token(token: str | None) -> None:
    reactor, feed, _ingest = listen_rig()
    factory, _pump = notifier_dials(reactor, token)
    assert factory.connections == []
    assert feed.sessions == set()


def test_listen_mode_without_token_configured() -> None:
    reactor, _feed, _ingest = listen_rig(token=None)
    factory, _pump = notifier_dials(reactor, None)
    assert "subscribe" in factory.connections[0].received[0]


# --- fuzz ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "event",
                    "subscriptionId",
                    "transactionId",
                    "notification",
                    "terminate",
                    "requestId",
                    "subscribeResponse",
                    "statusCode",
                    "x",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(message=st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=60)))
def test_fuzz_messages_never_break_the_session(message: bytes) -> None:
    r = rig()
    notifier = subscribed(r)
    session = r.session()
    session.onMessage(message, False)
    for d in r.ingest.pending:
        d.callback([REJECTED])
    r.flush()
    assert not session.sta_closed and notifier.closed_with is None
    if len(message) > 12:
        assert all(message not in json.dumps(m).encode() for m in notifier.received)
