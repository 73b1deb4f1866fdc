"""The HTTP POST feed: a real twisted.web Site, driven over StringTransport and, with a real
Agent, over iosim's in-memory connections; time only moves when the test moves it."""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.web.client import Agent, Response, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from corespond.adapters.http_client import BytesProducer
from corespond.adapters.http_feed import CappedBody, FeedResource, FeedSite, build_feed_site
from corespond.adapters.tls import client_tls_options, server_tls_options
from corespond.daemon.ingest import Accepted, Origin, Outcome, Rejected, SnapshotState
from tests.adapters.tlsfiles import SERVER_NAME, _Recorder, make_pki, tls_connect

TOKEN = "s3cret-token-for-tests"
PEER: Any = IPv4Address("TCP", "192.0.2.9", 50000)
EIDO = b'{"eidoMessageIdentifier":"urn:emergency:eido:1","caller":"Testy McTestface 555-0142"}'
PHI = (b"Testy", b"555-0142")


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


def accepted(n: int = 1, state: SnapshotState = SnapshotState.NEW) -> Accepted:
    return Accepted(f"inc-{n}", n, state)


REJECTED = Rejected("missing-field", "incidentComponent is required", "/incidentComponent")


@dataclass
class Rig:
    site: FeedSite
    resource: FeedResource
    ingest: FakeIngest
    reactor: MemoryReactorClock


def rig(**kwargs: Any) -> Rig:
    reactor = MemoryReactorClock()
    ingest = FakeIngest()
    options: dict[str, Any] = {"feed": "cad-a", "token": TOKEN, "max_message_bytes": 200}
    options.update(kwargs)
    resource = FeedResource(ingest, **options)
    site = build_feed_site({"/feeds/cad-a": resource}, reactor=reactor)
    return Rig(site, resource, ingest, reactor)


def raw_request(
    body: bytes = EIDO,
    *,
    method: bytes = b"POST",
    path: bytes = b"/feeds/cad-a",
    token: str | None = TOKEN,
    headers: Sequence[bytes] = (b"Content-Type: application/json",),
    chunked: bool = False,
) -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: corespond.example.test"]
    if token is not None:
        lines.append(b"Authorization: Bearer " + token.encode())
    lines.extend(headers)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    else:
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


@dataclass
class Parsed:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(data: bytes) -> Parsed:
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
    else:
        body = rest[: int(headers.get(b"content-length", len(rest)))]
    return Parsed(int(status_line.split()[1]), headers, body)


def channel(r: Rig) -> tuple[Any, StringTransport]:
    proto = r.site.buildProtocol(PEER)
    assert proto is not None
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    return proto, transport


def send(r: Rig, data: bytes, *, bytewise: bool = False) -> tuple[Any, StringTransport]:
    proto, transport = channel(r)
    if bytewise:
        for i in range(len(data)):
            proto.dataReceived(data[i : i + 1])
    else:
        proto.dataReceived(data)
    return proto, transport


def answer(r: Rig, data: bytes, *, bytewise: bool = False) -> Parsed:
    _proto, transport = send(r, data, bytewise=bytewise)
    return parse_response(transport.value())


# --- over StringTransport -----------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_answer_written_only_after_ingest_fires(bytewise: bool, chunked: bool) -> None:
    r = rig()
    _proto, transport = send(r, raw_request(chunked=chunked), bytewise=bytewise)
    assert r.ingest.calls == [(EIDO, Origin("cad-a", peer="192.0.2.9:50000"))]
    assert transport.value() == b""  # nothing before the commit
    r.ingest.pending[0].callback([accepted(7)])
    got = parse_response(transport.value())
    assert got.status == 200
    assert got.json() == {"results": [{"incident_id": "inc-7", "snapshot": "new"}]}
    assert got.headers[b"content-type"] == b"application/json"
    assert b"server" not in got.headers
    assert r.resource.unanswered == 0


def test_duplicate_snapshot_reported() -> None:
    r = rig()
    _proto, transport = send(r, raw_request())
    r.ingest.pending[0].callback([accepted(3, SnapshotState.DUPLICATE)])
    assert parse_response(transport.value()).json()["results"][0]["snapshot"] == "duplicate"


def test_rejection_is_400_with_code_reason_where() -> None:
    r = rig()
    _proto, transport = send(r, raw_request())
    r.ingest.pending[0].callback([REJECTED])
    got = parse_response(transport.value())
    assert got.status == 400
    assert got.json() == {
        "error": "missing-field",
        "reason": "incidentComponent is required",
        "where": "/incidentComponent",
    }


def test_multi_message_payload_lists_each_result() -> None:
    r = rig()
    _proto, transport = send(r, raw_request(EIDO + b"\n" + EIDO))
    r.ingest.pending[0].callback([accepted(1), REJECTED])
    got = parse_response(transport.value())
    assert got.status == 400
    assert got.json() == {
        "results": [{"incident_id": "inc-1", "snapshot": "new"}, REJECTED.as_json()]
    }
    _proto, transport = send(r, raw_request(EIDO + b"\n" + EIDO))
    r.ingest.pending[1].callback([accepted(1), accepted(2)])
    assert parse_response(transport.value()).status == 200


def test_ingest_failure_is_503_with_retry_after() -> None:
    r = rig(retry_after=17)
    with capture_logs() as logs:
        _proto, transport = send(r, raw_request())
        r.ingest.pending[0].errback(RuntimeError("database is locked"))
    got = parse_response(transport.value())
    assert got.status == 503
    assert got.headers[b"retry-after"] == b"17"
    assert got.json()["error"] == "unavailable"
    assert b"locked" not in got.body
    assert any(e["event"] == "feed.http.ingest.failed" for e in logs)


def test_ingest_raising_synchronously_is_503() -> None:
    r = rig()
    r.resource.ingest = lambda payload, origin: (_ for _ in ()).throw(RuntimeError("boom"))
    assert answer(r, raw_request()).status == 503


@pytest.mark.parametrize("method", [b"GET", b"PUT", b"DELETE", b"OPTIONS", b"HEAD"])
def test_other_methods_405_with_allow(method: bytes) -> None:
    r = rig()
    got = answer(r, raw_request(b"", method=method))
    assert got.status == 405
    assert got.headers[b"allow"] == b"POST"
    assert r.ingest.calls == []


def test_missing_token_401() -> None:
    r = rig()
    got = answer(r, raw_request(token=None))
    assert got.status == 401
    assert got.headers[b"www-authenticate"] == b'Bearer realm="corespond"'
    assert r.ingest.calls == []


@pytest.mark.parametrize(
    "header",
    [
        b"Authorization: Bearer wrong",
        b"Authorization: Basic " + TOKEN.encode(),
        b"Authorization: Bearer",
        b"Authorization: " + TOKEN.encode(),
        b"Authorization: Bearer " + TOKEN.encode() + b"x",
    ],
)
def test_wrong_token_401(header: bytes) -> None:
    r = rig()
    got = answer(r, raw_request(token=None, headers=(header,)))
    assert got.status == 401
    assert b'error="invalid_token"' in got.headers[b"www-authenticate"]
    assert r.ingest.calls == []


def test_scheme_is_case_insensitive_and_no_token_means_open() -> None:
    r = rig()
    send(r, raw_request(token=None, headers=(b"Authorization: bearer " + TOKEN.encode(),)))
    assert len(r.ingest.calls) == 1
    r = rig(token=None)
    send(r, raw_request(token=None))
    assert len(r.ingest.calls) == 1


def test_declared_length_over_limit_413_without_ingest() -> None:
    r = rig(max_message_bytes=50)
    got = answer(r, raw_request(b"x" * 51))
    assert got.status == 413
    assert got.json()["error"] == "oversize"
    assert r.ingest.calls == []


@pytest.mark.parametrize("bytewise", [False, True])
def test_chunked_body_over_limit_413_and_not_kept(bytewise: bool) -> None:
    r = rig(max_message_bytes=50)
    proto, transport = channel(r)
    data = raw_request(b"y" * 500, chunked=True)
    if bytewise:
        for i in range(len(data)):
            proto.dataReceived(data[i : i + 1])
    else:
        proto.dataReceived(data)
    got = parse_response(transport.value())
    assert got.status == 413
    assert b"500 bytes" in got.body
    assert r.ingest.calls == []


def test_body_at_limit_accepted() -> None:
    r = rig(max_message_bytes=len(EIDO))
    send(r, raw_request(EIDO))
    assert r.ingest.calls[0][0] == EIDO


def test_capped_body_keeps_at_most_cap() -> None:
    body = CappedBody(10)
    body.write(b"0123456789")
    assert not body.overflowed and body.getvalue() == b"0123456789"
    body.write(b"x")
    assert body.overflowed and body.getvalue() == b"" and body.received == 11
    assert CappedBody(10, declared=11).overflowed


def test_limit_is_per_feed_on_a_shared_site() -> None:
    small, big = FakeIngest(), FakeIngest()
    site = build_feed_site(
        {
            "/feeds/small": FeedResource(small, feed="small", token=None, max_message_bytes=10),
            "/feeds/big": FeedResource(big, feed="big", token=None, max_message_bytes=1000),
        },
        reactor=MemoryReactorClock(),
    )
    r = Rig(site, site.feeds[0], small, MemoryReactorClock())
    assert answer(r, raw_request(EIDO, path=b"/feeds/small", token=None)).status == 413
    send(r, raw_request(EIDO, path=b"/feeds/big/", token=None))
    assert big.calls[0][1].feed == "big" and small.calls == []


def test_empty_body_400() -> None:
    r = rig()
    got = answer(r, raw_request(b""))
    assert got.status == 400 and got.json()["error"] == "missing-field"
    assert r.ingest.calls == []


def test_unknown_path_404_json_without_banner() -> None:
    r = rig()
    got = answer(r, raw_request(path=b"/feeds/elsewhere"))
    assert got.status == 404
    assert got.json() == {"error": "not-found", "reason": "no feed at this path"}
    assert b"server" not in got.headers
    assert r.ingest.calls == []


def test_content_type_checked_when_configured() -> None:
    r = rig(content_types=("application/json", "application/emergency.eido+json"))
    got = answer(r, raw_request(headers=(b"Content-Type: text/plain",)))
    assert got.status == 415
    send(r, raw_request(headers=(b"Content-Type: application/emergency.eido+json; charset=utf-8",)))
    assert len(r.ingest.calls) == 1


def test_client_gone_before_commit_writes_nothing() -> None:
    r = rig()
    proto, transport = send(r, raw_request())
    with capture_logs() as logs:
        proto.connectionLost(Exception("peer reset"))
        r.ingest.pending[0].callback([accepted()])
    assert transport.value() == b""
    events = [e["event"] for e in logs]
    assert "feed.http.client.gone" in events and "feed.http.answer.dropped" in events
    assert r.resource.unanswered == 0


def test_pipelined_requests_answered_in_order() -> None:
    r = rig()
    _proto, transport = send(r, raw_request() + raw_request())
    r.ingest.pending[0].callback([accepted(1)])
    assert len(r.ingest.pending) == 2  # the second is read once the first is answered
    r.ingest.pending[1].callback([accepted(2)])
    out = transport.value()
    assert out.count(b"HTTP/1.1 200") == 2
    assert out.index(b"inc-1") < out.index(b"inc-2")


def test_drain_waits_for_in_flight_and_refuses_new() -> None:
    r = rig()
    _proto, transport = send(r, raw_request())
    drained = r.site.drain()
    assert not drained.called
    got = answer(r, raw_request())
    assert got.status == 503 and b"retry-after" in got.headers
    r.ingest.pending[0].callback([accepted()])
    assert drained.called
    assert parse_response(transport.value()).status == 200
    assert r.resource.drain().called


def test_ingest_firing_synchronously() -> None:
    r = rig()
    r.resource.ingest = lambda payload, origin: succeed([accepted(9)])
    assert answer(r, raw_request()).json()["results"][0]["incident_id"] == "inc-9"
    r.resource.ingest = lambda payload, origin: fail(RuntimeError("x"))
    assert answer(r, raw_request()).status == 503


def test_logs_carry_no_message_content() -> None:
    r = rig()
    with capture_logs() as logs:
        send(r, raw_request())
        r.ingest.pending[0].callback([REJECTED])
        answer(r, raw_request(b"x" * 500))
    text = repr(logs).encode()
    assert all(p not in text for p in PHI)


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(max_size=300),
    method=st.sampled_from([b"POST", b"GET", b"PUT"]),
    auth=st.one_of(
        st.none(), st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)
    ),
    ctype=st.binary(max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b),
    chunked=st.booleans(),
)
def test_fuzz_requests_never_echo_input(
    body: bytes, method: bytes, auth: bytes | None, ctype: bytes, chunked: bool
) -> None:
    headers = [b"Content-Type: " + ctype]
    if auth is not None:
        headers.append(b"Authorization: " + auth)

    def answer(payload: bytes) -> bytes:
        r = rig(content_types=("application/json",))
        _proto, transport = send(
            r, raw_request(payload, method=method, token=None, headers=headers, chunked=chunked)
        )
        for d in r.ingest.pending:
            d.callback([REJECTED])
        return bytes(transport.value())

    out = answer(body)
    if out:
        got = parse_response(out)
        assert got.status in {200, 400, 401, 405, 413, 415}
        if len(body) > 8 and body in got.body:
            # Our fixed wording may happen to contain the same bytes ("Authoriza..."): then
            # the answer to other bytes of the same length is the same. An echo would differ.
            assert parse_response(answer(b"~" * len(body))).body == got.body


# --- a real Agent over iosim, and TLS ----------------------------------------------------------


@implementer(IAgentEndpointFactory)
class MemoryEndpoints:
    """Connects an Agent's connections to ``site`` in memory; ``pumps`` move the bytes."""

    def __init__(self, site: FeedSite, clock: MemoryReactorClock) -> None:
        self.site = site
        self.clock = clock
        self.pumps: list[IOPump] = []

    def endpointForURI(self, uri: Any) -> MemoryEndpoints:
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        client = factory.buildProtocol(PEER)
        server = self.site.buildProtocol(PEER)
        assert client is not None and server is not None
        self.pumps.append(
            connect(
                server,
                FakeTransport(server, True, peerAddress=PEER),
                client,
                FakeTransport(client, False),
                greet=False,
                clock=self.clock,
            )
        )
        return succeed(client)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()


def agent_post(r: Rig, body: bytes, token: str | None = TOKEN) -> tuple[Deferred[Response], Any]:
    endpoints = MemoryEndpoints(r.site, r.reactor)
    agent = Agent.usingEndpointFactory(r.reactor, endpoints)
    headers = Headers({b"content-type": [b"application/emergency.eido+json"]})
    if token is not None:
        headers.addRawHeader(b"authorization", b"Bearer " + token.encode())
    d = agent.request(b"POST", b"http://cad.example.test/feeds/cad-a", headers, BytesProducer(body))
    return d, endpoints


def test_agent_gets_answer_only_after_commit() -> None:
    r = rig()
    d, endpoints = agent_post(r, EIDO)
    responses: list[Any] = []
    d.addCallback(responses.append)
    endpoints.flush()
    assert [p for p, _ in r.ingest.calls] == [EIDO]
    assert responses == []
    r.ingest.pending[0].callback([accepted(4)])
    endpoints.flush()
    response: Any = responses[0]
    assert response.code == 200
    assert not response.headers.hasHeader(b"server")
    bodies: list[Any] = []
    readBody(response).addCallback(bodies.append)
    endpoints.flush()
    assert json.loads(bodies[0]) == {"results": [{"incident_id": "inc-4", "snapshot": "new"}]}


def test_agent_401_and_503() -> None:
    r = rig()
    d, endpoints = agent_post(r, EIDO, token="nope")
    got: list[Any] = []
    d.addCallback(got.append)
    endpoints.flush()
    assert got[0].code == 401
    d, endpoints = agent_post(r, EIDO)
    d.addCallback(got.append)
    endpoints.flush()
    r.ingest.pending[0].errback(RuntimeError("disk full"))
    endpoints.flush()
    assert got[1].code == 503
    assert got[1].headers.getRawHeaders(b"retry-after") == [b"30"]


def test_post_over_mutual_tls(tmp_path: Any) -> None:
    pki = make_pki(tmp_path)
    r = rig()
    clock = MemoryReactorClock()
    client, _server, pump = tls_connect(
        r.site,
        server_tls_options(pki.server_cert, pki.server_key, pki.ca_cert, True),
        Factory.forProtocol(_Recorder),
        client_tls_options(SERVER_NAME, pki.ca_cert, pki.client_cert, pki.client_key),
        clock=clock,
    )
    assert isinstance(client, _Recorder)
    transport: Any = client.transport
    transport.write(raw_request())
    pump.flush()
    assert len(r.ingest.calls) == 1 and client.received == b""
    r.ingest.pending[0].callback([accepted(5)])
    pump.flush()
    assert parse_response(client.received).status == 200


def test_control_characters_in_content_type_answered_not_dropped() -> None:
    """Twisted's form parsing raises on a VT in Content-Type; we answer 400 instead."""
    r = rig()
    got = answer(r, raw_request(headers=(b"Content-Type: application/json\x0b\x01",)))
    assert got.status == 400 and got.json()["error"] == "invalid-field"
    assert r.ingest.calls == []


def test_a_post_leaves_no_class_for_the_cyclic_collector() -> None:
    """Twisted's form parsing reads Content-Type through the email package, whose header
    registry makes a new class per header: cyclic garbage on every snapshot, walked by the
    collector. The feed has no form arguments, so it parses none."""
    r = rig()
    assert r.site._parsePOSTFormSubmission is False
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            _proto, transport = send(r, raw_request(headers=(b"Content-Type: text/plain",)))
            r.ingest.pending.pop().callback([accepted()])
            assert parse_response(transport.value()).status == 200
        gc.collect()
        classes = [o for o in gc.garbage if isinstance(o, type)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert classes == []
