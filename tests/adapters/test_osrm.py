"""The OSRM table client against an OSRM-shaped server on loopback serving a recorded answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock as TaskClock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from corespond.adapters.http_client import make_agent
from corespond.adapters.osrm import MAX_SOURCES, OsrmClient, RoutingUnavailable, parse_table
from tests.adapters.loopback import Loopback

FIXTURE = Path(__file__).parent.parent / "fixtures" / "osrm" / "table-3-to-1.json"
INCIDENT = (45.523, -122.676)
CLINICIANS = [(45.51, -122.70), (45.52, -122.68), (46.10, -123.90)]


class FakeOsrm(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.paths: list[bytes] = []
        self.closed: list[bool] = []

    def render_GET(self, request: Request) -> bytes | int:
        self.paths.append(request.uri)
        request.setHeader(b"content-type", b"application/json")
        if self.mode == "hang":
            return NOT_DONE_YET
        if self.mode == "trickle":  # headers and half a body, then nothing
            request.setHeader(b"content-length", b"1000")
            request.write(b'{"code":"Ok",')
            request.notifyFinish().addErrback(lambda _: self.closed.append(True))
            return NOT_DONE_YET
        if self.mode == "503":
            request.setResponseCode(503)
            return b"<html>busy</html>"
        if self.mode == "noroute":
            request.setResponseCode(400)
            return b'{"code":"InvalidQuery","message":"Query string malformed"}'
        if self.mode == "drop":
            request.transport.abortConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        return FIXTURE.read_bytes()


def client(lb: Loopback) -> tuple[OsrmClient, FakeOsrm, TaskClock]:
    server = FakeOsrm()
    port = lb.listen(Site(server, reactor=lb.reactor))
    agent, pool = make_agent(lb.reactor)
    lb.cleanups.append(pool.closeCachedConnections)
    timeouts = TaskClock()
    return OsrmClient(agent, timeouts, f"http://127.0.0.1:{port}/", timeout=2.0), server, timeouts


def test_durations_for_n_sources_to_one_destination(loopback: Loopback) -> None:
    osrm, server, _ = client(loopback)
    assert loopback.until(osrm.durations(CLINICIANS, INCIDENT)) == [412.3, 95.0, None]
    (path,) = server.paths
    assert path == (
        b"/table/v1/driving/-122.676000,45.523000;-122.700000,45.510000;"
        b"-122.680000,45.520000;-123.900000,46.100000"
        b"?sources=1;2;3&destinations=0&annotations=duration"
    )


@pytest.mark.parametrize(("mode", "kind"), [("503", "server-error"), ("noroute", "refused"),
                                            ("drop", "dropped")])  # fmt: skip
def test_outages_are_routing_unavailable(loopback: Loopback, mode: str, kind: str) -> None:
    osrm, server, _ = client(loopback)
    server.mode = mode
    with pytest.raises(RoutingUnavailable) as caught:
        loopback.until(osrm.durations(CLINICIANS, INCIDENT))
    assert caught.value.kind == kind


def test_a_slow_router_times_out_on_the_clock(loopback: Loopback) -> None:
    osrm, server, timeouts = client(loopback)
    server.mode = "hang"
    d = osrm.durations(CLINICIANS, INCIDENT)
    loopback.until_true(lambda: server.paths)
    timeouts.advance(2.0)
    with pytest.raises(RoutingUnavailable) as caught:
        loopback.until(d)
    assert caught.value.kind == "timeout"


def test_a_timeout_mid_body_closes_the_connection(loopback: Loopback) -> None:
    osrm, server, timeouts = client(loopback)
    server.mode = "trickle"
    d = osrm.durations(CLINICIANS, INCIDENT)
    loopback.until_true(lambda: server.paths)
    loopback.turn(20)
    assert not d.called
    timeouts.advance(2.0)
    with pytest.raises(RoutingUnavailable) as caught:
        loopback.until(d)
    assert caught.value.kind == "timeout"
    loopback.until_true(lambda: server.closed)


def test_nobody_listening(loopback: Loopback) -> None:
    osrm, _, _ = client(loopback)
    osrm.base_url = "http://127.0.0.1:1"
    with pytest.raises(RoutingUnavailable) as caught:
        loopback.until(osrm.durations(CLINICIANS, INCIDENT))
    assert caught.value.kind == "connect"


def test_short_list_is_bounded(loopback: Loopback) -> None:
    osrm, server, _ = client(loopback)
    with pytest.raises(RoutingUnavailable):
        loopback.until(osrm.durations([INCIDENT] * (MAX_SOURCES + 1), INCIDENT))
    assert loopback.until(osrm.durations([], INCIDENT)) == []
    assert not server.paths


@pytest.mark.parametrize(
    "body",
    [b"[]", b'{"code":"Ok"}', b'{"code":"Ok","durations":[[1],[2]]}',
     b'{"code":"Ok","durations":[[1],[2],["x"]]}', b'{"code":"Ok","durations":[[1],[2],[-1]]}',
     b'{"code":"Ok","durations":[[1],[2],[1,2]]}', b"\xff"],
)  # fmt: skip
def test_answers_that_are_not_a_table(body: bytes) -> None:
    with pytest.raises(RoutingUnavailable):
        parse_table(body, 3)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(
                        st.sampled_from(["code", "durations", "x"]), c, max_size=3),
                    max_leaves=12))  # fmt: skip
def test_fuzz_any_json_is_a_table_or_unavailable(doc: object) -> None:
    try:
        body = json.dumps(doc).encode()
    except ValueError:
        return
    try:
        out = parse_table(body, 2)
    except RoutingUnavailable:
        return
    assert len(out) == 2
