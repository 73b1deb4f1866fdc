"""The only way code asks for the time or schedules work.

Wraps an ``IReactorTime`` so that tests drive time with ``twisted.internet.task.Clock``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall


class Clock:
    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor

    def seconds(self) -> float:
        """Seconds since the epoch, as the reactor sees them."""
        return self._reactor.seconds()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._reactor.seconds(), UTC)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> IDelayedCall:
        return self._reactor.callLater(delay, fn, *args)

    def looping_call(
        self, interval: float, fn: Callable[[], Any], *, now: bool = False
    ) -> LoopingCall:
        call = LoopingCall(fn)
        call.clock = self._reactor
        call.start(interval, now=now)
        return call
