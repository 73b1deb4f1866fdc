"""One HTTP request to a peer we call (a pager gateway, a routing engine), bounded in time and size.

Outbound adapters (WCTP, the SMS gateway, OSRM) share this: a ``twisted.web.client.Agent`` on
the reactor they were given, TLS set up with :func:`corespond.adapters.tls.client_tls_options`
(the server's name checked, our own CA bundle or the system's, client certificates when the
peer demands them), and a request that either answers within ``timeout`` seconds, body read,
or fails with :class:`HttpFailure`. Bodies are capped so a misbehaving peer cannot fill memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import (
    IConsumer,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from corespond.adapters.tls import client_tls_options
from corespond.daemon.errors import SafeMessage

MAX_RESPONSE_BYTES = 1_048_576


class HttpFailure(SafeMessage, Exception):
    """No usable answer: ``kind`` is ``timeout``, ``connect``, ``dropped`` or ``oversize``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    code: int
    content_type: str
    body: bytes


@implementer(IPolicyForHTTPS)
class PinnedTrustPolicy:
    """TLS for every https:// URL an agent fetches, built like every other client of ours."""

    def __init__(
        self,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file
        self._cache: dict[str, IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        name = hostname.decode("ascii")
        if name not in self._cache:
            self._cache[name] = client_tls_options(
                name, self.ca_file, self.cert_file, self.key_file
            )
        return self._cache[name]


def make_agent(
    reactor: Any,
    *,
    tls: PinnedTrustPolicy | None = None,
    connect_timeout: float = 10.0,
    max_connections: int = 4,
) -> tuple[Agent, HTTPConnectionPool]:
    """An agent with a pool of persistent connections (``max_connections`` per host)."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_connections
    pool.retryAutomatically = False  # a retried POST could page twice; GatewayQueue decides
    endpoints = ReactorEndpoints(reactor, tls or PinnedTrustPolicy(), connect_timeout)
    return Agent.usingEndpointFactory(reactor, endpoints, pool=pool), pool


@implementer(IAgentEndpointFactory)
class ReactorEndpoints:
    """TCP, or TLS over TCP, on the given reactor only: Twisted's default endpoint factory
    leaves the TLS layer's write scheduling to the global reactor."""

    def __init__(self, reactor: Any, tls: IPolicyForHTTPS, connect_timeout: float) -> None:
        self.reactor, self.tls, self.connect_timeout = reactor, tls, connect_timeout
        # The Agent asks for an endpoint at every request, even one a pooled connection
        # serves; making it (the host's IDNA encoding, the TLS creator) cost about a sixth of
        # a page's submission. An endpoint connects again at each connect(): kept by origin.
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._endpoint(uri)
        return endpoint

    def _endpoint(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, host, uri.port, timeout=self.connect_timeout
        )
        if uri.scheme == b"https":
            creator = self.tls.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint, clock=self.reactor)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        return endpoint


class _CappedReader(Protocol):
    def __init__(self, done: Deferred[bytes], cap: int) -> None:
        self.done, self.cap, self.size = done, cap, 0
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.cap:
            self.transport.stopProducing()  # type: ignore[union-attr]
            if not self.done.called:
                self.done.errback(HttpFailure("oversize", f"answer over {self.cap} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(HttpFailure("dropped", "the connection closed mid-answer"))


def read_capped(response: IResponse, cap: int = MAX_RESPONSE_BYTES) -> Deferred[bytes]:
    """The body, at most ``cap`` bytes; cancelling stops the transfer (closes the connection)."""
    readers: list[_CappedReader] = []

    def cancel(_: Deferred[bytes]) -> None:
        transport = readers[0].transport if readers else None
        if transport is not None:
            transport.stopProducing()  # type: ignore[attr-defined]

    done: Deferred[bytes] = Deferred(cancel)
    readers.append(_CappedReader(done, cap))
    response.deliverBody(readers[0])
    return done


def request(
    agent: Agent,
    clock: IReactorTime,
    method: bytes,
    url: str,
    *,
    headers: dict[bytes, bytes] | None = None,
    body: bytes | None = None,
    timeout: float,
    cap: int = MAX_RESPONSE_BYTES,
) -> Deferred[HttpAnswer]:
    """The whole exchange (connect, send, read) within ``timeout`` seconds, or HttpFailure."""

    async def exchange() -> HttpAnswer:
        producer = BytesProducer(body) if body is not None else None
        response: IResponse = await agent.request(
            method, url.encode("ascii"), Headers({k: [v] for k, v in (headers or {}).items()}),
            producer,
        )  # fmt: skip
        data = await read_capped(response, cap)
        types = response.headers.getRawHeaders(b"content-type") or [b""]
        return HttpAnswer(response.code, types[0].decode("latin-1"), data)

    d = Deferred.fromCoroutine(exchange())
    timed_out: list[bool] = []

    def expire() -> None:
        timed_out.append(True)
        d.cancel()  # closes the connection; the request's own failure then says "cancelled"

    timer = clock.callLater(timeout, expire)

    def settle(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    d.addBoth(settle)
    d.addErrback(_as_http_failure, timeout, timed_out)
    return d


def _as_http_failure(failure: Failure, timeout: float, timed_out: list[bool]) -> Failure:
    if timed_out or failure.check(TimeoutError, CancelledError):
        return Failure(HttpFailure("timeout", f"no answer within {timeout:g} s"))
    if failure.check(HttpFailure):
        return failure
    if failure.check(DNSLookupError):
        return Failure(HttpFailure("connect", "the host name does not resolve"))
    if failure.check(ConnectError):
        return Failure(HttpFailure("connect", f"cannot connect ({failure.type.__name__})"))
    if failure.check(ResponseFailed, ConnectionLost):
        return Failure(HttpFailure("dropped", "the connection closed before the answer"))
    return Failure(HttpFailure("dropped", f"request failed ({failure.type.__name__})"))


@implementer(IBodyProducer)
class BytesProducer:
    """A small in-memory request body, written at once (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
