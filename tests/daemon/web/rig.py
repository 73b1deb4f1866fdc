"""A web site on the dict desks, driven over StringTransport with a fake clock."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from corespond.daemon.clock import Clock
from corespond.daemon.config import ListenConfig, WebConfig, WebSystemConfig
from corespond.daemon.signed_links import LinkSigner
from corespond.daemon.web import WebSite, build_web_site, link_signer
from tests.adapters.test_http_feed import parse_response
from tests.daemon.web.desks import DictDesks

NOW = 1_794_994_200.0  # 2026-11-18T09:30:00Z
LINK_KEY = "synthetic-link-key-0123456789-abcdefghij"
SYSTEM_TOKEN = "avl-token-for-tests-0123456789"
PUBLIC_URL = "https://corespond.example.test"
PEER: Any = IPv4Address("TCP", "192.0.2.9", 50000)


def web_config(**kw: Any) -> WebConfig:
    values: dict[str, Any] = {
        "listen": ListenConfig("127.0.0.1", 0),
        "public_url": PUBLIC_URL,
        "link_key_file": Path("/nonexistent/link.key"),
        "link_key": LINK_KEY,
        "link_lifetime_seconds": 3600,
        "timezone": "America/Denver",
        "max_body_bytes": 2048,
        "systems": (WebSystemConfig("avl", Path("/nonexistent/avl.token"), SYSTEM_TOKEN),),
    }
    values.update(kw)
    return WebConfig(**values)


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


@dataclass
class WebRig:
    site: WebSite
    desks: DictDesks
    reactor: MemoryReactorClock
    signer: LinkSigner

    def link(self, page_ref: str = "C1445-2", clinician_id: str = "clin-7") -> str:
        return self.signer.sign(page_ref, clinician_id, self.reactor.seconds())

    def send(self, data: bytes) -> StringTransport:
        proto = self.site.buildProtocol(PEER)
        assert proto is not None
        transport = StringTransport(peerAddress=PEER)
        proto.makeConnection(transport)
        proto.dataReceived(data)
        return transport

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> Response:
        transport = self.send(raw(method, path, body, headers))
        return parse(transport.value())


def web_rig(
    config: WebConfig | None = None,
    referrals: Any = None,
    encounters: Any = None,
    **desk_kw: Any,
) -> WebRig:
    reactor = MemoryReactorClock()
    reactor.advance(NOW)
    desks = DictDesks(**desk_kw)
    config = config or web_config()
    site = build_web_site(
        config, desks, desks, clock=Clock(reactor), reactor=reactor, referrals=referrals,
        encounters=encounters,
    )  # fmt: skip
    return WebRig(site, desks, reactor, link_signer(config))


def raw(
    method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: corespond.example.test"]
    lines += [f"{k}: {v}".encode() for k, v in headers]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def parse(data: bytes) -> Response:
    got = parse_response(data)
    return Response(got.status, got.headers, got.body)
