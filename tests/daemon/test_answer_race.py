"""Two answers to one chain at once: an SMS reply on one daemon and an ack-page tap or a CAD
unit status on another, sharing one PostgreSQL (or SQLite, whose one writer serializes them).
The second is judged against what the first did, as if it had come later: an accept and a
decline of one page are never both counted, a chain is never taken or advanced twice, and a
reply matched by its sender answers the page that is its most recent open one once the other
answer is in.

Each side runs the transaction the paging core runs for it (``PagingService.reply`` /
``answer`` / ``unit_status``) on its own connection, in its own thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, text

from corespond.daemon.decision import Response
from corespond.daemon.pager import PageAnswer, Reply
from corespond.daemon.responders import Availability, UnitStatusChange
from corespond.daemon.store import paging as db
from corespond.daemon.store.unit_status import apply_unit_status
from tests.daemon.test_escalation import World, incident, result_of, roster, world

__all__ = ["roster", "world"]  # fixtures

POSTGRES_ONLY = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
C101_SMS = "+15550000101"


def reply_tx(conn: Connection, reply: Reply, senders: list[str], now: datetime) -> str:
    """What ``PagingService.reply`` does in its transaction: match, answer, record."""
    found = db.find_page(
        conn, page_ref=reply.page_ref, gateway=reply.gateway, gateway_id=reply.gateway_id,
        clinician_ids=senders,
    )  # fmt: skip
    if found is None:
        db.record_reply(conn, None, None, reply, "unmatched")
        return "unmatched"
    page, matched_by = found
    assert reply.answer is not None
    outcome = db.apply_answer(conn, page, reply.answer, reply.gateway, now)
    db.record_reply(conn, page, matched_by, reply, outcome)
    return f"{outcome} {page.page_ref}"


def tap_tx(conn: Connection, page_ref: str, answer: PageAnswer, now: datetime) -> str:
    """What ``PagingService.answer`` (the ack page) does in its transaction."""
    found = db.find_page(conn, page_ref=page_ref)
    assert found is not None
    return db.apply_answer(conn, found[0], answer, "ack-page", now)


def in_thread(
    engine: Engine,
    fn: Callable[[Connection], str],
    out: list[Any],
    start: threading.Barrier | None = None,
) -> Any:
    """``fn`` in a transaction of its own in a new thread (begun once ``start`` is passed)."""

    def run() -> None:
        try:
            if start is not None:
                start.wait(timeout=30)
            with engine.begin() as conn:
                out.append(fn(conn))
        except Exception as err:  # reported in the test's thread
            out.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_until_it_waits(engine: Engine, thread: threading.Thread) -> None:
    """Until PostgreSQL says another transaction waits for a lock (or the thread ended)."""
    with engine.connect() as watcher:
        for _ in range(1_000_000):
            waiting = watcher.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            ).scalar()
            watcher.rollback()  # pg_stat_activity is a snapshot per transaction
            if waiting or not thread.is_alive():
                return
    raise AssertionError("the second answer never waited")


def tap_while_sms(
    w: World, tap: tuple[str, PageAnswer], sms: tuple[PageAnswer, str]
) -> list[Any]:
    """A tap on the ack page (this daemon) under way while c-101's SMS reply without a
    reference (another daemon) comes in."""
    now = w.service.clock.now()
    reply = Reply("sms", now, sms[0], sender=C101_SMS, text=sms[1])
    return second_waits_for_first(
        w,
        lambda c: tap_tx(c, *tap, now) == "applied" or fail(),
        lambda c: reply_tx(c, reply, ["c-101"], now),
    )


def fail() -> None:
    raise AssertionError("the first answer was not applied")


def rows(w: World, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in w.rows(sql)]


def second_waits_for_first(
    w: World, first: Callable[[Connection], Any], second: Callable[[Connection], str]
) -> list[Any]:
    """``first`` in a transaction; ``second`` started (another daemon) while it is open: it
    must wait for it. What ``second`` returned, once ``first`` committed."""
    theirs: list[Any] = []
    with w.engine.connect() as conn:
        with conn.begin():
            first(conn)
            thread = in_thread(w.engine, second, theirs)
            wait_until_it_waits(w.engine, thread)
            assert theirs == []
        thread.join(60)
    return theirs


@POSTGRES_ONLY
def test_a_decline_racing_an_accept_of_the_same_page_is_late(w: World) -> None:
    """The accept holds the chain; the decline (another daemon, by SMS) waits for it, then
    finds the page accepted: recorded as ``page-closed``, the chain not advanced."""
    incident(w, Response.CLINICIAN)
    result_of(w.service.stop())
    theirs = tap_while_sms(w, ("C1445-1", PageAnswer.ACCEPT), (PageAnswer.DECLINE, "no"))
    assert theirs == ["page-closed C1445-1"]
    assert rows(w, "SELECT state, answered_via FROM pages") == [("accepted", "ack-page")]
    assert rows(w, "SELECT state, accepted_by FROM escalation_chains") == [("accepted", "c-101")]
    assert rows(w, "SELECT step, state FROM escalation_steps ORDER BY step") == [
        (0, "done"), (1, "cancelled"),
    ]  # fmt: skip
    assert rows(w, "SELECT matched_by, outcome FROM page_replies") == [("sender", "page-closed")]


@POSTGRES_ONLY
def test_a_reply_by_sender_answers_the_page_still_open_once_the_other_answer_is_in(
    w: World,
) -> None:
    """c-101 has two open pages. A decline of the newer one (ack page) is under way when an SMS
    "yes" without a reference arrives on another daemon: it waits, then answers the sender's
    most recent page that is still open, the older one, as it would have a moment later."""
    incident(w, Response.CLINICIAN)
    incident(w, Response.CLINICIAN, incident_id="2026-001446")
    assert rows(w, "SELECT page_ref, clinician_id, state FROM pages ORDER BY id") == [
        ("C1445-1", "c-101", "open"), ("C1446-1", "c-101", "open"),
    ]  # fmt: skip
    result_of(w.service.stop())
    theirs = tap_while_sms(w, ("C1446-1", PageAnswer.DECLINE), (PageAnswer.ACCEPT, "yes"))
    assert theirs == ["applied C1445-1"]
    assert rows(w, "SELECT page_ref, state FROM pages ORDER BY id") == [
        ("C1445-1", "accepted"), ("C1446-1", "declined"),
    ]  # fmt: skip
    assert rows(w, "SELECT state, accepted_by FROM escalation_chains ORDER BY id") == [
        ("accepted", "c-101"), ("open", None),
    ]  # fmt: skip


@POSTGRES_ONLY
def test_a_cad_status_racing_a_reply_takes_its_path_from_the_page_as_the_reply_left_it(
    w: World,
) -> None:
    """An "en route" reply is under way when the CAD says the unit is on scene: the status
    waits, finds the page en route, and takes it on scene (not through en route again)."""
    stored = incident(w, Response.CLINICIAN)
    result_of(w.service.stop())
    now = w.service.clock.now()
    change = UnitStatusChange("c-101", Availability.ON_SCENE, PageAnswer.ON_SCENE, now,
                              stored.incident_pk, "cad:cad-json")  # fmt: skip
    en_route = Reply("sms", now, PageAnswer.EN_ROUTE, sender=C101_SMS, text="omw")
    theirs = second_waits_for_first(
        w,
        lambda c: reply_tx(c, en_route, ["c-101"], now) == "applied C1445-1" or fail(),
        lambda c: str(apply_unit_status(c, change, now).answered),
    )
    assert theirs == ["C1445-1"]
    assert rows(w, "SELECT state, answered_via FROM pages") == [("on_scene", "cad:cad-json")]
    assert rows(w, "SELECT availability FROM clinician_states") == [("on_scene",)]


@POSTGRES_ONLY
def test_an_accept_chosen_to_break_a_deadlock_is_applied_again(w: World) -> None:
    """A worker finishing the chain's next step holds the step, then wants the chain, which an
    accept holds while it wants the step to cancel it. PostgreSQL fails the accept's statement
    to break the cycle; the accept rolls back to its savepoint (the worker goes on and commits)
    and is applied again, after the worker."""
    incident(w, Response.CLINICIAN)
    result_of(w.service.stop())
    now = w.service.clock.now()
    [(chain_id,)] = rows(w, "SELECT id FROM escalation_chains")
    theirs: list[Any] = []
    with w.engine.connect() as worker:
        with worker.begin():
            # The accept's side, waiting first and checking after 1 s, finds the cycle.
            worker.execute(text("SET LOCAL deadlock_timeout = '60s'"))
            worker.execute(
                text("SELECT id FROM escalation_steps WHERE chain_id = :c AND step = 1 "
                     "FOR UPDATE"), {"c": chain_id},
            )  # fmt: skip
            thread = in_thread(w.engine, lambda c: tap_tx(c, "C1445-1", PageAnswer.ACCEPT, now),
                               theirs)  # fmt: skip
            wait_until_it_waits(w.engine, thread)
            worker.execute(
                text("UPDATE escalation_chains SET pages_sent = pages_sent + 1 WHERE id = :c"),
                {"c": chain_id},
            )
        thread.join(60)
    assert theirs == ["applied"]
    assert rows(w, "SELECT state, accepted_by, pages_sent FROM escalation_chains") == [
        ("accepted", "c-101", 2),
    ]  # fmt: skip
    assert rows(w, "SELECT step, state FROM escalation_steps ORDER BY step") == [
        (0, "done"), (1, "cancelled"),
    ]  # fmt: skip


ROUNDS = 6


def test_answers_at_once_are_applied_one_after_the_other(w: World) -> None:
    """Rounds of an accept (ack page) and a decline (SMS) of one page, and of two clinicians'
    accepts of two pages of one chain, started together from two threads: exactly one of each
    pair counts, and the rows agree with it."""
    for n in range(ROUNDS):
        incident(w, Response.CLINICIAN, incident_id=f"2026-00{2000 + n}")
    w.advance(5.1)  # the second page of each chain: c-102
    result_of(w.service.stop())
    refs = rows(w, "SELECT chain_id, page_ref, clinician_id FROM pages WHERE kind = 'page' "
                "AND state = 'open' ORDER BY id")  # fmt: skip
    chains = sorted({chain for chain, _, _ in refs})
    assert len(chains) == ROUNDS and len(refs) == 2 * ROUNDS
    now = w.service.clock.now() + timedelta(minutes=1)
    for n, chain in enumerate(chains):
        (_, first_ref, first), (_, second_ref, second) = [r for r in refs if r[0] == chain]
        assert (first, second) == ("c-101", "c-102")
        accept_twice = n % 2 == 1
        start = threading.Barrier(2)
        out: list[Any] = []
        sides: list[Callable[[Connection], str]]
        if accept_twice:
            sides = [
                partial(tap_tx, page_ref=first_ref, answer=PageAnswer.ACCEPT, now=now),
                partial(tap_tx, page_ref=second_ref, answer=PageAnswer.ACCEPT, now=now),
            ]
        else:
            decline = Reply("sms", now, PageAnswer.DECLINE, page_ref=second_ref, text="no")
            sides = [
                partial(tap_tx, page_ref=second_ref, answer=PageAnswer.ACCEPT, now=now),
                partial(reply_tx, reply=decline, senders=["c-102"], now=now),
            ]
        threads = [in_thread(w.engine, side, out, start) for side in sides]
        for thread in threads:
            thread.join(60)
        assert not any(isinstance(o, Exception) for o in out), out
        pages = dict(rows(w, f"SELECT page_ref, state FROM pages WHERE chain_id = {chain}"))
        [(state, taker)] = rows(w, f"SELECT state, accepted_by FROM escalation_chains "
                                f"WHERE id = {chain}")  # fmt: skip
        if accept_twice:
            assert sorted(out) == ["applied", "page-closed"]  # the other page was withdrawn
            assert state == "accepted" and taker in ("c-101", "c-102")
            mine, other = (first_ref, second_ref) if taker == "c-101" else (second_ref, first_ref)
            assert (pages[mine], pages[other]) == ("accepted", "cancelled")
        else:
            assert sorted(o.split()[0] for o in out) == ["applied", "page-closed"]
            if pages[second_ref] == "accepted":
                assert (state, taker) == ("accepted", "c-102")
            else:
                assert pages[second_ref] == "declined" and (state, taker) == ("open", None)


@POSTGRES_ONLY
def test_a_step_being_finished_locks_its_chain_before_its_step(w: World) -> None:
    """Every writer of a chain locks chain, then steps, then pages (answers and cancellations do
    by their first statement): a worker claiming and finishing a step in the other order would
    deadlock against an accept, and lose its whole claim-and-finish transaction when chosen."""
    incident(w, Response.CLINICIAN)
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(w.engine, "before_cursor_execute", seen)
    try:
        w.advance(5.1)  # the chain's next step comes due and is finished
    finally:
        event.remove(w.engine, "before_cursor_execute", seen)
    result_of(w.service.stop())
    locks = [
        s for s in statements
        if s.endswith(("FOR UPDATE", "SKIP LOCKED", "FOR NO KEY UPDATE"))
    ]  # fmt: skip
    chain = next(i for i, s in enumerate(locks) if s.startswith("SELECT escalation_chains."))
    step = next(i for i, s in enumerate(locks) if s.startswith("SELECT escalation_steps."))
    assert chain < step, "\n".join(locks)
    assert rows(w, "SELECT step, state FROM escalation_steps ORDER BY step")[:2] == [
        (0, "done"), (1, "done"),
    ]  # fmt: skip
