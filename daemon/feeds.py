"""Running CAD feeds: each configured feed is a transport plus a format, wired to the pipeline.

A feed's transport becomes a *component*: a listener (HTTP feeds sharing one host:port share one
component), a WebSocket subscription, or a spool poller. Components start and stop as a whole,
which is what a reload swaps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
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


class Component(Protocol):
    key: tuple[Any, ...]
    spec: Any

    def start(self) -> None: ...

    def stop(self) -> Deferred[None]:
        """Stop accepting, then fire when everything in flight is answered."""
        ...


@dataclass
class HttpListener:
    """One HTTP listener serving one or more feeds by path."""

    reactor: Any
    pipeline: Pipeline
    where: ListenConfig
    feeds: tuple[FeedConfig, ...]
    key: tuple[Any, ...] = ()
    spec: Any = None
    _port: IListeningPort | None = None
    _resources: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = ("http", self.where.host, self.where.port)
        self.spec = (self.where, self.feeds)

    def start(self) -> None:
        from corespond.adapters.http_feed import FeedResource, build_feed_site

        routes = {}
        for feed in self.feeds:
            transport = feed.transport
            assert isinstance(transport, HttpTransport)
            resource = FeedResource(
                self.pipeline.ingest_for(feed_context(feed)),
                feed=feed.name,
                token=transport.token,
                max_message_bytes=feed.max_message_bytes,
            )
            self._resources.append(resource)
            routes[transport.path] = resource
        self._port = listen(self.reactor, self.where, build_feed_site(routes, reactor=self.reactor))
        log.info("feed.http.listening", host=self.where.host, port=self._port.getHost().port,
                 count=len(self.feeds))  # fmt: skip

    @property
    def port(self) -> int | None:
        return self._port.getHost().port if self._port else None

    def stop(self) -> Deferred[None]:
        stopped = maybeDeferred(self._port.stopListening) if self._port else succeed(None)
        return stopped.addCallback(lambda _: _all(r.drain() for r in self._resources))


@dataclass
class TcpListener:
    reactor: Any
    clock: Clock
    pipeline: Pipeline
    feed: FeedConfig
    key: tuple[Any, ...] = ()
    spec: Any = None
    _port: IListeningPort | None = None
    _factory: Any = None

    def __post_init__(self) -> None:
        self.key = ("tcp", self.feed.name)
        self.spec = self.feed

    def start(self) -> None:
        from corespond.adapters.tcp_feed import TcpFeedFactory

        transport = self.feed.transport
        assert isinstance(transport, TcpTransport)
        self._factory = TcpFeedFactory(
            self.pipeline.ingest_for(feed_context(self.feed)),
            feed=self.feed.name,
            framing=transport.framing,
            ack=transport.ack,
            max_message_bytes=self.feed.max_message_bytes,
            clock=self.clock,
            idle_timeout=transport.idle_timeout_seconds,
        )
        self._port = listen(self.reactor, transport.listen, self._factory)
        log.info("feed.tcp.listening", feed=self.feed.name, port=self._port.getHost().port,
                 framing=transport.framing)  # fmt: skip

    @property
    def port(self) -> int | None:
        return self._port.getHost().port if self._port else None

    def stop(self) -> Deferred[None]:
        stopped = maybeDeferred(self._port.stopListening) if self._port else succeed(None)
        factory = self._factory
        return stopped.addCallback(lambda _: factory.drain() if factory else None)


@dataclass
class WebSocketFeed:
    reactor: Any
    clock: Clock
    pipeline: Pipeline
    feed: FeedConfig
    key: tuple[Any, ...] = ()
    spec: Any = None
    _feed: Any = None

    def __post_init__(self) -> None:
        self.key = ("websocket", self.feed.name)
        self.spec = self.feed

    def start(self) -> None:
        from corespond.adapters.sta024 import Sta024Feed

        transport = self.feed.transport
        assert isinstance(transport, WebSocketTransport)
        self._feed = Sta024Feed.from_config(
            self.reactor,
            self.clock,
            self.pipeline.ingest_for(feed_context(self.feed)),
            feed=self.feed.name,
            transport=transport,
            listen=listen,
        )
        self._feed.start()

    def stop(self) -> Deferred[None]:
        return self._feed.stop() if self._feed else succeed(None)


@dataclass
class SpoolFeed:
    clock: Clock
    pipeline: Pipeline
    feed: FeedConfig
    threads: ThreadPool
    reactor: Any
    key: tuple[Any, ...] = ()
    spec: Any = None
    _spool: Any = None

    def __post_init__(self) -> None:
        self.key = ("spool", self.feed.name)
        self.spec = self.feed

    def start(self) -> None:
        from corespond.adapters.spool import SpoolDirectory

        transport = self.feed.transport
        assert isinstance(transport, SpoolTransport)

        def run_in_thread(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return deferToThreadPool(self.reactor, self.threads, fn, *args)

        self._spool = SpoolDirectory(
            Path(transport.directory),
            self.pipeline.ingest_for(feed_context(self.feed)),
            feed=self.feed.name,
            clock=self.clock,
            run_in_thread=run_in_thread,
            pattern=transport.pattern,
            poll_interval=transport.poll_interval_seconds,
            keep_done=transport.keep_done,
            max_message_bytes=self.feed.max_message_bytes,
        )
        self._spool.start()
        log.info("feed.spool.watching", feed=self.feed.name, path=str(transport.directory))

    def stop(self) -> Deferred[None]:
        return self._spool.stop() if self._spool else succeed(None)


def _all(deferreds: Any) -> Deferred[None]:
    return DeferredList(list(deferreds), consumeErrors=True).addCallback(lambda _: None)


class FeedSet:
    """The running feeds. ``apply`` turns the running set into a new configuration."""

    def __init__(self, reactor: Any, clock: Clock, pipeline: Pipeline, threads: ThreadPool) -> None:
        self.reactor = reactor
        self.clock = clock
        self.pipeline = pipeline
        self.threads = threads
        self.components: dict[tuple[Any, ...], Component] = {}

    def plan(self, feeds: Sequence[FeedConfig]) -> dict[tuple[Any, ...], Component]:
        """The components a feed configuration asks for (not started)."""
        out: dict[tuple[Any, ...], Component] = {}
        http_groups: dict[tuple[str, int], list[FeedConfig]] = {}
        for feed in feeds:
            if not feed.enabled:
                continue
            t = feed.transport
            comp: Component
            if isinstance(t, HttpTransport):
                http_groups.setdefault((t.listen.host, t.listen.port), []).append(feed)
                continue
            if isinstance(t, TcpTransport):
                comp = TcpListener(self.reactor, self.clock, self.pipeline, feed)
            elif isinstance(t, WebSocketTransport):
                comp = WebSocketFeed(self.reactor, self.clock, self.pipeline, feed)
            else:
                comp = SpoolFeed(self.clock, self.pipeline, feed, self.threads, self.reactor)
            out[comp.key] = comp
        for group in http_groups.values():
            transport = group[0].transport
            assert isinstance(transport, HttpTransport)
            listener = HttpListener(self.reactor, self.pipeline, transport.listen, tuple(group))
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
                comp_again = _rebuild(self, comp)
                comp_again.start()
                self.components[key] = comp_again
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


def _rebuild(feeds: FeedSet, comp: Component) -> Component:
    """A fresh, unstarted copy of a stopped component (components are single-use)."""
    if isinstance(comp, HttpListener):
        return HttpListener(feeds.reactor, feeds.pipeline, comp.where, comp.feeds)
    if isinstance(comp, TcpListener):
        return TcpListener(feeds.reactor, feeds.clock, feeds.pipeline, comp.feed)
    if isinstance(comp, WebSocketFeed):
        return WebSocketFeed(feeds.reactor, feeds.clock, feeds.pipeline, comp.feed)
    assert isinstance(comp, SpoolFeed)
    return SpoolFeed(feeds.clock, feeds.pipeline, comp.feed, feeds.threads, feeds.reactor)


def _name(key: tuple[Any, ...]) -> str:
    return ":".join(str(k) for k in key)
