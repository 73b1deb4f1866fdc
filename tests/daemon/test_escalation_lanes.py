"""Paging over the store's writer lanes: a chain's first page rides the next ingest batch.

The real PagingService and IncidentStore on the real database (SQLite and PostgreSQL); the
store's writer thread is the injected Threads of the store tests, so the test decides when each
transaction runs and sees when the page goes relative to the commit; a fake clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from corespond.daemon.decision import Response
from corespond.daemon.store import paging as db
from corespond.daemon.store.writer import (
    RIDE_LATER_WITHIN,
    RIDE_WITHIN,
    IncidentStore,
    StoredSnapshot,
    StoreError,
)
from tests.daemon.store.test_store import Threads
from tests.daemon.store.test_store import incident as other_incident
from tests.daemon.store.test_writer_lanes import failing_commit
from tests.daemon.test_escalation import (
    World,
    cad_record,
    clinician_call,
    incident,
    make_service,
    roster,  # noqa: F401 (a fixture)
    told,
    world,  # noqa: F401 (a fixture)
)


class Lanes:
    def __init__(self, w: World, store: IncidentStore, writes: Threads) -> None:
        self.w, self.store, self.writes = w, store, writes

    def chains(self) -> int:
        return len(self.w.rows("SELECT id FROM escalation_chains"))

    def submitted(self) -> int:
        return len(self.w.rows("SELECT id FROM pages WHERE submitted_at IS NOT NULL"))


@pytest.fixture(name="lanes")
def lanes_world(w: World) -> Iterator[Lanes]:
    """The world of test_escalation, its service replaced by one whose page work rides the
    batches of a store on the same database and clock."""
    w.service.stop()
    writes = Threads()
    store = IncidentStore(w.engine, w.reactor, run_in_thread=writes, run_read_in_thread=Threads())
    store.start()
    w.service = make_service(
        w.engine, w.roster, w.reactor, w.pagers,  # type: ignore[arg-type]
        ride=store.ride_next_batch, ride_later=store.ride_later,
    )  # fmt: skip
    w.service.start()
    yield Lanes(w, store, writes)
    w.service.stop()


def test_the_page_goes_after_the_batch_it_rode_commits(lanes: Lanes) -> None:
    w, store, writes = lanes.w, lanes.store, lanes.writes
    incident(w, Response.CLINICIAN)
    assert w.sent() == [] and writes.calls == []  # waiting for a batch
    store.store_snapshot(other_incident(1))  # the next ingest batch
    assert w.sent() == [] and lanes.chains() == 0 and len(writes.calls) == 1
    writes.run_next()  # the batch and the chain's first step: one transaction
    assert lanes.chains() == 1
    assert [(gw, address) for gw, address, _ in w.sent()] == [("wctp", "5550101")]
    # The submission is recorded later, riding a batch too (here none comes: alone), and never
    # beside page work: the worker's pass claiming due pages, waiting meanwhile, goes first.
    assert lanes.submitted() == 0 and writes.calls == []
    w.reactor.advance(RIDE_LATER_WITHIN)
    writes.run_next()
    assert lanes.submitted() == 0
    writes.run_next()
    assert lanes.submitted() == 1 and writes.calls == []


def test_without_a_batch_the_page_goes_after_the_bound(lanes: Lanes) -> None:
    w, writes = lanes.w, lanes.writes
    incident(w, Response.CLINICIAN)
    assert writes.calls == []
    w.reactor.advance(RIDE_WITHIN)
    assert w.sent() == [] and len(writes.calls) == 1
    writes.run_next()
    assert len(w.sent()) == 1 and lanes.chains() == 1


def test_a_batch_that_fails_to_commit_sends_no_page_until_the_chain_commits_alone(
    lanes: Lanes,
) -> None:
    w, store, writes = lanes.w, lanes.store, lanes.writes
    incident(w, Response.CLINICIAN)
    lost = store.store_snapshot(other_incident(1))
    with failing_commit(w.engine):
        writes.run_next()  # the chain's first step ran in the batch; the commit failed
    assert w.sent() == [] and lanes.chains() == 0
    assert store.healthy is False
    lost.addErrback(lambda failure: failure.trap(StoreError))  # the batch's own snapshot
    # The chain's first step only shared that transaction: it goes again in one of its own,
    # and the page goes once that commits.
    w.reactor.advance(RIDE_WITHIN)
    while writes.calls:
        writes.run_next()
    assert len(w.sent()) == 1 and lanes.chains() == 1


# --- a chain started in the snapshot's own transaction (the store's follower) -----------------


def test_a_clinician_call_pages_after_one_commit_its_snapshots(lanes: Lanes) -> None:
    w, store, writes = lanes.w, lanes.store, lanes.writes
    store.follow_with(w.service)
    rec = clinician_call()
    store.store_snapshot(rec).addCallback(lambda stored: told(w, rec, stored))
    assert len(writes.calls) == 1 and w.sent() == []
    writes.run_next()  # the snapshot, its chain, the first step and its page: one transaction
    assert lanes.chains() == 1
    assert [(gw, address) for gw, address, _ in w.sent()] == [("wctp", "5550101")]
    assert writes.calls == []  # nothing else was waited for: only the submission, later
    w.reactor.advance(RIDE_LATER_WITHIN)
    while writes.calls:
        writes.run_next()
    assert lanes.submitted() == 1 and lanes.chains() == 1 and len(w.sent()) == 1


def test_a_repeated_snapshot_of_a_call_with_its_chain_starts_nothing(lanes: Lanes) -> None:
    w, store, writes = lanes.w, lanes.store, lanes.writes
    store.follow_with(w.service)
    for updated in (0, 1):
        rec = cad_record(Response.CLINICIAN, updated=updated)
        store.store_snapshot(rec).addCallback(lambda stored, rec=rec: told(w, rec, stored))
        while writes.calls:
            w.reactor.advance(RIDE_LATER_WITHIN)
            writes.run_next()
    assert lanes.chains() == 1 and len(w.sent()) == 1


def test_when_the_chain_fails_in_the_snapshots_transaction_it_starts_after_the_commit(
    lanes: Lanes, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, store, writes = lanes.w, lanes.store, lanes.writes
    store.follow_with(w.service)
    opened = db.open_chain

    def broken(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(db, "open_chain", opened)  # only the first time
        raise RuntimeError("lock timeout")

    monkeypatch.setattr(db, "open_chain", broken)
    rec = clinician_call()
    acked: list[StoredSnapshot] = []
    store.store_snapshot(rec).addCallback(acked.append).addCallback(
        lambda _: told(w, rec, acked[0])
    )
    writes.run_next()
    assert acked and acked[0].state == "new"  # the snapshot is stored and acknowledged
    assert lanes.chains() == 0 and w.sent() == []
    w.reactor.advance(RIDE_WITHIN)  # the chain goes the way after the commit: riding
    while writes.calls:
        writes.run_next()
    assert lanes.chains() == 1 and len(w.sent()) == 1
