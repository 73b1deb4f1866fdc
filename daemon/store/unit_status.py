"""A CAD unit status applied to the clinician who rides as the unit, in one transaction.

The availability goes through :func:`~corespond.daemon.store.paging.write_availability` and
the page answer through :func:`~corespond.daemon.store.paging.apply_answer`, the functions a
reply and the API use, so the clinician's state, the page, the escalation chain and the
encounter's timeline agree whichever way the news came.

Order is the CAD's: a status changes the availability only when it differs from it and its time
is not older than the clinician's current availability (``clinician_states.changed_at``, which a
CAD status sets to its own time and a reply or the API to when it arrived). An older status
arriving late changes no availability; it may still answer the page of its call (a page never
moves backwards), and the availability that answer would have written is put back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from corespond.daemon.pager import PageAnswer
from corespond.daemon.responders import Availability, UnitStatusChange, UnitStatusOutcome
from corespond.daemon.store.paging import (
    OPEN,
    PageRecord,
    apply_answer,
    lock_page,
    write_availability,
)
from corespond.daemon.store.tables import clinician_states, pages

# The answers that take a page from its state to what the unit status says, in order: a unit
# on scene whose page is still open first went en route (which takes the call).
_ANSWER_PATHS: dict[tuple[str, PageAnswer], tuple[PageAnswer, ...]] = {
    (OPEN, PageAnswer.ACCEPT): (PageAnswer.ACCEPT,),
    (OPEN, PageAnswer.EN_ROUTE): (PageAnswer.EN_ROUTE,),
    (OPEN, PageAnswer.ON_SCENE): (PageAnswer.EN_ROUTE, PageAnswer.ON_SCENE),
    ("accepted", PageAnswer.EN_ROUTE): (PageAnswer.EN_ROUTE,),
    ("accepted", PageAnswer.ON_SCENE): (PageAnswer.ON_SCENE,),
    ("en_route", PageAnswer.ON_SCENE): (PageAnswer.ON_SCENE,),
}
_STATE_AFTER = {PageAnswer.ACCEPT: "accepted", PageAnswer.EN_ROUTE: "en_route",
                PageAnswer.ON_SCENE: "on_scene"}  # fmt: skip


def apply_unit_status(
    conn: Connection, change: UnitStatusChange, now: datetime
) -> UnitStatusOutcome:
    """Apply ``change``. Locks in the order every writer of a chain and a clinician takes them
    (:func:`~corespond.daemon.store.paging.apply_answer`): the page's chain first, then the
    clinician's availability row (``FOR UPDATE`` on PostgreSQL), so that an availability
    written meanwhile on another daemon (a reply, the API) is waited for and judged against,
    never overwritten by an older CAD status read before it committed."""
    page = _page_for(conn, change) if change.answer is not None else None
    t = clinician_states.c
    prior = conn.execute(
        _for_update(conn, select(t.availability, t.changed_at, t.via).where(
            t.clinician_id == change.clinician_id
        ))
    ).first()  # fmt: skip
    older = prior is not None and prior.changed_at > change.at
    answered = _answer_page(conn, change, page, now) if page is not None else None
    no_page = change.answer is not None and change.incident_pk is not None and page is None
    if older:
        assert prior is not None
        if answered is not None:  # the answer wrote the availability: the newer one stands
            write_availability(conn, change.clinician_id, Availability(prior.availability),
                               prior.via, prior.changed_at)  # fmt: skip
        return UnitStatusOutcome(applied=False, older=True, answered=answered, no_page=no_page)
    if change.state is None:
        return UnitStatusOutcome(applied=False, older=False, answered=answered, no_page=no_page)
    # The same state again is no change: it keeps the time it began.
    same = prior is not None and prior.availability == change.state.value
    if not same:
        write_availability(conn, change.clinician_id, change.state, change.via, change.at)
    return UnitStatusOutcome(applied=not same, older=False, answered=answered, no_page=no_page)


def _page_for(conn: Connection, change: UnitStatusChange) -> tuple[PageRecord, datetime] | None:
    """The clinician's page for the status's call that may still take an answer, and when it
    was created, as it stands once no other answer to its chain (a reply, a tap on the ack
    page, on this daemon or another) is under way (its chain locked on PostgreSQL)."""
    if change.incident_pk is None:
        return None
    p = pages.c
    row = conn.execute(
        select(p.id, p.page_ref, p.chain_id, p.kind, p.clinician_id, p.state, p.created_at)
        .where(
            p.incident_pk == change.incident_pk,
            p.clinician_id == change.clinician_id,
            p.kind == "page",
            p.state.in_((OPEN, "accepted", "en_route")),
        )
        .order_by(p.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    page = lock_page(conn, PageRecord(row.id, row.page_ref, row.chain_id, row.kind,
                                      row.clinician_id, row.state))  # fmt: skip
    return page, row.created_at


def _answer_page(
    conn: Connection, change: UnitStatusChange, found: tuple[PageRecord, datetime], now: datetime
) -> str | None:
    """The reference of the page (:func:`_page_for`) the status answered, if it did."""
    assert change.answer is not None
    page, created_at = found
    # The answer's time is the CAD's, within the page's life (a CAD clock that runs ahead, or a
    # status set before the page, would otherwise put the answer outside it).
    when = min(max(change.at, created_at), now)
    answered = None
    for answer in _ANSWER_PATHS.get((page.state, change.answer), ()):
        if apply_answer(conn, page, answer, change.via, when) != "applied":
            break
        answered = page.page_ref
        page = PageRecord(page.page_id, page.page_ref, page.chain_id, page.kind,
                          page.clinician_id, _STATE_AFTER[answer])  # fmt: skip
    return answered


def _for_update(conn: Connection, stmt: Any) -> Any:
    """Locked to the end of the transaction on PostgreSQL (SQLite's one writer holds it all)."""
    return stmt.with_for_update() if conn.dialect.name == "postgresql" else stmt


__all__ = ["apply_unit_status"]
