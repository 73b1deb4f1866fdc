"""The daemon's container: builds the long-lived objects once, starts, reloads and stops them.

Nothing here reaches for the global reactor; the entry point (``corespond run``) passes it in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
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
    PagingConfig,
    SpoolTransport,
    TcpTransport,
    load_config,
)
from corespond.daemon.decision import Classifier
from corespond.daemon.errors import SafeMessage
from corespond.daemon.escalation import PagingService, PagingSettings
from corespond.daemon.feeds import FeedServices, FeedSet, HttpListener, TcpListener, listen
from corespond.daemon.gateways import (
    GatewayInbound,
    GatewayMetrics,
    build_gateway_inbound,
    build_gateways,
)
from corespond.daemon.log import error_text
from corespond.daemon.memory import CollectorPolicy
from corespond.daemon.pager import Pager
from corespond.daemon.pipeline import IngestMetrics, Pipeline
from corespond.daemon.responders import ClinicianDesk, PageDesk
from corespond.daemon.sdnotify import SystemdNotifier, Watchdog
from corespond.daemon.store import migrate
from corespond.daemon.store.activity import Activity, activity_since
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.queries import Totals, totals
from corespond.daemon.store.writer import IncidentStore

log = structlog.get_logger(__name__)


# How often the demo's CAD sends its crisis units' positions and statuses, in simulator ticks
# (15 s at the demo's 1.5 s).
CAD_UNIT_TICKS = 10
# How long the referral worker's group commit of send results waits for an ingest batch to
# ride before it goes alone (SQLite): short, since the sender's claims ahead wait for it.
REFERRAL_COMMIT_WITHIN = 0.01


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
    activity: Activity | None = None  # paging and referrals of this run, when they run

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
                *(activity_lines(self.activity) if self.activity is not None else []),
            ]
        )


def activity_lines(a: Activity) -> list[str]:
    """The paging and referral part of the stop summary."""
    out = [
        "Paging, this run:",
        f"  pages sent          {a.pages_sent:>8}   (to clinicians: {a.clinician_pages}; the "
        f"rest told supervisors or dispatch)",
        f"  accepted            {a.accepted:>8}   (accept, en route or on scene)",
        f"  declined            {a.declined:>8}",
        f"  no answer           {a.unanswered:>8}   (timed out, or another clinician took it)",
        f"  escalations         {a.escalated:>8}   (of {a.chains} calls: went past the first "
        f"page; {a.reached_supervisor} reached a supervisor, {a.reached_dispatch} dispatch)",
        f"  AVL fixes from CAD  {a.avl_fixes:>8}   (EIDO unit locations; pages the CAD's unit "
        f"status answered: {a.cad_answers})",
        f"  encounters done     {a.encounters_completed:>8}   (completed on the encounter form "
        "or the API)",
        f"Referrals, this run: {a.referral_total}   (automatic, from a disposition or a rule: "
        f"{a.auto_referrals})",
    ]
    for r in a.referrals:
        ack = r.ack_code or "no ACK yet"
        outcome = f"RRI {r.outcome}" if r.outcome else "no RRI yet"
        out.append(f"  {r.state:<18} {r.count:>8}   (ACK {ack}, {outcome})")
    return out


class Corespond:
    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        notifier: SystemdNotifier | None = None,
        registry: CollectorRegistry | None = None,
        classifier: Classifier | None = None,
        pagers: Mapping[str, Pager] | None = None,
        page_desk: PageDesk | None = None,
        clinician_desk: ClinicianDesk | None = None,
        memory: CollectorPolicy | None = None,
    ) -> None:
        self.config = config
        # When the garbage collector may walk the heap; the entry point gives one (it is
        # process-wide state, as the reactor is), tests mostly do not.
        self.memory = memory
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
        # What the paging core puts in a page: the signed ack-page link (None: no web section).
        self.ack_links: Any = None
        # The link signer and system tokens the web side checks with; a reload updates these
        # in place (new keys, tokens) so every page, link and API request sees them at once.
        self.link_signer: Any = None
        self.encounter_signer: Any = None
        self.system_tokens: Any = None
        if config.web is not None:
            from corespond.daemon.web import (
                ack_links,
                encounter_link_signer,
                link_signer,
                system_tokens,
            )

            self.link_signer = link_signer(config.web)
            self.encounter_signer = encounter_link_signer(config.web)
            self.system_tokens = system_tokens(config.web)
            self.ack_links = ack_links(config.web, self.clock, self.link_signer)
        # Paging: gateways from the config (or given, in tests), replies and receipts back
        # through the paging core, which also serves the web side's desks.
        self.paging: PagingService | None = None
        self.unit_locations: Any = None
        self.gateway_inbound: GatewayInbound | None = None
        if config.paging is not None:
            self.paging = PagingService(
                self.engine,
                config.paging.roster,
                pagers or {},
                reactor,
                paging_settings(config.paging),
                eta_source=self._eta_source(config.paging),
                link_for=self.ack_links.url if self.ack_links is not None else None,
                # SQLite has one writer at a time: paging writes queue on the store's writer
                # thread rather than sleep in SQLite's busy handler (bench/dispatch.py).
                run_in_thread=self.store.run_on_writer
                if self.engine.dialect.name == "sqlite"
                else None,
                run_read=self.store.run_read,
                # ... and the transactions a page waits for ride the next ingest batch, ahead
                # of the writer's background work (referrals, sessions, checkpoints).
                ride=self.store.ride_next_batch if self.engine.dialect.name == "sqlite" else None,
                ride_later=self.store.ride_later if self.engine.dialect.name == "sqlite" else None,
            )
            self.pipeline.observers.append(self.paging.observe)
            self.pipeline.current_observers.append(self.paging.observe_current)
            # A snapshot that calls for a clinician starts its chain, and pages, in the
            # transaction that stores it (the observers above are the way when it did not).
            self.store.follow_with(self.paging)
            self.pipeline.snapshot_observers.append(self.paging.followed)
            # AVL from the CAD feeds: unit positions and statuses become clinicians' fixes
            # and availability.
            from corespond.daemon.unit_locations import EidoUnitLocations

            paging = self.paging
            self.unit_locations = EidoUnitLocations(
                paging, lambda: paging.roster, self.store.store_reject,
                statuses=config.paging.unit_statuses,
                answers_pages=config.paging.unit_status_answers_pages, registry=self.registry,
            )  # fmt: skip
            self.pipeline.snapshot_observers.append(self.unit_locations.observe)
            if pagers is None:
                metrics = GatewayMetrics(self.registry)
                self.paging.pagers.update(
                    build_gateways(config.gateways, reactor, self.clock, self.paging,
                                   metrics=metrics)
                )  # fmt: skip
                self.gateway_inbound = build_gateway_inbound(
                    config.gateways, reactor, self.clock, self.paging,
                    quarantine=self.store.store_reject, metrics=metrics,
                )  # fmt: skip
            page_desk = page_desk or self.paging
            clinician_desk = clinician_desk or self.paging
        self.watchdog: Watchdog | None = None
        self.simulator: Any = None
        self.cad_units: Any = None
        self._metrics_port: Any = None
        # The paging core's desks, which the web listener (ack page, API) calls into.
        self.page_desk = page_desk
        self.clinician_desk = clinician_desk
        self.web_site: Any = None
        self._web_port: Any = None
        self._nmea_port: Any = None
        self.login_threads: ThreadPool | None = None
        self.session_threads: ThreadPool | None = None
        self._session_purge: Any = None
        self._started = False
        self._store_started = False
        self.referrals: Any = None
        # Saves encounters for the API and the clinician's form (one code path). On SQLite
        # its writes queue on the store's writer thread, as paging's do.
        # A configured disposition asks for its referral in the saving transaction.
        from corespond.daemon.auto_referrals import (
            AfterCommitWake,
            AutoReferrals,
            disposition_hook,
        )
        from corespond.daemon.encounter_desk import EncounterDesk

        auto = config.referrals.auto if config.referrals is not None else ()
        # ... and wakes the automatic referrals once that transaction has committed.
        self.auto_referral_wake = AfterCommitWake()
        self.encounter_desk = EncounterDesk(
            self.engine, config.outcomes, clock=self.clock,
            run_in_thread=self.auto_referral_wake.runner(
                self.store.run_on_writer
                if self.engine.dialect.name == "sqlite"
                else self.in_thread
            ),
            hooks=(disposition_hook(auto, self.auto_referral_wake.mark),) if auto else (),
        )  # fmt: skip
        self.auto_referrals: AutoReferrals | None = None
        self.demo_peers: Any = None
        self._started_at = self.clock.now()

    def in_thread(self, fn: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.io_threads, fn, *args)

    def _install_classifier(self, classifier: Classifier) -> None:
        # One attribute store: the next payload is classified by the new set, none by a mix.
        self.pipeline.classifier = classifier

    async def start(self) -> None:
        self.io_threads.start()
        self._started = True
        # The rules directory as it is before the rules are read: the watcher compares with
        # this, so a file changed while the daemon starts is still picked up.
        rules_baseline = await self._rules_baseline()
        await self._load_rules()
        await self._prepare_schema()
        await self._seed_demo_encounters()
        if self.config.referrals is not None and self.engine.dialect.name == "sqlite":
            from corespond.daemon.rollups import prepare_referral_upkeep

            await self.in_thread(prepare_referral_upkeep)
        self.store.start()
        self._store_started = True
        if self.paging is not None:
            self.paging.start()  # resumes every chain and page that was due or in flight
        try:
            await self.feeds.apply(self.config.feeds)
        except Exception as err:
            raise StartupError(f"a feed could not start: {err}") from err
        if self.config.referrals is not None:
            from corespond.daemon.referrals import ReferralService

            try:
                from corespond.daemon.referral_metrics import ReferralMetrics

                self.referrals = ReferralService(
                    self.engine, self.reactor, self.config.referrals,
                    # SQLite: the outbox's transactions queue on the store's writer thread, as
                    # paging's do, instead of contending for SQLite's lock.
                    run_in_thread=self.store.run_on_writer
                    if self.engine.dialect.name == "sqlite"
                    else None,
                    ride=self.store.ride_later if self.engine.dialect.name == "sqlite" else None,
                    ride_commits=partial(
                        self.store.ride_next_batch, within=REFERRAL_COMMIT_WITHIN, urgent=False
                    )
                    if self.engine.dialect.name == "sqlite"
                    else None,
                    ride_claims=self.store.ride_later
                    if self.engine.dialect.name == "sqlite"
                    else None,
                    metrics=ReferralMetrics(self.registry),
                )  # fmt: skip
                self.referrals.start()
                self._start_auto_referrals()
            except Exception as err:
                raise StartupError(f"referrals could not start: {err}") from err
        self._start_metrics()
        self._start_web()
        self._start_gateway_inbound()
        self._start_locations()
        self._start_demo_peers()
        await self._start_simulator()
        self._start_rules_watcher(rules_baseline)
        self.notifier.ready()
        self._status(f"running {len(self.feeds.components)} feed components")
        self.watchdog = Watchdog.from_environment(self.notifier, self.clock, self.healthy)
        if self.watchdog is not None:
            self.watchdog.start()
        if self.memory is not None:
            self.memory.started()
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

    async def _rules_baseline(self) -> Any:
        if self.rules is None or not self.config.rules.watch:
            return None
        from corespond.daemon.classification import fingerprint

        return await self.in_thread(fingerprint, self.config.rules.site_dir)

    def _start_rules_watcher(self, baseline: Any = None) -> None:
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
        ensureDeferred(self.rules_watcher.start(baseline)).addErrback(
            lambda f: log.error("rules.watch.failed", error=error_text(f))
        )

    async def _rules_changed(self) -> None:
        assert self.rules is not None
        ok = await self.rules.reload()
        self._status("rules reloaded" if ok else "rules reload failed; previous rules kept")
        if ok and self.memory is not None:
            self.memory.reloaded()

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

    def _eta_source(self, paging: PagingConfig) -> Any:
        """The OSRM-compatible routing client for drive-time ETAs, when one is configured."""
        if paging.routing_url is None:
            return None
        from corespond.adapters.http_client import make_agent
        from corespond.adapters.osrm import OsrmClient

        agent, _ = make_agent(self.reactor, connect_timeout=paging.routing_timeout_seconds)
        return OsrmClient(
            agent, self.reactor, paging.routing_url, timeout=paging.routing_timeout_seconds
        )

    def _start_locations(self) -> None:
        """The NMEA 0183 listener for AVL devices (``paging.nmea_listen``)."""
        paging = self.config.paging
        if self.paging is None or paging is None or paging.nmea_listen is None:
            return
        from corespond.adapters.nmea import NmeaFeedFactory

        factory = NmeaFeedFactory(
            self.paging, feed="nmea", clock=self.clock, quarantine=self.store.store_reject
        )
        try:
            self._nmea_port = listen(self.reactor, paging.nmea_listen, factory)
        except Exception as err:
            raise StartupError(f"the NMEA listener could not start: {error_text(err)}") from err
        log.info("locations.nmea.listening", port=self._nmea_port.getHost().port)

    def _start_gateway_inbound(self) -> None:
        inbound = self.gateway_inbound
        if inbound is None:
            return
        if inbound.resources and self.web_site is None:
            log.warning(
                "gateways.callbacks.unmounted",
                reason="gateway callbacks need the web section; replies come only by polling",
                count=len(inbound.resources),
            )
        inbound.start()

    def update_encounter(
        self, encounter_id: int, changes: dict[str, Any], complete: bool
    ) -> Deferred[dict[str, Any]]:
        """A clinician's documentation of an encounter (the API), in one transaction."""
        return self.encounter_desk.update(encounter_id, changes, complete)

    def _start_auto_referrals(self) -> None:
        """Referrals a configured disposition or rule asks for (``referrals.auto``)."""
        if self.config.referrals is None or not self.config.referrals.auto:
            return
        from corespond.daemon.auto_referrals import AutoReferrals

        self.auto_referrals = AutoReferrals.of_service(
            self.engine, self.config.referrals, self.referrals, self.clock
        )
        self.auto_referral_wake.target = self.auto_referrals.wake
        self.auto_referrals.start()

    def _referral_page(self) -> Any:
        """The referral form beside the encounter form, when this daemon sends referrals."""
        if self.referrals is None:
            return None
        from corespond.daemon.web.referral_form import ReferralDesk, referral_pages

        return referral_pages(ReferralDesk(
            self.config.referrals, self.referrals.person_of, self.referrals.create
        ))  # fmt: skip

    def _start_web(self) -> None:
        """The ack page and API listener (config section ``web``), on the paging core's desks."""
        if self.config.web is None:
            return
        if self.page_desk is None or self.clinician_desk is None:
            raise StartupError(
                "the web section needs the paging core (its page and clinician desks), which "
                "this daemon does not run: remove the web section"
            )
        from corespond.daemon.web import build_web_site

        self.web_site = build_web_site(
            self.config.web, self.page_desk, self.clinician_desk,
            clock=self.clock, reactor=self.reactor,
            referrals=self.referrals.create_from_request if self.referrals is not None else None,
            encounters=self.update_encounter, signer=self.link_signer,
            encounter_signer=self.encounter_signer, systems=self.system_tokens,
            encounter_desk=self.encounter_desk,
            custom_fields=self.config.outcomes.custom_fields,
            referral_page=self._referral_page(),
        )  # fmt: skip
        if self.gateway_inbound is not None:
            for path, resource in self.gateway_inbound.resources.items():
                self.web_site.mount(path, resource)
        if self.config.web.users_file is not None:
            self.web_site.mount("/dashboard", self._dashboard(self.config.web))
        try:
            self._web_port = listen(self.reactor, self.config.web.listen, self.web_site)
        except Exception as err:
            raise StartupError(f"the web listener could not start: {error_text(err)}") from err
        log.info("web.listening", port=self._web_port.getHost().port)

    def _dashboard(self, web: Any) -> Any:
        """The dashboard: sessions in the database (on SQLite through the store's writer
        thread, else a small pool of their own), password hashes in a bounded pool of their
        own (never the I/O pool spool ingest needs), expired sessions purged every few
        minutes."""
        from corespond.daemon.web.dashboard import Dashboard
        from corespond.daemon.web.sessions import PURGE_SECONDS, LoginGate, SessionStore

        self.login_threads = ThreadPool(0, web.login_hashes_at_once, name="corespond-login")
        self.login_threads.start()
        if self.engine.dialect.name == "sqlite":
            run_sessions = self.store.run_on_writer
        else:
            self.session_threads = ThreadPool(0, 2, name="corespond-sessions")
            self.session_threads.start()
            pool = self.session_threads

            def run_sessions(fn: Any) -> Deferred[Any]:
                return deferToThreadPool(self.reactor, pool, fn)

        sessions = SessionStore(
            self.engine, self.clock, run_sessions, idle_seconds=web.session_idle_seconds,
            absolute_seconds=web.session_absolute_seconds,
        )  # fmt: skip
        gate = LoginGate(self.clock, max_hashing=web.login_hashes_at_once,
                         rate=web.logins_per_second, burst=web.login_burst)  # fmt: skip

        def purge() -> None:
            sessions.purge().addErrback(
                lambda f: log.error("web.session.purge_failed", error=error_text(f))
            )

        self._session_purge = self.clock.looping_call(PURGE_SECONDS, purge)
        return Dashboard(
            engine=self.engine, users_file=web.users_file, outcomes=self.config.outcomes,
            in_thread=self.in_thread, clock=self.clock, sessions=sessions, gate=gate,
            hash_in_thread=lambda fn, *a: deferToThreadPool(
                self.reactor, self.login_threads, fn, *a
            ),
        )  # fmt: skip

    def _start_demo_peers(self) -> None:
        """The stand-in carrier, SMS gateway, AVL and provider of ``make demo`` (demo.peers)."""
        demo = self.config.demo
        if demo is None or demo.peers is None:
            return
        from twisted.internet.error import CannotListenError

        from corespond.daemon.demo_peers import DemoPeers, DemoPeersError

        listener = self.referrals.listener if self.referrals is not None else None
        listen = self.config.referrals.listen if self.config.referrals is not None else None

        def referral_listener() -> tuple[str, int] | None:
            if listener is None or listen is None or listener.port is None:
                return None
            return _loopback(listen.host), listener.port

        try:
            self.demo_peers = DemoPeers(
                self.config, self.reactor, self.clock, engine=self.engine,
                in_thread=self.in_thread, referrals=self.referrals,
                referral_listener=referral_listener,
            )  # fmt: skip
            self.demo_peers.start()
        except (DemoPeersError, CannotListenError) as err:
            raise StartupError(f"the demo peers could not start: {error_text(err)}") from err

    async def _start_simulator(self) -> None:
        demo = self.config.demo
        if demo is None or demo.simulator is None:
            return
        # A rerun over the same store plays new incidents, numbered after those it holds, so
        # that they are paged for (known ones would only be duplicates).
        first = (await self.store.run_read(totals)).incidents
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
            close_after=sim.close_after_seconds,
            first=first,
        )
        self.simulator.start()
        if http_url is not None and self.config.paging is not None:
            from corespond.daemon.demo import CadUnitUpdates

            # The same CAD's AVL: positions and statuses of the roster's crisis units.
            from corespond.daemon.store.activity import open_pages_of

            simulator = self.simulator
            self.cad_units = CadUnitUpdates(
                self.reactor, self.clock, self.config.paging.roster, url=http_url, token=token,
                seed=sim.seed, interval=CAD_UNIT_TICKS * sim.interval_seconds,
                calls=lambda: simulator.eido_calls,
                paged=lambda ids: self.store.run_read(lambda conn: open_pages_of(conn, ids)),
            )  # fmt: skip
            self.cad_units.start()

    async def reload(self) -> bool:
        """Reload the configuration file, then the rules: each all or nothing. Says which, in
        the log."""
        self.notifier.reloading()
        config_ok = await self._reload_config()
        rules_ok = await self._reload_rules()
        if self.memory is not None:
            self.memory.reloaded()  # even a failed reload may have replaced a part
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
            # Off the reactor: the roster, its GeoJSON zones and iCalendar files load with it.
            new = await self.in_thread(load_config, self.config.path)
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
        from corespond.daemon.web import web_restart_needed

        if web_restart_needed(self.config.web, new.web):
            needs_restart.append("web")
        if (self.config.paging is None) != (new.paging is None):
            needs_restart.append("paging")
        if needs_restart:
            log.error(
                "config.reload.aborted",
                reason="these sections change only with a restart; nothing changed",
                errors=needs_restart,
            )
            return False
        try:
            web_secrets = self._web_secrets(new)
        except ValueError as err:
            log.error(
                "config.reload.aborted",
                reason="the web keys or tokens are unusable; nothing changed",
                error=error_text(err),
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
        if web_secrets is not None:
            changes = [*(changes or ["no feed changed"]), *self._apply_web_secrets(*web_secrets)]
        if new.logging != self.config.logging:
            from corespond.daemon.log import set_level

            set_level(new.logging.level)
        if self.paging is not None and new.paging is not None:
            # Running chains keep the steps they were snapshotted with; new steps see the new
            # roster (clinicians, zones, schedules) at once.
            self.paging.reconfigure(new.paging.roster, paging_settings(new.paging))
            changes = [*(changes or ["no feed changed"]), "paging roster reloaded"]
            if self.unit_locations is not None:
                changes += self.unit_locations.reconfigure(
                    new.paging.unit_statuses, new.paging.unit_status_answers_pages
                )
        self.config = new
        log.info("config.reload.complete", changes=changes or ["no feed changed"])
        return True

    def _web_secrets(self, new: Config) -> tuple[Any, tuple[int, int], dict[str, str]] | None:
        """The link keys, link lifetimes (ack, encounter) and system tokens of ``new``, checked
        (ValueError) but not yet applied; None when the daemon has no web side."""
        if new.web is None or self.link_signer is None:
            return None
        from corespond.daemon.signed_links import LinkSigner
        from corespond.daemon.web import link_keys
        from corespond.daemon.web.auth import SystemTokens

        keys, tokens = link_keys(new.web), {s.name: s.token for s in new.web.systems}
        LinkSigner(keys, new.web.link_lifetime_seconds)
        SystemTokens(tokens)
        lifetimes = (new.web.link_lifetime_seconds, new.web.encounter_link_lifetime_seconds)
        return keys, lifetimes, tokens

    def _apply_web_secrets(
        self, keys: Any, lifetimes: tuple[int, int], tokens: dict[str, str]
    ) -> list[str]:
        """Swap in new link keys and system tokens: what changed, for the reload's log line
        (names of systems, never a key or token)."""
        changes = []
        old = self.link_signer.keys
        if (keys.current, keys.previous) != (old.current, old.previous):
            changes.append("link keys reloaded")
        lifetime, encounter_lifetime = lifetimes
        if lifetime != self.link_signer.lifetime:
            changes.append("link lifetime changed")
        if encounter_lifetime != self.encounter_signer.lifetime:
            changes.append("encounter link lifetime changed")
        self.link_signer.rotate(keys, lifetime)
        self.encounter_signer.rotate(keys, encounter_lifetime)
        before = {s.name: s.token for s in self.config.web.systems} if self.config.web else {}
        if before != tokens:
            added, removed = (
                sorted(tokens.keys() - before.keys()),
                sorted(before.keys() - tokens.keys()),
            )
            changed = sorted(n for n in tokens.keys() & before.keys() if tokens[n] != before[n])
            changes.append(
                "system tokens reloaded"
                + "".join(f"; {what}: {', '.join(names)}" for what, names in
                          (("added", added), ("removed", removed), ("changed", changed)) if names)
            )  # fmt: skip
        self.system_tokens.replace(tokens)
        return changes

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
        if self.memory is not None:
            self.memory.stop()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.rules_watcher is not None:
            self.rules_watcher.stop()
        if self.simulator is not None:
            self.simulator.stop()
        if self.cad_units is not None:
            self.cad_units.stop()
        if self.demo_peers is not None:
            await self.demo_peers.stop()
        if self._metrics_port is not None:
            await self._metrics_port.stopListening()
        if self._web_port is not None:
            await self._web_port.stopListening()
        if self._session_purge is not None and self._session_purge.running:
            self._session_purge.stop()
        if self._nmea_port is not None:
            await self._nmea_port.stopListening()
        if self.gateway_inbound is not None:
            await self.gateway_inbound.stop()
        await self.feeds.stop()
        if self.paging is not None:
            await self.paging.stop()
        if self.auto_referrals is not None:
            self.auto_referral_wake.target = None
            self.auto_referrals.stop()
        if self.referrals is not None:
            await self.referrals.stop()
        # A start that failed early (rules, schema) never started the store's reader threads.
        store_totals = (
            await self.store.run_read(totals) if self._store_started else Totals(0, 0, 0, 0)
        )
        activity: Activity | None = None
        if self._store_started and (self.paging is not None or self.referrals is not None):
            since = self._started_at
            activity = await self.store.run_read(lambda conn: activity_since(conn, since))
        await self.store.stop()
        if self._started:
            self.io_threads.stop()
        for pool in (self.login_threads, self.session_threads):
            if pool is not None and pool.started:
                pool.stop()
        self.engine.dispose()
        c = self.pipeline.counts
        summary = RunSummary(
            c.new,
            c.duplicate,
            c.rejected,
            c.decision_changes,
            c.behavioral_health,
            store_totals,
            activity,
        )
        log.info(
            "daemon.stopped",
            snapshots=c.new,
            rejects=c.rejected,
            incidents=store_totals.incidents,
        )
        return summary


def paging_settings(config: PagingConfig) -> PagingSettings:
    return PagingSettings(
        max_fix_age=timedelta(seconds=config.max_fix_age_seconds),
        eta_candidates=config.eta_candidates,
        recent_window=timedelta(hours=config.recent_pages_hours),
        lease=timedelta(seconds=config.lease_seconds),
        worker_id=config.worker_id or "",
    )


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
