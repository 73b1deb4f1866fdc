"""The daemon's container: builds the long-lived objects once, starts, reloads and stops them.

Nothing here reaches for the global reactor; the entry point (``corespond run``) passes it in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from corespond.daemon import __version__
from corespond.daemon.clock import Clock
from corespond.daemon.config import (
    Config,
    ConfigError,
    HttpTransport,
    SpoolTransport,
    TcpTransport,
    load_config,
)
from corespond.daemon.decision import Classifier
from corespond.daemon.feeds import FeedSet, HttpListener, TcpListener, listen
from corespond.daemon.pipeline import IngestMetrics, Pipeline
from corespond.daemon.sdnotify import SystemdNotifier, Watchdog
from corespond.daemon.store import migrate
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.queries import Totals, totals
from corespond.daemon.store.writer import IncidentStore
from corespond.rules.baseline import BaselineClassifier

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What the daemon prints when it stops: this run's work and what the store holds."""

    new: int
    duplicate: int
    rejected: int
    decision_changes: int
    behavioral_health: int
    store: Totals

    def text(self) -> str:
        s = self.store
        return "\n".join(
            [
                "corespond stopped. This run:",
                f"  snapshots stored    {self.new:>8}   (duplicates ignored: {self.duplicate})",
                f"  messages rejected   {self.rejected:>8}   (kept in quarantine with the reason)",
                f"  decision changes    {self.decision_changes:>8}   "
                f"(incidents that became behavioral-health: {self.behavioral_health})",
                "In the store:",
                f"  incidents {s.incidents}, snapshots {s.snapshots}, decisions {s.decisions}, "
                f"rejects {s.rejects}",
            ]
        )


class Corespond:
    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        notifier: SystemdNotifier | None = None,
        registry: CollectorRegistry | None = None,
        classifier: Classifier | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = Clock(reactor)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self.engine = create_store_engine(
            config.store.url,
            sqlite_synchronous=config.store.sqlite_synchronous,
            password=config.store.password,
        )
        self.store = IncidentStore(self.engine, reactor, batch_max=config.store.batch_max)
        self.pipeline = Pipeline(
            self.store,
            classifier if classifier is not None else BaselineClassifier(),
            self.clock,
            IngestMetrics(self.registry),
        )
        # Disk I/O of spool directories and start-up work; never the reactor thread.
        self.io_threads = ThreadPool(minthreads=1, maxthreads=4, name="corespond-io")
        self.feeds = FeedSet(reactor, self.clock, self.pipeline, self.io_threads)
        self.watchdog: Watchdog | None = None
        self.simulator: Any = None
        self._metrics_port: Any = None
        self._started = False

    def in_thread(self, fn: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.io_threads, fn, *args)

    async def start(self) -> None:
        self.io_threads.start()
        self._started = True
        await self._prepare_schema()
        self.store.start()
        try:
            await self.feeds.apply(self.config.feeds)
        except Exception as err:
            raise StartupError(f"a feed could not start: {err}") from err
        self._start_metrics()
        self._start_simulator()
        self.notifier.ready()
        self.notifier.status(f"running {len(self.feeds.components)} feed components")
        self.watchdog = Watchdog.from_environment(self.notifier, self.clock, self.healthy)
        if self.watchdog is not None:
            self.watchdog.start()
        log.info(
            "daemon.started",
            version=__version__,
            config=str(self.config.path),
            count=len(self.feeds.components),
            ruleset=self.pipeline.classifier.version,
        )

    async def _prepare_schema(self) -> None:
        if self.config.store.migrate_on_start:
            revision = await self.in_thread(migrate.upgrade, self.engine)
            log.info("store.schema.ready", revision=revision)
        elif not await self.in_thread(migrate.is_up_to_date, self.engine):
            raise StartupError(
                "the database schema is not up to date: run `corespond db upgrade -c CONFIG` "
                "(or set store.migrate_on_start: true)"
            )

    def healthy(self) -> bool:
        """Whether the watchdog may say so: the reactor runs this, and the store commits."""
        return bool(self.store.healthy)

    def _start_metrics(self) -> None:
        if self.config.metrics is None:
            return
        from prometheus_client.twisted import MetricsResource
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        site = Site(root)
        site.displayTracebacks = False
        self._metrics_port = listen(self.reactor, self.config.metrics.listen, site)
        log.info("metrics.listening", port=self._metrics_port.getHost().port)

    def _start_simulator(self) -> None:
        demo = self.config.demo
        if demo is None or demo.simulator is None:
            return
        from corespond.adapters.eido import eido_document
        from corespond.adapters.newworld import newworld_document
        from corespond.daemon.demo import CadSimulator, SimulatorTargets

        sim = demo.simulator
        by_name = {f.name: f for f in self.config.feeds}
        http_url = token = spool_dir = tcp_host = tcp_port = None
        if sim.http_feed:
            feed = by_name[sim.http_feed]
            assert isinstance(feed.transport, HttpTransport)
            listener = self.feeds.find("http", feed.transport.listen.port)
            assert isinstance(listener, HttpListener)
            http_url = f"http://{_loopback(feed.transport.listen.host)}:{listener.port}{feed.transport.path}"
            token = feed.transport.token
        if sim.spool_feed:
            feed = by_name[sim.spool_feed]
            assert isinstance(feed.transport, SpoolTransport)
            spool_dir = feed.transport.directory
        if sim.tcp_feed:
            feed = by_name[sim.tcp_feed]
            assert isinstance(feed.transport, TcpTransport)
            tcp = self.feeds.find("tcp", feed.name)
            assert isinstance(tcp, TcpListener)
            tcp_host, tcp_port = _loopback(feed.transport.listen.host), tcp.port
        self.simulator = CadSimulator(
            self.reactor,
            self.clock,
            SimulatorTargets(http_url, token, spool_dir, tcp_host, tcp_port),
            incidents=sim.incidents,
            interval=sim.interval_seconds,
            seed=sim.seed,
            eido_document=eido_document,
            newworld_document=newworld_document,
        )
        self.simulator.start()

    async def reload(self) -> bool:
        """Reload the configuration file: all or nothing. Says which, in the log."""
        self.notifier.reloading()
        try:
            new = load_config(self.config.path)
        except ConfigError as err:
            log.error(
                "config.reload.aborted",
                reason="configuration has errors; running configuration kept, nothing changed",
                errors=[str(p) for p in err.problems],
            )
            return self._reloaded(False)
        needs_restart = [
            name
            for name, old, now in (
                ("store", self.config.store, new.store),
                ("state_dir", self.config.state_dir, new.state_dir),
                ("metrics", self.config.metrics, new.metrics),
                ("demo", self.config.demo, new.demo),
            )
            if old != now
        ]
        if needs_restart:
            log.error(
                "config.reload.aborted",
                reason="these sections change only with a restart; nothing changed",
                errors=needs_restart,
            )
            return self._reloaded(False)
        try:
            changes = await self.feeds.apply(new.feeds)
        except Exception as err:
            log.error(
                "config.reload.aborted",
                reason="a feed could not start; previous feeds restored",
                error=str(err)[:300],
            )
            return self._reloaded(False)
        if new.logging != self.config.logging:
            from corespond.daemon.log import set_level

            set_level(new.logging.level)
        self.config = new
        log.info("config.reload.complete", changes=changes or ["no feed changed"])
        return self._reloaded(True)

    def _reloaded(self, ok: bool) -> bool:
        self.notifier.ready()
        self.notifier.status("reload complete" if ok else "reload failed; previous config kept")
        return ok

    async def stop(self) -> RunSummary:
        """Stop accepting, finish what is in flight, commit, and say what was done."""
        self.notifier.stopping()
        log.info("daemon.stopping")
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.simulator is not None:
            self.simulator.stop()
        if self._metrics_port is not None:
            await self._metrics_port.stopListening()
        await self.feeds.stop()
        store_totals = await self.store.run_read(totals)
        await self.store.stop()
        if self._started:
            self.io_threads.stop()
        self.engine.dispose()
        c = self.pipeline.counts
        summary = RunSummary(
            c.new, c.duplicate, c.rejected, c.decision_changes, c.behavioral_health, store_totals
        )
        log.info(
            "daemon.stopped",
            snapshots=c.new,
            rejects=c.rejected,
            incidents=store_totals.incidents,
        )
        return summary


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
