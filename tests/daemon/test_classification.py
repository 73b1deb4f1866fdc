"""The daemon's rule set: load, last known good, reload all or nothing, and the watcher.

Units run their blocking work inline (``in_thread`` below); the process tests at the end run
the real daemon with real signals and real threads.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.task import Clock as TaskClock

from corespond.daemon.classification import (
    LastGoodRules,
    LoadedRules,
    RuleKeeper,
    RulesMetrics,
    RulesUnavailable,
    RulesWatcher,
    build_rules,
    fingerprint,
)
from corespond.daemon.clock import Clock
from corespond.daemon.config import RulesConfig
from corespond.rules.loader import load_ruleset
from corespond.rules.samples import incident_snapshot
from tests.daemon.daemon_process import DaemonProcess

NOW = datetime(2026, 11, 26, 20, 0, tzinfo=UTC)

# Our (invented) program sends a clinician with an officer to every welfare check.
WELFARE_OVERRIDE = """\
engine: 1
rules:
  - id: bh.apco.welfare
    description: welfare checks go with an officer here
    status: stable
    category: welfare
    effect: include
    response: co-response
    weight: 0.6
    when: {apco_type: WELFARE}
    samples:
      positive: [{apco_type: WELFARE, expect: {response: co-response}}]
      negative: [{apco_type: NOISE}]
"""
BROKEN = """\
engine: 1
rules:
  - id: site.broken
    category: welfare
    effect: include
    response: sometimes
    when: {apco_type: WELFARE}
"""


def in_thread(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Runs the work at once: these tests are about what happens, not where."""
    return maybeDeferred(fn, *args)


def run(coro: Any) -> Any:
    """The result of a coroutine that completes without the reactor (inline work)."""
    results: list[Any] = []
    ensureDeferred(coro).addBoth(results.append)
    [result] = results
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def welfare_response(classifier: Any) -> str:
    return str(classifier.classify(incident_snapshot({"apco_type": "WELFARE"})).response.value)


class Daemon:
    """The parts of the container the rules touch: a pipeline slot, metrics, a clock."""

    def __init__(self, tmp: Path, site: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        self.installed: list[Any] = []
        self.clock = TaskClock()
        self.settings = RulesConfig(site_dir=site or tmp / "rules.d", watch_interval_seconds=5)
        self.keeper = RuleKeeper(
            settings=self.settings,
            last_good=LastGoodRules(tmp / "state" / "rules"),
            in_thread=in_thread,
            clock=Clock(self.clock),
            metrics=RulesMetrics(self.registry),
            install=self.installed.append,
        )

    def metric(self, name: str) -> float | None:
        return self.registry.get_sample_value(name)


# --- building and the last known good set -------------------------------------------------------


def test_a_missing_site_directory_means_vendor_rules_only(tmp_path: Path) -> None:
    loaded = build_rules(RulesConfig(site_dir=tmp_path / "nowhere"))
    assert loaded.version == load_ruleset().version
    assert loaded.site_dir is None and loaded.site_files == {}


def test_site_rules_are_built_with_their_file_contents(tmp_path: Path) -> None:
    site = tmp_path / "rules.d"
    write(site / "50-welfare.yaml", WELFARE_OVERRIDE)
    write(site / "README.txt", "not a rule file")
    loaded = build_rules(RulesConfig(site_dir=site))
    assert loaded.version != load_ruleset().version
    assert welfare_response(loaded.classifier) == "co-response"
    assert loaded.site_files == {"50-welfare.yaml": WELFARE_OVERRIDE.encode()}


def test_last_good_is_saved_atomically_and_loads_again(tmp_path: Path) -> None:
    site = tmp_path / "rules.d"
    write(site / "50-welfare.yaml", WELFARE_OVERRIDE)
    write(site / "60-codes.tsv", "local\tapco\n4M\tEDP\n")
    store = LastGoodRules(tmp_path / "state" / "rules")
    assert store.saved() is None and store.load() is None
    first = build_rules(RulesConfig(site_dir=site, timezone="America/Denver"))
    assert store.save(first, "America/Denver", NOW)
    assert not store.save(first, "America/Denver", NOW)  # same version: nothing to write
    assert store.link.is_symlink()
    saved = store.saved()
    assert saved is not None and saved.version == first.version
    assert saved.files == ("50-welfare.yaml", "60-codes.tsv")
    manifest = json.loads((store.link / "ruleset.json").read_text())
    assert manifest["timezone"] == "America/Denver" and manifest["site_dir"] == str(site)

    # The site files break; the saved copy still builds the same rule set.
    write(site / "50-welfare.yaml", BROKEN)
    kept = store.load()
    assert kept is not None
    loaded, _ = kept
    assert loaded.version == first.version
    assert welfare_response(loaded.classifier) == "co-response"

    # A newer good set replaces it whole; the older copy is gone.
    (site / "50-welfare.yaml").unlink()
    second = build_rules(RulesConfig(site_dir=site))
    assert store.save(second, None, NOW)
    assert store.saved().version == second.version
    assert [p.name for p in (store.root / "sets").iterdir()] == [second.version]
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]


def test_files_changed_during_a_load_are_not_kept(tmp_path: Path) -> None:
    loaded = build_rules(RulesConfig(site_dir=tmp_path))
    racing = LoadedRules(loaded.ruleset, loaded.classifier, tmp_path, None)
    store = LastGoodRules(tmp_path / "state")
    assert not store.save(racing, None, NOW) and store.saved() is None


# --- start-up ------------------------------------------------------------------------------------


def test_start_loads_site_rules_and_keeps_them_as_last_good(tmp_path: Path) -> None:
    write(tmp_path / "rules.d" / "50-welfare.yaml", WELFARE_OVERRIDE)
    d = Daemon(tmp_path)
    with capture_logs() as logs:
        classifier = run(d.keeper.start())
    assert d.installed == [classifier] and welfare_response(classifier) == "co-response"
    assert not d.keeper.fallback and d.metric("corespond_rules_fallback") == 0
    assert d.keeper.status_text() is None
    assert d.keeper.last_good.saved().version == classifier.version
    events = [e["event"] for e in logs]
    assert events == ["rules.loaded", "rules.last_good.saved"]


def test_broken_site_rules_at_start_run_on_the_last_good_set_loudly(tmp_path: Path) -> None:
    site = write(tmp_path / "rules.d" / "50-welfare.yaml", WELFARE_OVERRIDE)
    good = run(Daemon(tmp_path).keeper.start())
    write(site, BROKEN)
    d = Daemon(tmp_path)
    with capture_logs() as logs:
        classifier = run(d.keeper.start())
    assert classifier.version == good.version and d.installed == [classifier]
    assert d.keeper.fallback and d.metric("corespond_rules_fallback") == 1
    [fallback] = [e for e in logs if e["event"] == "rules.fallback.last_good"]
    assert fallback["log_level"] == "error" and fallback["ruleset"] == good.version
    assert any(f"{site}:6: error: rule site.broken:" in e for e in fallback["errors"])
    status = d.keeper.status_text()
    assert status is not None and status.startswith("DEGRADED") and good.version[:12] in status

    # Fixed files: the next reload leaves the fallback.
    write(site, WELFARE_OVERRIDE.replace("co-response", "clinician"))
    with capture_logs() as logs:
        assert run(d.keeper.reload())
    assert not d.keeper.fallback and d.metric("corespond_rules_fallback") == 0
    [complete] = [e for e in logs if e["event"] == "rules.reload.complete"]
    assert complete["old_ruleset"] == good.version
    assert complete["new_ruleset"] == d.installed[-1].version != good.version


def test_broken_site_rules_and_no_last_good_refuse_to_start(tmp_path: Path) -> None:
    site = write(tmp_path / "rules.d" / "50-broken.yaml", BROKEN)
    d = Daemon(tmp_path)
    with pytest.raises(RulesUnavailable) as caught:
        run(d.keeper.start())
    assert "no last known good rule set" in str(caught.value)
    assert any(f"{site}:6: error: rule site.broken:" in p for p in caught.value.problems)
    assert d.installed == []


# --- reload ---------------------------------------------------------------------------------------


def test_reload_swaps_a_good_set_and_keeps_the_running_one_on_errors(tmp_path: Path) -> None:
    site = tmp_path / "rules.d"
    d = Daemon(tmp_path)
    vendor = run(d.keeper.start())
    assert welfare_response(vendor) == "clinician"

    write(site / "50-welfare.yaml", WELFARE_OVERRIDE)
    with capture_logs() as logs:
        assert run(d.keeper.reload())
    new = d.installed[-1]
    assert welfare_response(new) == "co-response"
    [complete] = [e for e in logs if e["event"] == "rules.reload.complete"]
    assert (complete["old_ruleset"], complete["new_ruleset"]) == (vendor.version, new.version)
    assert d.keeper.last_good.saved().version == new.version

    # One good file and one broken one: nothing of either is taken.
    write(site / "40-more.yaml", WELFARE_OVERRIDE.replace("bh.apco.welfare", "site.welfare"))
    broken = write(site / "60-broken.yaml", BROKEN)
    with capture_logs() as logs:
        assert not run(d.keeper.reload())
    assert d.installed[-1] is new and d.keeper.version == new.version
    assert d.metric("corespond_rules_reload_failures_total") == 1
    [aborted] = [e for e in logs if e["event"] == "rules.reload.aborted"]
    assert aborted["log_level"] == "error" and aborted["ruleset"] == new.version
    assert any(f"{broken}:6: error: rule site.broken:" in e for e in aborted["errors"])
    assert d.keeper.last_good.saved().version == new.version

    # The same rules again change nothing.
    broken.unlink()
    (site / "40-more.yaml").unlink()
    with capture_logs() as logs:
        assert run(d.keeper.reload())
    assert [e["event"] for e in logs] == ["rules.reload.unchanged"]
    assert d.installed[-1] is new


def test_a_loader_failure_is_a_failed_reload_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = Daemon(tmp_path)
    running = run(d.keeper.start())

    def explode(*_: Any, **__: Any) -> None:
        raise RuntimeError("loader bug")

    monkeypatch.setattr("corespond.daemon.classification.load_ruleset", explode)
    with capture_logs() as logs:
        assert not run(d.keeper.reload())
    assert d.installed[-1] is running
    assert "rules.reload.aborted" in [e["event"] for e in logs]


# --- the watcher ----------------------------------------------------------------------------------


def test_the_watcher_reloads_once_a_change_has_settled(tmp_path: Path) -> None:
    site = tmp_path / "rules.d"
    d = Daemon(tmp_path)
    run(d.keeper.start())
    reloads: list[bool] = []

    def changed() -> Deferred[Any]:
        return ensureDeferred(d.keeper.reload()).addCallback(reloads.append)

    watcher = RulesWatcher(Clock(d.clock), site, 5, in_thread, changed)
    run(watcher.start())
    d.clock.advance(5)
    d.clock.advance(5)
    assert reloads == []  # nothing there, nothing changed

    write(site / "50-welfare.yaml", WELFARE_OVERRIDE)
    d.clock.advance(5)
    assert reloads == []  # seen once: maybe half written
    d.clock.advance(5)
    assert reloads == [True] and welfare_response(d.installed[-1]) == "co-response"
    d.clock.advance(5)
    assert reloads == [True]

    # A broken edit is refused; the fix is taken.
    path = write(site / "50-welfare.yaml", BROKEN)
    d.clock.advance(5)
    d.clock.advance(5)
    assert reloads == [True, False] and welfare_response(d.installed[-1]) == "co-response"
    write(path, WELFARE_OVERRIDE.replace("co-response", "police"))
    os.utime(path, ns=(1, 1))  # a copy that keeps the old mtime still differs in size
    d.clock.advance(5)
    d.clock.advance(5)
    assert reloads == [True, False, True] and welfare_response(d.installed[-1]) == "police"

    watcher.stop()
    assert not d.clock.getDelayedCalls()


def test_the_watcher_never_overlaps_a_slow_reload(tmp_path: Path) -> None:
    clock = TaskClock()
    pending: list[Deferred[None]] = []

    def changed() -> Deferred[None]:
        pending.append(Deferred())
        return pending[-1]

    watcher = RulesWatcher(Clock(clock), tmp_path, 1, in_thread, changed)
    run(watcher.start())
    write(tmp_path / "a.yaml", "engine: 1\n")
    clock.advance(1)
    clock.advance(1)
    assert len(pending) == 1
    write(tmp_path / "b.yaml", "engine: 1\n")
    for _ in range(5):
        clock.advance(1)
    assert len(pending) == 1  # the first reload is still running
    pending[0].callback(None)
    clock.advance(1)
    clock.advance(1)
    assert len(pending) == 2
    pending[1].callback(None)
    watcher.stop()


def test_a_change_made_while_starting_is_seen(tmp_path: Path) -> None:
    """The baseline is the directory as the running rules were read: a file written after
    that but before the watcher's first look still counts as a change."""
    clock = TaskClock()
    baseline = fingerprint(tmp_path)  # taken before the rules are read
    write(tmp_path / "a.yaml", "engine: 1\n")  # ... and a file lands meanwhile
    changes: list[int] = []

    def changed() -> Deferred[None]:
        changes.append(1)
        return succeed(None)

    watcher = RulesWatcher(Clock(clock), tmp_path, 1, in_thread, changed)
    run(watcher.start(baseline))
    clock.advance(1)
    clock.advance(1)
    assert changes == [1]
    watcher.stop()


def test_fingerprint_sees_names_sizes_and_times_of_rule_files_only(tmp_path: Path) -> None:
    assert fingerprint(tmp_path / "missing") == ()
    write(tmp_path / "a.yaml", "x")
    write(tmp_path / "notes.txt", "x")
    write(tmp_path / "b.tsv", "xy")
    names = [(name, size) for name, _, size in fingerprint(tmp_path)]
    assert names == [("a.yaml", 1), ("b.tsv", 2)]


def test_the_watcher_needs_no_thread_when_a_poll_fails(tmp_path: Path) -> None:
    clock = TaskClock()

    def failing(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if fn is fingerprint and clock.seconds() > 0:
            raise_later: Deferred[Any] = Deferred()
            raise_later.errback(PermissionError("denied"))
            return raise_later
        return succeed(fn(*args))

    watcher = RulesWatcher(Clock(clock), tmp_path, 1, failing, lambda: succeed(None))
    run(watcher.start())
    with capture_logs() as logs:
        clock.advance(1)
        clock.advance(1)
    assert [e["event"] for e in logs] == ["rules.watch.failed"] * 2
    watcher.stop()


# --- the real daemon ------------------------------------------------------------------------------


def daemon_config(tmp: Path) -> Path:
    config = tmp / "corespond.yaml"
    config.write_text(
        f"""
state_dir: {tmp / "state"}
logging: {{level: info, format: json}}
rules: {{site_dir: rules.d, watch: true, watch_interval_seconds: 0.2}}
feeds:
  cad-lines:
    format: jsonl
    transport:
      type: tcp
      listen: {{host: 127.0.0.1, port: 0}}
      framing: newline
"""
    )
    return config


@pytest.mark.process
def test_the_daemon_reloads_rules_falls_back_and_refuses(tmp_path: Path) -> None:
    config = daemon_config(tmp_path)
    site = tmp_path / "rules.d"
    vendor = load_ruleset().version
    daemon = DaemonProcess(config, tmp_path)
    try:
        loaded = daemon.wait_event("rules.loaded")
        assert loaded["ruleset"] == vendor
        daemon.wait_datagram("READY=1")
        # A change in the directory: picked up by the watcher.
        write(site / "50-welfare.yaml", WELFARE_OVERRIDE)
        complete = daemon.wait_event("rules.reload.complete")
        assert complete["old_ruleset"] == vendor
        good = complete["new_ruleset"]
        # A broken file and SIGHUP: refused, every error logged, the running set kept.
        write(site / "60-broken.yaml", BROKEN)
        daemon.send_signal(signal.SIGHUP)
        aborted = daemon.wait_event("rules.reload.aborted")
        assert any("60-broken.yaml:6: error: rule site.broken:" in e for e in aborted["errors"])
        assert aborted["ruleset"] == good
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()

    # Restarted with the broken file: runs on the last good set and says so everywhere.
    daemon = DaemonProcess(config, tmp_path)
    try:
        fallback = daemon.wait_event("rules.fallback.last_good")
        assert fallback["level"] == "error" and fallback["ruleset"] == good
        daemon.wait_datagram("READY=1")
        status = daemon.next_datagram()  # the daemon sends its STATUS right after READY
        assert "DEGRADED" in status and good[:12] in status
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()

    # No last good set either: it does not start, and says why.
    (tmp_path / "state" / "rules" / "last-good").unlink()
    daemon = DaemonProcess(config, tmp_path)
    try:
        assert daemon.finish() == 1
    finally:
        daemon.kill()
    stderr = daemon.stderr.decode()
    assert "cannot start" in stderr and "60-broken.yaml:6: error: rule site.broken:" in stderr
