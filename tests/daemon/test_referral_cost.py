"""What a referral costs the shared writer, and idempotency keys.

A referral made in the daemon is one transaction: the referral, its message and the claim of
that message for this daemon's worker, handed to the provider's sender without a poll.
Idempotency keys are unique per referral: a repeat answers with the first referral, on SQLite
and PostgreSQL, also when both submits race (PostgreSQL's unique index makes the second wait
for the first and fail, and it then answers with the first).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select, text
from twisted.internet.defer import ensureDeferred

from corespond.daemon.referrals import (
    CreatedReferral,
    ReferralError,
    ReferralService,
    referral_content,
    store_referral,
)
from corespond.daemon.store.tables import referral_idempotency, referral_messages, referrals
from corespond.daemon.store.writer import IncidentStore
from tests.daemon.referral_rig import Loop, Peer, config, now, request, with_port
from tests.daemon.store.test_store import Threads, incident

KEY = "api:avl:8e03978e-40d5-43e8-bc93-6894a57f9324"


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


class Commits:
    """Counts the transactions committed on ``engine``."""

    def __init__(self, engine: Engine) -> None:
        self.n = 0
        self.engine = engine
        event.listen(engine, "commit", self._count)

    def _count(self, _conn: Any) -> None:
        self.n += 1

    def close(self) -> None:
        event.remove(self.engine, "commit", self._count)


def started(
    engine: Engine, loop: Loop, port: int, wiring: dict[str, Any] | None = None, **kw: Any
) -> ReferralService:
    """The service on ``loop``, started and idle; ``wiring``: its store hand-offs (ride...)."""
    # A poll interval far beyond the test: anything sent was handed over, not polled for.
    cfg = replace(with_port(config(), "csu", port), poll_interval=3600.0, **kw)
    service = ReferralService(engine, loop.reactor, cfg, clock=loop.clock, **(wiring or {}))
    service.start()
    loop.spin(lambda: service.started.called, turns=6000)
    loop.spin(lambda: not service.worker._polling)  # the first poll's claim, done
    return service


def stop(loop: Loop, service: ReferralService, peer: Peer) -> None:
    stopped = ensureDeferred(service.stop())
    loop.spin(lambda: stopped.called)
    peer.stop()


def created(loop: Loop, service: ReferralService, **kw: Any) -> CreatedReferral:
    d = service.create(request(**kw))
    loop.spin(lambda: d.called, turns=6000)
    result: Any = d.result
    if not isinstance(result, CreatedReferral):
        result.raiseException()
    return result


def test_a_referral_is_one_transaction_and_goes_out_without_a_poll(engine: Engine) -> None:
    loop = Loop()
    peer = Peer(loop).start()
    service = started(engine, loop, peer.port)
    commits = Commits(engine)
    try:
        first = created(loop, service)
        assert commits.n == 1  # the referral, its message and the claim
        loop.spin(lambda: service.worker.delivered == 1)
        second = created(loop, service, incident_ref="I-2")
        loop.spin(lambda: service.worker.delivered == 2)
    finally:
        stop(loop, service, peer)
        commits.close()
    assert peer.control_ids() == [first.control_id, second.control_id]
    assert commits.n == 4  # two referrals, two results (no claim, no poll)
    with engine.connect() as conn:
        assert set(conn.execute(select(referral_messages.c.state)).scalars()) == {"delivered"}


@pytest.mark.parametrize("driver_level", [True, False], ids=["driver", "core"])
def test_a_message_another_daemon_is_sending_to_waits_for_the_poll(
    engine: Engine, driver_level: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker holds a live claim on the provider: the new message is queued, not
    claimed (one sender per provider across daemons), and this worker does not send it.
    On SQLite the look at the live claims runs on the driver's cursor too (or Core)."""
    from corespond.daemon import referrals as module

    monkeypatch.setattr(module, "SQLITE_DRIVER_LEVEL", driver_level)
    loop = Loop()
    peer = Peer(loop).start()
    service = started(engine, loop, peer.port)
    cfg = service.config
    try:
        provider = cfg.providers[0]
        content = referral_content(cfg, provider, request(), "RBUSY", "CRBUSY0001", now())
        store_referral(engine, provider, request(), content, b"MSH|busy\r", now(),
                       claim=("other-daemon", service.worker._lease()))  # fmt: skip
        mine = created(loop, service, incident_ref="I-2")
        loop.settle()
    finally:
        stop(loop, service, peer)
    assert peer.received == []
    with engine.connect() as conn:
        query = select(referral_messages.c.control_id, referral_messages.c.state)
        rows = {control_id: state for control_id, state in conn.execute(query)}
    assert rows == {"CRBUSY0001": "sending", mine.control_id: "pending"}


def test_the_same_idempotency_key_answers_with_the_first_referral(engine: Engine) -> None:
    loop = Loop()
    peer = Peer(loop).start()
    service = started(engine, loop, peer.port)
    try:
        first = created(loop, service, idempotency_key=KEY)
        again = created(loop, service, idempotency_key=KEY)
        other = created(loop, service, idempotency_key=KEY + "-2")
        d = service.create(request(idempotency_key=KEY, summary="a different summary"))
        loop.spin(lambda: d.called)
        failure: Any = d.result
        d.addErrback(lambda _: None)
        held = created(loop, service, idempotency_key="form:P1:n1", part2=True)
        held_again = created(loop, service, idempotency_key="form:P1:n1", part2=True)
        loop.spin(lambda: service.worker.delivered == 2)
    finally:
        stop(loop, service, peer)
    assert not first.replayed and again.replayed
    assert (again.id, again.ref, again.control_id) == (first.id, first.ref, first.control_id)
    assert again.state in ("queued", "delivered")  # as it is now: it may have gone meanwhile
    assert other.ref != first.ref
    assert failure.check(ReferralError)
    assert "idempotency key was used for another request" in str(failure.value)
    assert first.ref in str(failure.value) and "different summary" not in str(failure.value)
    assert held.state == "held" and held_again.replayed and held_again.ref == held.ref
    assert count(engine, referrals) == 3 and count(engine, referral_idempotency) == 3
    assert sorted(peer.control_ids()) == sorted([first.control_id, other.control_id])


def _lock_waiters(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                )
            ).scalar_one()
        )


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_submits_racing_with_one_key_make_one_referral(engine: Engine) -> None:
    """The second submit's insert waits on the first's uncommitted key (PostgreSQL), fails
    when the first commits, and answers with the first referral."""
    cfg = config()
    provider = cfg.providers[0]
    wanted = request(idempotency_key=KEY)
    results: dict[str, Any] = {}

    def submit(name: str, on_stored: Any = None) -> None:
        content = referral_content(cfg, provider, wanted, "R" + name, "CR" + name, now())
        try:
            results[name] = store_referral(
                engine, provider, wanted, content, b"MSH|x\r", now(), on_stored=on_stored
            )[0]
        except Exception as err:  # reported below
            results[name] = err

    second = threading.Thread(target=submit, args=("SECOND",))

    def start_the_second_and_wait_for_it(_conn: Any, _ref: str) -> None:
        second.start()
        for _ in range(1_000_000):  # until it waits on our uncommitted key
            if _lock_waiters(engine):
                return
        raise AssertionError("the second submit never waited for the first")

    submit("FIRST", start_the_second_and_wait_for_it)
    second.join(30)
    first, again = results["FIRST"], results["SECOND"]
    assert isinstance(first, CreatedReferral) and not first.replayed
    assert isinstance(again, CreatedReferral) and again.replayed and again.ref == "RFIRST"
    assert count(engine, referrals) == 1 and count(engine, referral_messages) == 1


def store_on_writer(engine: Engine, loop: Loop) -> tuple[IncidentStore, Threads]:
    """The daemon's store on ``loop``'s clock, its writer thread the test's Threads: the test
    runs each unit of writer work, so it sees what rides which batch."""
    writes = Threads()
    store = IncidentStore(engine, loop.clock, run_in_thread=writes, run_read_in_thread=Threads())
    store.start()
    return store, writes


def stop_store(store: IncidentStore, writes: Threads) -> None:
    store.stop()
    while writes.calls:
        writes.run_next()


def one_batch_then_delivered(
    engine: Engine, loop: Loop, store: IncidentStore, writes: Threads, service: ReferralService
) -> None:
    """A snapshot's batch, and the referral work waiting to ride it, in one transaction; then
    the referral is delivered (its send waited for that commit)."""
    commits = Commits(engine)
    store.store_snapshot(incident(0))
    writes.run_next()
    assert commits.n == 1
    commits.close()
    loop.spin(lambda: service.worker.delivered == 1)


def test_a_referral_rides_the_next_ingest_batch_and_commits_with_it(engine: Engine) -> None:
    """On SQLite the daemon hands the service the store's ``ride_later``: a new referral's
    statements go in a savepoint of the next ingest batch, so no page waits behind a commit
    of its own on the shared writer; it is handed to the sender once that batch committed."""
    loop = Loop()
    peer = Peer(loop).start()
    store, writes = store_on_writer(engine, loop)
    service = started(engine, loop, peer.port, {"ride": store.ride_later})
    commits = Commits(engine)
    try:
        d = service.create(request())
        loop.spin(lambda: bool(store._riders), turns=6000)  # built, waiting for a batch
        assert not d.called and count(engine, referrals) == 0
        stored = store.store_snapshot(incident(0))
        writes.run_next()  # the batch, and the referral riding it: one transaction
        assert commits.n == 1 and stored.called
        loop.spin(lambda: d.called)
        mine = d.result
        assert isinstance(mine, CreatedReferral) and mine.state == "queued"
        loop.spin(lambda: service.worker.delivered == 1)
    finally:
        stop(loop, service, peer)
        commits.close()
        stop_store(store, writes)
    assert peer.control_ids() == [mine.control_id]


def test_the_group_commit_of_send_results_rides_a_batch_too(engine: Engine) -> None:
    """The worker's commit of an ACK rides the next ingest batch (``ride_commits``): the
    referral counts as delivered only once that batch committed, in one transaction."""
    loop = Loop()
    peer = Peer(loop).start()
    store, writes = store_on_writer(engine, loop)
    ride = {"ride_commits": lambda fn: store.ride_next_batch(fn, within=60, urgent=False)}
    service = started(engine, loop, peer.port, ride)
    try:
        mine = created(loop, service)
        loop.spin(lambda: bool(store._riders))  # acknowledged; its commit waits for a batch
        assert peer.control_ids() == [mine.control_id] and service.worker.delivered == 0
        one_batch_then_delivered(engine, loop, store, writes, service)
    finally:
        stop(loop, service, peer)
        stop_store(store, writes)
    with engine.connect() as conn:
        assert set(conn.execute(select(referral_messages.c.state)).scalars()) == {"delivered"}


def test_the_polls_claim_rides_a_batch_and_sends_only_after_it_committed(engine: Engine) -> None:
    """The poll's claim rides the next ingest batch (``ride_claims``) instead of a transaction
    of its own on the writer a page's batch could queue behind; the claimed message goes on
    the wire only once that batch (one transaction) has committed."""
    from corespond.daemon.referrals import create_referral

    loop = Loop()
    peer = Peer(loop).start()
    store, writes = store_on_writer(engine, loop)
    cfg = replace(with_port(config(), "csu", peer.port), poll_interval=3600.0)
    mine = create_referral(engine, cfg, request(), now())  # in the outbox, due, not claimed
    service = ReferralService(
        engine, loop.reactor, cfg, clock=loop.clock,
        ride_claims=lambda fn: store.ride_next_batch(fn, within=60, urgent=False),
    )  # fmt: skip
    service.start()
    try:
        loop.spin(lambda: service.started.called, turns=6000)
        loop.spin(lambda: bool(store._riders))  # the first poll's claim waits for a batch
        assert not writes.calls and service.worker._polling
        loop.settle()
        assert peer.control_ids() == []  # the claim is not committed yet: nothing sent
        one_batch_then_delivered(engine, loop, store, writes, service)
    finally:
        stop(loop, service, peer)
        stop_store(store, writes)
    assert peer.control_ids() == [mine.control_id]
