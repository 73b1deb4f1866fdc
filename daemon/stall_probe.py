"""Where the reactor was when it was late: its stack, sampled by a watchdog thread.

For benchmarks and diagnosis only. With ``CORESPOND_STALL_PROBE=FILE`` in the environment,
the entry point starts a :class:`StallProbe`: a heartbeat on the reactor every ``beat``
seconds, and a daemon thread that wakes as often and, whenever the last heartbeat is more
than ``late`` seconds old, appends one JSON line to FILE: when (``time.perf_counter()``
seconds, CLOCK_MONOTONIC, the clock the store's trace and the GC probe use), how late, and
the reactor thread's innermost frames. A stall of 50 ms gives about 20 lines, the first
ones showing what began it.

This is how stop 15 found the two longest stalls of a page's tail (the collector policy's
``gc.get_freeze_count()`` and the bench's own garbage collections): when the reactor holds
the GIL, the watchdog gets it back within Python's switch interval and still sees the frame
that holds it; when the reactor is idle and work still does not arrive, no line is written,
which says the wait is elsewhere. Without the variable nothing runs.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

from twisted.internet.task import LoopingCall

STALL_PROBE_ENV = "CORESPOND_STALL_PROBE"


class StallProbe:
    """The reactor's heartbeat and the watchdog that samples its stack (see the module)."""

    def __init__(
        self,
        reactor: Any,
        path: str,
        *,
        beat: float = 0.002,
        late: float = 0.010,
        depth: int = 16,
        reactor_thread: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.path = path
        self.beat = beat
        self.late = late
        self.depth = depth
        # The thread that runs the reactor: the one that builds the probe, at the entry point.
        self.reactor_thread = reactor_thread or threading.get_ident()
        self.last_beat = time.perf_counter()
        self.samples = 0
        self._heart = LoopingCall(self._beat)
        self._heart.clock = reactor
        self._stopped = threading.Event()
        self._watchdog = threading.Thread(
            target=self._watch, name="corespond-stall-probe", daemon=True
        )

    @classmethod
    def from_environment(
        cls, reactor: Any, environ: Mapping[str, str] = os.environ
    ) -> StallProbe | None:
        path = environ.get(STALL_PROBE_ENV)
        return cls(reactor, path) if path else None

    def start(self) -> None:
        """From the reactor thread, once it runs (``reactor.callWhenRunning``)."""
        self.start_heartbeat()
        self._watchdog.start()

    def start_heartbeat(self) -> None:
        self._heart.start(self.beat)

    def stop(self) -> None:
        if self._heart.running:
            self._heart.stop()
        self._stopped.set()

    def _beat(self) -> None:
        self.last_beat = time.perf_counter()

    def _watch(self) -> None:
        while not self._stopped.wait(self.beat):
            self.check(time.perf_counter())

    def check(self, now: float) -> bool:
        """If the reactor's last heartbeat is older than ``late`` at ``now``: one line with
        its stack (True). Called by the watchdog thread; tests call it directly."""
        late = now - self.last_beat
        if late <= self.late:
            return False
        frame = sys._current_frames().get(self.reactor_thread)
        stack = traceback.format_stack(frame)[-self.depth :] if frame is not None else []
        line = {"at": round(now, 6), "late_ms": round(late * 1e3, 3), "stack": stack}
        with open(self.path, "a") as out:
            out.write(json.dumps(line) + "\n")
        self.samples += 1
        return True
