"""The writer's lanes: page work before background work, and work riding the next batch.

As in test_store.py the "run in a thread" function is injected (the test decides when each
unit of writer work runs, on the real database, in the test's thread) and the reactor is a
Clock, so the ride's fallback is driven by advancing it: no threads, no sleeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection, Engine, event, select, update
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from corespond.daemon.store.tables import incidents
from corespond.daemon.store.writer import (
    BACKGROUND_EVERY,
    RIDE_LATER_WITHIN,
    RIDE_WITHIN,
    IncidentStore,
    SnapshotRecord,
    StoredSnapshot,
    StoreError,
)
from tests.daemon.store.records import record, snapshot
from tests.daemon.store.test_store import Results, Threads, incident


def make_store(engine: Engine) -> tuple[IncidentStore, Threads, Clock]:
    writes, clock = Threads(), Clock()
    store = IncidentStore(engine, clock, run_in_thread=writes, run_read_in_thread=Threads())
    store.start()
    return store, writes, clock


class Log:
    """Writer work that only notes, in order, that it ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def job(self, name: str) -> Callable[[], str]:
        def run() -> str:
            self.ran.append(name)
            return name

        return run

    def rider(self, name: str) -> Callable[[Connection], str]:
        """The same, as page work riding a batch."""
        return lambda conn: self.job(name)()


def run_all(writes: Threads) -> None:
    while writes.calls:
        writes.run_next()


def category(engine: Engine, external_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(
            select(incidents.c.category).where(incidents.c.external_id == external_id)
        ).scalar_one()


def set_category(external_id: str, value: str) -> Callable[[Connection], str]:
    def ride(conn: Connection) -> str:
        conn.execute(
            update(incidents).where(incidents.c.external_id == external_id).values(category=value)
        )
        return value

    return ride


@contextmanager
def failing_commit(engine: Engine) -> Iterator[None]:
    """Every COMMIT on ``engine`` fails (not a transient error: the batch is not retried)."""

    def refuse(conn: Connection) -> None:
        raise RuntimeError("the disk is full")

    event.listen(engine, "commit", refuse)
    try:
        yield
    finally:
        event.remove(engine, "commit", refuse)


def stored_first(store: IncidentStore, writes: Threads) -> None:
    """Incident G-0 committed, the writer free."""
    store.store_snapshot(incident(0))
    writes.run_next()
    assert not writes.calls


# --- lanes -----------------------------------------------------------------------------------


def test_page_work_goes_before_background_work_queued_earlier(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    log = Log()
    store.run_on_writer(log.job("b1"))  # the writer was free: it starts at once
    store.run_on_writer(log.job("b2"))
    store.run_on_writer(log.job("b3"))
    page = store.ride_next_batch(log.rider("p1"), within=0)  # its own transaction at once
    store.store_snapshot(incident(1))
    run_all(writes)
    # b1 was running; then the page, the ingest batch, and only then the rest.
    assert log.ran == ["b1", "p1", "b2", "b3"]
    assert page.result == "p1"


def test_a_page_waits_behind_at_most_one_background_job(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    log = Log()
    for n in range(5):
        store.run_on_writer(log.job(f"b{n}"))
    writes.run_next()
    writes.run_next()  # b0, b1 ran: the writer was free of anything urgent
    store.ride_next_batch(log.rider("page"), within=0)
    run_all(writes)
    assert log.ran == ["b0", "b1", "b2", "page", "b3", "b4"]


def test_background_work_is_not_starved_by_a_busy_feed(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    log = Log()
    store.store_snapshot(incident(0))  # being written
    background = store.run_on_writer(log.job("background"))
    units = 0
    while not background.called:
        store.store_snapshot(incident(units + 1))  # a batch always waiting ...
        store.ride_next_batch(log.rider("page"))  # ... and a page riding it
        writes.run_next()
        units += 1
        assert units <= BACKGROUND_EVERY + 2  # the unit running, BACKGROUND_EVERY, then it
    assert background.result == "background"
    assert log.ran.count("page") >= BACKGROUND_EVERY // 2  # urgent work went first


def test_failing_page_work_errbacks_only_itself(engine: Engine) -> None:
    store, writes, _ = make_store(engine)

    def broken(conn: Connection) -> None:
        raise ValueError("no")

    failed = store.ride_next_batch(broken, within=0)
    fine = store.run_on_writer(lambda: 7)
    run_all(writes)
    assert isinstance(failed.result, Failure) and failed.result.check(ValueError)
    failed.addErrback(lambda _: None)
    assert fine.result == 7


def test_drain_waits_for_every_lane(engine: Engine) -> None:
    store, writes, clock = make_store(engine)
    stored_first(store, writes)
    store.run_on_writer(lambda: None)
    store.ride_next_batch(set_category("G-0", "x"))
    drained = store.drain()
    writes.run_next()  # the background job (nothing urgent was ready)
    assert not drained.called  # the rider still waits for a batch
    clock.advance(RIDE_WITHIN)
    writes.run_next()
    assert drained.called


# --- riding the next batch -------------------------------------------------------------------


def riding(
    engine: Engine, second: Any, work: Callable[[Connection], str] | None = None
) -> tuple[Threads, Clock, Results]:
    """G-0 stored; then G-1 being written when work (set G-0's category) asks to ride, and
    ``second`` submitted after it. G-1's batch is written: the next is ``second``'s."""
    store, writes, clock = make_store(engine)
    stored_first(store, writes)
    store.store_snapshot(incident(1))
    results = Results()
    results.watch(0, store.ride_next_batch(work or set_category("G-0", "rode")))
    results.watch(1, store.store_snapshot(second))
    assert len(writes.calls) == 1
    writes.run_next()  # G-1's batch: the work waits for the next one
    assert results.values == {} and len(writes.calls) == 1
    return writes, clock, results


def test_work_rides_the_next_batch_in_its_transaction(engine: Engine) -> None:
    writes, clock, results = riding(engine, incident(2))
    assert category(engine, "G-0") != "rode"
    writes.run_next()  # G-2's batch, with the work in it: one transaction
    assert results.values[0] == "rode"
    assert isinstance(results.values[1], StoredSnapshot)
    assert category(engine, "G-0") == "rode"
    clock.advance(RIDE_WITHIN * 10)
    assert writes.calls == []  # nothing ran on its own later


def test_savepoints_on_the_writer_keep_their_journal_in_memory(engine: Engine) -> None:
    """On SQLite the writer's connection keeps temporary storage (a savepoint's sub-journal
    past 64 KiB) in memory, not in a file created and removed each time; the work riding a
    batch sees the setting on the connection it is given."""
    store, writes, _ = make_store(engine)
    results = Results()

    def temp_store(conn: Connection) -> str:
        if conn.dialect.name != "sqlite":
            return "n/a"
        return str(conn.exec_driver_sql("PRAGMA temp_store").scalar_one())

    results.watch(0, store.ride_next_batch(temp_store, within=0))
    run_all(writes)
    assert results.values == {0: "n/a" if engine.dialect.name != "sqlite" else "2"}  # MEMORY


def test_a_failed_batch_sends_the_work_that_rode_it_on_its_own(engine: Engine) -> None:
    bad = replace(record(snapshot("BAD")), feed=None)  # NOT NULL: the batch cannot commit
    writes, _, results = riding(engine, bad)
    writes.run_next()
    assert isinstance(results.values[1], Failure) and results.values[1].check(StoreError)
    assert 0 not in results.values and category(engine, "G-0") != "rode"
    assert len(writes.calls) == 1  # the work goes again, in a transaction of its own
    writes.run_next()
    assert results.values[0] == "rode" and category(engine, "G-0") == "rode"


def test_a_commit_that_fails_takes_the_work_that_rode_it(engine: Engine) -> None:
    """The work goes again on its own; its caller is told when that commit fails too."""
    ran: list[str] = []

    def work(conn: Connection) -> str:
        ran.append(set_category("G-0", "rode")(conn))
        return "rode"

    writes, _, results = riding(engine, incident(2), work)
    with failing_commit(engine):
        writes.run_next()
        assert ran == ["rode"]  # the work ran in its savepoint; then the commit failed
        assert isinstance(results.values[1], Failure) and results.values[1].check(StoreError)
        assert 0 not in results.values
        writes.run_next()  # on its own, and that commit fails too
    assert ran == ["rode", "rode"]
    assert isinstance(results.values[0], Failure) and results.values[0].check(StoreError)
    assert writes.calls == []
    assert category(engine, "G-0") != "rode"
    with engine.connect() as conn:
        assert (
            conn.execute(select(incidents.c.id).where(incidents.c.external_id == "G-2")).all() == []
        )


def test_work_that_fails_rolls_back_only_its_savepoint(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    stored_first(store, writes)
    store.store_snapshot(incident(1))  # being written

    def half_done(conn: Connection) -> None:
        set_category("G-0", "half")(conn)
        raise ValueError("changed its mind")

    results = Results()
    results.watch(0, store.ride_next_batch(half_done))
    results.watch(1, store.ride_next_batch(set_category("G-1", "kept")))
    results.watch(2, store.store_snapshot(incident(2)))
    run_all(writes)
    assert isinstance(results.values[0], Failure) and results.values[0].check(ValueError)
    assert results.values[1] == "kept"
    assert isinstance(results.values[2], StoredSnapshot)
    assert category(engine, "G-0") != "half"
    assert category(engine, "G-1") == "kept"


def test_without_a_batch_the_work_goes_alone_after_the_bound(engine: Engine) -> None:
    store, writes, clock = make_store(engine)
    stored_first(store, writes)
    log = Log()
    ridden = store.ride_next_batch(set_category("G-0", "alone"), within=0.005)
    store.run_on_writer(log.job("background"))
    assert writes.calls == []  # the writer waits for a batch; no background work starts
    clock.advance(0.004)
    assert writes.calls == [] and not ridden.called
    clock.advance(0.001)
    assert len(writes.calls) == 1
    writes.run_next()  # its own transaction
    assert ridden.result == "alone" and category(engine, "G-0") == "alone"
    writes.run_next()
    assert log.ran == ["background"]


def test_a_batch_arriving_within_the_bound_takes_the_work(engine: Engine) -> None:
    store, writes, clock = make_store(engine)
    stored_first(store, writes)
    ridden = store.ride_next_batch(set_category("G-0", "rode"), within=0.005)
    clock.advance(0.004)
    stored = store.store_snapshot(incident(1))
    assert len(writes.calls) == 1
    writes.run_next()
    assert ridden.result == "rode" and isinstance(stored.result, StoredSnapshot)
    clock.advance(0.01)
    assert writes.calls == []


def test_stopping_sends_waiting_work_on_its_own(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    stored_first(store, writes)
    ridden = store.ride_next_batch(set_category("G-0", "late"), within=60)
    stopped = store.stop()
    assert len(writes.calls) == 1
    writes.run_next()
    assert ridden.result == "late" and stopped.called
    assert category(engine, "G-0") == "late"


def test_work_no_page_waits_for_does_not_hold_the_writer(engine: Engine) -> None:
    store, writes, clock = make_store(engine)
    stored_first(store, writes)
    log = Log()
    later = store.ride_later(set_category("G-0", "later"))
    store.run_on_writer(log.job("background"))
    assert len(writes.calls) == 1  # background work goes while it waits for a batch
    writes.run_next()
    assert log.ran == ["background"] and not later.called
    drained = store.drain()
    clock.advance(RIDE_LATER_WITHIN)
    writes.run_next()
    assert later.result == "later" and category(engine, "G-0") == "later"
    assert drained.called


def test_work_no_page_waits_for_stays_out_of_a_batch_with_page_work(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    stored_first(store, writes)
    log = Log()
    later = store.ride_later(log.rider("referral"))
    page = store.ride_next_batch(log.rider("page"))
    store.store_snapshot(incident(1))
    writes.run_next()  # the batch and the page riding it: the referral waits for the next
    assert log.ran == ["page"] and page.result == "page" and not later.called
    store.store_snapshot(incident(2))
    writes.run_next()
    assert log.ran == ["page", "referral"] and later.result == "referral"


def test_a_batch_takes_one_unit_of_work_no_page_waits_for(engine: Engine) -> None:
    store, writes, clock = make_store(engine)
    stored_first(store, writes)
    log = Log()
    first = store.ride_later(log.rider("referral 1"))
    second = store.ride_later(log.rider("referral 2"))
    page = store.ride_next_batch(log.rider("page"), within=RIDE_LATER_WITHIN)
    store.store_snapshot(incident(1))
    writes.run_next()  # a batch with page work riding it takes neither
    assert log.ran == ["page"] and page.result == "page"
    store.store_snapshot(incident(3))
    writes.run_next()  # the next batch takes one: a page arriving now waits for one unit
    assert log.ran == ["page", "referral 1"] and first.called and not second.called
    store.store_snapshot(incident(4))
    writes.run_next()
    assert log.ran == ["page", "referral 1", "referral 2"] and second.called
    assert not writes.calls and not clock.getDelayedCalls()


def test_work_no_page_waits_for_goes_alone_after_its_bound_even_beside_page_work(
    engine: Engine,
) -> None:
    store, writes, clock = make_store(engine)
    stored_first(store, writes)
    log = Log()
    store.store_snapshot(incident(1))  # the writer is busy with a batch ...
    later = store.ride_later(log.rider("referral"))
    clock.advance(RIDE_LATER_WITHIN)  # ... when its time is up: it waits no longer
    page = store.ride_next_batch(log.rider("page"))
    writes.run_next()
    assert log.ran == []
    writes.run_next()  # the next unit takes both
    assert log.ran == ["referral", "page"]
    assert page.result == "page" and later.result == "referral"


# --- the follower: work a snapshot calls for, in the snapshot's own transaction ---------------


class Marker:
    """A follower that sets the stored incident's category to "followed" for the snapshots
    whose incident id is in ``wanted`` (or fails for those in ``failing``), noting each call."""

    def __init__(self, wanted: set[str], failing: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.wanted, self.failing = wanted, failing
        self.asked: list[str] = []
        self.followed: list[tuple[str, str]] = []  # (incident id, snapshot state)

    def wants(self, rec: SnapshotRecord) -> bool:
        self.asked.append(rec.snapshot.incident_id)
        return rec.snapshot.incident_id in self.wanted

    def follow(self, conn: Connection, rec: SnapshotRecord, stored: StoredSnapshot) -> str:
        self.followed.append((stored.external_id, stored.state))
        set_category(stored.external_id, "followed")(conn)
        if stored.external_id in self.failing:
            raise RuntimeError("no clinician table")
        return f"followed {stored.external_id}"


def incident_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(incidents.c.external_id)).scalars())


def test_a_follower_works_in_the_snapshots_own_transaction(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    marker = Marker({"G-1"})
    store.follow_with(marker)
    results = Results()
    results.watch(1, store.store_snapshot(incident(1)))
    with failing_commit(engine):
        writes.run_next()  # the commit fails: the follower's work is gone with the snapshot
    assert marker.followed == [("G-1", "new")] and incident_ids(engine) == []
    assert isinstance(results.values[1], Failure)
    for n in (1, 2):  # the CAD sends it again, and another
        results.watch(n, store.store_snapshot(incident(n)))
    run_all(writes)
    assert category(engine, "G-1") == "followed" and category(engine, "G-2") is None
    first, second = results.values[1], results.values[2]
    assert isinstance(first, StoredSnapshot) and isinstance(second, StoredSnapshot)
    assert first.followed is not None and first.followed.ok
    assert first.followed.value == "followed G-1"
    assert second.followed is None  # not wanted: never asked to follow
    assert marker.followed == [("G-1", "new")] * 2


def test_a_follower_is_not_asked_for_a_repeated_snapshot(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    store.follow_with(marker := Marker({"G-1"}))
    done = Results()
    done.watch(1, store.store_snapshot(incident(1)))
    writes.run_next()
    done.watch(2, store.store_snapshot(incident(1)))  # the same bytes again: a duplicate
    writes.run_next()
    assert [state for _, state in marker.followed] == ["new"]
    assert done.values[2].state == "duplicate" and done.values[2].followed is None


def test_a_failing_follower_rolls_back_only_its_savepoint(engine: Engine) -> None:
    store, writes, _ = make_store(engine)
    store.follow_with(Marker({"G-1"}, failing={"G-1"}))
    done = Results()
    done.watch(1, store.store_snapshot(incident(1)))
    writes.run_next()
    stored = done.values[1]
    assert isinstance(stored, StoredSnapshot) and stored.state == "new"  # stored, acknowledged
    assert stored.followed is not None and not stored.followed.ok
    assert str(stored.followed.value) == "no clinician table"
    assert category(engine, "G-1") is None  # the follower's statements rolled back
    assert store.healthy


def test_a_batch_with_a_followed_snapshot_keeps_work_no_page_waits_for_out(
    engine: Engine,
) -> None:
    store, writes, _ = make_store(engine)
    stored_first(store, writes)
    store.follow_with(Marker({"G-1"}))
    log = Log()
    later = store.ride_later(log.rider("referral"))
    store.store_snapshot(incident(1))  # a snapshot that may page
    writes.run_next()
    assert log.ran == [] and not later.called
    store.store_snapshot(incident(2))  # one that does not: the referral rides it
    writes.run_next()
    assert log.ran == ["referral"] and later.result == "referral"
