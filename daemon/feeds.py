"""Running CAD feeds: each configured feed is a transport plus a format, wired to the pipeline.

A feed's transport becomes a *component*: a listener (HTTP feeds sharing one host:port share one
component), a WebSocket subscription, or a spool poller. Components start and stop as a whole,
which is what a reload swaps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import structlog
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from corespond.adapters.formats import MessageFormat
from corespond.adapters.tls import server_tls_options
from corespond.daemon.clock import Clock
from corespond.daemon.config import (
    FeedConfig,
    HttpTransport,
    ListenConfig,
    SpoolTransport,
    TcpTransport,
    WebSocketTransport,
)
from corespond.daemon.pipeline import FeedContext, Pipeline

log = structlog.get_logger(__name__)


def build_format(name: str, *, mapping: Path | None = None, timezone: str = "UTC") -> MessageFormat:
    """The parser a feed's ``format`` names."""
    if name == "eido":
        from corespond.adapters.eido import EidoFormat

        return EidoFormat()
    if name == "newworld":
        from corespond.adapters.newworld import NewWorldFormat

        return NewWorldFormat(timezone=timezone)
    if name == "xml-mapped":
        from corespond.adapters.xml_mapping import MappedXmlFormat, load_mapping

        if mapping is None:
            raise ValueError("the xml-mapped format needs a mapping file")
        return MappedXmlFormat(load_mapping(mapping), timezone=timezone)
    if name == "jsonl":
        from corespond.adapters.corespond_json import CorespondJsonFormat

        return CorespondJsonFormat()
    raise ValueError(f"unknown format {name!r}")


def feed_context(feed: FeedConfig) -> FeedContext:
    return FeedContext(
        name=feed.name,
        source=feed.source,
        format=build_format(feed.format, mapping=feed.mapping, timezone=feed.timezone),
        max_message_bytes=feed.max_message_bytes,
    )


def listen(reactor: Any, where: ListenConfig, factory: Any) -> IListeningPort:
    """Listen on ``where`` (with TLS, and client certificates, when configured)."""
    if where.tls is not None:
        tls = where.tls
        options = server_tls_options(
            tls.cert_file,
            tls.key_file,
            client_ca_file=tls.client_ca_file,
            require_client_cert=tls.require_client_cert,
        )
        port: IListeningPort = reactor.listenSSL(where.port, factory, options, interface=where.host)
    else:
        port = reactor.listenTCP(where.port, factory, interface=where.host)
    return port


@dataclass(frozen=True)
class FeedServices:
    """What every running feed is built from."""

    reactor: Any
    clock: Clock
    pipeline: Pipeline
    threads: ThreadPool  # for disk I/O (spool directories)


class Component:
    """One running piece of the feed set: a listener, a subscription or a spool poller.

    ``spec`` is the configuration it was built from: a reload restarts it only when that
    changes. Components are single-use: ``fresh()`` gives an unstarted copy.
    """

    kind: ClassVar[str]

    def __init__(self, services: FeedServices, spec: Any) -> None:
        self.services = services
        self.spec = spec

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.spec.name)

    def fresh(self) -> Component:
        return type(self)(self.services, self.spec)

    def ingest_for(self, feed: FeedConfig) -> Any:
        return self.services.pipeline.ingest_for(feed_context(feed))

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> Deferred[None]:
        """Stop accepting, then fire when everything in flight is answered."""
        raise NotImplementedError


@dataclass(frozen=True)
class HttpGroup:
    """The HTTP feeds that share one listener, each on its own path."""

    where: ListenConfig
    feeds: tuple[FeedConfig, ...]


class HttpListener(Component):
    kind = "http"
    spec: HttpGroup

    def __init__(self, services: FeedServices, spec: HttpGroup) -> None:
        super().__init__(services, spec)
        self._port: IListeningPort | None = None
        self._resources: list[Any] = []

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.spec.where.host, self.spec.where.port)

    def start(self) -> None:
        from corespond.adapters.http_feed import FeedResource, build_feed_site

        routes = {}
        for feed in self.spec.feeds:
            transport = feed.transport
            assert isinstance(transport, HttpTransport)
            resource = FeedResource(
                self.ingest_for(feed),
                feed=feed.name,
                token=transport.token,
                max_message_bytes=feed.max_message_bytes,
            )
            self._resources.append(resource)
            routes[transport.path] = resource
        reactor = self.services.reactor
        site = build_feed_site(routes, reactor=reactor)
        self._port = listen(reactor, self.spec.where, site)
        log.info("feed.http.listening", host=self.spec.where.host, port=self.port,
                 count=len(self.spec.feeds))  # fmt: skip

    @property
    def port(self) -> int | None:
        return cast(IPv4Address, self._port.getHost()).port if self._port else None

    def stop(self) -> Deferred[None]:
        stopped = maybeDeferred(self._port.stopListening) if self._port else succeed(None)
        return stopped.addCallback(lambda _: _all(r.drain() for r in self._resources))


class TcpListener(Component):
    kind = "tcp"
    spec: FeedConfig

    def __init__(self, services: FeedServices, spec: FeedConfig) -> None:
        super().__init__(services, spec)
        self._port: IListeningPort | None = None
        self._factory: Any = None

    def start(self) -> None:
        from corespond.adapters.tcp_feed import TcpFeedFactory

        transport = self.spec.transport
        assert isinstance(transport, TcpTransport)
        self._factory = TcpFeedFactory(
            self.ingest_for(self.spec),
            feed=self.spec.name,
            framing=transport.framing,
            ack=transport.ack,
            max_message_bytes=self.spec.max_message_bytes,
            clock=self.services.clock,
            idle_timeout=transport.idle_timeout_seconds,
        )
        self._port = listen(self.services.reactor, transport.listen, self._factory)
        log.info("feed.tcp.listening", feed=self.spec.name, port=self.port,
                 framing=transport.framing)  # fmt: skip

    @property
    def port(self) -> int | None:
        return cast(IPv4Address, self._port.getHost()).port if self._port else None

    def stop(self) -> Deferred[None]:
        stopped = maybeDeferred(self._port.stopListening) if self._port else succeed(None)
        factory = self._factory
        return stopped.addCallback(lambda _: factory.drain() if factory else None)


class WebSocketFeed(Component):
    kind = "websocket"
    spec: FeedConfig

    def __init__(self, services: FeedServices, spec: FeedConfig) -> None:
        super().__init__(services, spec)
        self._feed: Any = None

    def start(self) -> None:
        from corespond.adapters.sta024 import Sta024Feed

        transport = self.spec.transport
        assert isinstance(transport, WebSocketTransport)
        self._feed = Sta024Feed.from_config(
            self.services.reactor,
            self.services.clock,
            self.ingest_for(self.spec),
            feed=self.spec.name,
            transport=transport,
            listen=listen,
        )
        self._feed.start()

    def stop(self) -> Deferred[None]:
        return self._feed.stop() if self._feed else succeed(None)


class SpoolFeed(Component):
    kind = "spool"
    spec: FeedConfig

    def __init__(self, services: FeedServices, spec: FeedConfig) -> None:
        super().__init__(services, spec)
        self._spool: Any = None

    def start(self) -> None:
        from corespond.adapters.spool import SpoolDirectory

        transport = self.spec.transport
        assert isinstance(transport, SpoolTransport)
        services = self.services

        def run_in_thread(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return deferToThreadPool(services.reactor, services.threads, fn, *args)

        self._spool = SpoolDirectory(
            Path(transport.directory),
            self.ingest_for(self.spec),
            feed=self.spec.name,
            clock=services.clock,
            run_in_thread=run_in_thread,
            pattern=transport.pattern,
            poll_interval=transport.poll_interval_seconds,
            keep_done=transport.keep_done,
            max_message_bytes=self.spec.max_message_bytes,
        )
        self._spool.start()
        log.info("feed.spool.watching", feed=self.spec.name, path=str(transport.directory))

    def stop(self) -> Deferred[None]:
        return self._spool.stop() if self._spool else succeed(None)


def _all(deferreds: Any) -> Deferred[None]:
    return DeferredList(list(deferreds), consumeErrors=True).addCallback(lambda _: None)


class FeedSet:
    """The running feeds. ``apply`` turns the running set into a new configuration."""

    def __init__(self, services: FeedServices) -> None:
        self.services = services
        self.components: dict[tuple[Any, ...], Component] = {}

    def plan(self, feeds: Sequence[FeedConfig]) -> dict[tuple[Any, ...], Component]:
        """The components a feed configuration asks for (not started)."""
        out: dict[tuple[Any, ...], Component] = {}
        http_groups: dict[tuple[str, int], list[FeedConfig]] = {}
        for feed in feeds:
            if not feed.enabled:
                continue
            t = feed.transport
            if isinstance(t, HttpTransport):
                http_groups.setdefault((t.listen.host, t.listen.port), []).append(feed)
                continue
            kind = {TcpTransport: TcpListener, WebSocketTransport: WebSocketFeed}.get(
                type(t), SpoolFeed
            )
            comp = kind(self.services, feed)
            out[comp.key] = comp
        for group in http_groups.values():
            transport = group[0].transport
            assert isinstance(transport, HttpTransport)
            listener = HttpListener(self.services, HttpGroup(transport.listen, tuple(group)))
            out[listener.key] = listener
        return out

    async def apply(self, feeds: Sequence[FeedConfig]) -> list[str]:
        """Start, stop and restart components so the running set matches ``feeds``.

        All or nothing: if a new component fails to start, everything started is stopped, what
        was stopped is started again, and the error is raised. Returns what changed.
        """
        wanted = self.plan(feeds)
        stale = [
            k for k, c in self.components.items() if k not in wanted or wanted[k].spec != c.spec
        ]
        fresh = [k for k, c in wanted.items() if k not in self.components or k in stale]
        stopped: dict[tuple[Any, ...], Component] = {}
        for key in stale:
            await self.components[key].stop()
            stopped[key] = self.components.pop(key)
        started: list[tuple[Any, ...]] = []
        try:
            for key in fresh:
                wanted[key].start()
                self.components[key] = wanted[key]
                started.append(key)
        except Exception:
            for key in started:
                await self.components.pop(key).stop()
            for key, comp in stopped.items():
                again = comp.fresh()
                again.start()
                self.components[key] = again
            raise
        return [f"stopped {_name(k)}" for k in stale if k not in fresh] + [
            f"{'restarted' if k in stale else 'started'} {_name(k)}" for k in fresh
        ]

    async def stop(self) -> None:
        """Stop accepting everywhere at once, then wait for what is in flight."""
        await _all(c.stop() for c in self.components.values())
        self.components.clear()

    def find(self, kind: str, name_or_port: Any) -> Component | None:
        for key, comp in self.components.items():
            if key[0] == kind and name_or_port in key[1:]:
                return comp
        return None


def _name(key: tuple[Any, ...]) -> str:
    return ":".join(str(k) for k in key)
