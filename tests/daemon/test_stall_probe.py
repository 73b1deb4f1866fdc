"""The stall probe writes the reactor thread's stack when its heartbeat is late, and only
then (driven with explicit times and a fake reactor: no thread, no sleep)."""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet.task import Clock as FakeReactor

from corespond.daemon.stall_probe import STALL_PROBE_ENV, StallProbe


def test_a_late_reactor_is_written_with_the_frame_that_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "stalls.jsonl"
    probe = StallProbe(FakeReactor(), str(path))  # this thread plays the reactor's
    probe.last_beat = 100.0
    assert not probe.check(100.009)  # under the bound: not late
    assert not path.exists()
    assert probe.check(100.050)
    [line] = [json.loads(text) for text in path.read_text().splitlines()]
    assert line["at"] == 100.05 and line["late_ms"] == 50.0
    # Here the "reactor" thread is the one checking: its stack runs through this test.
    assert any("test_a_late_reactor_is_written_with" in frame for frame in line["stack"])
    assert probe.samples == 1


def test_the_heartbeat_keeps_the_reactor_on_time(tmp_path: Path) -> None:
    reactor = FakeReactor()
    probe = StallProbe(reactor, str(tmp_path / "stalls.jsonl"), beat=0.002)
    probe.start_heartbeat()
    probe.last_beat = 0.0
    reactor.advance(0.002)
    assert probe.last_beat > 0.0  # the beat ran and took the time
    probe.stop()
    assert not reactor.getDelayedCalls()


def test_it_runs_only_with_its_variable(tmp_path: Path) -> None:
    assert StallProbe.from_environment(FakeReactor(), {}) is None
    probe = StallProbe.from_environment(FakeReactor(), {STALL_PROBE_ENV: str(tmp_path / "s")})
    assert probe is not None and probe.path == str(tmp_path / "s")
