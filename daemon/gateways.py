"""Configured pager gateways: each adapter wrapped in its own in-flight cap and retry policy.

:class:`GatewayQueue` is what the escalation engine holds for every gateway named in the
``gateways:`` section. It lets at most ``max_in_flight`` submissions reach the adapter at once
(the rest wait their turn, in order), and retries a :class:`PagerError` marked ``retryable``
(timeout, refused, 5xx, WCTP 5xx/6xx) up to ``retries`` times with exponential backoff and
jitter, on the injected clock and random source. A permanent refusal is passed on at once: the
escalation moves to the clinician's next endpoint.

Retries stay inside one claimed attempt row of the engine: every try sends the same
``attempt_id`` (gateways that take a client message id drop repeats), and the engine marks the
row sent only when ``submit`` fires. A daemon killed during a backoff leaves the row claimed and
unsent, and the engine's claim expiry sends it again after the restart. The wait for a slot
does not count against the adapter's own timeout, and a slot is given back during a backoff so
one failing page does not hold up the others.

:func:`build_gateways` turns the typed ``gateways:`` configuration into these queues.
"""

from __future__ import annotations

import random as random_module
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from twisted.internet.defer import Deferred

from corespond.daemon.clock import Clock
from corespond.daemon.pager import PageMessage, Pager, PagerError, Submitted

log = structlog.get_logger(__name__)


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
        self.in_flight = 0
        self._waiting: deque[Deferred[None]] = deque()

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
                    raise
            else:
                if attempt > 1:
                    log.info("page.gateway.recovered", transport=self.name,
                             request_id=message.attempt_id, attempt=attempt)  # fmt: skip
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
        return d

    def _abandon_wait(self, d: Deferred[Any]) -> None:
        if d in self._waiting:
            self._waiting.remove(d)

    def _release(self) -> None:
        if self._waiting:
            self._waiting.popleft().callback(None)  # the slot passes on; in_flight unchanged
        else:
            self.in_flight -= 1

    def _sleep(self, seconds: float) -> Deferred[None]:
        def cancel(_: Deferred[None]) -> None:
            if call.active():
                call.cancel()

        d: Deferred[None] = Deferred(cancel)
        call = self.clock.call_later(seconds, d.callback, None)
        return d
