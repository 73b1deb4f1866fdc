"""Paging over the store's writer lanes: a chain's first page rides the next ingest batch.

The real PagingService and IncidentStore on the real database (SQLite and PostgreSQL); the
store's writer thread is the injected Threads of the store tests, so the test decides when each
transaction runs and sees when the page goes relative to the commit; a fake clock.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from corespond.daemon.decision import Response
from corespond.daemon.store.writer import (
    RIDE_LATER_WITHIN,
    RIDE_WITHIN,
    IncidentStore,
    StoreError,
)
from tests.daemon.store.test_store import Threads
from tests.daemon.store.test_store import incident as other_incident
from tests.daemon.store.test_writer_lanes import failing_commit
from tests.daemon.test_escalation import (
    World,
    incident,
    make_service,
    roster,  # noqa: F401 (a fixture)
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
