"""The spool directory transport: CADs drop one file per snapshot into a folder.

Tyler New World and many other CADs write a file per incident change (``CFS_YYYYMMddhhmmssfff.xml``)
into a shared folder. :class:`SpoolDirectory` polls the folder and, for each file, in name order:

1. claims it by ``os.rename`` into ``processing/`` (atomic on one filesystem: of two daemons
   polling one spool, only one rename succeeds) and holds an exclusive ``flock`` on it while
   it works on it;
2. reads it (a file over ``max_message_bytes`` is not read, it goes to quarantine as ``oversize``)
   and hands the bytes to the feed's :data:`~corespond.daemon.ingest.IngestFn`;
3. once every outcome is Accepted (committed), moves it to ``done/`` or deletes it
   (``keep_done``); if any is Rejected, moves it to ``quarantine/`` with ``<name>.reason``
   beside it (JSON: code, reason, where, feed, file, time, reject_id); if the ingest failed
   internally (store down), leaves it in ``processing/``, still locked, and tries it again on
   the next poll before anything newer (the batch stops there, to keep name order).

Eligible files match ``pattern`` (case-insensitively), are regular files (not symlinks), do not
start with ``.`` and do not end with ``.tmp`` or ``.part`` (a CAD writes them under such a name
and renames when complete). Files in ``processing/`` that no process holds a lock on (left by a
daemon that was killed, here or on another host) are taken first, on start and on every poll
(the store deduplicates by content); the kernel drops a dead process's locks, and a live
daemon's files are never taken (``flock``: a local filesystem, or NFS, where Linux maps it to
server-side locks). Names already in ``done/`` or ``quarantine/`` are never overwritten: the
newcomer gets a ``.1``, ``.2``... before its extension. All disk I/O runs through
``run_in_thread``, never on the reactor thread.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import structlog
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed

from corespond.daemon.clock import Clock
from corespond.daemon.ingest import Accepted, IngestFn, Origin, Outcome, Rejected
from corespond.daemon.log import error_text

log = structlog.get_logger(__name__)

RunInThread = Callable[..., Deferred[Any]]
SUBDIRS = ("processing", "done", "quarantine")
PARTIAL_SUFFIXES = (".tmp", ".part")
DIR_MODE = 0o750


@dataclass(frozen=True, slots=True)
class Oversize:
    """A file not read because it is larger than the limit."""

    size: int


def is_eligible(name: str, pattern: str) -> bool:
    """Whether a directory entry named ``name`` is a complete file to pick up."""
    lower = name.lower()
    return (
        not name.startswith(".")
        and not lower.endswith(PARTIAL_SUFFIXES)
        and fnmatchcase(lower, pattern.lower())
    )


def free_name(folder: Path, name: str, *, companions: Sequence[str] = ()) -> str:
    """``name``, or ``stem.N.ext``, such that neither it nor ``it + companion`` exists in
    ``folder`` (so that a move never overwrites)."""
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no extension (or a leading dot only)
        stem, dot, ext = name, "", ""
    candidate, n = name, 0
    while any(os.path.lexists(folder / (candidate + c)) for c in ("", *companions)):
        n += 1
        candidate = f"{stem}.{n}{dot}{ext}"
    return candidate


# Disk work, run in a thread: plain values in and out, nothing from the reactor.


def _ensure_dirs(directory: Path) -> None:
    for sub in SUBDIRS:
        os.makedirs(directory / sub, mode=DIR_MODE, exist_ok=True)


def _list_processing(directory: Path) -> list[str]:
    with os.scandir(directory / "processing") as entries:
        return sorted(e.name for e in entries if e.is_file(follow_symlinks=False))


def _list_eligible(directory: Path, pattern: str, limit: int) -> list[str]:
    with os.scandir(directory) as entries:
        names = [
            e.name
            for e in entries
            if is_eligible(e.name, pattern) and e.is_file(follow_symlinks=False)
        ]
    names.sort()
    return names[:limit]


def _lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on ``path``; None if another process
    holds it (or the file is gone). The kernel drops the lock when the holder dies, so a killed
    daemon's files become free at once, while a live daemon's files are never taken."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, OSError) as e:
        if isinstance(e, FileNotFoundError) or e.errno == errno.ELOOP:
            return None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # It may have been finished and moved away between open and flock.
        if os.fstat(fd).st_ino != os.stat(path, follow_symlinks=False).st_ino:
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _claim(directory: Path, name: str) -> int | None:
    """Move ``name`` into ``processing/`` and lock it; None if another process took it first, or
    if a file of that name is still waiting there (it goes first, and is never overwritten)."""
    target = directory / "processing" / name
    if os.path.lexists(target):
        return None
    try:
        os.rename(directory / name, target)
    except FileNotFoundError:
        return None
    return _lock(target)


def _read(fd: int, limit: int) -> bytes | Oversize:
    """The file's bytes, or :class:`Oversize` without reading it whole."""
    size = os.fstat(fd).st_size
    if size > limit:
        return Oversize(size)
    chunks: list[bytes] = []
    got = 0
    while got <= limit:  # it may have grown since fstat: read one byte past the limit at most
        chunk = os.pread(fd, limit + 1 - got, got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got > limit:
        return Oversize(got)
    return b"".join(chunks)


def _move_done(directory: Path, name: str, keep: bool) -> str | None:
    source = directory / "processing" / name
    try:
        if not keep:
            os.unlink(source)
            return None
        target = free_name(directory / "done", name)
        os.rename(source, directory / "done" / target)
        return target
    except FileNotFoundError:
        return None


def _quarantine(directory: Path, name: str, reason: dict[str, Any]) -> str | None:
    """Move ``processing/name`` to ``quarantine/`` and write ``<name>.reason`` beside it."""
    folder = directory / "quarantine"
    target = free_name(folder, name, companions=(".reason",))
    try:
        os.rename(directory / "processing" / name, folder / target)
    except FileNotFoundError:
        return None
    tmp = folder / f".{target}.reason.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(reason, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, folder / f"{target}.reason")
    return target


class SpoolDirectory:
    """Polls one spool directory for one feed (see the module documentation)."""

    def __init__(
        self,
        directory: Path,
        ingest: IngestFn,
        *,
        feed: str,
        clock: Clock,
        run_in_thread: RunInThread,
        pattern: str = "*",
        poll_interval: float = 2.0,
        keep_done: bool = True,
        max_message_bytes: int,
        batch_limit: int = 100,
    ) -> None:
        if max_message_bytes < 1 or batch_limit < 1 or poll_interval <= 0:
            raise ValueError("max_message_bytes, batch_limit and poll_interval must be positive")
        self.directory = Path(directory)
        self.ingest = ingest
        self.feed = feed
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.pattern = pattern
        self.poll_interval = poll_interval
        self.keep_done = keep_done
        self.max_message_bytes = max_message_bytes
        self.batch_limit = batch_limit
        # Files in processing/ to take before any new one: our own, locked (with their
        # descriptor), waiting for a retry, then those nobody holds (None: lock first).
        self._held: list[tuple[str, int | None]] = []
        self._ready = False
        self._running = False
        self._stopping = False
        self._busy = False
        self._call: Any = None  # an IDelayedCall; zope interfaces do not type-check as attributes
        self._idle_waiters: list[Deferred[None]] = []
        self.done = self.quarantined = self.failed = 0

    def start(self) -> None:
        """Poll now, then every ``poll_interval`` seconds (at once again after a full batch)."""
        if self._running:
            return
        self._running, self._stopping = True, False
        self._schedule(0)

    def stop(self) -> Deferred[None]:
        """Stop polling; fires once the file in hand is finished. Files not yet claimed stay in
        the spool; files held for a retry are unlocked and stay in processing/, to be taken
        again by the next start (of this or another instance)."""
        self._running, self._stopping = False, True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if not self._busy:
            self._release()
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _release(self) -> None:
        for _, fd in self._held:
            if fd is not None:
                os.close(fd)  # a read-only descriptor: closing never waits on the disk
        self._held = []
        self._ready = False

    def _schedule(self, delay: float) -> None:
        self._call = self.clock.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        self.poll().addCallback(self._after_poll)

    def _after_poll(self, full: bool) -> None:
        if self._running:
            self._schedule(0 if full else self.poll_interval)

    def poll(self) -> Deferred[bool]:
        """Handle one batch; fires (never fails) with whether the batch was full."""
        if self._busy:
            return succeed(False)
        self._busy = True

        def failed(failure: Any) -> bool:
            log.error("feed.spool.poll.failed", feed=self.feed, path=str(self.directory),
                      error=error_text(failure))  # fmt: skip
            return False

        def finished(full: bool) -> bool:
            self._busy = False
            if self._stopping:
                self._release()
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
            return full

        d = ensureDeferred(self._poll())
        d.addErrback(failed)
        return d.addCallback(finished)

    async def _poll(self) -> bool:
        run = self.run_in_thread
        if not self._ready:
            await run(_ensure_dirs, self.directory)
            self._ready = True
        # Files in processing/ that nobody holds: left by a daemon that was killed (here or on
        # another host sharing the spool). Taken before any new file.
        mine = {name for name, _ in self._held}
        orphans = [n for n in await run(_list_processing, self.directory) if n not in mine]
        if orphans:
            self._held += [(name, None) for name in orphans]
        handled = 0
        while self._held and handled < self.batch_limit and not self._stopping:
            name, fd = self._held.pop(0)
            if fd is None:
                fd = await run(_lock, self.directory / "processing" / name)
                if fd is None:
                    continue  # another daemon is on it, or has finished it
                log.info("feed.spool.leftover.taken", feed=self.feed, file=name)
            handled += 1
            if not await self._handle(name, fd):
                return False  # the store is failing: keep order, try again next poll
        if handled >= self.batch_limit or self._stopping:
            return handled >= self.batch_limit
        names: list[str] = await run(
            _list_eligible, self.directory, self.pattern, self.batch_limit - handled
        )
        for name in names:
            if self._stopping:
                break
            fd = await run(_claim, self.directory, name)
            if fd is None:
                continue
            handled += 1
            if not await self._handle(name, fd):
                return False
        return handled >= self.batch_limit

    async def _handle(self, name: str, fd: int) -> bool:
        """One locked file in processing/. False when the store failed: the file stays there,
        locked, for a retry, and the batch stops so that newer files do not overtake it."""
        try:
            data: bytes | Oversize = await self.run_in_thread(_read, fd, self.max_message_bytes)
            if isinstance(data, Oversize):
                await self._quarantine(name, Rejected(
                    "oversize",
                    f"file is {data.size} bytes, over the limit of {self.max_message_bytes}",
                ), messages=1, rejected=1)  # fmt: skip
                os.close(fd)
                return True
            try:
                outcomes: Sequence[Outcome] = await maybeDeferred(
                    self.ingest, data, Origin(self.feed, name=name)
                )
            except Exception as e:
                self.failed += 1
                log.error("feed.spool.ingest.failed", feed=self.feed, file=name,
                          error=error_text(e))  # fmt: skip
                self._held.insert(0, (name, fd))
                return False
            rejected = [o for o in outcomes if not isinstance(o, Accepted)]
            if rejected:
                first = rejected[0]
                assert isinstance(first, Rejected)
                await self._quarantine(name, first, messages=len(outcomes), rejected=len(rejected))
            else:
                kept = await self.run_in_thread(_move_done, self.directory, name, self.keep_done)
                self.done += 1
                log.info("feed.spool.file.done", feed=self.feed, file=name, kept_as=kept,
                         messages=len(outcomes))  # fmt: skip
            os.close(fd)  # after the move: unlocks it
            return True
        except OSError as e:
            # Permissions, a full disk, a bad sector: this file stays in processing/, locked,
            # for the next poll; the others go on (one bad file never stalls the feed).
            log.error("feed.spool.file.failed", feed=self.feed, file=name,
                      error=errno.errorcode.get(e.errno or 0, type(e).__name__))  # fmt: skip
            self.failed += 1
            self._held.append((name, fd))
            return True

    async def _quarantine(self, name: str, rejection: Rejected, *, messages: int,
                          rejected: int) -> None:  # fmt: skip
        reason: dict[str, Any] = {
            "code": rejection.code,
            "reason": rejection.reason,
            "where": rejection.where,
            "feed": self.feed,
            "file": name,
            "time": self.clock.now().isoformat(),
            "messages": messages,
            "rejected": rejected,
        }
        if rejection.reject_id is not None:
            reason["reject_id"] = rejection.reject_id
        target = await self.run_in_thread(_quarantine, self.directory, name, reason)
        self.quarantined += 1
        log.warning("feed.spool.file.quarantined", feed=self.feed, file=name, kept_as=target,
                    code=rejection.code)  # fmt: skip
