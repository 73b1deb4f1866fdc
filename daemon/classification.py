"""The daemon's rule classifier: built from the configuration, reloaded whole, never half.

:func:`build_rules` loads the vendor rules plus the site directory and compiles them (slow: it
runs in a thread). :class:`RuleKeeper` owns the running set: it loads it at start-up, falls back
to the last known good set when the site files are broken, and on a reload (SIGHUP, or
:class:`RulesWatcher` seeing the directory change) builds the new set off to the side and either
swaps it in at once or keeps the running one and logs every problem with file:line and rule id.

:class:`LastGoodRules` keeps a copy of the site files of the last set that loaded, under
``<state_dir>/rules/``: ``sets/<version>/`` holds the files and ``ruleset.json``, and the
symbolic link ``last-good`` names the current one. A new set is written beside the old and the
link replaced by ``rename(2)``, so a crash at any instant leaves one complete set behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.task import LoopingCall

from corespond.daemon.clock import Clock
from corespond.daemon.config import RulesConfig
from corespond.daemon.errors import SafeMessage
from corespond.daemon.log import error_text
from corespond.rules.engine import RuleClassifier
from corespond.rules.loader import load_ruleset
from corespond.rules.model import RuleSet
from corespond.rules.problems import Problem, RuleSetError

log = structlog.get_logger(__name__)

RULE_SUFFIXES = (".yaml", ".yml", ".tsv")  # what the loader reads from a directory
LAST_GOOD_LINK = "last-good"
SETS_DIR = "sets"
MANIFEST = "ruleset.json"

InThread = Callable[..., Deferred[Any]]
Fingerprint = tuple[tuple[str, int, int], ...]


# --- building ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedRules:
    """A complete rule set, compiled, and the site file contents it was built from."""

    ruleset: RuleSet
    classifier: RuleClassifier
    site_dir: Path | None
    # name -> bytes of each site file, when the directory did not change during the load.
    site_files: dict[str, bytes] | None

    @property
    def version(self) -> str:
        return self.ruleset.version


class RulesUnavailable(SafeMessage, Exception):
    """No usable rule set: the site rules are broken and there is no last good set."""

    def __init__(self, problems: Sequence[Problem | str], reason: str) -> None:
        self.problems = [str(p) for p in problems]
        self.reason = reason
        super().__init__(reason + "".join(f"\n  {p}" for p in self.problems))


def rule_file_names(directory: Path) -> list[Path]:
    """The files of ``directory`` the loader reads, sorted; none if it does not exist."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    return sorted(p for p in entries if p.suffix in RULE_SUFFIXES and p.is_file())


def read_site_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in rule_file_names(directory)}


def site_paths(settings: RulesConfig) -> list[Path]:
    """What ``load_ruleset`` gets as ``site``: a missing directory means no site rules."""
    return [settings.site_dir] if settings.site_dir.is_dir() else []


def build_rules(settings: RulesConfig, vendor_dir: Path | None = None) -> LoadedRules:
    """Load and compile the vendor rules plus ``settings.site_dir``; raises RuleSetError.

    Blocking (file reads and compilation): call it in a thread.
    """
    site = site_paths(settings)
    before = _read_quietly(settings.site_dir) if site else {}
    ruleset = load_ruleset(vendor_dir, site, timezone=settings.timezone)
    classifier = RuleClassifier(ruleset)
    after = _read_quietly(settings.site_dir) if site else {}
    # An edit during the load: these bytes are not what built the set, so none are kept; the
    # watcher sees the change and loads again.
    files = before if before == after and before is not None else None
    return LoadedRules(ruleset, classifier, settings.site_dir if site else None, files)


def _read_quietly(directory: Path) -> dict[str, bytes] | None:
    try:
        return read_site_files(directory)
    except OSError:
        return None  # the loader reports what it could not read


# --- the last known good set -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SavedRules:
    directory: Path
    version: str
    timezone: str | None
    saved_at: str
    files: tuple[str, ...]


class LastGoodRules:
    """The site files of the last rule set that loaded, kept in the state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root  # <state_dir>/rules

    @property
    def link(self) -> Path:
        return self.root / LAST_GOOD_LINK

    def saved(self) -> SavedRules | None:
        """What is kept, or None (nothing yet, or a manifest that cannot be read)."""
        manifest = self.link / MANIFEST
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            return SavedRules(
                directory=self.link.resolve(),
                version=str(data["version"]),
                timezone=data.get("timezone"),
                saved_at=str(data.get("saved_at", "")),
                files=tuple(data.get("files", ())),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, loaded: LoadedRules, timezone: str | None, now: datetime) -> bool:
        """Keep ``loaded``'s site files; False if they are unknown or already kept. Blocking."""
        if loaded.site_files is None:
            return False
        current = self.saved()
        if current is not None and current.version == loaded.version:
            return False
        sets = self.root / SETS_DIR
        sets.mkdir(parents=True, exist_ok=True)
        target = sets / loaded.version
        staging = sets / f".{loaded.version}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for name, data in loaded.site_files.items():
            _write_synced(staging / name, data)
        manifest = {
            "version": loaded.version,
            "timezone": timezone,
            "saved_at": now.astimezone(UTC).isoformat(),
            "site_dir": str(loaded.site_dir) if loaded.site_dir else None,
            "files": sorted(loaded.site_files),
        }
        _write_synced(staging / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n")
        _sync_directory(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        # The switch itself: a new link renamed over the old one, atomic on POSIX.
        new_link = self.root / f".{LAST_GOOD_LINK}.{os.getpid()}.tmp"
        new_link.unlink(missing_ok=True)
        new_link.symlink_to(Path(SETS_DIR) / loaded.version, target_is_directory=True)
        os.replace(new_link, self.link)
        _sync_directory(sets)
        _sync_directory(self.root)
        for old in sets.iterdir():
            if old.name != loaded.version:
                shutil.rmtree(old, ignore_errors=True)
        return True

    def load(self, vendor_dir: Path | None = None) -> tuple[LoadedRules, SavedRules] | None:
        """The kept set, built with today's vendor rules; None if nothing is kept. Raises
        RuleSetError if it no longer loads (a vendor upgrade). Blocking."""
        saved = self.saved()
        if saved is None:
            return None
        settings = RulesConfig(site_dir=saved.directory, timezone=saved.timezone, watch=False)
        loaded = build_rules(settings, vendor_dir)
        return loaded, saved


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the running set ---------------------------------------------------------------------------


class RulesMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reload_failures = Counter(
            "corespond_rules_reload_failures",
            "Rule reloads aborted because the new rule files have errors (running set kept)",
            registry=registry,
        )
        self.fallback = Gauge(
            "corespond_rules_fallback",
            "1 while the daemon runs on the last known good rule set (site rules are broken)",
            registry=registry,
        )


@dataclass
class RuleKeeper:
    """Holds the running rule set; loads, falls back, reloads all or nothing.

    ``install`` receives every new classifier (the daemon sets ``Pipeline.classifier``).
    """

    settings: RulesConfig
    last_good: LastGoodRules
    in_thread: InThread
    clock: Clock
    metrics: RulesMetrics
    install: Callable[[RuleClassifier], None]
    vendor_dir: Path | None = None
    current: LoadedRules | None = None
    fallback: bool = False
    _lock: DeferredLock = field(default_factory=DeferredLock)

    @property
    def version(self) -> str | None:
        return self.current.version if self.current is not None else None

    def status_text(self) -> str | None:
        """What sd_notify STATUS must say about the rules, if anything."""
        if not self.fallback or self.current is None:
            return None
        return (
            f"DEGRADED: site rules in {self.settings.site_dir} have errors; running on the last "
            f"known good rule set {self.current.version[:12]} (see rules.fallback.last_good)"
        )

    async def start(self) -> RuleClassifier:
        """Load the rules for start-up: the site's, else the last good set; RulesUnavailable
        when neither loads."""
        await self._lock.acquire()
        try:
            return await self._start()
        finally:
            self._lock.release()

    async def _start(self) -> RuleClassifier:
        try:
            loaded = await self.in_thread(build_rules, self.settings, self.vendor_dir)
        except RuleSetError as err:
            return await self._fall_back(err.problems)
        except Exception as err:  # a loader bug: treat as broken rules, never crash start-up
            log.exception("rules.load.failed", path=str(self.settings.site_dir))
            return await self._fall_back([f"{self.settings.site_dir}: {err}"])
        self._warn(loaded)
        self._set(loaded, fallback=False)
        log.info(
            "rules.loaded",
            ruleset=loaded.version,
            count=len(loaded.ruleset.rules),
            path=str(loaded.site_dir) if loaded.site_dir else None,
        )
        await self._keep(loaded)
        return loaded.classifier

    async def _fall_back(self, problems: Sequence[Problem | str]) -> RuleClassifier:
        errors = [str(p) for p in problems]
        try:
            kept = await self.in_thread(self.last_good.load, self.vendor_dir)
        except RuleSetError as err:
            raise RulesUnavailable(
                [*errors, *err.problems],
                f"the rule files have errors and the last known good rule set in "
                f"{self.last_good.link} no longer loads either",
            ) from None
        if kept is None:
            raise RulesUnavailable(
                errors,
                f"the rule files have errors and there is no last known good rule set "
                f"({self.last_good.link}); fix them (`corespond rules check`)",
            )
        loaded, saved = kept
        self._set(loaded, fallback=True)
        log.error(
            "rules.fallback.last_good",
            reason="site rules have errors: running on the last known good rule set",
            errors=errors,
            ruleset=loaded.version,
            version=saved.version,
            path=str(saved.directory),
        )
        return loaded.classifier

    async def reload(self, settings: RulesConfig | None = None) -> bool:
        """Build the rule set again, off to the side; swap it in whole, or keep the running
        one and log why. True when the running set is the one the files describe."""
        await self._lock.acquire()
        try:
            return await self._reload(settings or self.settings)
        finally:
            self._lock.release()

    async def _reload(self, settings: RulesConfig) -> bool:
        old = self.version
        try:
            loaded = await self.in_thread(build_rules, settings, self.vendor_dir)
        except Exception as err:
            self.metrics.reload_failures.inc()
            problems = err.problems if isinstance(err, RuleSetError) else [str(err)[:500]]
            if not isinstance(err, RuleSetError):
                log.exception("rules.load.failed", path=str(settings.site_dir))
            log.error(
                "rules.reload.aborted",
                reason="rule files have errors; running rule set kept, nothing changed",
                errors=[str(p) for p in problems],
                ruleset=old,
                path=str(settings.site_dir),
            )
            return False
        self.settings = settings
        self._warn(loaded)
        was_fallback = self.fallback
        if loaded.version == old and not was_fallback:
            log.info("rules.reload.unchanged", ruleset=old)
        else:
            self._set(loaded, fallback=False)
            log.info(
                "rules.reload.complete",
                old_ruleset=old,
                new_ruleset=loaded.version,
                count=len(loaded.ruleset.rules),
                reason="site rules load again; last known good set left" if was_fallback else None,
            )
        await self._keep(loaded)
        return True

    def _set(self, loaded: LoadedRules, *, fallback: bool) -> None:
        self.current = loaded
        self.fallback = fallback
        self.metrics.fallback.set(1 if fallback else 0)
        self.install(loaded.classifier)

    def _warn(self, loaded: LoadedRules) -> None:
        if loaded.ruleset.warnings:
            log.warning(
                "rules.load.warnings",
                ruleset=loaded.version,
                errors=[str(p) for p in loaded.ruleset.warnings],
            )

    async def _keep(self, loaded: LoadedRules) -> None:
        """Persist ``loaded`` as the last good set; a failure is logged, never fatal."""
        try:
            saved = await self.in_thread(
                self.last_good.save, loaded, self.settings.timezone, self.clock.now()
            )
        except Exception as err:
            log.error(
                "rules.last_good.not_saved",
                path=str(self.last_good.root),
                error=error_text(err),
            )
            return
        if saved:
            log.info("rules.last_good.saved", ruleset=loaded.version, path=str(self.last_good.link))


# --- watching the site directory ---------------------------------------------------------------


def fingerprint(directory: Path) -> Fingerprint:
    """Names, mtimes and sizes of the rule files in ``directory``. Blocking."""
    out = []
    for path in rule_file_names(directory):
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((path.name, st.st_mtime_ns, st.st_size))
    return tuple(out)


class RulesWatcher:
    """Polls a directory through the clock; calls ``changed()`` once a change has settled.

    A change must look the same on two polls in a row before it counts, so a file caught half
    written by an editor does not abort a reload (and count as a failure) for nothing.
    """

    def __init__(
        self,
        clock: Clock,
        directory: Path,
        interval: float,
        in_thread: InThread,
        changed: Callable[[], Deferred[Any]],
    ) -> None:
        self.clock = clock
        self.directory = directory
        self.interval = interval
        self.in_thread = in_thread
        self.changed = changed
        self.seen: Fingerprint | None = None
        self._pending: Fingerprint | None = None
        self._busy = False
        self._loop: LoopingCall | None = None

    async def start(self, baseline: Fingerprint | None = None) -> None:
        """Poll from now on; ``baseline`` is the directory as it was when the running rules
        were read (taken before reading them, so a change made meanwhile is not missed)."""
        self.seen = baseline if baseline is not None else await self.in_thread(
            fingerprint, self.directory
        )
        self._loop = self.clock.looping_call(self.interval, self._poll)
        log.info("rules.watch.started", path=str(self.directory), seconds=self.interval)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _poll(self) -> None:
        if self._busy:  # a slow disk or a long reload: never two at once
            return
        self._busy = True
        d = self.in_thread(fingerprint, self.directory)
        d.addCallback(self._compare)
        d.addErrback(self._failed)
        d.addBoth(self._done)

    def _compare(self, now: Fingerprint) -> Deferred[Any] | None:
        if now == self.seen:
            self._pending = None
            return None
        if now != self._pending:
            self._pending = now  # changed; wait one more poll for it to settle
            return None
        self.seen, self._pending = now, None
        log.info("rules.watch.changed", path=str(self.directory), count=len(now))
        return self.changed()

    def _failed(self, failure: Any) -> None:
        log.error(
            "rules.watch.failed", path=str(self.directory), error=error_text(failure)
        )

    def _done(self, _: object) -> None:
        self._busy = False


class PendingClassifier:
    """Stands in until the rules are loaded; the daemon starts no feed before they are."""

    version = "not-loaded"

    def classify(self, snapshot: Any) -> Any:
        raise RuntimeError("the rule set is not loaded yet")
