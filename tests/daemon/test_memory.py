"""The collector policy's decisions (driven by a fake clock over a recording stand-in for the
``gc`` module: the real one would freeze the test process's heap), its wiring into the app's
start, reload and stop, and the probe's figures over the real collector."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock as FakeReactor

from corespond.daemon.app import Corespond
from corespond.daemon.clock import Clock
from corespond.daemon.config import load_config
from corespond.daemon.memory import (
    GC_PROBE_ENV,
    SLOW_PAUSE_MS,
    CollectorPolicy,
    CollectorSettings,
    GcProbe,
    owners_of,
    pause_summary,
    read_probe,
    take_census,
)
from tests.browser import free_port
from tests.daemon.paging_rig import Turner, write_daemon_config


class RecordingCollector:
    """Counts objects as the collector would: ``young`` long-lived objects not frozen (what
    ``get_objects(2)`` lists), ``frozen`` in the permanent generation; records each call."""

    def __init__(self, young: int = 0, frozen: int = 0) -> None:
        self.young = young
        self.frozen = frozen
        self.calls: list[str] = []

    def collect(self, generation: int = 2) -> int:
        self.calls.append(f"collect({generation})")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")
        self.frozen, self.young = self.frozen + self.young, 0

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")
        self.frozen, self.young = 0, self.young + self.frozen

    # No get_freeze_count: it walks the whole frozen heap (26 ms at 270,000 objects), and a
    # policy that called it would fail these tests with an AttributeError.

    def get_objects(self, generation: int | None = None) -> list[Any]:
        return [None] * self.young


SETTINGS = CollectorSettings(
    warm_freezes=(5.0, 30.0), check_seconds=60.0, young_limit=1000, frozen_growth=0.5
)


def policy(young: int = 0) -> tuple[CollectorPolicy, RecordingCollector, FakeReactor]:
    reactor = FakeReactor()
    collector = RecordingCollector(young=young)
    return CollectorPolicy(Clock(reactor), collector, SETTINGS), collector, reactor


def test_start_up_is_collected_then_frozen_whole() -> None:
    p, gc_, _ = policy(young=150_000)
    p.started()
    assert gc_.calls == ["unfreeze", "collect(2)", "freeze"]
    assert (gc_.frozen, gc_.young) == (150_000, 0)
    assert p.baseline == 150_000
    p.stop()


def test_what_warm_up_builds_is_frozen_at_the_warm_times_only() -> None:
    p, gc_, reactor = policy(young=100_000)
    p.started()
    gc_.calls.clear()
    gc_.young = 800  # caches filling after start-up
    reactor.advance(4.9)
    assert gc_.calls == []
    reactor.advance(0.1)
    assert gc_.calls == ["collect(2)", "freeze"]  # not unfrozen: only the new objects walked
    assert (gc_.frozen, gc_.young) == (100_800, 0)
    gc_.young = 300
    reactor.advance(25)
    assert p.freezes == ["start", "warm", "warm"]
    assert gc_.frozen == p.frozen == 101_100
    reactor.advance(30)  # past the last warm freeze, before the first check
    assert p.freezes == ["start", "warm", "warm"]
    p.stop()


def test_a_check_freezes_only_when_the_unfrozen_long_lived_pass_the_limit() -> None:
    p, gc_, reactor = policy(young=10_000)
    p.started()
    reactor.advance(30)  # the warm freezes
    gc_.young = 1000  # at the limit, not past it
    reactor.advance(30)  # the check at 60 s
    assert p.freezes == ["start", "warm", "warm"]
    gc_.young = 1001
    reactor.advance(60)
    assert p.freezes == ["start", "warm", "warm", "grown"]
    assert gc_.young == 0
    p.stop()


def test_a_reload_unfreezes_so_one_collection_reclaims_what_it_replaced() -> None:
    p, gc_, _ = policy(young=10_000)
    p.started()
    gc_.calls.clear()
    gc_.young = 2_000  # the new rule set and roster
    p.reloaded()
    assert gc_.calls == ["unfreeze", "collect(2)", "freeze"]
    assert p.freezes == ["start", "reload"]
    assert p.baseline == 12_000  # the next growth is measured from here
    p.stop()


def test_freezing_past_the_growth_bound_unfreezes_first() -> None:
    p, gc_, reactor = policy(young=10_000)
    p.started()
    gc_.young = 4_000
    reactor.advance(5)  # frozen 14,000: within 10,000 * 1.5
    gc_.young = 2_000
    gc_.calls.clear()
    reactor.advance(25)  # was 14,000 frozen: within; now 16,000
    assert p.freezes[-1] == "warm"
    gc_.young = 2_000
    reactor.advance(30)  # the check: 2,000 > 1,000 and frozen 16,000 > 15,000
    assert p.freezes[-1] == "grown+compact"
    assert gc_.calls[-3:] == ["unfreeze", "collect(2)", "freeze"]
    assert p.frozen == p.baseline == gc_.frozen == 18_000  # counted as frozen, not walked
    assert p.baseline == 18_000
    p.stop()


def test_stop_leaves_no_timer_behind() -> None:
    p, _, reactor = policy()
    p.started()
    assert reactor.getDelayedCalls()
    p.stop()
    assert reactor.getDelayedCalls() == []


# --- wiring ---------------------------------------------------------------------------------


@pytest.fixture(name="turner")
def turner_fixture() -> Iterator[Turner]:
    turner = Turner()
    try:
        yield turner
    finally:
        turner.close()


def test_the_app_freezes_after_start_up_and_reloads_and_stops_the_policy(
    tmp_path: Path, turner: Turner
) -> None:
    config = write_daemon_config(
        tmp_path, store_url=f"sqlite:///{tmp_path / 'store.db'}",
        wctp_url="http://127.0.0.1:9/wctp", sms_url="http://127.0.0.1:9", web_port=free_port(),
    )  # fmt: skip
    collector = RecordingCollector()
    memory = CollectorPolicy(Clock(turner.reactor), collector, SETTINGS)
    app = Corespond(load_config(config), turner.reactor, memory=memory)
    turner.until(ensureDeferred(app.start()))
    assert memory.freezes == ["start"]
    assert turner.until(ensureDeferred(app.reload()))
    assert memory.freezes == ["start", "reload"]
    turner.until(ensureDeferred(app.stop()))
    assert memory._check is None and memory._timers == []
    turner.advance(60)
    assert memory.freezes == ["start", "reload"]  # no warm freeze after stop


# --- the probe, over the real collector --------------------------------------------------------


class Knot:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_the_probe_records_each_collection_and_writes_it_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(GC_PROBE_ENV, str(tmp_path / "gc.jsonl"))
    probe = GcProbe.from_environment()
    assert probe is not None
    try:
        for _ in range(50):
            Knot()
        gc.collect()
        probe.census("after")
    finally:
        probe.close()
    assert probe.pauses._callback not in gc.callbacks
    records = read_probe(str(tmp_path / "gc.jsonl"))
    full = [r for r in records if r.get("gc") == 2]
    assert full and max(r["collected"] for r in full) >= 50
    assert {"thread", "ms", "cpu_ms", "at"} <= set(full[0])
    census = [r for r in records if "census" in r]
    assert census[0]["census"] == "after" and census[0]["tracked"] > 0


def test_no_probe_without_the_environment_variable() -> None:
    assert GcProbe.from_environment({}) is None


def test_the_pause_summary_keeps_the_window_and_counts_slow_pauses() -> None:
    records: list[dict[str, Any]] = [
        {"gc": 0, "at": 1.0, "ms": 0.4, "collected": 0},
        {"gc": 0, "at": 2.0, "ms": 0.6, "collected": 3},
        {"gc": 1, "at": 3.0, "ms": 2.0, "collected": 0},
        {"gc": 2, "at": 4.0, "ms": SLOW_PAUSE_MS + 1, "cpu_ms": 1.0, "collected": 9},
        {"gc": 2, "at": 9.0, "ms": 120.0, "collected": 9},  # after the window
        {"census": "warm", "at": 5.0, "tracked": 1},
    ]
    s = pause_summary(records, 1.5, 8.0)
    assert s.collections == (1, 1, 1)
    assert s.max_ms == SLOW_PAUSE_MS + 1
    assert s.slow == 1 and s.slow_cpu == 0 and s.max_cpu_ms == 1.0
    assert s.collected == 12
    assert s.total_ms == pytest.approx(0.6 + 2.0 + SLOW_PAUSE_MS + 1)
    assert "gen0/1/2 1/1/1" in s.line()
    assert pause_summary([]).collections == (0, 0, 0)


class Holder:
    def __init__(self) -> None:
        self.items: list[Any] = [[n] for n in range(5)]


def test_the_census_counts_types_and_finds_who_holds_plain_containers() -> None:
    holders = [Holder() for _ in range(300)]
    census = take_census(top=10_000)
    assert census["types"][f"{__name__}.Holder"] >= 300
    assert json.dumps(census)  # written as a JSON line
    owners = owners_of([h.items for h in holders[:20]] + [holders[0].items[0]], depth=2)
    assert owners[f"{__name__}.Holder"] == 21  # the inner list through the outer one


def test_keeping_garbage_names_what_was_made_in_cycles(tmp_path: Path) -> None:
    probe = GcProbe(str(tmp_path / "gc.jsonl"), keep_garbage=True)
    try:
        for _ in range(40):
            Knot()
        gc.collect()
        probe.census("garbage")
    finally:
        probe.close()
    assert gc.get_debug() == 0 and gc.garbage == []
    (census,) = [r for r in read_probe(str(tmp_path / "gc.jsonl")) if "census" in r]
    assert census["garbage"][f"{__name__}.Knot"] >= 40
