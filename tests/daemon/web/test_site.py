"""The web listener as a whole: mounting, unknown paths, headers, and the daemon's wiring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from corespond.daemon.app import Corespond, StartupError
from corespond.daemon.config import load_config
from corespond.daemon.web import WebSite
from tests.daemon.web.desks import DictDesks, page_view
from tests.daemon.web.rig import PEER, parse, raw, web_rig


class Hello(Resource):
    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        return b"hello " + b"/".join(request.postpath or [])


def test_resources_mount_by_path_beside_the_ack_page_and_api() -> None:
    r = web_rig()
    r.site.mount("/gateways/twilio", Hello())
    r.site.mount("/gateways/wctp", Hello())
    got = r.request("POST", "/gateways/twilio/status")
    assert got.status == 200 and got.body == b"hello status"
    assert got.headers[b"cache-control"] == b"no-store"  # every response gets the headers
    assert r.request("POST", "/gateways/wctp").status == 200
    assert r.request("GET", "/gateways").status == 404
    assert r.request("GET", "/gateways/other").status == 404
    assert r.request("GET", "/ack").status == 404


@pytest.mark.parametrize(
    "path", ["/ack", "/api/v1", "/api", "/gateways/twilio", "/gateways", "x", "/a//b", "/"]
)
def test_mounts_never_shadow_each_other(path: str) -> None:
    r = web_rig()
    r.site.mount("/gateways/twilio", Hello())
    with pytest.raises(ValueError):
        r.site.mount(path, Hello())
    with pytest.raises(ValueError):
        r.site.mount("/api/v1/location", Hello())  # under a leaf already mounted


@pytest.mark.parametrize("path", ["/", "/robots.txt", "/ack/../api", "/%00", "/api/v1/"])
def test_unknown_paths_are_404_without_detail(path: str) -> None:
    got = web_rig().request("GET", path)
    assert got.status == 404
    assert b"twisted" not in got.body.lower() and b"server" not in got.headers


def test_oversized_bodies_are_never_kept_whole() -> None:
    site = WebSite(max_body_bytes=1024)
    body = site.getContentFile(None)
    body.write(b"x" * 5000)
    assert body.overflowed and len(body.getvalue()) == 0
    assert site.getContentFile(2000).overflowed


# --- the daemon's wiring -----------------------------------------------------------------------


def daemon_config(tmp_path: Path) -> Path:
    (tmp_path / "link.key").write_text("synthetic-link-key-0123456789-abcdefghij\n")
    (tmp_path / "corespond.yaml").write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "web:\n  listen: {host: 127.0.0.1, port: 8444}\n"
        "  public_url: https://corespond.example.test\n  link_key_file: link.key\n"
    )
    return tmp_path / "corespond.yaml"


def test_the_daemon_serves_the_web_site_on_its_listener(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    desks = DictDesks()
    app = Corespond(
        load_config(daemon_config(tmp_path)), reactor, page_desk=desks, clinician_desk=desks
    )
    try:
        app._start_web()
        [(port, factory, _backlog, interface)] = reactor.tcpServers
        assert (port, interface) == (8444, "127.0.0.1")
        assert factory is app.web_site and isinstance(factory, WebSite)
        assert {b"ack", b"api"} <= set(app.web_site.resource.children)
        app.web_site.mount("/gateways/twilio", Hello())  # what the lead mounts later
        # The links the paging core puts in pages open on this site.
        url = app.ack_links.url("C1445-2", "clin-7")
        assert url.startswith("https://corespond.example.test/ack/v1.")
        desks.pages["C1445-2"] = page_view()
        proto = app.web_site.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        proto.makeConnection(transport)
        proto.dataReceived(raw("GET", url.removeprefix("https://corespond.example.test")))
        got = parse(transport.value())
        assert got.status == 200 and "Welfare check" in got.text
    finally:
        app.engine.dispose()


def test_the_daemon_refuses_a_web_section_without_the_paging_core(tmp_path: Path) -> None:
    app: Any = Corespond(load_config(daemon_config(tmp_path)), MemoryReactorClock())
    try:
        with pytest.raises(StartupError, match="needs the paging core"):
            app._start_web()
    finally:
        app.engine.dispose()


def test_hsts_only_over_tls() -> None:
    from twisted.internet.interfaces import ISSLTransport
    from zope.interface import directlyProvides

    r = web_rig()
    assert b"strict-transport-security" not in r.request("GET", "/ack/x").headers
    proto = r.site.buildProtocol(PEER)
    assert proto is not None
    transport: Any = StringTransport(peerAddress=PEER)
    directlyProvides(transport, ISSLTransport)
    transport.setTcpNoDelay = lambda enabled: None  # HTTPChannel asks TLS transports for it
    proto.makeConnection(transport)
    proto.dataReceived(raw("GET", "/ack/x"))
    got = parse(transport.value())
    assert got.status == 404
    assert got.headers[b"strict-transport-security"] == b"max-age=31536000"
