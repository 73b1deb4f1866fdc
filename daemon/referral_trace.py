"""Where the reactor's time goes to referral work, for the page-latency benchmark.

With ``CORESPOND_STORE_TRACE`` set (the store's trace, see daemon/store/writer.py), the
referral side records every stretch of reactor time it spends in its own callbacks: results of
its writer transactions, builds handed back by the builder processes, ACKs, its timers. Each is
a (start, end) pair of ``time.perf_counter()`` seconds - the system's monotonic clock, so a
benchmark in another process can lay them beside its own timestamps. Stretches nested in one
already being timed count once. They are written, one JSON line each, to the trace's path with
``.referrals`` appended when the worker stops (bench/referrals.py reads them).

Without the variable nothing is wrapped: :meth:`ReactorSpans.relay` returns the Deferred it was
given and :meth:`ReactorSpans.timed` the callable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from corespond.daemon.store.writer import TRACE_ENV

T = TypeVar("T")

SUFFIX = ".referrals"


class ReactorSpans:
    """Reactor time spent in referral callbacks, kept in memory until :meth:`close`."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.spans: list[tuple[float, float, float, str]] = []  # start, end, CPU, what
        self._depth = 0

    @classmethod
    def from_environment(cls) -> ReactorSpans:
        trace = os.environ.get(TRACE_ENV)
        return cls(trace + SUFFIX if trace else None)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def run(self, fn: Callable[..., T], *args: Any, label: str = "") -> T:
        """``fn(*args)`` on the reactor, timed as ``label`` (unless a timed stretch already
        runs: it holds this one)."""
        if self._depth:
            return fn(*args)
        self._depth += 1
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args)
        finally:
            self.spans.append((start, time.perf_counter(), time.thread_time() - cpu, label))
            self._depth -= 1

    def timed(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn``, timed whenever it runs (a timer's or a loop's callable)."""
        if self.path is None:
            return fn

        label = getattr(fn, "__qualname__", "timer")

        def timed(*args: Any) -> T:
            return self.run(fn, *args, label=label)

        return timed

    def relay(self, d: Deferred[T], label: str) -> Deferred[T]:
        """A Deferred that fires with ``d``'s result, its callbacks (everything the referral
        side does with the result, up to its next wait) timed as ``label``."""
        if self.path is None:
            return d
        out: Deferred[T] = Deferred()

        def fire(result: T | Failure) -> None:
            if isinstance(result, Failure):
                self.run(out.errback, result, label=label)
            else:
                self.run(out.callback, result, label=label)

        d.addBoth(fire)
        return out

    def close(self) -> None:
        """Write the spans (once), if tracing."""
        if self.path is None or not self.spans:
            return
        with open(self.path, "w") as out:
            out.writelines(
                f'{{"start":{s:.6f},"end":{e:.6f},"cpu":{c:.6f},"what":"{what}"}}\n'
                for s, e, c, what in self.spans
            )
        self.spans = []
