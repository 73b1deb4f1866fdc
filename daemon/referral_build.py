"""hl7apy builds in worker processes, so that they never hold the daemon's GIL.

Building and strictly validating one referral with hl7apy takes tens of milliseconds of pure
Python. In a thread of the daemon it still holds the GIL the reactor needs, and every page in
flight waits. :class:`BuildPool` runs the builds in a ``concurrent.futures``
``ProcessPoolExecutor`` (``forkserver`` where the platform has it, else ``spawn``: a clean
interpreter, never a fork of a running reactor) and hands each result back to the reactor
thread with ``callFromThread``.

A build is handed to the executor from a thread of the pool's own, never from the reactor:
``ProcessPoolExecutor.submit`` wakes the executor's manager thread with a write to a pipe, a
system call that gives up the GIL, and the reactor then waited for the threads that took it
(the manager thread pickling the build, the store's writer with a page's batch) - on average
0.9 ms a referral in the dispatch benchmark, in the middle of the reactor callback that stored
the previous referral. A hand-off to the thread is a queue put that keeps the GIL.

Builders run under Linux's ``SCHED_IDLE`` policy (and at ``nice`` +10 where there is none):
on a machine whose cores are all busy, a referral waits for the CPU rather than a page. Nice
alone only weighs the shares: the kernel still let a builder finish its time slice (1-3 ms)
before a woken daemon thread got the core. A ``SCHED_IDLE`` task is preempted as soon as any
normal task wakes, yet is never starved outright (it keeps a minimal share).

A worker process that dies (killed, out of memory) fails the builds it had with
:class:`BuildCrashed`, a precise, safe error; the pool is then replaced for the next build.
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
from twisted.python.threadpool import ThreadPool

from corespond.daemon.errors import SafeMessage

if TYPE_CHECKING:  # hl7apy is imported by the first build, in the builder, once it is niced
    from corespond.adapters.hl7_referral import ReferralContent

log = structlog.get_logger("corespond.referrals")

Build = Callable[["ReferralContent", str], bytes]


class BuildCrashed(SafeMessage, RuntimeError):
    """The process building a message died before it answered; nothing was built."""


BUILDER_NICE = 10  # builders yield the CPU to the daemon (and its pages) when both want it


def _yield_the_cpu() -> None:
    """This process runs only when nothing else wants the core (see the module's docstring)."""
    if hasattr(os, "nice"):
        os.nice(BUILDER_NICE)
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as err:  # a seccomp filter or a sandbox may refuse; nice still holds
            log.warning("referrals.builder.sched_idle_refused", error=str(err))


def _warm() -> None:
    """Each worker starts here, at a lower CPU priority, then imports hl7apy: the import is
    a fraction of a second of CPU per builder, which should not compete with pages either
    (this module leaves hl7apy out, so unpickling this function does not import it).

    Ctrl-C in a terminal reaches the whole process group: the daemon stops the pool itself,
    so a builder ignores SIGINT rather than print a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _yield_the_cpu()
    import corespond.adapters.hl7_referral  # noqa: F401


def start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


class BuildPool:
    """``build(content, profile)`` in ``processes`` worker processes; results on the reactor."""

    def __init__(
        self,
        reactor: Any,
        processes: int = 1,
        build: Build | None = None,
        *,
        timed: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    ) -> None:
        if build is None:
            from corespond.adapters.hl7_referral import build_message

            build = build_message
        self.reactor = reactor
        self.processes = processes
        self._build = build
        self._executor: ProcessPoolExecutor | None = None
        self._stopped = False
        self.crashes = 0
        # The thread that hands builds to the executor (see the module's docstring).
        self._submitter = ThreadPool(0, 1, name="corespond-referral-submit")
        # The reactor's hand-over of a result, timed by the referral trace when it is on.
        self._hand_over_timed = (timed or (lambda fn: fn))(self._hand_over)

    def start(self) -> None:
        self._stopped = False
        self._executor = self._new_executor()
        self._submitter.start()

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
        done: Deferred[bytes] = Deferred()

        def finished(f: Future[bytes]) -> None:
            # In the executor's management thread (or the submitter, when it was quick).
            self.reactor.callFromThread(self._hand_over_timed, f, done, executor)

        def submit() -> None:  # in the submitter thread
            try:
                future = executor.submit(self._build, content, profile)
            except BrokenProcessPool:
                self.reactor.callFromThread(self._submit_failed, done, executor)
            except RuntimeError:  # shut down meanwhile (stop): the referral is built later
                self.reactor.callFromThread(self._submit_failed, done, None)
            else:
                future.add_done_callback(finished)

        if self._submitter.started:
            self._submitter.callInThread(submit)
        else:  # not started (a test's pool): at once, from here
            submit()
        return done

    def _submit_failed(self, done: Deferred[bytes], broken: ProcessPoolExecutor | None) -> None:
        if broken is None:
            done.errback(BuildCrashed("the message builder stopped before it answered"))
            return
        self._replace(broken)
        done.errback(BuildCrashed("the message builder process died; a new one starts"))

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
        if self._submitter.started:
            self._submitter.stop()  # its hand-overs are queue puts: it stops at once
        if self._executor is not None:
            # Not waiting: an unfinished build leaves its referral queued, built at next start.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
