"""Configured pager gateways: each adapter wrapped in its own in-flight cap and retry policy.

:class:`GatewayQueue` is what the escalation engine holds for every gateway named in the
``gateways:`` section. It lets at most ``max_in_flight`` submissions reach the adapter at once
(the rest wait their turn, in order), and retries a :class:`PagerError` marked ``retryable``
(timeout, refused, 5xx, WCTP 5xx/6xx) up to ``retries`` times with exponential backoff and
jitter, on the injected clock and random source. A permanent refusal is passed on at once: the
escalation moves to the clinician's next endpoint.

Retries belong to one attempt row that the escalation engine has claimed: every try sends the
same ``attempt_id`` (as WCTP's ``messageID``, so a carrier that deduplicates can drop a repeat),
and the engine must mark the row sent only when ``submit`` fires. A daemon killed during a
backoff then leaves the row claimed and unsent; the engine's claim expiry (its business, not
this module's) sends it again after the restart. The backoff timer itself is only in memory.
The wait for a slot does not count against the adapter's own timeout, and a slot is given back
during a backoff so one failing page does not hold up the others.

:func:`build_gateways` turns the typed ``gateways:`` configuration into these queues.
"""

from __future__ import annotations

import random as random_module
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.web.resource import Resource

from corespond.adapters.gateway_events import Quarantine
from corespond.adapters.http_client import PinnedTrustPolicy, make_agent
from corespond.adapters.sms_gateway import SmsCallbackResource, SmsPager
from corespond.adapters.smtp_pager import SmtpPager
from corespond.adapters.snpp import SnppPager
from corespond.adapters.tls import client_tls_options
from corespond.adapters.wctp import WctpCallbackResource, WctpPager, WctpPoller
from corespond.daemon.clock import Clock
from corespond.daemon.config import GatewayConfig
from corespond.daemon.pager import (
    DeliveryReceipt,
    PageMessage,
    Pager,
    PagerError,
    PagerEvents,
    Reply,
    Submitted,
)
from corespond.daemon.store.writer import RejectRecord

log = structlog.get_logger(__name__)


class GatewayMetrics:
    """Per-gateway figures for the metrics endpoint."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "corespond_page_attempts",
            "Submissions to a pager gateway, by outcome (accepted, retried, refused, exhausted)",
            ["gateway", "outcome"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "corespond_gateway_in_flight", "Submissions in progress", ["gateway"],
            registry=registry,
        )  # fmt: skip
        self.queued = Gauge(
            "corespond_gateway_queued", "Submissions waiting for a slot", ["gateway"],
            registry=registry,
        )  # fmt: skip
        self.submit_seconds = Histogram(
            "corespond_gateway_submit_seconds",
            "Time from submit to the gateway's acceptance, retries included",
            ["gateway"],
            registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
        )
        self.inbound = Counter(
            "corespond_gateway_inbound",
            "What gateways brought back, by kind (reply, receipt, rejected)",
            ["gateway", "kind"],
            registry=registry,
        )


class GatewayQueue:
    """A :class:`Pager` that caps and retries another one."""

    def __init__(
        self,
        pager: Pager,
        *,
        clock: Clock,
        max_in_flight: int = 4,
        retries: int = 3,
        backoff_initial: float = 2.0,
        backoff_max: float = 60.0,
        random: Callable[[], float] = random_module.random,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if retries < 0:
            raise ValueError("retries must not be negative")
        self.pager = pager
        self.name = pager.name
        self.two_way = pager.two_way
        self.clock = clock
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.random = random
        self.metrics = metrics
        self.in_flight = 0
        self._waiting: deque[Deferred[None]] = deque()

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.attempts.labels(self.name, outcome).inc()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.in_flight.labels(self.name).set(self.in_flight)
            self.metrics.queued.labels(self.name).set(len(self._waiting))

    @property
    def queued(self) -> int:
        """Submissions waiting for a slot."""
        return len(self._waiting)

    def backoff(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (1-based): exponential, capped, with jitter
        between half and all of it so that pages failed together do not retry together."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** (retry - 1))
        return ceiling * (0.5 + 0.5 * self.random())

    def submit(self, message: PageMessage) -> Deferred[Submitted]:
        return Deferred.fromCoroutine(self._submit(message))

    async def _submit(self, message: PageMessage) -> Submitted:
        attempt = 0
        started = self.clock.seconds()
        while True:
            attempt += 1
            await self._slot()
            try:
                result: Submitted = await self.pager.submit(message)
            except PagerError as err:
                retry = err.retryable and attempt <= self.retries
                log.warning("page.gateway.failed", transport=self.name,
                            request_id=message.attempt_id, attempt=attempt, error=str(err),
                            state="retrying" if retry else "given-up")  # fmt: skip
                if not retry:
                    self._count("exhausted" if err.retryable else "refused")
                    raise
                self._count("retried")
            else:
                if attempt > 1:
                    log.info("page.gateway.recovered", transport=self.name,
                             request_id=message.attempt_id, attempt=attempt)  # fmt: skip
                self._count("accepted")
                if self.metrics is not None:
                    elapsed = self.clock.seconds() - started
                    self.metrics.submit_seconds.labels(self.name).observe(elapsed)
                return result
            finally:
                self._release()
            await self._sleep(self.backoff(attempt))

    def _slot(self) -> Deferred[None]:
        d: Deferred[None] = Deferred(self._abandon_wait)
        if self.in_flight < self.max_in_flight:
            self.in_flight += 1
            d.callback(None)
        else:
            self._waiting.append(d)
        self._gauges()
        return d

    def _abandon_wait(self, d: Deferred[Any]) -> None:
        if d in self._waiting:
            self._waiting.remove(d)
            self._gauges()

    def _release(self) -> None:
        if self._waiting:
            self._waiting.popleft().callback(None)  # the slot passes on; in_flight unchanged
        else:
            self.in_flight -= 1
        self._gauges()

    def _sleep(self, seconds: float) -> Deferred[None]:
        def cancel(_: Deferred[None]) -> None:
            if call.active():
                call.cancel()

        d: Deferred[None] = Deferred(cancel)
        call = self.clock.call_later(seconds, d.callback, None)
        return d


# --- from configuration ---------------------------------------------------------------------------


def _http_policy(config: GatewayConfig) -> PinnedTrustPolicy:
    tls = config.tls
    if tls is None:
        return PinnedTrustPolicy()
    return PinnedTrustPolicy(tls.ca_file, tls.cert_file, tls.key_file)


def _client_tls(config: GatewayConfig) -> IOpenSSLClientConnectionCreator | None:
    tls = config.tls
    if tls is None or config.host is None:
        return None
    return client_tls_options(config.host, tls.ca_file, tls.cert_file, tls.key_file)


def build_pager(config: GatewayConfig, reactor: Any, clock: Clock) -> Pager:
    """The bare adapter for one configured gateway (one attempt per submit)."""
    timer: IReactorTime = reactor
    if config.type in ("wctp", "sms"):
        agent, _ = make_agent(reactor, tls=_http_policy(config),
                              connect_timeout=config.timeout_seconds,
                              max_connections=config.max_in_flight)  # fmt: skip
        assert config.url is not None
        if config.type == "wctp":
            assert config.sender_id is not None
            return WctpPager(
                config.name, agent=agent, clock=clock, reactor=timer, url=config.url,
                sender_id=config.sender_id, security_code=config.secret,
                send_responses_to=config.send_responses_to, timeout=config.timeout_seconds,
            )  # fmt: skip
        assert config.account_sid is not None and config.secret is not None
        return SmsPager(
            config.name, agent=agent, reactor=timer, base_url=config.url,
            account_sid=config.account_sid, auth_user=config.auth_user,
            auth_secret=config.secret, sender=config.sender,
            messaging_service_sid=config.messaging_service_sid,
            status_callback=config.callback_url, timeout=config.timeout_seconds,
        )  # fmt: skip
    assert config.host is not None
    if config.type == "snpp":
        return SnppPager(
            config.name, reactor=reactor, clock=timer, host=config.host,
            port=config.port or 444, login=config.login, password=config.secret,
            tls=_client_tls(config) if config.use_tls else None, timeout=config.timeout_seconds,
        )  # fmt: skip
    if config.type == "smtp":
        assert config.sender is not None
        return SmtpPager(
            config.name, reactor=reactor, clock=clock, timer=timer, host=config.host,
            port=config.port or 587, sender=config.sender, username=config.login,
            password=config.secret, starttls=config.starttls,
            tls=_client_tls(config) if config.starttls != "none" else None,
            timeout=config.timeout_seconds,
        )  # fmt: skip
    raise ValueError(f"unknown gateway type {config.type!r}")


def build_gateways(
    config_section: Sequence[GatewayConfig],
    reactor: Any,
    clock: Clock,
    events: PagerEvents,
    *,
    random: Callable[[], float] = random_module.random,
    metrics: GatewayMetrics | None = None,
) -> dict[str, Pager]:
    """Every configured gateway by name, each adapter inside its :class:`GatewayQueue`.

    ``events`` receives what two-way gateways bring back: see :func:`build_gateway_inbound`
    for the callback resources and pollers built with it.
    """
    del events  # the pagers only send; inbound goes through build_gateway_inbound
    return {
        config.name: GatewayQueue(
            build_pager(config, reactor, clock),
            clock=clock,
            max_in_flight=config.max_in_flight,
            retries=config.retries,
            backoff_initial=config.backoff_initial_seconds,
            backoff_max=config.backoff_max_seconds,
            random=random,
            metrics=metrics,
        )
        for config in config_section
    }


@dataclass
class CountingEvents:
    """Counts replies and receipts (once committed) on the way to the core's PagerEvents."""

    events: PagerEvents
    metrics: GatewayMetrics

    def reply(self, reply: Reply) -> Deferred[None]:
        d = self.events.reply(reply)
        d.addCallback(self._counted, reply.gateway, "reply")
        return d

    def receipt(self, receipt: DeliveryReceipt) -> Deferred[None]:
        d = self.events.receipt(receipt)
        d.addCallback(self._counted, receipt.gateway, "receipt")
        return d

    def _counted(self, result: None, gateway: str, kind: str) -> None:
        self.metrics.inbound.labels(gateway, kind).inc()
        return result


def counting_quarantine(quarantine: Quarantine, metrics: GatewayMetrics) -> Quarantine:
    def keep(record: RejectRecord) -> Deferred[int]:
        metrics.inbound.labels(record.feed, "rejected").inc()
        return quarantine(record)

    return keep


@dataclass
class GatewayInbound:
    """What two-way gateways need on our side: HTTP resources to mount (path -> resource,
    under ``/gateways/<name>``) and pollers to start and stop with the daemon."""

    resources: dict[str, Resource] = field(default_factory=dict)
    pollers: list[WctpPoller] = field(default_factory=list)

    def start(self) -> None:
        for poller in self.pollers:
            poller.start()

    def stop(self) -> Deferred[None]:
        stopped = DeferredList([poller.stop() for poller in self.pollers], consumeErrors=True)
        return stopped.addCallback(lambda _: None)


def build_gateway_inbound(
    config_section: Sequence[GatewayConfig],
    reactor: Any,
    clock: Clock,
    events: PagerEvents,
    *,
    quarantine: Quarantine | None = None,
    metrics: GatewayMetrics | None = None,
) -> GatewayInbound:
    """Callback resources and pollers of the two-way gateways; ``quarantine`` (the store's
    ``store_reject``) keeps what they refuse."""
    if metrics is not None:
        events = CountingEvents(events, metrics)
        if quarantine is not None:
            quarantine = counting_quarantine(quarantine, metrics)
    inbound = GatewayInbound()
    for config in config_section:
        path = f"/gateways/{config.name}"
        if config.type == "wctp":
            if config.callback_token is not None:
                inbound.resources[path] = WctpCallbackResource(
                    config.name, events, clock, token=config.callback_token, quarantine=quarantine
                )
            if config.poll_interval_seconds is not None:
                assert config.url is not None and config.sender_id is not None
                agent, _ = make_agent(reactor, tls=_http_policy(config), max_connections=1)
                inbound.pollers.append(WctpPoller(
                    config.name, agent=agent, clock=clock, reactor=reactor, url=config.url,
                    poller_id=config.sender_id, security_code=config.secret, events=events,
                    interval=config.poll_interval_seconds, timeout=config.timeout_seconds,
                    quarantine=quarantine,
                ))  # fmt: skip
        elif config.type == "sms" and config.callback_url is not None:
            assert config.secret is not None
            inbound.resources[path] = SmsCallbackResource(
                config.name, events, clock, auth_token=config.secret,
                public_url=config.callback_url, quarantine=quarantine,
            )  # fmt: skip
    return inbound
