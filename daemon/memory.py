"""The cyclic garbage collector: what it costs a warm daemon, and when it may run.

A full (generation 2) collection walks every tracked container object that is not frozen and
stops every thread while it does (the GIL): over a warm daemon's heap that was 100+ ms, with
every snapshot and page waiting (stop 11's trace). Two parts:

- :class:`GcProbe`, for benchmarks: with ``CORESPOND_GC_PROBE=FILE`` in the environment, the
  entry point records every collection (generation, start, duration, objects collected, thread)
  and censuses of the tracked objects, and writes them to FILE as JSON lines when it stops.
  :func:`pause_summary` turns a window of that file into the figures the benches print.
- :class:`CollectorPolicy`: when the collector may run. The entry point builds it; the app
  tells it when start-up and reloads are done (:meth:`CollectorPolicy.settled`).
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from corespond.daemon.clock import Clock

log = structlog.get_logger(__name__)

GC_PROBE_ENV = "CORESPOND_GC_PROBE"
# Set too (to anything), the probe keeps what the collector frees (gc.DEBUG_SAVEALL) and its
# censuses count it by type: which objects are made in reference cycles. Diagnosis only: the
# garbage is kept until the next census.
GC_GARBAGE_ENV = "CORESPOND_GC_PROBE_GARBAGE"
SLOW_PAUSE_MS = 5.0  # a pause above this shows in a 20 ms page p99


# --- the probe ----------------------------------------------------------------------------------


class PauseRecorder:
    """Appends a JSON line to ``lines`` for every collection of this process (``gc.callbacks``)
    until :meth:`remove`: generation, start, duration, the collecting thread's CPU time (what
    the collection cost, whatever else ran on the machine), objects freed, thread.

    Times are ``time.perf_counter()`` seconds: CLOCK_MONOTONIC on Linux, the same clock a bench
    in another process reads, so it can keep the pauses inside its own measuring window.
    """

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self._started = 0.0
        self._cpu = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        # Collections never overlap (they hold the GIL), so one start is pending at a time.
        now, cpu = time.perf_counter(), time.thread_time()
        if phase == "start":
            self._started, self._cpu = now, cpu
            return
        self.lines.append(
            f'{{"gc":{info["generation"]},"at":{self._started:.6f},'
            f'"ms":{(now - self._started) * 1e3:.3f},"cpu_ms":{(cpu - self._cpu) * 1e3:.3f},'
            f'"collected":{info["collected"]},'
            f'"thread":{json.dumps(threading.current_thread().name)}}}'
        )

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


class GcProbe:
    """Records every collection (:class:`PauseRecorder`) and censuses until :meth:`close`,
    then writes them to ``path``."""

    def __init__(self, path: str, *, keep_garbage: bool = False) -> None:
        self.path = path
        self.lines: list[str] = []
        self.keep_garbage = keep_garbage
        if keep_garbage:
            gc.set_debug(gc.DEBUG_SAVEALL)
        self.pauses = PauseRecorder(self.lines)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> GcProbe | None:
        path = environ.get(GC_PROBE_ENV)
        return cls(path, keep_garbage=bool(environ.get(GC_GARBAGE_ENV))) if path else None

    def census(self, label: str, *, owners: bool = False, **extra: Any) -> None:
        """Note what the collector tracks now (see :func:`take_census`)."""
        found = take_census(owners=owners)
        record = {"census": label, "at": time.perf_counter(), **extra, **found}
        if self.keep_garbage:
            record["garbage"] = dict(Counter(map(_garbage_name, gc.garbage)).most_common(60))
            gc.garbage.clear()
        self.lines.append(json.dumps(record))

    def close(self) -> None:
        self.pauses.remove()
        if self.keep_garbage:
            gc.set_debug(0)
            gc.garbage.clear()
        with open(self.path, "w") as out:
            out.write("\n".join(self.lines) + "\n")


_PLAIN = frozenset({"dict", "list", "tuple", "set", "frozenset", "cell", "deque"})


def type_name(obj: object) -> str:
    cls = type(obj)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _garbage_name(obj: object) -> str:
    """Classes made at run time are named by what they are, not as ``type``."""
    if isinstance(obj, type):
        return f"class {obj.__module__}.{obj.__qualname__}"
    if type(obj).__name__ == "function":
        return _owner_name(obj)  # which closure
    return type_name(obj)


def _owner_name(obj: object) -> str:
    name = type_name(obj)
    if name == "module":
        return f"module {getattr(obj, '__name__', '?')}"
    if name == "function":
        return f"function {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"
    return name


def owners_of(samples: list[object], depth: int = 4) -> Counter[str]:
    """For each sampled plain container, the nearest holder that is not one (a class instance,
    a module, a function) up to ``depth`` hops: what keeps it alive. Unfreezes the heap, since
    the holder is often frozen (a cache built at start-up): for a census as the process ends."""
    gc.unfreeze()
    heap = gc.get_objects()
    skip = {id(heap), id(samples)}
    owner: list[str | None] = [None] * len(samples)
    frontier = {id(o): i for i, o in enumerate(samples)}
    for _ in range(depth):
        following: dict[int, int] = {}
        for holder in heap:
            if id(holder) in skip or type(holder).__name__ == "frame":
                continue
            for ref in gc.get_referents(holder):
                i = frontier.get(id(ref))
                if i is None or owner[i] is not None:
                    continue
                if type(holder).__name__ in _PLAIN:
                    following.setdefault(id(holder), i)
                else:
                    owner[i] = _owner_name(holder)
        frontier = {k: i for k, i in following.items() if owner[i] is None}
        if not frontier:
            break
    del heap
    return Counter(o or "(unreached)" for o in owner)


def take_census(*, owners: bool = False, sample: int = 2000, top: int = 40) -> dict[str, Any]:
    """Tracked objects that are not frozen, by type (what a full collection walks); with
    ``owners``, who holds a sample of the plain containers among them (see :func:`owners_of`).
    Walks the heap: for benchmarks and diagnosis, never on a hot path."""
    objects = gc.get_objects()
    by_type = Counter(type_name(o) for o in objects)
    out: dict[str, Any] = {
        "tracked": len(objects),
        "frozen": gc.get_freeze_count(),
        "types": dict(by_type.most_common(top)),
    }
    if owners:
        plain = [o for o in objects if type(o).__name__ in _PLAIN]
        picked = plain[:: max(1, len(plain) // sample)]
        scale = len(plain) / max(1, len(picked))
        del objects, plain
        out["owners"] = {k: round(v * scale) for k, v in owners_of(picked).most_common(top)}
    return out


@dataclass(frozen=True, slots=True)
class PauseSummary:
    collections: tuple[int, int, int]  # per generation
    max_ms: float
    p99_ms: float
    slow: int  # pauses above SLOW_PAUSE_MS
    total_ms: float
    collected: int  # objects freed: cyclic garbage that reference counting could not free
    max_cpu_ms: float  # the same in the collecting thread's CPU time: other processes and
    slow_cpu: int  # threads taking the core in the middle of a collection do not count

    def line(self) -> str:
        g0, g1, g2 = self.collections
        return (
            f"collections gen0/1/2 {g0}/{g1}/{g2}, pause max {self.max_ms:.1f} ms "
            f"(CPU {self.max_cpu_ms:.1f}), p99 {self.p99_ms:.2f} ms, "
            f"> {SLOW_PAUSE_MS:.0f} ms: {self.slow} (CPU: {self.slow_cpu}), "
            f"total {self.total_ms:.0f} ms, {self.collected} objects collected"
        )


def read_probe(path: str) -> list[dict[str, Any]]:
    with open(path) as lines:
        return [json.loads(line) for line in lines if line.strip()]


def pause_summary(
    records: Iterable[Mapping[str, Any]], since: float = 0.0, until: float = float("inf")
) -> PauseSummary:
    """The collections that started inside [since, until] (perf_counter seconds)."""
    pauses = [r for r in records if "gc" in r and since <= r["at"] <= until]
    counts = [0, 0, 0]
    for p in pauses:
        counts[int(p["gc"])] += 1
    ms = sorted(float(p["ms"]) for p in pauses)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else 0.0
    return PauseSummary(
        (counts[0], counts[1], counts[2]),
        ms[-1] if ms else 0.0,
        p99,
        sum(1 for m in ms if m > SLOW_PAUSE_MS),
        sum(ms),
        sum(int(p["collected"]) for p in pauses),
        max((float(p.get("cpu_ms", 0)) for p in pauses), default=0.0),
        sum(1 for p in pauses if float(p.get("cpu_ms", 0)) > SLOW_PAUSE_MS),
    )


# --- the policy ---------------------------------------------------------------------------------


class Collector(Protocol):
    """The part of :mod:`gc` the policy drives (tests give it a recording stand-in).

    Not ``gc.get_freeze_count()``: it walks the whole permanent generation, one cache miss an
    object, 26 ms over a warm daemon's 270,000 frozen objects. Called twice a freeze, it was
    the longest stall of the daemon under load (a warm freeze, 5 s after start, held every
    snapshot and page for 30-50 ms in bench/dispatch.py). The policy counts what it freezes
    instead."""

    def collect(self, generation: int = 2) -> int: ...
    def freeze(self) -> None: ...
    def unfreeze(self) -> None: ...
    def get_objects(self, generation: int | None = None) -> list[Any]: ...


@dataclass(frozen=True, slots=True)
class CollectorSettings:
    # Seconds after start-up at which what has been built since is frozen too: the caches that
    # fill while the daemon warms (SQLAlchemy's compiled statements, the parsers' bounded LRU
    # caches, roster and location state). Each refreeze first collects what is not frozen,
    # a pause as long as what was built since the last one, so they come soon and then rarely.
    warm_freezes: tuple[float, ...] = (5.0, 30.0, 180.0, 900.0)
    # Then, every check_seconds, the long-lived objects not frozen are counted; above
    # young_limit (a full collection over 30,000 objects is about 10 ms on this machine) they
    # are collected and frozen.
    check_seconds: float = 300.0
    young_limit: int = 30_000
    # Freezing keeps what becomes cyclic garbage after it (a frozen object freed by its
    # reference count is freed as ever). When the frozen population has grown by this share
    # since start-up, the next freeze unfreezes first, so one full collection reclaims it.
    frozen_growth: float = 0.5


class CollectorPolicy:
    """When the cyclic collector may walk the long-lived heap: not while snapshots and pages
    wait on it.

    What start-up builds lives as long as the process, and so does most of what the first
    minutes build; frozen (``gc.freeze``), a full collection no longer walks it. The policy
    freezes after start-up, after each reload (a reload replaces rules, roster and config: it
    unfreezes first, so the replaced objects' cycles are reclaimed in that one collection),
    at the ``warm_freezes`` times, and when the unfrozen long-lived population passes
    ``young_limit``. The generation thresholds stay Python's: a larger generation 0 makes
    each young collection walk more live objects (gen0's count is net of objects freed).
    """

    def __init__(
        self,
        clock: Clock,
        collector: Collector = gc,
        settings: CollectorSettings | None = None,
    ) -> None:
        self.clock = clock
        self.gc = collector
        self.settings = settings or CollectorSettings()
        self.baseline = 0  # frozen objects after the last freeze that unfroze first
        # Objects frozen since the last unfreeze, counted as they were frozen (some have been
        # freed since: the count is how much was frozen, the measure of growth that matters).
        self.frozen = 0
        self.freezes: list[str] = []  # reasons, in order (for tests and the probe)
        self._timers: list[Any] = []
        self._check: Any = None

    def started(self) -> None:
        """Start-up is done: freeze what it built, and plan the warm-up freezes."""
        self._freeze("start", compact=True)
        for at in self.settings.warm_freezes:
            self._timers.append(self.clock.call_later(at, self._freeze, "warm", False))
        self._check = self.clock.looping_call(self.settings.check_seconds, self._look)

    def reloaded(self) -> None:
        """A reload replaced rules, roster or config: reclaim the old, freeze the new."""
        self._freeze("reload", compact=True)

    def stop(self) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        if self._check is not None and self._check.running:
            self._check.stop()
        self._check = None

    def _look(self) -> None:
        if len(self.gc.get_objects(2)) > self.settings.young_limit:
            self._freeze("grown", compact=False)

    def _freeze(self, reason: str, compact: bool) -> None:
        started = time.perf_counter()
        if not compact and self.baseline:
            compact = self.frozen > self.baseline * (1 + self.settings.frozen_growth)
            reason = f"{reason}+compact" if compact else reason
        if compact:
            self.gc.unfreeze()
            self.frozen = 0
        self.gc.collect()
        # What the collection kept, all of it about to be frozen: get_objects() lists the
        # three generations, never the permanent one, so this walks only what is not frozen.
        self.frozen += len(self.gc.get_objects())
        self.gc.freeze()
        if compact:
            self.baseline = self.frozen
        self.freezes.append(reason)
        log.info(
            "gc.frozen", reason=reason, count=self.frozen,
            duration_ms=round((time.perf_counter() - started) * 1e3, 1),
        )  # fmt: skip
