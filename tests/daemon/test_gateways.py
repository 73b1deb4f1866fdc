"""GatewayQueue: in-flight cap, retries with backoff and jitter, all on a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock as TaskClock

from corespond.daemon.clock import Clock
from corespond.daemon.gateways import GatewayMetrics, GatewayQueue
from corespond.daemon.pager import PageMessage, PagerError, Submitted


@dataclass
class ScriptedPager:
    """Each submit returns a Deferred the test fires."""

    name: str = "wctp-a"
    two_way: bool = True
    calls: list[tuple[PageMessage, Deferred[Submitted]]] = field(default_factory=list)

    def submit(self, message: PageMessage) -> Deferred[Submitted]:
        d: Deferred[Submitted] = Deferred()
        self.calls.append((message, d))
        return d


def page(n: int) -> PageMessage:
    return PageMessage(f"C{n}-1", f"att-{n}", "5550100", "C Welfare check")


def rig(**kwargs: object) -> tuple[GatewayQueue, ScriptedPager, TaskClock]:
    pager = ScriptedPager()
    clock = TaskClock()
    options: dict[str, object] = {"max_in_flight": 2, "retries": 3, "backoff_initial": 2.0,
                                  "backoff_max": 10.0, "random": lambda: 1.0}  # fmt: skip
    options.update(kwargs)
    return GatewayQueue(pager, clock=Clock(clock), **options), pager, clock  # type: ignore[arg-type]


def ok(name: str = "wctp-a", gid: str = "g") -> Submitted:
    return Submitted(name, gid)


def test_at_most_max_in_flight_reach_the_adapter_in_order() -> None:
    queue, pager, _ = rig()
    results = [queue.submit(page(n)) for n in range(5)]
    assert [m.attempt_id for m, _ in pager.calls] == ["att-0", "att-1"]
    assert queue.in_flight == 2 and queue.queued == 3
    pager.calls[1][1].callback(ok())
    assert [m.attempt_id for m, _ in pager.calls] == ["att-0", "att-1", "att-2"]
    assert results[1].result == ok()
    for _, d in pager.calls[:]:
        if not d.called:
            d.callback(ok())
    for _, d in pager.calls[:]:
        if not d.called:
            d.callback(ok())
    assert len(pager.calls) == 5
    assert all(r.called for r in results)
    assert queue.in_flight == 0 and queue.queued == 0


def test_retryable_failures_back_off_exponentially_with_jitter() -> None:
    draws = iter([0.0, 1.0, 0.5])
    queue, pager, clock = rig(random=lambda: next(draws))
    d = queue.submit(page(1))
    pager.calls[0][1].errback(PagerError("wctp-a", "timeout", retryable=True))
    assert len(pager.calls) == 1 and queue.in_flight == 0  # the slot is free during the wait
    clock.advance(0.99)  # retry 1: 2 s * (0.5 + 0.5 * 0.0) = 1 s
    assert len(pager.calls) == 1
    clock.advance(0.01)
    assert len(pager.calls) == 2 and pager.calls[1][0] == page(1)  # the same attempt id again
    pager.calls[1][1].errback(PagerError("wctp-a", "HTTP 503", retryable=True))
    clock.advance(3.99)  # retry 2: 4 s * 1.0
    assert len(pager.calls) == 2
    clock.advance(0.01)
    pager.calls[2][1].errback(PagerError("wctp-a", "HTTP 503", retryable=True))
    clock.advance(5.99)  # retry 3: min(10, 8) * 0.75 = 6 s
    assert len(pager.calls) == 3
    clock.advance(0.01)
    pager.calls[3][1].callback(ok())
    assert d.result == ok()
    assert not clock.getDelayedCalls()


def test_gives_up_after_the_configured_retries() -> None:
    queue, pager, clock = rig(retries=1)
    d = queue.submit(page(1))
    failures: list[PagerError] = []
    d.addErrback(lambda f: failures.append(f.value))
    pager.calls[0][1].errback(PagerError("wctp-a", "timeout", retryable=True))
    clock.advance(10)
    pager.calls[1][1].errback(PagerError("wctp-a", "timeout again", retryable=True))
    assert len(failures) == 1 and "timeout again" in str(failures[0])
    assert len(pager.calls) == 2 and queue.in_flight == 0


def test_a_permanent_refusal_is_not_retried() -> None:
    queue, pager, clock = rig()
    d = queue.submit(page(1))
    failures: list[PagerError] = []
    d.addErrback(lambda f: failures.append(f.value))
    pager.calls[0][1].errback(PagerError("wctp-a", "WCTP 403", retryable=False))
    clock.advance(100)
    assert len(pager.calls) == 1 and failures[0].retryable is False


def test_backoff_is_capped() -> None:
    queue, _, _ = rig(random=lambda: 1.0)
    assert [queue.backoff(n) for n in (1, 2, 3, 4, 10)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_cancelling_a_queued_or_backing_off_page_frees_everything() -> None:
    queue, pager, clock = rig(max_in_flight=1)
    first = queue.submit(page(1))
    waiting = queue.submit(page(2))
    waiting.cancel()
    assert queue.queued == 0
    waiting.addErrback(lambda f: f.trap(CancelledError))
    pager.calls[0][1].errback(PagerError("wctp-a", "timeout", retryable=True))
    first.cancel()
    first.addErrback(lambda f: f.trap(CancelledError))
    assert not clock.getDelayedCalls()
    assert queue.in_flight == 0 and len(pager.calls) == 1


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        rig(max_in_flight=0)
    with pytest.raises(ValueError):
        rig(retries=-1)


def test_metrics_count_outcomes_and_slots() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    queue, pager, clock = rig(metrics=metrics, max_in_flight=1, retries=1)
    first = queue.submit(page(1))
    queue.submit(page(2)).addErrback(lambda f: f.trap(PagerError))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"gateway": "wctp-a", **labels})

    assert value("corespond_gateway_in_flight") == 1 and value("corespond_gateway_queued") == 1
    pager.calls[0][1].errback(PagerError("wctp-a", "timeout", retryable=True))
    pager.calls[1][1].errback(PagerError("wctp-a", "WCTP 403", retryable=False))
    clock.advance(2.5)
    clock.advance(1.0)
    pager.calls[2][1].callback(ok())
    assert first.called
    assert value("corespond_page_attempts_total", outcome="retried") == 1
    assert value("corespond_page_attempts_total", outcome="refused") == 1
    assert value("corespond_page_attempts_total", outcome="accepted") == 1
    assert value("corespond_gateway_submit_seconds_count") == 1
    assert value("corespond_gateway_submit_seconds_sum") == 3.5
    assert value("corespond_gateway_in_flight") == 0 and value("corespond_gateway_queued") == 0


def test_counting_events_count_only_what_committed() -> None:
    from datetime import UTC, datetime

    from corespond.daemon.gateways import CountingEvents
    from corespond.daemon.pager import DeliveryReceipt, DeliveryState, Reply
    from tests.adapters.pager_events import RecordingEvents

    registry = CollectorRegistry()
    inner = RecordingEvents(fail_next=1)
    events = CountingEvents(inner, GatewayMetrics(registry))
    now = datetime(2026, 11, 27, tzinfo=UTC)
    events.reply(Reply("g", now, None)).addErrback(lambda f: None)
    events.reply(Reply("g", now, None))
    events.receipt(DeliveryReceipt("g", "m", DeliveryState.SENT, now))
    get = registry.get_sample_value
    assert get("corespond_gateway_inbound_total", {"gateway": "g", "kind": "reply"}) == 1
    assert get("corespond_gateway_inbound_total", {"gateway": "g", "kind": "receipt"}) == 1
