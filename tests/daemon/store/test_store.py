"""IncidentStore: group commit, delivery after commit, failures confined to their batch.

The "run in a thread" function is injected: the test decides when each write happens (it runs
the real write_batch on the real database, in the test's thread) and so sees batches form
while a write is in progress, without threads, reactors or sleeps.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from corespond.daemon.ingest import SnapshotState
from corespond.daemon.store import writer
from corespond.daemon.store.engine import READ_ONLY
from corespond.daemon.store.queries import totals
from corespond.daemon.store.tables import snapshots
from corespond.daemon.store.writer import (
    IncidentStore,
    StoreClosed,
    StoredSnapshot,
    StoreError,
    _transient,
)
from tests.daemon.store.records import record, reject, snapshot


class Threads:
    """Stands in for deferToThreadPool: remembers each call until the test runs it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, fn: Callable[[], Any]) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.calls.append((fn, done))
        return done

    def run_next(self) -> None:
        fn, done = self.calls.pop(0)
        try:
            result = fn()
        except Exception:
            done.errback(Failure())
        else:
            done.callback(result)

    def fail_next(self, error: Exception) -> None:
        self.calls.pop(0)[1].errback(error)


class Results:
    def __init__(self) -> None:
        self.values: dict[int, Any] = {}

    def watch(self, n: int, d: Deferred[Any]) -> None:
        d.addBoth(lambda value: self.values.__setitem__(n, value))


def make_store(engine: Engine, **kwargs: Any) -> tuple[IncidentStore, Threads, Threads]:
    writes, reads = Threads(), Threads()
    store = IncidentStore(engine, Clock(), run_in_thread=writes, run_read_in_thread=reads, **kwargs)
    store.start()
    return store, writes, reads


def incident(n: int) -> Any:
    return record(snapshot(f"G-{n}", updated=n), received=n)


def test_batches_form_while_a_write_is_in_progress(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    results = Results()
    results.watch(0, store.store_snapshot(incident(0)))
    assert len(writes.calls) == 1  # nothing was being written: goes at once
    for n in range(1, 4):
        results.watch(n, store.store_snapshot(incident(n)))
    results.watch(4, store.store_reject(reject()))
    assert len(writes.calls) == 1 and store.queued == 4
    assert results.values == {}

    writes.run_next()
    assert list(results.values) == [0]  # only the committed one
    assert len(writes.calls) == 1 and store.queued == 0  # the rest went as one batch
    writes.run_next()
    assert sorted(results.values) == [0, 1, 2, 3, 4]
    assert all(isinstance(results.values[n], StoredSnapshot) for n in range(4))
    assert isinstance(results.values[4], int)
    assert writes.calls == []


def test_batch_max(engine: Engine) -> None:
    store, writes, _ = make_store(engine, batch_max=2)
    for n in range(6):
        store.store_snapshot(incident(n))
    sizes = []
    while writes.calls:
        sizes.append(store.queued)
        writes.run_next()
    assert sizes == [5, 3, 1, 0]


def test_a_failed_batch_errbacks_only_its_items(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    results = Results()
    results.watch(0, store.store_snapshot(incident(0)))
    results.watch(1, store.store_snapshot(incident(1)))
    results.watch(2, store.store_snapshot(incident(2)))
    writes.run_next()
    assert store.healthy
    writes.fail_next(RuntimeError("disk on fire"))
    assert not store.healthy
    for n in (1, 2):
        assert isinstance(results.values[n], Failure)
        assert results.values[n].check(StoreError)
    results.watch(3, store.store_snapshot(incident(3)))
    writes.run_next()
    assert isinstance(results.values[3], StoredSnapshot) and store.healthy


def test_a_database_error_is_reported_without_the_data(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    results = Results()
    secret = b"Testy McTestface 555-0101"
    bad = replace(record(snapshot("BAD"), raw=secret), feed=None)
    results.watch(0, store.store_snapshot(bad))
    writes.run_next()
    failure = results.values[0]
    assert isinstance(failure, Failure) and failure.check(StoreError)
    message = failure.getErrorMessage()
    assert "IntegrityError" in message
    assert "McTestface" not in message and "555" not in message
    # Nothing of that batch was committed; the store goes on.
    results.watch(1, store.store_snapshot(incident(1)))
    writes.run_next()
    assert results.values[1].state is SnapshotState.NEW
    with engine.connect() as conn:
        assert totals(conn).snapshots == 1


def test_submissions_before_start_wait_for_it(engine: Engine) -> None:
    writes = Threads()
    store = IncidentStore(engine, Clock(), run_in_thread=writes)
    d = store.store_snapshot(incident(0))
    assert writes.calls == []
    store.start()
    writes.run_next()
    assert isinstance(d.result, StoredSnapshot)
    store.stop()


def test_drain_and_stop(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    assert store.drain().called
    store.store_snapshot(incident(0))
    store.store_snapshot(incident(1))
    drained = store.drain()
    stopped = store.stop()
    late = store.store_snapshot(incident(2))
    assert isinstance(late.result, Failure) and late.result.check(StoreClosed)
    late.addErrback(lambda _: None)
    assert not drained.called and not stopped.called
    writes.run_next()
    assert not drained.called
    writes.run_next()
    assert drained.called and stopped.called


def test_run_read(engine: Engine) -> None:
    store, writes, reads = make_store(engine)
    store.store_snapshot(incident(0))
    writes.run_next()
    d = store.run_read(totals)
    assert not d.called
    reads.run_next()
    assert d.result.snapshots == 1


@pytest.mark.parametrize(
    ("message", "transient"), [("database is locked", True), ("no such table: x", False)]
)
def test_transient_errors(message: str, transient: bool) -> None:
    err = OperationalError("INSERT", {}, sqlite3.OperationalError(message))
    assert _transient(err) is transient


def test_the_writer_holds_one_connection_and_replaces_a_failed_one(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    results = Results()
    results.watch(0, store.store_snapshot(incident(0)))
    writes.run_next()
    assert engine.pool.checkedout() == 1  # held between batches, not returned
    results.watch(1, store.store_snapshot(replace(incident(1), feed=None)))  # NOT NULL
    writes.run_next()
    assert results.values[1].check(StoreError)
    assert engine.pool.checkedout() == 0  # a failed batch's connection is let go
    results.watch(2, store.store_snapshot(incident(2)))
    writes.run_next()
    assert results.values[2].state is SnapshotState.NEW
    assert engine.pool.checkedout() == 1
    stopped = store.stop()
    assert stopped.called and engine.pool.checkedout() == 0


def test_sqlite_statement_journals_stay_in_memory_on_the_writer_only(engine: Engine) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("an SQLite setting")
    store, writes, _ = make_store(engine)
    results = Results()
    for n in range(40):  # a batch whose statement journal passed SQLite's 64 KiB spill
        results.watch(n, store.store_snapshot(incident(n)))
    while writes.calls:  # the first alone, then the 39 that waited for it in one batch
        writes.run_next()
    assert all(results.values[n].state is SnapshotState.NEW for n in range(40))
    held = store._conn
    assert held is not None
    temp_store = "PRAGMA temp_store"  # 2: MEMORY, 0: the default (files)
    assert held.connection.driver_connection.execute(temp_store).fetchone() == (2,)  # type: ignore[union-attr]
    with engine.connect() as reader:  # other connections keep sorts and temp tables on disk
        assert reader.exec_driver_sql(temp_store).scalar() == 0
    store.stop()


def wal_frames(engine: Engine) -> int:
    """Frames in the WAL now (a PASSIVE checkpoint says so, and copies them)."""
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        _busy, frames, _copied = raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()  # type: ignore[union-attr]
    return int(frames)


def checkpointing_store(engine: Engine) -> tuple[IncidentStore, Clock, Threads, Threads]:
    """A started store whose writes and checkpoints run when the test says, every 0.5 s."""
    clock, writes, checkpoints = Clock(), Threads(), Threads()
    store = IncidentStore(
        engine, clock, run_in_thread=writes, run_checkpoint_in_thread=checkpoints,
        checkpoint_seconds=0.5,
    )  # fmt: skip
    store.start()
    return store, clock, writes, checkpoints


def test_sqlite_wal_checkpoints_run_off_the_commit_path(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite's WAL")
    monkeypatch.setattr(writer, "_WAL_BYTES_BOUND", 1000 * 4096)
    store, clock, writes, checkpoints = checkpointing_store(engine)
    wal = Path(engine.url.database + "-wal")  # type: ignore[operator]
    for n in range(150):
        store.store_snapshot(incident(n))
        writes.run_next()
    # A commit would have checkpointed at 1,000 pages and started the WAL over from there.
    assert wal.stat().st_size > 1200 * 4096
    with engine.connect() as reader:
        # A reader keeps the bulk from copying what was committed after its snapshot, as a
        # commit made while the bulk runs would.
        reader.execution_options(**{READ_ONLY: True})
        with reader.begin():
            reader.execute(select(func.count()).select_from(snapshots)).scalar()
            store.store_snapshot(incident(150))
            writes.run_next()
            clock.advance(0.5)
            assert len(checkpoints.calls) == 1 and writes.calls == []
            checkpoints.run_next()  # the bulk, on its own thread
    assert len(writes.calls) == 1  # the rest, queued on the writer thread
    writes.run_next()
    store.store_snapshot(incident(151))
    writes.run_next()
    # The WAL started over: only the last batch is in it.
    assert wal_frames(engine) < 30
    for n in range(152, 182):
        store.store_snapshot(incident(n))
        writes.run_next()
    clock.advance(0.5)  # commits since the last checkpoint began, and no reader
    assert len(checkpoints.calls) == 1
    checkpoints.run_next()
    # The passes off the writer thread copied every frame: nothing waits for the writer.
    assert writes.calls == []
    store.store_snapshot(incident(182))
    writes.run_next()
    assert wal_frames(engine) < 30  # and the next write started the WAL over
    clock.advance(0.5)  # one commit since
    assert len(checkpoints.calls) == 1
    checkpoints.run_next()
    assert writes.calls == []
    clock.advance(0.5)  # none since
    assert checkpoints.calls == [] and writes.calls == []
    stopped = store.stop()
    assert stopped.called and not clock.getDelayedCalls()


def test_sqlite_wal_checkpoints_leave_a_short_wal_to_the_next_tick(engine: Engine) -> None:
    """Passes that cannot copy everything leave the writer thread alone while the WAL is short."""
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite's WAL")
    store, clock, writes, checkpoints = checkpointing_store(engine)
    for n in range(5):
        store.store_snapshot(incident(n))
        writes.run_next()
    with engine.connect() as reader:
        reader.execution_options(**{READ_ONLY: True})
        with reader.begin():  # holds the next commit's frames back from the checkpoints
            reader.execute(select(func.count()).select_from(snapshots)).scalar()
            store.store_snapshot(incident(5))
            writes.run_next()
            clock.advance(0.5)
            checkpoints.run_next()
            assert writes.calls == []
            with engine.connect() as conn:  # frames not copied yet
                raw = conn.connection.driver_connection
                _busy, frames, copied = raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()  # type: ignore[union-attr]
            assert copied < frames
    store.store_snapshot(incident(6))
    writes.run_next()
    clock.advance(0.5)  # the next tick copies them all
    checkpoints.run_next()
    assert writes.calls == []
    store.store_snapshot(incident(7))
    writes.run_next()
    assert wal_frames(engine) < 30  # and the next write started the WAL over
    assert store.stop().called


class ReactorPasses(Clock):
    """A test clock with the reactor's thread-call queue: what ``callFromThread`` queues runs
    when the test says the reactor makes its next pass (after the pass over its sockets)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread_calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.thread_calls.append((f, args))

    def next_pass(self) -> None:
        calls, self.thread_calls = self.thread_calls, []
        for f, args in calls:
            f(*args)


def passes_store(engine: Engine) -> tuple[IncidentStore, ReactorPasses, Threads]:
    reactor, writes = ReactorPasses(), Threads()
    store = IncidentStore(engine, reactor, run_in_thread=writes, run_read_in_thread=Threads())
    store.start()
    return store, reactor, writes


def test_the_next_batch_goes_to_the_writer_after_the_answers_leave(engine: Engine) -> None:
    store, reactor, writes = passes_store(engine)
    results = Results()
    results.watch(0, store.store_snapshot(incident(0)))
    results.watch(1, store.store_snapshot(incident(1)))  # queued behind the write in flight
    writes.run_next()
    # 0 is answered; its answer leaves at the reactor's next pass over its sockets, and the
    # writer thread (which would take the GIL and the core through its statements) waits.
    assert list(results.values) == [0]
    assert writes.calls == [] and store.queued == 1
    reactor.next_pass()
    assert len(writes.calls) == 1 and store.queued == 0
    writes.run_next()
    assert sorted(results.values) == [0, 1]
    reactor.next_pass()
    assert writes.calls == [] and reactor.thread_calls == []


def test_what_the_pass_reads_joins_the_waiting_batch(engine: Engine) -> None:
    store, reactor, writes = passes_store(engine)
    results = Results()
    for n in range(2):
        results.watch(n, store.store_snapshot(incident(n)))
    writes.run_next()
    results.watch(2, store.store_snapshot(incident(2)))  # read in the pass: goes at once
    assert len(writes.calls) == 1 and store.queued == 0
    reactor.next_pass()  # the handed-over call finds the writer busy: nothing twice
    assert len(writes.calls) == 1
    writes.run_next()
    assert sorted(results.values) == [0, 1, 2]
    assert all(isinstance(v, StoredSnapshot) for v in results.values.values())


def test_a_store_with_nothing_left_drains_without_a_pass(engine: Engine) -> None:
    store, reactor, writes = passes_store(engine)
    drained: list[object] = []
    store.store_snapshot(incident(0))
    store.drain().addCallback(drained.append)
    writes.run_next()
    assert drained == [None] and reactor.thread_calls == []
