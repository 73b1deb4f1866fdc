"""The recent window's pages kept in memory (``RecentPages``, SQLite): a page step counts each
clinician's recent pages from what a reader saw plus the pages added since, and gets what
reading the whole window gives: after pages left the window, after pages committed since the
read, with a page of its own transaction not yet committed, and after that one rolled back.
On PostgreSQL nothing is kept (ids are not given in commit order there)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, func, insert, select

from corespond.daemon.decision import Response
from corespond.daemon.roster_table import RosterTable
from corespond.daemon.store import paging as db
from corespond.daemon.store.tables import pages, sqlite_datetime_text
from tests.daemon.test_escalation import World, incident, roster, world

__all__ = ["roster", "world"]  # fixtures

WINDOW = timedelta(minutes=10)


def recent(w: World, conn: Connection, pk: int, kept: db.RecentPages | None) -> dict[str, int]:
    """Recent pages per clinician (those with any), as a page step of incident ``pk`` reads."""
    now = w.service.clock.now()
    found = db.candidate_states(conn, w.roster, pk, now, WINDOW, None, (), kept)
    return {str(cid): int(n) for cid, n in zip(found.ids, found.recent, strict=True) if n}


def both_ways(w: World, conn: Connection, pk: int, kept: db.RecentPages) -> dict[str, int]:
    whole = recent(w, conn, pk, None)
    assert recent(w, conn, pk, kept) == whole
    return whole


def since_text(w: World) -> str:
    text = sqlite_datetime_text(w.service.clock.now() - WINDOW)
    assert text is not None
    return text


def test_kept_recent_pages_count_as_the_whole_window(w: World) -> None:
    pks = []
    for n in range(3):  # three calls 4 minutes apart (and the first's second step, at +5)
        pks.append(incident(w, Response.CLINICIAN, incident_id=f"2026-00150{n}").incident_pk)
        w.advance(4)
    with w.engine.connect() as conn:
        kept = db.read_recent_pages(conn, w.service.clock.now() - WINDOW)
    if w.engine.dialect.name != "sqlite":
        assert kept is None
        return
    assert kept is not None
    assert len(kept.times) == len(kept.clinicians) == 4
    pks.append(incident(w, Response.CLINICIAN, incident_id="2026-001510").incident_pk)
    w.advance(3)  # the first call's page leaves the window
    assert kept.times[0] < since_text(w) <= kept.times[1]
    with w.engine.connect() as conn:
        assert conn.execute(select(func.max(pages.c.id))).scalar_one() > kept.last_id
        committed = both_ways(w, conn, pks[-1], kept)
        in_window = conn.execute(
            select(func.count())
            .select_from(pages)
            .where(pages.c.kind == "page", pages.c.created_at >= _now(w) - WINDOW)
        ).scalar_one()
        assert sum(committed.values()) == in_window == 5  # 4 read, 1 left, 2 added since
    with w.engine.connect() as conn, conn.begin() as tx:
        # A page of this transaction, not committed: to another clinician, now.
        row = dict(conn.execute(select(pages).order_by(pages.c.id.desc())).mappings().first())
        row.pop("id")
        row |= {"page_ref": "C9999-1", "clinician_id": "c-102", "created_at": _now(w)}
        conn.execute(insert(pages), row)
        uncommitted = both_ways(w, conn, pks[-1], kept)
        assert uncommitted == committed | {"c-102": committed.get("c-102", 0) + 1}
        tx.rollback()
    with w.engine.connect() as conn:
        assert both_ways(w, conn, pks[-1], kept) == committed


def test_a_window_reaching_before_the_kept_one_reads_the_whole(w: World) -> None:
    incident(w, Response.CLINICIAN)
    with w.engine.connect() as conn:
        kept = db.read_recent_pages(conn, w.service.clock.now() - timedelta(minutes=1))
    if kept is None:
        return  # PostgreSQL
    table = w.roster.table

    def counts_since(since: datetime) -> dict[str, int] | None:
        counts = kept.counts_since(since, table)
        return None if counts is None else dict(zip(table.ids, counts.tolist(), strict=True))

    assert counts_since(w.service.clock.now() - WINDOW) is None
    assert counts_since(w.service.clock.now())["c-101"] == 1  # type: ignore[index]
    w.advance(0.5)  # (paged at that instant; not any more in a window from now)
    assert set(counts_since(w.service.clock.now()).values()) == {0}  # type: ignore[union-attr]


def test_a_read_from_a_kept_one_is_the_whole_read(w: World) -> None:
    """A read given the last one reads only the pages added since, drops those that left the
    window, carries the counts made from it, and is what reading the whole window gives."""
    table = w.roster.table
    for n in range(3):  # three calls 4 minutes apart (and the first's second step, at +5)
        incident(w, Response.CLINICIAN, incident_id=f"2026-00160{n}")
        w.advance(4)
    with w.engine.connect() as conn:
        kept = db.read_recent_pages(conn, _now(w) - WINDOW)
    if kept is None:
        return  # PostgreSQL
    # (made, as a step does: for an older roster's table, then the current one's)
    assert kept.counts_since(_now(w) - WINDOW, RosterTable(w.roster)) is not None
    assert kept.counts_since(_now(w) - WINDOW, table) is not None
    for n in range(2):
        incident(w, Response.CLINICIAN, incident_id=f"2026-00170{n}")
        w.advance(3)  # the first call's pages leave the window
    with w.engine.begin() as conn:  # and one committed since, stamped before the last kept
        row = dict(conn.execute(select(pages).order_by(pages.c.id.desc())).mappings().first())
        row.pop("id")
        at = datetime.fromisoformat(kept.times[-1] + "+00:00") - timedelta(seconds=30)
        assert sqlite_datetime_text(_now(w) - WINDOW) < sqlite_datetime_text(at)  # type: ignore[operator]
        row |= {"page_ref": "C9998-1", "clinician_id": "c-102", "created_at": at}
        conn.execute(insert(pages), row)
    for start in (_now(w) - WINDOW, _now(w) - WINDOW + timedelta(minutes=5)):
        with w.engine.connect() as conn:
            again = db.read_recent_pages(conn, start, kept)
            whole = db.read_recent_pages(conn, start)
        assert again is not None and whole is not None
        assert list(again._arrays) == [table]  # the last table's counts carried, not made again
        assert again.times[0] > kept.times[0] and len(again.times) > 0  # some left, some came
        assert (again.last_id, again.since, again.times, again.clinicians) == (
            whole.last_id, whole.since, whole.times, whole.clinicians
        )
        for since in (start, start + timedelta(minutes=2)):
            carried, made = again.counts_since(since, table), whole.counts_since(since, table)
            assert carried is not None and made is not None
            assert carried.tolist() == made.tolist()
    with w.engine.connect() as conn:  # a window reaching before the kept one: read whole
        early = db.read_recent_pages(conn, _now(w) - 2 * WINDOW, kept)
        assert early is not None
        assert early.times == db.read_recent_pages(conn, _now(w) - 2 * WINDOW).times  # type: ignore[union-attr]


def _now(w: World) -> datetime:
    return w.service.clock.now()
