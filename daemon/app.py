"""The daemon's container: builds the long-lived objects once, starts, reloads and stops them.

Nothing here reaches for the global reactor; the entry point (``corespond run``) passes it in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from corespond.daemon import __version__
from corespond.daemon.classification import (
    LastGoodRules,
    PendingClassifier,
    RuleKeeper,
    RulesMetrics,
    RulesUnavailable,
    RulesWatcher,
)
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
from corespond.daemon.errors import SafeMessage
from corespond.daemon.feeds import FeedServices, FeedSet, HttpListener, TcpListener, listen
from corespond.daemon.log import error_text
from corespond.daemon.pipeline import IngestMetrics, Pipeline
from corespond.daemon.sdnotify import SystemdNotifier, Watchdog
from corespond.daemon.store import migrate
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.queries import Totals, totals
from corespond.daemon.store.writer import IncidentStore

log = structlog.get_logger(__name__)


class StartupError(SafeMessage, Exception):
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
            classifier if classifier is not None else PendingClassifier(),
            self.clock,
            IngestMetrics(self.registry),
        )
        # Disk I/O of spool directories, rule loading and start-up work; never the reactor.
        self.io_threads = ThreadPool(minthreads=1, maxthreads=4, name="corespond-io")
        # A classifier given by the caller is fixed (tests); otherwise the rule files decide.
        self.rules: RuleKeeper | None = None
        if classifier is None:
            self.rules = RuleKeeper(
                settings=config.rules,
                last_good=LastGoodRules(config.state_dir / "rules"),
                in_thread=self.in_thread,
                clock=self.clock,
                metrics=RulesMetrics(self.registry),
                install=self._install_classifier,
            )
        self.rules_watcher: RulesWatcher | None = None
        self.feeds = FeedSet(FeedServices(reactor, self.clock, self.pipeline, self.io_threads))
        self.watchdog: Watchdog | None = None
        self.simulator: Any = None
        self._metrics_port: Any = None
        self._started = False
        self._store_started = False

    def in_thread(self, fn: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.io_threads, fn, *args)

    def _install_classifier(self, classifier: Classifier) -> None:
        # One attribute store: the next payload is classified by the new set, none by a mix.
        self.pipeline.classifier = classifier

    async def start(self) -> None:
        self.io_threads.start()
        self._started = True
        await self._load_rules()
        await self._prepare_schema()
        await self._seed_demo_encounters()
        self.store.start()
        self._store_started = True
        try:
            await self.feeds.apply(self.config.feeds)
        except Exception as err:
            raise StartupError(f"a feed could not start: {err}") from err
        self._start_metrics()
        self._start_simulator()
        self._start_rules_watcher()
        self.notifier.ready()
        self._status(f"running {len(self.feeds.components)} feed components")
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

    async def _load_rules(self) -> None:
        if self.rules is None:
            return
        try:
            await self.rules.start()
        except RulesUnavailable as err:
            log.critical("rules.unavailable", reason=err.reason, errors=err.problems)
            raise StartupError(str(err)) from None

    def _start_rules_watcher(self) -> None:
        if self.rules is None or not self.config.rules.watch:
            return
        settings = self.config.rules
        self.rules_watcher = RulesWatcher(
            self.clock,
            settings.site_dir,
            settings.watch_interval_seconds,
            self.in_thread,
            lambda: ensureDeferred(self._rules_changed()),
        )
        ensureDeferred(self.rules_watcher.start()).addErrback(
            lambda f: log.error("rules.watch.failed", error=error_text(f))
        )

    async def _rules_changed(self) -> None:
        assert self.rules is not None
        ok = await self.rules.reload()
        self._status("rules reloaded" if ok else "rules reload failed; previous rules kept")

    def _status(self, text: str) -> None:
        """sd_notify STATUS; a daemon on its last known good rules says so first, always."""
        degraded = self.rules.status_text() if self.rules is not None else None
        self.notifier.status(f"{degraded}; {text}" if degraded else text)

    async def _prepare_schema(self) -> None:
        if self.config.store.migrate_on_start:
            revision = await self.in_thread(migrate.upgrade, self.engine)
            log.info("store.schema.ready", revision=revision)
        elif not await self.in_thread(migrate.is_up_to_date, self.engine):
            raise StartupError(
                "the database schema is not up to date: run `corespond db upgrade -c CONFIG` "
                "(or set store.migrate_on_start: true)"
            )

    async def _seed_demo_encounters(self) -> None:
        outcomes = self.config.outcomes
        if outcomes.demo_encounters <= 0:
            return
        from corespond.daemon.synthetic_encounters import seed_demo_encounters

        today = self.clock.now().date()
        seeded = await self.in_thread(
            seed_demo_encounters, self.engine, outcomes.demo_encounters, outcomes.demo_months, today
        )
        if seeded:
            log.info("outcomes.demo.seeded", count=seeded)

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
        """Reload the configuration file, then the rules: each all or nothing. Says which, in
        the log."""
        self.notifier.reloading()
        config_ok = await self._reload_config()
        rules_ok = await self._reload_rules()
        return self._reloaded(config_ok, rules_ok)

    async def _reload_rules(self) -> bool:
        if self.rules is None:
            return True
        settings = self.config.rules
        ok = await self.rules.reload(settings)
        watcher = self.rules_watcher
        moved = watcher is None or (
            watcher.directory != settings.site_dir
            or watcher.interval != settings.watch_interval_seconds
        )
        if moved or not settings.watch:
            if watcher is not None:
                watcher.stop()
                self.rules_watcher = None
            self._start_rules_watcher()
        return ok

    async def _reload_config(self) -> bool:
        try:
            new = load_config(self.config.path)
        except ConfigError as err:
            log.error(
                "config.reload.aborted",
                reason="configuration has errors; running configuration kept, nothing changed",
                errors=[str(p) for p in err.problems],
            )
            return False
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
            return False
        try:
            changes = await self.feeds.apply(new.feeds)
        except Exception as err:
            log.error(
                "config.reload.aborted",
                reason="a feed could not start; previous feeds restored",
                error=error_text(err),
            )
            return False
        if new.logging != self.config.logging:
            from corespond.daemon.log import set_level

            set_level(new.logging.level)
        self.config = new
        log.info("config.reload.complete", changes=changes or ["no feed changed"])
        return True

    def _reloaded(self, config_ok: bool, rules_ok: bool) -> bool:
        self.notifier.ready()
        if config_ok and rules_ok:
            self._status("reload complete")
        else:
            failed = [name for name, ok in (("config", config_ok), ("rules", rules_ok)) if not ok]
            self._status(
                f"reload failed ({', '.join(failed)}); previous {' and '.join(failed)} kept"
            )
        return config_ok and rules_ok

    async def stop(self) -> RunSummary:
        """Stop accepting, finish what is in flight, commit, and say what was done."""
        self.notifier.stopping()
        log.info("daemon.stopping")
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.rules_watcher is not None:
            self.rules_watcher.stop()
        if self.simulator is not None:
            self.simulator.stop()
        if self._metrics_port is not None:
            await self._metrics_port.stopListening()
        await self.feeds.stop()
        # A start that failed early (rules, schema) never started the store's reader threads.
        store_totals = (
            await self.store.run_read(totals) if self._store_started else Totals(0, 0, 0, 0)
        )
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
