"""A new chain's first page step chosen before its transaction (``PreChoice``): the choice is
used only while what it rests on is unchanged under the incident's lock, otherwise the step is
gathered and chosen again inside the transaction. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, event, update
from twisted.internet.defer import Deferred, maybeDeferred

from corespond.daemon.decision import Response
from corespond.daemon.pager import PageAnswer
from corespond.daemon.responders import Availability, LocationFix
from corespond.daemon.store import paging as db
from corespond.daemon.store.tables import incidents
from corespond.daemon.store.writer import StoredSnapshot
from tests.daemon.test_escalation import T, World, incident, make_service, result_of, roster, world

__all__ = ["roster", "world"]  # fixtures

LEASE = timedelta(minutes=2)
WINDOW = timedelta(hours=12)


def stored_quietly(w: World, incident_id: str = "2026-001445") -> int:
    """An incident whose decision calls for a clinician, stored without telling the service."""
    observe, w.service.observe = w.service.observe, lambda *_: None  # type: ignore[method-assign]
    try:
        stored = incident(w, Response.CLINICIAN, incident_id=incident_id)
    finally:
        w.service.observe = observe  # type: ignore[method-assign]
    return stored.incident_pk


def ahead(w: World, pk: int) -> db.PreChoice:
    now = w.service.clock.now()
    with w.engine.connect() as conn:
        gathered = db.gather_first_step(conn, pk, w.roster, now, WINDOW)
    assert gathered is not None
    work, response = gathered
    result = w.service._page_step(work, None, now)
    chosen = db.PreChoice.of(work, result, response, now, WINDOW, LEASE)
    assert chosen is not None
    return chosen


def opened_with(w: World, pk: int, chosen: db.PreChoice) -> db.OpenedChain:
    """open_chain with the choice, in a transaction rolled back afterwards."""
    with w.engine.connect() as conn, conn.begin() as tx:
        opened = db.open_chain(
            conn, pk, w.roster, w.service.clock.now(), worker="w1", lease=LEASE,
            chosen=chosen,
        )  # fmt: skip
        tx.rollback()
    return opened


def test_an_unchanged_choice_is_inserted_done_with_its_page(w: World) -> None:
    pk = stored_quietly(w)
    chosen = ahead(w, pk)
    assert chosen.clinician_id == "c-101"
    opened = opened_with(w, pk, chosen)
    assert opened.done is not None
    work, finished = opened.done
    assert [(p.clinician_id, p.page_ref, p.gateway) for p in finished.pages] == [
        ("c-101", "C1445-1", "wctp")
    ]
    assert finished.next_due == w.service.clock.now() + timedelta(minutes=5)
    assert work.step.chain_id == opened.chain_id


def test_a_choice_whose_clinician_changed_meanwhile_is_made_again(w: World) -> None:
    pk = stored_quietly(w)
    chosen = ahead(w, pk)
    now = w.service.clock.now()
    # c-101 goes off duty between the read and the chain's transaction.
    with w.engine.begin() as conn:
        db.write_availability(conn, "c-101", Availability.OFF_DUTY, "api", now)
    opened = opened_with(w, pk, chosen)
    assert opened.done is None and opened.first is not None  # gathered again under the lock


def test_a_choice_whose_clinician_took_another_call_meanwhile_is_made_again(w: World) -> None:
    other = incident(w, Response.CLINICIAN, incident_id="2026-000777")  # c-101 paged
    pk = stored_quietly(w)
    chosen = ahead(w, pk)
    assert chosen.clinician_id == "c-101" and chosen.recent == 1 and not chosen.busy
    # c-101 accepts the other call's page meanwhile (on another daemon, say).
    with w.engine.begin() as conn:
        conn.execute(
            update(db.pages)
            .where(db.pages.c.incident_pk == other.incident_pk)
            .values(state="accepted")
        )
    assert opened_with(w, pk, chosen).done is None


def test_a_choice_whose_clinician_was_paged_again_meanwhile_is_made_again(w: World) -> None:
    """Another page to the chosen clinician changes the fewest-recent-pages tie-break."""
    pk = stored_quietly(w)
    chosen = ahead(w, pk)
    assert chosen.recent == 0
    incident(w, Response.CLINICIAN, incident_id="2026-000777")  # c-101 paged meanwhile
    assert opened_with(w, pk, chosen).done is None


def test_a_choice_for_an_incident_that_changed_meanwhile_is_made_again(w: World) -> None:
    pk = stored_quietly(w)
    chosen = ahead(w, pk)
    with w.engine.begin() as conn:
        conn.execute(update(incidents).where(incidents.c.id == pk).values(lat=30.26))
    assert opened_with(w, pk, chosen).done is None


def test_the_daemon_pages_the_next_best_when_the_first_goes_off_duty_meanwhile(
    w: World,
) -> None:
    """The service's own path: the read chooses c-101; before the transaction, c-101 goes off
    duty; the page goes to c-102, chosen again under the lock."""
    result_of(w.service.stop())
    statements: list[str] = []

    def read_then_off_duty(fn: Callable[[Connection], Any]) -> Deferred[Any]:
        def run() -> Any:
            with w.engine.connect() as conn, conn.begin():
                found = fn(conn)
            if isinstance(found, tuple):  # the choice's read (not the positions')
                assert found[2].dispatch["chosen"] == "c-101"
                with w.engine.begin() as conn:
                    db.write_availability(conn, "c-101", Availability.OFF_DUTY, "api", T)
            return found

        return maybeDeferred(run)

    service = make_service(
        w.engine, w.roster, w.reactor, w.pagers, run_read=read_then_off_duty  # type: ignore[arg-type]
    )
    service.start()
    for cid, lat in (("c-101", 30.26), ("c-102", 30.28)):
        service.record_fix(LocationFix(cid, lat, -97.75, T - timedelta(minutes=2), "http"))
    w.service = service
    listen = lambda conn, cursor, sql, *_: statements.append(sql)  # noqa: E731
    event.listen(w.engine, "before_cursor_execute", listen)
    try:
        incident(w, Response.CLINICIAN)
    finally:
        event.remove(w.engine, "before_cursor_execute", listen)
        result_of(service.stop())
    assert w.sent() == [("wctp", "5550102", "C1445-1")]
    (dispatch,) = w.rows("SELECT outcome, claimed_by FROM escalation_steps WHERE step = 0")
    assert tuple(dispatch) == ("paged", "w1")
    # Chosen again in the transaction: the step was inserted claimed, then finished.
    assert any(s.startswith("UPDATE escalation_steps") for s in statements)


def test_the_daemon_uses_a_choice_that_holds_and_answers_still_work(w: World) -> None:
    """With nothing changed, the chain's transaction only inserts (no step is updated), and
    the page it created is answered and stops the chain as any other."""
    statements: list[str] = []
    listen = lambda conn, cursor, sql, *_: statements.append(sql)  # noqa: E731
    event.listen(w.engine, "before_cursor_execute", listen)
    try:
        stored: StoredSnapshot = incident(w, Response.CLINICIAN)
    finally:
        event.remove(w.engine, "before_cursor_execute", listen)
    assert stored.incident_pk
    assert w.sent() == [("wctp", "5550101", "C1445-1")]
    assert not any(s.startswith("UPDATE escalation") for s in statements)
    assert w.rows("SELECT step, state FROM escalation_steps ORDER BY step") == [
        (0, "done"),
        (1, "pending"),
    ]
    w.service.reply(db_reply("C1445-1"))
    assert w.rows("SELECT state, accepted_by FROM escalation_chains") == [("accepted", "c-101")]
    assert w.rows("SELECT step, state FROM escalation_steps ORDER BY step") == [
        (0, "done"),
        (1, "cancelled"),
    ]


def db_reply(ref: str) -> Any:
    from corespond.daemon.pager import Reply

    return Reply("wctp", T, PageAnswer.ACCEPT, page_ref=ref)
