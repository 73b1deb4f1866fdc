"""hl7apy builds in worker processes, so that they never hold the daemon's GIL.

Building and strictly validating one referral with hl7apy takes tens of milliseconds of pure
Python. In a thread of the daemon it still holds the GIL the reactor needs, and every page in
flight waits. :class:`BuildPool` runs the builds in a ``concurrent.futures``
``ProcessPoolExecutor`` (``forkserver`` where the platform has it, else ``spawn``: a clean
interpreter, never a fork of a running reactor) and hands each result back to the reactor
thread with ``callFromThread``.

Builders run at ``nice`` +10: on a machine whose cores are all busy, a referral waits for
the CPU rather than a page. A worker process that dies (killed, out of memory) fails the
builds it had with :class:`BuildCrashed`, a precise, safe error; the pool is then replaced
for the next build.
The caller keeps the referral queued and builds it again later (see
:class:`~corespond.daemon.referrals.ReferralService`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

import structlog
from twisted.internet.defer import Deferred, fail

from corespond.daemon.errors import SafeMessage

if TYPE_CHECKING:  # hl7apy is imported by the first build, in the builder, once it is niced
    from corespond.adapters.hl7_referral import ReferralContent

log = structlog.get_logger("corespond.referrals")

Build = Callable[["ReferralContent", str], bytes]


class BuildCrashed(SafeMessage, RuntimeError):
    """The process building a message died before it answered; nothing was built."""


BUILDER_NICE = 10  # builders yield the CPU to the daemon (and its pages) when both want it


def _warm() -> None:
    """Each worker starts here, at a lower CPU priority, then imports hl7apy: the import is
    a fraction of a second of CPU per builder, which should not compete with pages either
    (this module leaves hl7apy out, so unpickling this function does not import it).

    Ctrl-C in a terminal reaches the whole process group: the daemon stops the pool itself,
    so a builder ignores SIGINT rather than print a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "nice"):
        os.nice(BUILDER_NICE)
    import corespond.adapters.hl7_referral  # noqa: F401


def start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


class BuildPool:
    """``build(content, profile)`` in ``processes`` worker processes; results on the reactor."""

    def __init__(self, reactor: Any, processes: int = 1, build: Build | None = None) -> None:
        if build is None:
            from corespond.adapters.hl7_referral import build_message

            build = build_message
        self.reactor = reactor
        self.processes = processes
        self._build = build
        self._executor: ProcessPoolExecutor | None = None
        self._stopped = False
        self.crashes = 0

    def start(self) -> None:
        self._stopped = False
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.processes,
            mp_context=multiprocessing.get_context(start_method()),
            initializer=_warm,
        )

    def build(self, content: ReferralContent, profile: str) -> Deferred[bytes]:
        """Fires (on the reactor thread) with the message, or fails with the builder's
        :class:`~corespond.adapters.hl7_referral.BuildError` or with :class:`BuildCrashed`."""
        if self._stopped:
            return fail(BuildCrashed("the message builder is stopped"))
        if self._executor is None:
            self._executor = self._new_executor()
        executor = self._executor
        try:
            future = executor.submit(self._build, content, profile)
        except BrokenProcessPool:
            self._replace(executor)
            return fail(BuildCrashed("the message builder process died; a new one starts"))
        done: Deferred[bytes] = Deferred()

        def finished(f: Future[bytes]) -> None:
            # In the executor's management thread (or here, when it was quick).
            self.reactor.callFromThread(self._hand_over, f, done, executor)

        future.add_done_callback(finished)
        return done

    def _hand_over(
        self, future: Future[bytes], done: Deferred[bytes], executor: ProcessPoolExecutor
    ) -> None:
        if future.cancelled():
            done.errback(BuildCrashed("the message builder stopped before it answered"))
            return
        err = future.exception()
        if err is None:
            done.callback(future.result())
        elif isinstance(err, BrokenProcessPool):
            self.crashes += 1
            self._replace(executor)
            log.error("referral.build.crashed", error=type(err).__name__)
            done.errback(
                BuildCrashed("the message builder process died before it answered")
            )
        else:
            done.errback(err)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if self._executor is broken:
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = None if self._stopped else self._new_executor()

    def stop(self) -> None:
        self._stopped = True
        if self._executor is not None:
            # Not waiting: an unfinished build leaves its referral queued, built at next start.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
