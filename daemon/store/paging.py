"""The paging core's units of work: one function per transaction, plain values in and out.

Escalation steps and pages are outbox rows with a due time. A worker claims due rows (``FOR
UPDATE SKIP LOCKED`` on PostgreSQL, so two daemons never take the same row; SQLite has one
writer at a time) under a lease; a claim whose lease ran out (its daemon died) is taken again.
A step is finished only by the worker that still holds it, and the next step is inserted in
the same transaction under the unique (chain, step) constraint: a step never runs twice.
"""

from __future__ import annotations

import sqlite3
from bisect import bisect_left
from collections import namedtuple
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson
from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from corespond.daemon.dispatcher import AVAILABILITIES, Candidates, Fix, Ints
from corespond.daemon.pager import PageAnswer
from corespond.daemon.responders import Availability, LocationFix, PageView
from corespond.daemon.roster import Roster
from corespond.daemon.roster_table import Positions, RosterTable
from corespond.daemon.store.tables import (
    chain_waits,
    clinician_positions,
    clinician_states,
    escalation_chains,
    escalation_steps,
    incidents,
    location_fixes,
    page_replies,
    pages,
    snapshots,
    sqlite_datetime_text,
)

OPEN = "open"
ACTIVE_PAGE_STATES = ("accepted", "en_route", "on_scene")  # a clinician who took the call
TERMINAL_CHAIN_STATES = ("accepted", "exhausted", "cancelled")
# The chain kind each decision's response starts (``none`` starts nothing).
CHAIN_KINDS = {"clinician": "dispatch", "co-response": "dispatch", "police": "notify"}


def _for_update(conn: Connection, stmt: Any) -> Any:
    if conn.dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=True)
    return stmt  # SQLite: the transaction already holds the write lock (BEGIN IMMEDIATE)


# --- the new chain's statements on the driver's cursor (SQLite) --------------------------------
#
# A new page's transaction runs a handful of statements, each of which cost SQLAlchemy Core
# about 0.3-0.5 ms of per-statement work (cache look-up, parameter processing, events, result
# wrapping) for a few microseconds of SQLite's. On SQLite they go to the DB-API cursor of the
# transaction's own connection (the savepoint of the batch the page rides), as the writer's
# batch statements do: SQL compiled once from the same Core statement, values bound by the
# columns' own bind processors (UTCDateTime's text, JSON through the engine's serializer),
# driver errors raised as SQLAlchemy's DBAPIError. PostgreSQL runs the Core statement.


class _OnDriver:
    """A Core statement, run on the driver's cursor on SQLite (see above), through
    ``conn.execute`` elsewhere. Rows come back with the statement's column names."""

    __slots__ = ("_compiled", "columns", "stmt")

    def __init__(self, stmt: Any, columns: Sequence[str] = ()) -> None:
        self.stmt = stmt
        self.columns = tuple(columns)  # an INSERT's columns, in the order rows give them
        self._compiled: tuple[str, list[tuple[str, Any, Any]], Any] | None = None

    def _sqlite(self, conn: Connection) -> tuple[str, list[tuple[str, Any, Any]], Any]:
        compiled = self._compiled
        if compiled is None:
            dialect = conn.dialect
            c = self.stmt.compile(dialect=dialect, column_keys=list(self.columns) or None)
            binds = []
            for name in c.positiontup:
                bind = c.binds[name]
                process = bind.type._cached_bind_processor(dialect)
                binds.append((name, bind.effective_value, process))
            names = [col.key for col in getattr(self.stmt, "selected_columns", ())] or [
                col.key for col in (self.stmt._returning or ())
            ]
            row = namedtuple("Row", names, rename=True) if names else None
            compiled = self._compiled = (str(c), binds, row)
        return compiled

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[Any]:
        if conn.dialect.name != "sqlite":
            return list(conn.execute(self.stmt, params).all())
        sql, binds, row = self._sqlite(conn)
        values = [
            (p(v) if p is not None else v)
            for v, p in ((params.get(name, default), proc) for name, default, proc in binds)
        ]
        cursor = _cursor(conn)
        try:
            found = cursor.execute(sql, values).fetchall()
        except sqlite3.Error as err:
            raise DBAPIError.instance(sql, values, err, sqlite3.Error) from err
        return [row._make(r) for r in found] if row is not None else []

    def tuples(self, conn: Connection, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The rows as plain tuples (in the statement's column order): for many rows, where
        a named row each would cost more than the statement."""
        if conn.dialect.name != "sqlite":
            return [tuple(r) for r in conn.execute(self.stmt, params)]
        sql, binds, _ = self._sqlite(conn)
        values = [
            (p(params.get(name, default)) if p is not None else params.get(name, default))
            for name, default, p in binds
        ]
        try:
            return _cursor(conn).execute(sql, values).fetchall()
        except sqlite3.Error as err:
            raise DBAPIError.instance(sql, values, err, sqlite3.Error) from err

    def inserted(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> list[Any]:
        """An INSERT .. RETURNING of several rows in one statement (one VALUES group each;
        the rows come back in no given order)."""
        if conn.dialect.name != "sqlite":
            return list(conn.execute(self.stmt, list(rows)).all())
        sql, binds, row = self._sqlite(conn)
        head, _, tail = sql.partition(" VALUES ")
        group, _, returning = tail.partition(") ")
        sql = f"{head} VALUES {', '.join([group + ')'] * len(rows))} {returning}"
        values = [
            (p(r.get(name, d)) if p is not None else r.get(name, d))
            for r in rows
            for name, d, p in binds
        ]
        try:
            found = _cursor(conn).execute(sql, values).fetchall()
        except sqlite3.Error as err:
            raise DBAPIError.instance(sql, values, err, sqlite3.Error) from err
        assert row is not None
        return [row._make(r) for r in found]

    def many(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """The statement once per row (executemany; nothing returned)."""
        if conn.dialect.name != "sqlite":
            conn.execute(self.stmt, list(rows))
            return
        sql, binds, _ = self._sqlite(conn)
        values = [
            [(p(r.get(name, d)) if p is not None else r.get(name, d)) for name, d, p in binds]
            for r in rows
        ]
        try:
            _cursor(conn).executemany(sql, values)
        except sqlite3.Error as err:
            raise DBAPIError.instance(sql, values, err, sqlite3.Error) from err


def _cursor(conn: Connection) -> sqlite3.Cursor:
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver.cursor()


def _loaded(value: Any) -> Any:
    """A JSON column's value as the driver returns it on SQLite (text) or as Core does."""
    return orjson.loads(value) if isinstance(value, str) else value


# --- chains ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewChain:
    incident_pk: int
    kind: str  # dispatch (page clinicians) or notify (supervisors only)
    program: str
    response: str
    steps: list[dict[str, Any]]


_i, _w, _c = incidents.c, chain_waits.c, escalation_chains.c
# The facts a page may say (incident_facts) and what a chain start needs, in one statement.
_FACT_COLUMNS = (
    _i.id, _i.status, _i.incident_number, _i.external_id, _i.call_type, _i.apco_type, _i.zone,
    _i.lat, _i.lon, snapshots.c.public,
)  # fmt: skip
_LOCKED_COLUMNS = (*_FACT_COLUMNS, _i.response, _w.reason.label("waiting"))
_LOCKED_FROM = (
    incidents.outerjoin(chain_waits, _w.incident_pk == _i.id)
    .outerjoin(snapshots, snapshots.c.id == _i.current_snapshot_id)
    .outerjoin(escalation_chains, _c.incident_pk == _i.id)
)
# What a chosen clinician's figures rest on, read again under the incident's lock (see
# PreChoice): availability (NULL: none set), busy with another active call, pages recently.
_p2, _i2 = pages.alias("p2"), incidents.alias("i2")
_CHOSEN_COLUMNS = (
    select(clinician_states.c.availability)
    .where(clinician_states.c.clinician_id == bindparam("chosen"))
    .scalar_subquery()
    .label("chosen_availability"),
    select(func.count())
    .select_from(_p2.join(_i2, _i2.c.id == _p2.c.incident_pk))
    .where(
        _p2.c.clinician_id == bindparam("chosen"),
        _p2.c.state.in_([literal_column(f"'{state}'") for state in ACTIVE_PAGE_STATES]),
        _p2.c.incident_pk != bindparam("incident_pk"),
        _i2.c.status == "active",
    )
    .scalar_subquery()
    .label("chosen_busy"),
    select(func.count())
    .select_from(_p2)
    .where(
        _p2.c.clinician_id == bindparam("chosen"),
        _p2.c.kind == "page",
        _p2.c.created_at >= bindparam("since", type_=pages.c.created_at.type),
    )
    .scalar_subquery()
    .label("chosen_recent"),
)


def _incident_with(*columns: Any) -> Any:
    return select(*columns).select_from(_LOCKED_FROM).where(_i.id == bindparam("incident_pk"))


# One row per chain the incident had (chain_kind and chain_state NULL when none): on SQLite
# the chains come with the lock, not in a statement of their own (the transaction holds the
# write lock). On PostgreSQL a statement that waited for the row lock still reads the other
# tables as they were when it began (READ COMMITTED): they are read in a second statement,
# once the lock is held, which sees what the transaction that held it committed.
_CHAIN_COLUMNS = (_c.kind.label("chain_kind"), _c.state.label("chain_state"))
_INCIDENT_CHAINS = _incident_with(*_LOCKED_COLUMNS, *_CHAIN_COLUMNS)
_INCIDENT_CHAINS_CHOSEN = _incident_with(*_LOCKED_COLUMNS, *_CHAIN_COLUMNS, *_CHOSEN_COLUMNS)
_DRIVER_INCIDENT_CHAINS = _OnDriver(_INCIDENT_CHAINS)
_DRIVER_INCIDENT_CHAINS_CHOSEN = _OnDriver(_INCIDENT_CHAINS_CHOSEN)
_LOCK_ONLY = (
    select(_i.id).where(_i.id == bindparam("incident_pk")).with_for_update()
)  # PostgreSQL
_CHAINS_OF = select(_c.kind, _c.state).where(_c.incident_pk == bindparam("incident_pk"))


def _lock_incident(
    conn: Connection, incident_pk: int, chosen: PreChoice | None = None
) -> tuple[Any, list[tuple[str, str]]]:
    """The incident's status, response, point and page facts, whether it waits for a chain,
    and the (kind, state) of every chain it had, under its row lock: the lock serializes
    chain starts per incident across daemons sharing one PostgreSQL (two snapshots at once
    must not start two chains); SQLite's transaction already holds the write lock. With
    ``chosen``, the row also holds that clinician's figures as they stand now."""
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK_ONLY, {"incident_pk": incident_pk})
    if chosen is None:
        rows = _DRIVER_INCIDENT_CHAINS.rows(conn, {"incident_pk": incident_pk})
    else:
        rows = _DRIVER_INCIDENT_CHAINS_CHOSEN.rows(
            conn, {"incident_pk": incident_pk, "chosen": chosen.clinician_id, "since": chosen.since}
        )
    if not rows:
        return None, []
    return rows[0], [(r.chain_kind, r.chain_state) for r in rows if r.chain_kind is not None]


def _chains_of(conn: Connection, incident_pk: int) -> list[tuple[str, str]]:
    """(kind, state) of every chain the incident had."""
    return [(kind, state) for kind, state in conn.execute(_CHAINS_OF, {"incident_pk": incident_pk})]


def _blocks(chains: Iterable[tuple[str, str]], kind: str) -> bool:
    """True when the incident must not get a new chain of ``kind``: one is open, one of this
    kind was exhausted (everyone it could reach was paged: never again), or a clinician took
    the call. A chain cancelled because the call closed does not block: a reopened call
    starts again."""
    return any(
        state == "accepted" or (k == kind and state in (OPEN, "exhausted")) for k, state in chains
    )


def _blocking_chain(conn: Connection, incident_pk: int, kind: str) -> bool:
    return _blocks(_chains_of(conn, incident_pk), kind)


def start_chain(
    conn: Connection,
    chain: NewChain,
    now: datetime,
    *,
    worker: str | None = None,
    lease: timedelta | None = None,
) -> int | None:
    """The new chain's id; None when the incident is closed, or already has an open or
    exhausted chain of this kind, or an accepted clinician. With ``worker`` (and ``lease``),
    the first step is inserted already claimed by that worker, to be run in this transaction
    or right after it."""
    row, chains = _lock_incident(conn, chain.incident_pk)
    if row is None or row.status != "active" or _blocks(chains, chain.kind):
        return None
    claim = (worker, now + lease) if worker is not None and lease is not None else None
    return _create_chain(conn, chain, now, claim, row.waiting is not None)[0]


_INSERT_CHAIN = insert(escalation_chains).returning(escalation_chains.c.id)
_INSERT_STEP = insert(escalation_steps).returning(escalation_steps.c.id)


def _create_chain(
    conn: Connection,
    chain: NewChain,
    now: datetime,
    claim: tuple[str, datetime] | None,
    waited: bool,
) -> tuple[int, int]:
    """Insert the chain and its first step (claimed with ``claim``); end its wait. The ids of
    the chain and of the step."""
    chain_id = conn.execute(
        _INSERT_CHAIN,
        dict(
            incident_pk=chain.incident_pk,
            kind=chain.kind,
            program=chain.program,
            response=chain.response,
            steps=chain.steps,
            state=OPEN,
            created_at=now,
            pages_sent=0,
        ),
    ).scalar_one()
    step_id = _insert_step(conn, chain_id, 0, chain.steps[0]["action"], now, claim)
    if waited:
        conn.execute(delete(chain_waits).where(chain_waits.c.incident_pk == chain.incident_pk))
    return int(chain_id), step_id


@dataclass(frozen=True, slots=True)
class OpenedChain:
    """What :func:`open_chain` did: a chain started (its id and first step, claimed), or why
    not (``waiting``: recorded in ``chain_waits`` until a snapshot gives a covered location)."""

    chain: NewChain | None
    chain_id: int | None
    first: ClaimedStep | None
    reason: str  # started, not-active, no-response, has-chain, no-location, out-of-zone
    waiting: bool = False
    cancelled: tuple[int, ...] = ()  # chains of a closed call ended here
    # Read under the lock for the first step, which runs in the same transaction: the
    # incident's facts, and its pages (known to be none when it never had a chain).
    facts: IncidentFacts | None = None
    first_chain: bool = False
    # With a PreChoice that held: the first step as it was done, and its page claimed.
    done: tuple[StepWork, FinishedStep] | None = None
    chosen: StepOutcome | None = None  # the outcome of that first step (with ``done``)


def cancel_chains(conn: Connection, incident_pk: int, now: datetime) -> tuple[int, ...]:
    """End the open chains of a call that closed (their ids): the steps still to run are
    cancelled, pages not yet handed to a gateway are never sent, and open pages can no longer
    be answered. Nobody is told: the clinician already paged gets no new page. A step another
    worker holds right now finds its claim gone and writes nothing."""
    c, s, p = escalation_chains.c, escalation_steps.c, pages.c
    ids = tuple(
        conn.execute(
            select(c.id).where(c.incident_pk == incident_pk, c.state == OPEN)
        ).scalars()
    )
    if not ids:
        return ()
    conn.execute(
        update(escalation_chains)
        .where(c.id.in_(ids))
        .values(state="cancelled", closed_at=now)
    )
    conn.execute(
        update(escalation_steps)
        .where(s.chain_id.in_(ids), s.state.in_(("pending", "claimed")))
        .values(state="cancelled", done_at=now, lease_until=None, outcome="incident-closed")
    )
    conn.execute(
        update(pages)
        .where(p.chain_id.in_(ids), p.delivery == "pending")
        .values(delivery="cancelled", next_try_at=None)
    )
    conn.execute(
        update(pages).where(p.chain_id.in_(ids), p.state == OPEN).values(state="cancelled")
    )
    return ids


def open_chain(
    conn: Connection,
    incident_pk: int,
    roster: Roster,
    now: datetime,
    *,
    worker: str | None = None,
    lease: timedelta | None = None,
    chosen: PreChoice | None = None,
    choose: Callable[[Connection, StepWork, str], PreChoice | None] | None = None,
) -> OpenedChain:
    """Start the chain the incident's *current* state calls for, if it has none: read under the
    incident's row lock, so a decision change, a location that arrives later and a reopened
    call all come here, in any order, and at most one chain starts.

    ``chosen`` (with ``worker``): the first step's choice, made before this transaction from a
    read (:class:`PreChoice`). When what it rests on is unchanged under the lock, the chain is
    inserted with its first step already done and its page claimed (``OpenedChain.done``);
    otherwise the first step is inserted claimed, for the caller to gather and finish here.

    ``choose`` (with ``worker``, instead of ``chosen``): the first page step of a first chain
    chosen here, under the lock, from the step's work without its candidates (the caller reads
    them: :func:`first_step_candidates`) and the decision's response; what it returns goes in
    as a ``chosen`` that holds (None: the first step is gathered and finished as without)."""
    row, chains = _lock_incident(conn, incident_pk, chosen)
    kind = CHAIN_KINDS.get(row.response) if row is not None else None
    if row is None or row.status != "active" or kind is None:
        if row is not None and row.waiting is not None:
            conn.execute(delete(chain_waits).where(chain_waits.c.incident_pk == incident_pk))
        if row is not None and row.status != "active":
            cancelled = cancel_chains(conn, incident_pk, now) if chains else ()
            return OpenedChain(None, None, None, "not-active", cancelled=cancelled)
        return OpenedChain(None, None, None, "no-response" if row is not None else "not-active")
    if _blocks(chains, kind):
        return OpenedChain(None, None, None, "has-chain")
    programs = (
        roster.programs_covering(row.lat, row.lon)
        if row.lat is not None and row.lon is not None
        else []
    )
    if not programs:
        reason = "no-location" if row.lat is None or row.lon is None else "out-of-zone"
        _record_wait(conn, incident_pk, kind, row.response, reason, now)
        return OpenedChain(None, None, None, reason, waiting=True)
    program = programs[0]
    if kind == "notify":
        steps = [{"action": "supervisor", "wait_minutes": 0.0}]
    else:
        steps = [step.as_json() for step in program.escalation]
    chain = NewChain(incident_pk, kind, program.id, row.response, steps)
    facts = _facts_of(row)
    waited = row.waiting is not None
    held = False
    first_page = bool(steps) and steps[0]["action"] == "page" and kind == "dispatch"
    if chosen is None and choose is not None and worker is not None and not chains and first_page:
        work = StepWork(ClaimedStep(0, 0, 0, "page"), OPEN, kind, program.id, steps, facts, None, 0)
        chosen = choose(conn, work, str(row.response))
        held = chosen is not None  # chosen under the lock: it holds
    if (
        chosen is not None
        and worker is not None
        and (held or chosen.holds(row, chains, chain, facts))
    ):
        chain_id, done = _create_chain_done(conn, chain, now, chosen, worker, waited)
        return OpenedChain(
            chain, chain_id, done[0].step, "started", facts=facts, first_chain=True,
            done=done, chosen=chosen.result,
        )  # fmt: skip
    claim = (worker, now + lease) if worker is not None and lease is not None else None
    chain_id, step_id = _create_chain(conn, chain, now, claim, waited)
    first = ClaimedStep(step_id, chain_id, 0, str(steps[0]["action"])) if claim else None
    return OpenedChain(chain, chain_id, first, "started", facts=facts, first_chain=not chains)


@dataclass(frozen=True, slots=True)
class PreChoice:
    """A new chain's first page step decided before the chain's transaction, from a read on a
    reader (:func:`gather_first_step`): the roster scan, and the drive times when asked, stay
    off the writer and outside the lock.

    The choice holds when, under the incident's lock, the incident still has no chain, its
    facts (status, point, words of the page) and decision are as read, its program leads with
    a page step, and the chosen clinician's figures are as read: availability, busy with no
    other call, the same number of recent pages. A concurrent answer that took them (accept,
    en route, on scene), a status change, or another page to them in the meantime fails the
    check, and the step is gathered and chosen again inside the transaction, as before."""

    work: StepWork  # as gathered on the reader (its step a placeholder)
    result: StepOutcome  # "paged", one page
    clinician_id: str
    availability: str  # as read (available when the clinician never set one)
    busy: bool
    recent: int
    response: str
    since: datetime  # the start of the recent-pages window
    lease: timedelta  # the page's claim for delivery

    @classmethod
    def of(
        cls, work: StepWork, result: StepOutcome, response: str, now: datetime,
        recent_window: timedelta, lease: timedelta,
    ) -> PreChoice | None:  # fmt: skip
        """The choice ``result`` made from ``work`` (None unless it pages a clinician)."""
        candidates = work.candidates
        if result.outcome != "paged" or result.dispatch is None or candidates is None:
            return None
        chosen = str(result.dispatch["chosen"])
        i = candidates.index[chosen]
        return cls(
            work, result, chosen, AVAILABILITIES[candidates.availability[i]].value,
            bool(candidates.busy[i]), int(candidates.recent[i]), response, now - recent_window,
            lease,
        )  # fmt: skip

    def holds(self, row: Any, chains: Sequence[tuple[str, str]], chain: NewChain,
              facts: IncidentFacts) -> bool:  # fmt: skip
        """True when the choice is still what the step would choose under the lock."""
        return (
            not chains
            and row.response == self.response
            and facts == self.work.incident
            and chain.program == self.work.program
            and chain.steps == self.work.steps
            and (row.chosen_availability or Availability.AVAILABLE.value) == self.availability
            and bool(row.chosen_busy) == self.busy
            and row.chosen_recent == self.recent
        )


def gather_first_step(
    conn: Connection,
    incident_pk: int,
    roster: Roster,
    now: datetime,
    recent_window: timedelta,
    fixes: Positions | None = None,
    recent_pages: RecentPages | None = None,
) -> tuple[StepWork, str] | None:
    """What the first page step of the incident's new chain would read, without a lock (a
    reader's snapshot), and the decision's response; None when no dispatch chain with a page
    step first would start now (closed, no chain yet, has one, no covered point)."""
    rows = _DRIVER_INCIDENT_CHAINS.rows(conn, {"incident_pk": incident_pk})
    if not rows or any(r.chain_kind is not None for r in rows):
        return None
    row = rows[0]
    if row.status != "active" or CHAIN_KINDS.get(row.response) != "dispatch":
        return None
    if row.lat is None or row.lon is None:
        return None
    programs = roster.programs_covering(row.lat, row.lon)
    if not programs or not programs[0].escalation:
        return None
    program = programs[0]
    steps = [step.as_json() for step in program.escalation]
    if steps[0]["action"] != "page":
        return None
    work = StepWork(
        ClaimedStep(0, 0, 0, "page"), OPEN, "dispatch", program.id, steps, _facts_of(row), None,
        0,
    )  # fmt: skip
    work = first_step_candidates(conn, work, roster, now, recent_window, fixes, recent_pages)
    return work, str(row.response)


def first_step_candidates(
    conn: Connection,
    work: StepWork,
    roster: Roster,
    now: datetime,
    recent_window: timedelta,
    fixes: Positions | None = None,
    recent_pages: RecentPages | None = None,
) -> StepWork:
    """``work``, the first page step of an incident's first chain, with every clinician's
    state (the incident has no page yet: it never had a chain)."""
    pk = work.incident.incident_pk
    candidates = candidate_states(
        conn, roster, pk, now, recent_window, fixes, (), recent_pages
    )
    return replace(work, candidates=candidates)


# Several steps in one statement (RETURNING in no given order: each row names its step).
_DRIVER_INSERT_STEPS = _OnDriver(
    insert(escalation_steps).returning(escalation_steps.c.id, escalation_steps.c.step),
    ("chain_id", "step", "action", "due_at", "state", "claimed_by", "lease_until", "done_at",
     "outcome", "dispatch"),
)  # fmt: skip
_DRIVER_INSERT_CHAIN = _OnDriver(
    _INSERT_CHAIN,
    ("incident_pk", "kind", "program", "response", "steps", "state", "created_at", "closed_at",
     "pages_sent"),
)  # fmt: skip


def _create_chain_done(
    conn: Connection,
    chain: NewChain,
    now: datetime,
    chosen: PreChoice,
    worker: str,
    waited: bool,
) -> tuple[int, tuple[StepWork, FinishedStep]]:
    """Insert the chain with its first step done as ``chosen`` decided, the step after it
    pending (one statement for both), and the step's page claimed by ``worker`` for delivery
    (as :func:`finish_step_and_claim` would after :func:`_create_chain`, in four statements
    fewer); end the incident's wait."""
    steps = chain.steps
    last = len(steps) < 2
    (inserted,) = _DRIVER_INSERT_CHAIN.rows(
        conn,
        dict(
            incident_pk=chain.incident_pk, kind=chain.kind, program=chain.program,
            response=chain.response, steps=steps, state="exhausted" if last else OPEN,
            created_at=now, closed_at=now if last else None,
            pages_sent=len(chosen.result.pages),
        ),
    )  # fmt: skip
    chain_id = int(inserted.id)
    rows = [
        dict(
            chain_id=chain_id, step=0, action=steps[0]["action"], due_at=now, state="done",
            claimed_by=worker, lease_until=None, done_at=now, outcome=chosen.result.outcome,
            dispatch=chosen.result.dispatch,
        )
    ]  # fmt: skip
    due = None
    if not last:
        due = now + timedelta(minutes=float(steps[0].get("wait_minutes", 0)))
        rows.append(
            dict(
                chain_id=chain_id, step=1, action=steps[1]["action"], due_at=due,
                state="pending", claimed_by=None, lease_until=None, done_at=None, outcome=None,
                dispatch=None,
            )
        )  # fmt: skip
    step_id = next(int(r.id) for r in _DRIVER_INSERT_STEPS.inserted(conn, rows) if r.step == 0)
    if waited:
        conn.execute(delete(chain_waits).where(chain_waits.c.incident_pk == chain.incident_pk))
    work = replace(chosen.work, step=ClaimedStep(step_id, chain_id, 0, str(steps[0]["action"])))
    claim = {"delivery": "sending", "lease_until": now + chosen.lease}
    return chain_id, (work, FinishedStep(_insert_pages(conn, work, chosen.result, now, claim), due))


def _record_wait(
    conn: Connection, incident_pk: int, kind: str, response: str, reason: str, now: datetime
) -> None:
    w = chain_waits.c
    updated = conn.execute(
        update(chain_waits)
        .where(w.incident_pk == incident_pk)
        .values(kind=kind, response=response, reason=reason, updated_at=now)
    )
    if not updated.rowcount:
        conn.execute(
            insert(chain_waits),
            dict(
                incident_pk=incident_pk, kind=kind, response=response, reason=reason, since=now,
                updated_at=now,
            ),
        )  # fmt: skip


def may_need_chain(conn: Connection, incident_pk: int) -> bool:
    """A read-only first look (no lock, on a reader): would :func:`open_chain` change anything
    for the incident now (start its chain, record or end its wait)? False is final for this
    snapshot; True is checked again under the lock. Spares the one writer a transaction for
    every repeated snapshot of a call that already has its chain."""
    i, w = incidents.c, chain_waits.c
    row = conn.execute(
        select(i.status, i.response, i.lat, w.reason)
        .select_from(incidents.outerjoin(chain_waits, w.incident_pk == i.id))
        .where(i.id == incident_pk)
    ).one_or_none()
    if row is None:
        return False
    kind = CHAIN_KINDS.get(row.response)
    if row.status != "active":  # a wait to end, or the open chain of a closed call
        return row.reason is not None or _has_open_chain(conn, incident_pk)
    if kind is None:
        return row.reason is not None  # a wait to end
    if _blocking_chain(conn, incident_pk, kind):
        return False
    return row.lat is not None or row.reason is None  # a chain to start, or a wait to record


def _has_open_chain(conn: Connection, incident_pk: int) -> bool:
    c = escalation_chains.c
    found = conn.execute(
        select(c.id).where(c.incident_pk == incident_pk, c.state == OPEN).limit(1)
    ).first()
    return found is not None


def _insert_step(
    conn: Connection,
    chain_id: int,
    step: int,
    action: str,
    due: datetime,
    claim: tuple[str, datetime] | None = None,
) -> int:
    """A step due at ``due`` (its id); with ``claim`` (worker, lease end) already claimed."""
    held = (
        dict(state="claimed", claimed_by=claim[0], lease_until=claim[1]) if claim
        else dict(state="pending", claimed_by=None, lease_until=None)
    )  # fmt: skip
    step_id = conn.execute(
        _INSERT_STEP, dict(chain_id=chain_id, step=step, action=action, due_at=due) | held
    ).scalar_one()
    return int(step_id)


@dataclass(frozen=True, slots=True)
class ClaimedStep:
    step_id: int
    chain_id: int
    step: int
    action: str


def claim_due_steps(
    conn: Connection, now: datetime, worker: str, lease: timedelta, limit: int
) -> list[ClaimedStep]:
    s = escalation_steps.c
    due = or_(
        and_(s.state == "pending", s.due_at <= now),
        and_(s.state == "claimed", s.lease_until < now),
    )
    stmt = select(s.id, s.chain_id, s.step, s.action).where(due).order_by(s.due_at).limit(limit)
    if conn.dialect.name == "postgresql":
        # Chains before steps, the order answers and cancellations lock in (apply_answer,
        # cancel_chains): the steps claimed here are finished in this same transaction, which
        # then writes their chains. A chain another transaction holds is passed over.
        c = escalation_chains.c
        chains = conn.execute(
            select(c.id)
            .where(c.id.in_(stmt.with_only_columns(s.chain_id).scalar_subquery()))
            .order_by(c.id)
            .with_for_update(key_share=True, skip_locked=True)
        ).scalars().all()  # fmt: skip
        stmt = stmt.where(s.chain_id.in_(chains))
    rows = conn.execute(_for_update(conn, stmt)).all()
    if rows:
        conn.execute(
            update(escalation_steps)
            .where(s.id.in_([r.id for r in rows]))
            .values(state="claimed", claimed_by=worker, lease_until=now + lease)
        )
    return [ClaimedStep(r.id, r.chain_id, r.step, r.action) for r in rows]


def claim_and_gather_steps(
    conn: Connection,
    now: datetime,
    worker: str,
    lease: timedelta,
    limit: int,
    roster: Roster,
    recent_window: timedelta,
    fixes: Positions | None = None,
) -> list[StepWork]:
    """:func:`claim_due_steps` and :func:`gather_step` for each, in one transaction."""
    claimed = claim_due_steps(conn, now, worker, lease, limit)
    return [gather_step(conn, step, roster, now, recent_window, fixes) for step in claimed]


def finish_steps(
    conn: Connection,
    works: Sequence[StepWork],
    decide: Callable[[StepWork], StepOutcome],
    worker: str,
    now: datetime,
    lease: timedelta,
) -> list[tuple[StepWork, StepOutcome, FinishedStep | None]]:
    """``decide`` and finish each gathered step, its pages claimed for delivery (with
    :func:`claim_and_gather_steps` in the same transaction: one commit for what took four)."""
    out = []
    for work in works:
        result = decide(work)
        out.append((work, result, finish_step_and_claim(conn, work, result, worker, now, lease)))
    return out


@dataclass(frozen=True, slots=True)
class IncidentFacts:
    """What a page may say about an incident, and where it is."""

    incident_pk: int
    status: str
    number: str
    call_type: str
    general_location: str
    lat: float | None
    lon: float | None


@dataclass(frozen=True, slots=True)
class StepWork:
    step: ClaimedStep
    chain_state: str
    chain_kind: str
    program: str
    steps: list[dict[str, Any]]
    incident: IncidentFacts
    candidates: Candidates | None  # page steps of an open chain only
    attempts: int  # pages already sent for the incident


_INCIDENT_FACTS = (
    select(*_FACT_COLUMNS)
    .select_from(incidents.outerjoin(snapshots, snapshots.c.id == _i.current_snapshot_id))
    .where(_i.id == bindparam("incident_pk"))
)


def incident_facts(conn: Connection, incident_pk: int) -> IncidentFacts:
    return _facts_of(conn.execute(_INCIDENT_FACTS, {"incident_pk": incident_pk}).one())


def _facts_of(row: Any) -> IncidentFacts:
    location = (_loaded(row.public) or {}).get("location") or {}
    parts = [f"zone {row.zone}" if row.zone else None, location.get("city")]
    general = ", ".join(str(p)[:40] for p in parts if p) or "see CAD"
    call_type = str(row.call_type or row.apco_type or "call")[:40]
    return IncidentFacts(
        row.id, row.status, row.incident_number or row.external_id, call_type, general,
        row.lat, row.lon,
    )  # fmt: skip


def gather_step(
    conn: Connection,
    step: ClaimedStep,
    roster: Roster,
    now: datetime,
    recent_window: timedelta,
    fixes: Positions | None = None,
    opened: OpenedChain | None = None,
) -> StepWork:
    """Everything the step needs, read in the claiming transaction (``fixes``: the latest
    position of each clinician when the caller keeps them; else read here; ``opened``: the
    chain :func:`open_chain` has just started in this transaction, whose first step this is:
    what it read is not read again)."""
    if opened is not None and opened.chain is not None and opened.facts is not None:
        new = opened.chain
        chain = _Chain(new.incident_pk, OPEN, new.kind, new.program, new.steps)
        facts = opened.facts
    else:
        chain = _Chain(*conn.execute(_CHAIN, {"chain_id": step.chain_id}).one())
        facts = incident_facts(conn, chain.incident_pk)
    if opened is not None and opened.first_chain:
        sent: Sequence[Any] = ()  # no chain before this one: no page either
    else:
        sent = conn.execute(_PAGES_OF_INCIDENT, {"incident_pk": chain.incident_pk}).all()
    attempts = len(sent)
    candidates: Candidates | None = None
    if step.action == "page" and chain.state == OPEN:
        paged = [(r.clinician_id, r.state) for r in sent if r.kind == "page"]
        candidates = candidate_states(
            conn, roster, chain.incident_pk, now, recent_window, fixes, paged
        )
    return StepWork(
        step, chain.state, chain.kind, chain.program, list(chain.steps), facts, candidates,
        int(attempts),
    )  # fmt: skip


class _Chain(NamedTuple):
    incident_pk: int
    state: str
    kind: str
    program: str
    steps: list[dict[str, Any]]


_CHAIN = select(_c.incident_pk, _c.state, _c.kind, _c.program, _c.steps).where(
    _c.id == bindparam("chain_id")
)
_PAGES_OF_INCIDENT = select(pages.c.clinician_id, pages.c.state, pages.c.kind).where(
    pages.c.incident_pk == bindparam("incident_pk")
)


def candidate_states(
    conn: Connection,
    roster: Roster,
    incident_pk: int,
    now: datetime,
    recent_window: timedelta,
    positions: Positions | None = None,
    incident_pages: Iterable[tuple[str, str]] | None = None,
    recent_pages: RecentPages | None = None,
) -> Candidates:
    """Every clinician's state for a page step (``positions``, ``incident_pages``: the latest
    positions in the roster table's order and the (clinician, state) of the incident's pages,
    when the caller has them; ``recent_pages``: the recent window's pages as a reader saw them,
    on SQLite: only the pages added since are read)."""
    table = roster.table
    if positions is None:
        positions = table.positions(latest_fixes(conn))
    if incident_pages is None:
        incident_pages = conn.execute(_INCIDENT_PAGES, {"incident_pk": incident_pk})
    since = now - recent_window
    kept = recent_pages.counts_since(since, table) if recent_pages is not None else None
    if kept is None or recent_pages is None:
        rows = _DRIVER_STATES.tuples(conn, {"incident_pk": incident_pk, "since": since})
    else:  # (r) one row for each page added since the reader's look
        params = {"incident_pk": incident_pk, "since": since, "after": recent_pages.last_id}
        rows = _DRIVER_STATES_AFTER.tuples(conn, params)
    availability, busy, recent = [], [], []
    for what, cid, state, count in rows:
        if what == "a":
            availability.append((cid, state))
        elif what == "b":
            busy.append(cid)
        else:
            recent.append((cid, count))
    return table.candidates(
        availability=availability, on_call=table.on_call(now), positions=positions, busy=busy,
        incident_pages=incident_pages, recent=recent, recent_before=kept,
    )  # fmt: skip


_p = pages.c
_INCIDENT_PAGES = select(_p.clinician_id, _p.state).where(
    _p.incident_pk == bindparam("incident_pk"), _p.kind == "page"
)
# What a step reads of every clinician, in one statement: (a) availability set by those who
# set one; (b) busy: took another call that is still active (pages in these states are few:
# indexed by state); (r) pages in the recent window (indexed by time), per clinician.
_STATES = union_all(
    select(
        literal_column("'a'"), clinician_states.c.clinician_id, clinician_states.c.availability,
        literal_column("0"),
    ),
    select(literal_column("'b'"), _p.clinician_id, null(), literal_column("0"))
    .join(incidents, incidents.c.id == _p.incident_pk)
    .where(
        _p.state.in_([literal_column(f"'{state}'") for state in ACTIVE_PAGE_STATES]),
        _p.incident_pk != bindparam("incident_pk"),
        incidents.c.status == "active",
    ),
    select(literal_column("'r'"), _p.clinician_id, null(), func.count())
    .where(_p.kind == "page", _p.created_at >= bindparam("since"))
    .group_by(_p.clinician_id),
)  # fmt: skip
_DRIVER_STATES = _OnDriver(_STATES)
# The same with, instead of (r), each page added after a RecentPages was read (by id: on
# SQLite every page up to its last id was committed then, and none is added below it since).
_STATES_AFTER: Any = union_all(
    *_STATES.selects[:2],
    select(literal_column("'r'"), _p.clinician_id, null(), literal_column("1")).where(
        _p.id > bindparam("after"), _p.kind == "page", _p.created_at >= bindparam("since")
    ),
)
_DRIVER_STATES_AFTER = _OnDriver(_STATES_AFTER)


@dataclass(frozen=True, slots=True, eq=False)
class RecentPages:
    """The pages (kind ``page``) of a recent window as a reader saw them, on SQLite, kept in
    memory so that a page step reads only the pages added since (:func:`candidate_states`):
    reading every page of the window grows with the window, for every page.

    Exact on SQLite only: one writer at a time, each transaction's ids above every committed
    one, so every page up to ``last_id`` was committed when read and no page is added below
    it later (a rolled-back page's id is given again, above it). Pages are never deleted.
    Times are the stored text, compared as SQLite compares them."""

    last_id: int  # the highest page id when read (0: none)
    since: str  # the window's start when read
    times: list[str]  # created_at of each page from ``since`` on, ascending
    clinicians: list[str]  # whose each one is, in the same order
    # Pages from ``since`` on per clinician, in a roster table's order, made at its first use
    # (on the writer thread).
    _arrays: dict[RosterTable, Ints] = field(default_factory=dict)

    def counts_since(self, since: datetime, table: RosterTable) -> Ints | None:
        """Pages per clinician from ``since`` on, of those read, in ``table``'s order (a copy,
        the caller's to change); None when ``since`` is before the window read."""
        start = sqlite_datetime_text(since)
        assert start is not None
        if start < self.since:
            return None
        index = table.index
        counts = self._arrays.get(table)
        if counts is None:
            counts = self._arrays[table] = table.counts((cid, 1) for cid in self.clinicians)
        counts = counts.copy()
        for cid in self.clinicians[: bisect_left(self.times, start)]:  # left the window since
            i = index.get(cid)
            if i is not None:
                counts[i] -= 1
        return counts


def read_recent_pages(
    conn: Connection, since: datetime, kept: RecentPages | None = None
) -> RecentPages | None:
    """The pages from ``since`` on (on a reader), or None: not SQLite (see RecentPages).

    With ``kept``, an earlier read whose window starts no later: only the pages above its
    last id are read (the window is 12 hours; read whole every second it grows with every
    page), those of ``kept`` before ``since`` dropped, and the per-clinician counts ``kept``
    made carried over. The same pages as a whole read, in the same order (by time, then id:
    every page read now has a higher id than every kept one)."""
    if conn.dialect.name != "sqlite":
        return None
    start = sqlite_datetime_text(since)
    assert start is not None
    if kept is None or start < kept.since:
        # One statement: the highest id and the window's pages in one snapshot of the database.
        (_, _, last_id), *rows = _DRIVER_RECENT_PAGES.tuples(conn, {"since": since})
        rows.sort(key=lambda row: (row[0], row[2]))  # by time, then id
        return RecentPages(
            int(last_id or 0), start, [at for at, _, _ in rows], [cid for _, cid, _ in rows]
        )
    params = {"since": since, "after": kept.last_id}
    (_, _, last_id), *rows = _DRIVER_RECENT_PAGES_AFTER.tuples(conn, params)
    rows.sort(key=lambda row: (row[0], row[2]))
    left = bisect_left(kept.times, start)
    times, clinicians = kept.times[left:], kept.clinicians[left:]
    if rows and times and rows[0][0] < times[-1]:  # (one stamped before a kept one: merged)
        # A stable sort by time: on a tie the kept one (a lower id) stays first.
        pairs = [*zip(times, clinicians, strict=True), *((at, cid) for at, cid, _ in rows)]
        pairs.sort(key=lambda pair: pair[0])
        times, clinicians = [at for at, _ in pairs], [cid for _, cid in pairs]
    else:
        times += [at for at, _, _ in rows]
        clinicians += [cid for _, cid, _ in rows]
    # The kept counts (made on the writer, never changed once there) less the pages that left,
    # plus those read now: of the table made last only (a reloaded roster's old table is not
    # carried from read to read).
    arrays = {}
    for table, counts in list(kept._arrays.items())[-1:]:
        counts = counts.copy()
        table.counts(((cid, -1) for cid in kept.clinicians[:left]), counts)
        arrays[table] = table.counts(((cid, 1) for _, cid, _ in rows), counts)
    return RecentPages(int(last_id or kept.last_id), start, times, clinicians, arrays)


# (The first row: the highest id; then the window's pages, their ids breaking ties of time.)
_DRIVER_RECENT_PAGES = _OnDriver(
    union_all(
        select(null(), null(), func.max(_p.id)),
        select(_p.created_at, _p.clinician_id, _p.id).where(
            _p.kind == "page", _p.created_at >= bindparam("since")
        ),
    )
)
# The same, of the pages above a kept read's last id only (a rowid range).
_DRIVER_RECENT_PAGES_AFTER = _OnDriver(
    union_all(
        select(null(), null(), func.max(_p.id)),
        select(_p.created_at, _p.clinician_id, _p.id).where(
            _p.id > bindparam("after"), _p.kind == "page", _p.created_at >= bindparam("since")
        ),
    )
)


def latest_fixes(conn: Connection) -> dict[str, Fix]:
    """Each clinician's latest fix (``clinician_positions``, kept by :func:`write_fix`).

    On SQLite from the driver's rows, the times parsed as UTCDateTime reads them, and a row
    unchanged since the last read gives the same Fix again: the paging service reads them all
    every second (the 500 of the benchmark's roster), most of them unchanged."""
    global _FIXES_READ
    if conn.dialect.name != "sqlite":
        return {cid: Fix(lat, lon, at) for cid, lat, lon, at in conn.execute(_POSITIONS.stmt)}
    known, read = _FIXES_READ, {}
    out = {}
    for row in _POSITIONS.tuples(conn, {}):
        fix = known.get(row)
        if fix is None:
            fix = Fix(row[1], row[2], datetime.fromisoformat(row[3]).replace(tzinfo=UTC))
        read[row] = out[row[0]] = fix
    _FIXES_READ = read
    return out


# The rows of the last read on SQLite and their fixes (rows are values: any database's row
# gives the same Fix).
_FIXES_READ: dict[tuple[Any, ...], Fix] = {}


_POSITIONS = _OnDriver(
    select(
        clinician_positions.c.clinician_id,
        clinician_positions.c.lat,
        clinician_positions.c.lon,
        clinician_positions.c.fixed_at,
    )
)


@dataclass(frozen=True, slots=True)
class NewPage:
    kind: str  # page (answerable) or notice
    clinician_id: str | None
    endpoints: list[dict[str, str]]
    text_for: Any  # Callable[[str], str]: the page text, given its reference


@dataclass(frozen=True, slots=True)
class StepOutcome:
    outcome: str  # paged, no-candidate, notified, nobody-to-notify, chain-closed, incident-closed
    dispatch: dict[str, Any] | None
    pages: Sequence[NewPage]
    close_chain: str | None  # exhausted or cancelled, when the chain ends here
    advance_now: bool  # the next step is due now rather than after this step's wait


def finish_step(
    conn: Connection,
    work: StepWork,
    result: StepOutcome,
    worker: str,
    now: datetime,
) -> list[str] | None:
    """The references of the pages created; None when the claim was lost (lease ran out and
    another worker took the step): nothing is written then."""
    finished = finish_step_and_claim(conn, work, result, worker, now, None)
    return None if finished is None else [page.page_ref for page in finished.pages]


@dataclass(frozen=True, slots=True)
class FinishedStep:
    pages: list[ClaimedPage]  # the pages created, claimed for delivery when a lease was given
    next_due: datetime | None  # when the chain's next step is due (None: the chain ended)


# The statements of a page's step, built once: building one (and its cache key) at each call
# cost more than executing it. The SET columns are the parameters' keys.
_FINISH_STEP = update(escalation_steps).where(escalation_steps.c.id == bindparam("b_step_id"))
_ADD_PAGES_SENT = (
    update(escalation_chains)
    .where(escalation_chains.c.id == bindparam("b_chain_id"))
    .values(pages_sent=escalation_chains.c.pages_sent + bindparam("b_count"))
)
_CLOSE_CHAIN = update(escalation_chains).where(
    escalation_chains.c.id == bindparam("b_chain_id"), escalation_chains.c.state == OPEN
)
# INSERT .. ON CONFLICT (page_ref) DO NOTHING RETURNING id, per dialect.
_INSERT_PAGE = {
    "postgresql": postgresql.insert(pages)
    .on_conflict_do_nothing(index_elements=[pages.c.page_ref])
    .returning(pages.c.id),
    "sqlite": sqlite.insert(pages)
    .on_conflict_do_nothing(index_elements=[pages.c.page_ref])
    .returning(pages.c.id),
}


def finish_step_and_claim(
    conn: Connection,
    work: StepWork,
    result: StepOutcome,
    worker: str,
    now: datetime,
    lease: timedelta | None,
    *,
    fresh: bool = False,
) -> FinishedStep | None:
    """:func:`finish_step`, and with ``lease`` the pages it creates are inserted already claimed
    by ``worker`` (``sending`` under the lease), so the caller submits them at once instead of
    claiming them in another transaction; if it dies, they are due again when the lease ends,
    as any claimed page is. None when the claim on the step was lost. ``fresh``: the step was
    inserted claimed in this very transaction (nobody else can have taken it)."""
    s = escalation_steps.c
    if not fresh:
        if conn.dialect.name == "postgresql":
            # Chain before step, the order answers and cancellations lock in (apply_answer):
            # the other order deadlocks against an accept of this chain's page.
            conn.execute(_LOCK_CHAIN, {"chain_id": work.step.chain_id})
        held = conn.execute(
            _for_update(conn, select(s.id).where(
                s.id == work.step.step_id, s.state == "claimed", s.claimed_by == worker
            ))
        ).first()  # fmt: skip
        if held is None:
            return None
    conn.execute(
        _FINISH_STEP,
        dict(
            b_step_id=work.step.step_id, state="done", done_at=now, lease_until=None,
            outcome=result.outcome, dispatch=result.dispatch,
        ),
    )  # fmt: skip
    delivery = (
        dict(delivery="sending", lease_until=now + lease) if lease is not None
        else dict(delivery="pending")
    )  # fmt: skip
    created = _insert_pages(conn, work, result, now, delivery)
    if created:
        conn.execute(_ADD_PAGES_SENT, dict(b_chain_id=work.step.chain_id, b_count=len(created)))
    following = work.step.step + 1
    due: datetime | None = None
    if result.close_chain is None and following < len(work.steps):
        wait = timedelta(minutes=float(work.steps[work.step.step].get("wait_minutes", 0)))
        due = now if result.advance_now else now + wait
        _insert_step(conn, work.step.chain_id, following, work.steps[following]["action"], due)
    else:
        conn.execute(
            _CLOSE_CHAIN,
            dict(
                b_chain_id=work.step.chain_id, state=result.close_chain or "exhausted",
                closed_at=now,
            ),
        )  # fmt: skip
    return FinishedStep(created, due)


_PAGE_INSERT_COLUMNS = (
    "page_ref", "chain_id", "step_id", "incident_pk", "kind", "clinician_id", "state", "text",
    "created_at", "endpoints", "endpoint_index", "delivery", "next_try_at", "lease_until",
)  # fmt: skip
_DRIVER_INSERT_PAGE = {
    name: _OnDriver(stmt, _PAGE_INSERT_COLUMNS) for name, stmt in _INSERT_PAGE.items()
}


def _insert_pages(
    conn: Connection,
    work: StepWork,
    result: StepOutcome,
    now: datetime,
    delivery: dict[str, Any],
) -> list[ClaimedPage]:
    """Insert the step's pages with ``delivery`` (claimed: ``sending`` under a lease; or
    ``pending``), numbered after the incident's earlier pages."""
    created: list[ClaimedPage] = []
    attempts = work.attempts
    for page in result.pages:
        attempts += 1
        row = dict(
            chain_id=work.step.chain_id, step_id=work.step.step_id,
            incident_pk=work.incident.incident_pk, kind=page.kind,
            clinician_id=page.clinician_id, state=OPEN if page.kind == "page" else "sent",
            created_at=now, endpoints=page.endpoints, endpoint_index=0, next_try_at=now,
            **delivery,
        )  # fmt: skip
        page_id, ref, text = _insert_page(conn, work.incident, attempts, page.text_for, row)
        first = page.endpoints[0]
        created.append(
            ClaimedPage(
                int(page_id), ref, page.kind, work.step.chain_id, text, 0, first["gateway"],
                first["address"], page.clinician_id,
            )
        )  # fmt: skip
    return created


def _insert_page(
    conn: Connection,
    incident: IncidentFacts,
    attempt: int,
    text_for: Callable[[str], str],
    row: dict[str, Any],
) -> tuple[int, str, str]:
    """Insert a page under the first free reference of :func:`_references` (its id, the
    reference and the text): the insert itself finds out whether a reference is taken (the
    unique constraint, ON CONFLICT DO NOTHING), no look-up first."""
    stmt = _DRIVER_INSERT_PAGE[conn.dialect.name]
    for ref in _references(incident, attempt):
        text = text_for(ref)
        inserted = stmt.rows(conn, dict(row, page_ref=ref, text=text))
        if inserted:
            return int(inserted[0].id), ref, text
    raise AssertionError("the last reference names the incident's own key")  # pragma: no cover


def _references(incident: IncidentFacts, attempt: int) -> list[str]:
    """``C1445-2``: the incident's short number and the attempt; longer if that is taken, in
    this order (the last one holds the incident's primary key)."""
    digits = "".join(ch for ch in incident.number if ch.isdigit()) or str(incident.incident_pk)
    short = [f"C{digits[-length:]}-{attempt}" for length in (4, 6, len(digits))]
    return [*dict.fromkeys(short), f"C{digits}-{incident.incident_pk}-{attempt}"]


def advance_chain(conn: Connection, chain_id: int, now: datetime) -> None:
    """Make the chain's waiting step due now (a decline, or a page nobody could receive)."""
    s = escalation_steps.c
    conn.execute(
        update(escalation_steps)
        .where(s.chain_id == chain_id, s.state == "pending", s.due_at > now)
        .values(due_at=now)
    )


def next_due(conn: Connection) -> datetime | None:
    """When the worker must next look: the earliest due step, page or expiring lease."""
    s, p = escalation_steps.c, pages.c
    candidates = [
        conn.execute(select(func.min(s.due_at)).where(s.state == "pending")).scalar(),
        conn.execute(select(func.min(s.lease_until)).where(s.state == "claimed")).scalar(),
        conn.execute(select(func.min(p.next_try_at)).where(p.delivery == "pending")).scalar(),
        conn.execute(select(func.min(p.lease_until)).where(p.delivery == "sending")).scalar(),
    ]
    found = [c for c in candidates if c is not None]
    return min(found) if found else None


# --- page delivery -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimedPage:
    page_id: int
    page_ref: str
    kind: str
    chain_id: int
    text: str
    endpoint_index: int
    gateway: str
    address: str
    clinician_id: str | None  # None for a notice to a bare endpoint


def claim_due_pages(
    conn: Connection, now: datetime, worker: str, lease: timedelta, limit: int
) -> list[ClaimedPage]:
    p = pages.c
    due = or_(
        and_(p.delivery == "pending", p.next_try_at <= now),
        and_(p.delivery == "sending", p.lease_until < now),
    )
    stmt = (
        select(
            p.id,
            p.page_ref,
            p.kind,
            p.chain_id,
            p.text,
            p.endpoint_index,
            p.endpoints,
            p.clinician_id,
        )
        .where(due)
        .order_by(p.id)
        .limit(limit)
    )
    rows = conn.execute(_for_update(conn, stmt)).all()
    if rows:
        conn.execute(
            update(pages)
            .where(p.id.in_([r.id for r in rows]))
            .values(delivery="sending", lease_until=now + lease)
        )
    out = []
    for r in rows:
        endpoint = r.endpoints[r.endpoint_index]
        out.append(
            ClaimedPage(
                r.id, r.page_ref, r.kind, r.chain_id, r.text, r.endpoint_index,
                endpoint["gateway"], endpoint["address"], r.clinician_id,
            )
        )  # fmt: skip
    return out


_PAGE_SUBMITTED = (
    update(pages)
    .where(pages.c.id == bindparam("page_id"), pages.c.endpoint_index == bindparam("index"))
    .values(
        delivery="submitted", gateway=bindparam("via"), gateway_id=bindparam("gid"),
        submitted_at=bindparam("at", type_=pages.c.submitted_at.type), lease_until=None,
        next_try_at=None, last_error=None,
    )
)  # fmt: skip


_DRIVER_PAGE_SUBMITTED = _OnDriver(_PAGE_SUBMITTED)


def pages_submitted(
    conn: Connection, done: Sequence[tuple[ClaimedPage, str | None, datetime]]
) -> None:
    """Record several submissions (page, the gateway's id, when) in one transaction: deliveries
    that finish while a commit is under way share the next one."""
    if done:
        _DRIVER_PAGE_SUBMITTED.many(
            conn,
            [
                dict(page_id=page.page_id, index=page.endpoint_index, via=page.gateway,
                     gid=gateway_id, at=at)
                for page, gateway_id, at in done
            ],
        )  # fmt: skip


def page_failed(
    conn: Connection, page: ClaimedPage, code: str, retry_at: datetime | None, now: datetime
) -> bool:
    """Record a failed submission: retry this endpoint at ``retry_at``, else try the next one.
    True when no endpoint is left (the page could not be delivered)."""
    p = pages.c
    count = len(conn.execute(select(p.endpoints).where(p.id == page.page_id)).scalar_one())
    if retry_at is not None:
        values: dict[str, Any] = dict(delivery="pending", next_try_at=retry_at)
        exhausted = False
    elif page.endpoint_index + 1 < count:
        values = dict(delivery="pending", next_try_at=now, endpoint_index=page.endpoint_index + 1)
        exhausted = False
    else:
        values = dict(delivery="failed", next_try_at=None)
        exhausted = True
    conn.execute(
        update(pages)
        .where(p.id == page.page_id, p.endpoint_index == page.endpoint_index)
        .values(lease_until=None, last_error=code[:200], **values)
    )
    if exhausted and page.kind == "page":
        advance_chain(conn, page.chain_id, now)  # nobody can answer it: go on now
    return exhausted


# --- answers, replies, receipts ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageRecord:
    page_id: int
    page_ref: str
    chain_id: int
    kind: str
    clinician_id: str | None
    state: str


_PAGE_COLUMNS = (
    pages.c.id, pages.c.page_ref, pages.c.chain_id, pages.c.kind, pages.c.clinician_id,
    pages.c.state,
)  # fmt: skip


def _record(row: Any) -> PageRecord:
    return PageRecord(row.id, row.page_ref, row.chain_id, row.kind, row.clinician_id, row.state)


def find_page(
    conn: Connection,
    *,
    page_ref: str | None = None,
    gateway: str | None = None,
    gateway_id: str | None = None,
    clinician_ids: Iterable[str] = (),
) -> tuple[PageRecord, str] | None:
    """The page a reply answers, and how it was matched: by reference, else by the gateway's
    id, else the sender's most recent open page."""
    p = pages.c
    if page_ref:
        row = conn.execute(
            select(*_PAGE_COLUMNS).where(func.upper(p.page_ref) == page_ref.upper())
        ).first()
        if row is not None:
            return _record(row), "page_ref"
    if gateway and gateway_id:
        row = conn.execute(
            select(*_PAGE_COLUMNS).where(p.gateway == gateway, p.gateway_id == gateway_id)
        ).first()
        if row is not None:
            return _record(row), "gateway_id"
    ids = list(clinician_ids)
    if ids:
        latest = (
            select(*_PAGE_COLUMNS)
            .where(
                p.clinician_id.in_(ids),
                p.kind == "page",
                p.state.in_((OPEN, "accepted", "en_route")),
            )
            .order_by(p.created_at.desc(), p.id.desc())
            .limit(1)
        )
        row = conn.execute(latest).first()
        if row is None:
            return None
        if conn.dialect.name != "postgresql":
            return _record(row), "sender"  # SQLite: this transaction is the only writer
        # PostgreSQL: an answer to that page may be under way on another daemon. Which page is
        # the sender's most recent open one is decided once no answer to it is: as if this
        # reply came after the other (a page it closed is passed over, as it would be then).
        for _ in range(_REMATCHES):
            page = lock_page(conn, _record(row))
            again = conn.execute(latest).first()
            if again is None:
                return None
            if again.id == row.id:
                return page, "sender"
            row = again
        return lock_page(conn, _record(row)), "sender"
    return None


# A reply matched by its sender looks again this many times when the page it found was closed
# by another answer while it waited: each look passes over one more page.
_REMATCHES = 5


# Which answers a page in each state still takes.
ANSWERABLE: dict[str, tuple[PageAnswer, ...]] = {
    OPEN: (PageAnswer.ACCEPT, PageAnswer.DECLINE, PageAnswer.EN_ROUTE),
    "accepted": (PageAnswer.EN_ROUTE, PageAnswer.ON_SCENE),
    "en_route": (PageAnswer.ON_SCENE,),
}


def apply_answer(
    conn: Connection, page: PageRecord, answer: PageAnswer, via: str, now: datetime
) -> str:
    """Apply a human answer; the outcome token (``applied`` or why not).

    Answers to the pages of one chain are applied one at a time, whichever daemon, gateway or
    path they came by (an SMS reply, an ack-page tap, a CAD unit status): on PostgreSQL the
    chain's row is locked first (``FOR NO KEY UPDATE``; an answer to the same chain on another
    daemon waits for this transaction to end); SQLite's one writer already serializes them.
    ``page.state`` is not trusted: the page, its chain and its call are read again under the
    lock, so of two answers at once the second is judged against what the first did, exactly
    as if it had come later (``page-closed``, ``taken`` or ``incident-closed``: recorded with
    the reply, the clinician told as for any late answer). An accept and a decline of one page
    are never both counted, nor a chain advanced or taken twice.

    On PostgreSQL the answer runs in a savepoint: when it is chosen to break a deadlock (a step
    being finished holds the step this answer cancels and waits for the chain), it is rolled
    back to the savepoint, which lets the other transaction finish, and applied again."""
    if page.kind != "page" or page.clinician_id is None:
        return "not-answerable"
    if conn.dialect.name != "postgresql":
        return _apply_answer(conn, page, answer, via, now)
    for attempt in range(1, _ANSWER_TRIES + 1):
        try:
            with conn.begin_nested():
                return _apply_answer(conn, page, answer, via, now)
        except DBAPIError as err:
            if attempt == _ANSWER_TRIES or getattr(err.orig, "sqlstate", None) not in _RETRY:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


_ANSWER_TRIES = 3
_RETRY = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure
_LOCK_CHAIN = (
    select(_c.id).where(_c.id == bindparam("chain_id")).with_for_update(key_share=True)
)  # FOR NO KEY UPDATE: pages and steps inserted for the chain (their foreign key) don't wait
_ANSWER_STATE = (
    select(pages.c.state.label("page_state"), _c.state, _c.accepted_by, _i.status)
    .select_from(
        pages.join(escalation_chains, _c.id == pages.c.chain_id).join(
            incidents, _i.id == _c.incident_pk
        )
    )
    .where(pages.c.id == bindparam("page_id"))
)


def _answer_state(conn: Connection, page: PageRecord) -> Any:
    """The page's state, its chain's state and taker, and its call's status, read under the
    chain's lock (taken here on PostgreSQL; held to the end of the transaction)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK_CHAIN, {"chain_id": page.chain_id})
    return conn.execute(_ANSWER_STATE, {"page_id": page.page_id}).one()


def lock_page(conn: Connection, page: PageRecord) -> PageRecord:
    """``page`` as it stands once no other answer to its chain is under way (the chain's row
    locked to the end of this transaction on PostgreSQL): what an answer is chosen by."""
    return replace(page, state=_answer_state(conn, page).page_state)


def _apply_answer(
    conn: Connection, page: PageRecord, answer: PageAnswer, via: str, now: datetime
) -> str:
    assert page.clinician_id is not None
    p, c = pages.c, escalation_chains.c
    chain = _answer_state(conn, page)
    if answer not in ANSWERABLE.get(chain.page_state, ()):
        return "page-closed"
    if chain.status != "active" and answer in (PageAnswer.ACCEPT, PageAnswer.EN_ROUTE):
        return "incident-closed"
    if chain.state == "accepted" and chain.accepted_by != page.clinician_id:
        return "taken"
    new_state = {"accept": "accepted", "decline": "declined"}.get(answer.value, answer.value)
    conn.execute(
        update(pages)
        .where(p.id == page.page_id)
        .values(state=new_state, answered_at=now, answered_via=via)
    )
    if answer is PageAnswer.DECLINE:
        if chain.state == OPEN:
            advance_chain(conn, page.chain_id, now)
        return "applied"
    if chain.state in (OPEN, "exhausted"):  # a late accept still closes the call
        conn.execute(
            update(escalation_chains)
            .where(c.id == page.chain_id)
            .values(state="accepted", accepted_by=page.clinician_id, closed_at=now)
        )
        s = escalation_steps.c
        conn.execute(
            update(escalation_steps)
            .where(s.chain_id == page.chain_id, s.state.in_(("pending", "claimed")))
            .values(state="cancelled", done_at=now, lease_until=None)
        )
        conn.execute(
            update(pages)
            .where(p.chain_id == page.chain_id, p.id != page.page_id, p.state == OPEN)
            .values(state="cancelled")
        )
    if answer in (PageAnswer.EN_ROUTE, PageAnswer.ON_SCENE):
        write_availability(conn, page.clinician_id, Availability(answer.value), via, now)
    record_encounter_times(conn, page, answer, now)
    return "applied"


# The encounter timeline columns a human answer fills (the first time stays).
ANSWER_TIMES = {
    PageAnswer.ACCEPT: ("page_ack_at",),
    PageAnswer.EN_ROUTE: ("page_ack_at", "en_route_at"),
    PageAnswer.ON_SCENE: ("page_ack_at", "on_scene_at"),
}


def record_encounter_times(
    conn: Connection, page: PageRecord, answer: PageAnswer, now: datetime
) -> None:
    """A clinician who takes a call makes it an encounter (issue 6): created pre-filled from
    the incident on the first accept, its timeline filled from the paging records, in the same
    transaction as the answer."""
    from corespond.daemon.encounters import encounter_from_incident, record_times

    fields = ANSWER_TIMES.get(answer)
    if not fields:
        return
    chain = conn.execute(
        select(escalation_chains.c.incident_pk, escalation_chains.c.program).where(
            escalation_chains.c.id == page.chain_id
        )
    ).one()
    first_paged = conn.execute(
        select(func.min(func.coalesce(pages.c.submitted_at, pages.c.created_at))).where(
            pages.c.chain_id == page.chain_id, pages.c.kind == "page"
        )
    ).scalar()
    encounter = encounter_from_incident(
        conn, chain.incident_pk, chain.program, now, clinician=page.clinician_id
    )
    times = dict.fromkeys(fields, now)
    if first_paged is not None:
        times["clinician_paged_at"] = first_paged
    record_times(conn, encounter, times, now)


def record_reply(
    conn: Connection,
    page: PageRecord | None,
    matched_by: str | None,
    reply: Any,
    outcome: str,
) -> None:
    conn.execute(
        insert(page_replies),
        dict(
            page_id=page.page_id if page else None, gateway=reply.gateway,
            received_at=reply.received_at, answer=reply.answer.value if reply.answer else None,
            matched_by=matched_by, outcome=outcome, sender=reply.sender, text=reply.text,
        ),
    )  # fmt: skip


def record_receipt(
    conn: Connection, gateway: str, gateway_id: str, state: str, at: datetime
) -> int:
    result = conn.execute(
        update(pages)
        .where(pages.c.gateway == gateway, pages.c.gateway_id == gateway_id)
        .values(receipt=state, receipt_at=at)
    )
    return int(result.rowcount or 0)


def page_view(conn: Connection, page_ref: str) -> PageView | None:
    p = pages.c
    row = conn.execute(
        select(p.page_ref, p.clinician_id, p.incident_pk, p.created_at, p.state, p.kind).where(
            p.page_ref == page_ref
        )
    ).first()
    if row is None or row.kind != "page" or row.clinician_id is None:
        return None
    facts = incident_facts(conn, row.incident_pk)
    return PageView(
        page_ref=row.page_ref,
        clinician_id=row.clinician_id,
        incident_ref=facts.number,
        call_type=facts.call_type,
        general_location=facts.general_location,
        paged_at=row.created_at,
        state=row.state,
        answers=ANSWERABLE.get(row.state, ()),
    )


# --- clinicians --------------------------------------------------------------------------------


def write_availability(
    conn: Connection, clinician_id: str, state: Availability, via: str, now: datetime
) -> None:
    t = clinician_states.c
    done = conn.execute(
        update(clinician_states)
        .where(t.clinician_id == clinician_id)
        .values(availability=state.value, changed_at=now, via=via)
    )
    if not done.rowcount:
        conn.execute(
            insert(clinician_states),
            dict(clinician_id=clinician_id, availability=state.value, changed_at=now, via=via),
        )


def write_fix(conn: Connection, fix: LocationFix, now: datetime) -> None:
    """Record a fix in the history and, when it is the clinician's latest, as its position
    (a fix that arrives late does not move the clinician back)."""
    values = dict(
        clinician_id=fix.clinician_id, lat=fix.latitude, lon=fix.longitude,
        fixed_at=fix.fixed_at, received_at=now, source=fix.source, accuracy_m=fix.accuracy_m,
    )  # fmt: skip
    conn.execute(insert(location_fixes), values)
    upsert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(
        clinician_positions
    )
    conn.execute(
        upsert.values(values).on_conflict_do_update(
            index_elements=[clinician_positions.c.clinician_id],
            set_={k: upsert.excluded[k] for k in values if k != "clinician_id"},
            where=clinician_positions.c.fixed_at < upsert.excluded.fixed_at,
        )
    )


# --- reads for the CLI -------------------------------------------------------------------------


def list_pages(conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
    """Recent pages, newest first; endpoints by gateway only (addresses are protected)."""
    p = pages.c
    rows = conn.execute(
        select(
            p.page_ref, p.created_at, incidents.c.external_id, p.kind, p.clinician_id, p.state,
            p.delivery, p.gateway, p.receipt, p.answered_at, p.answered_via,
        )
        .join(incidents, incidents.c.id == p.incident_pk)
        .order_by(p.created_at.desc(), p.id.desc())
        .limit(limit)
    ).mappings()  # fmt: skip
    return [dict(row) for row in rows]


def page_detail(conn: Connection, page_ref: str) -> dict[str, Any] | None:
    """One page with its chain, the step that sent it (with the dispatcher's reasons) and the
    replies received (answers and outcomes; not their text)."""
    p = pages.c
    row = conn.execute(
        select(
            p.id, p.page_ref, p.chain_id, p.step_id, p.kind, p.clinician_id, p.state, p.text,
            p.created_at, p.answered_at, p.answered_via, p.endpoint_index, p.delivery,
            p.gateway, p.gateway_id, p.submitted_at, p.receipt, p.receipt_at, p.last_error,
            incidents.c.external_id.label("incident_id"),
        )
        .join(incidents, incidents.c.id == p.incident_pk)
        .where(func.upper(p.page_ref) == page_ref.upper())
    ).mappings().first()  # fmt: skip
    if row is None:
        return None
    page = dict(row)
    c, s, r = escalation_chains.c, escalation_steps.c, page_replies.c
    chain = conn.execute(
        select(c.id, c.kind, c.program, c.response, c.state, c.created_at, c.closed_at,
               c.accepted_by, c.steps).where(c.id == page["chain_id"])
    ).mappings().one()  # fmt: skip
    steps = conn.execute(
        select(s.step, s.action, s.state, s.due_at, s.done_at, s.outcome)
        .where(s.chain_id == page["chain_id"])
        .order_by(s.step)
    ).mappings()
    step = conn.execute(
        select(s.step, s.action, s.dispatch).where(s.id == page.pop("step_id"))
    ).mappings().one()  # fmt: skip
    replies = conn.execute(
        select(r.received_at, r.gateway, r.answer, r.matched_by, r.outcome)
        .where(r.page_id == page.pop("id"))
        .order_by(r.id)
    ).mappings()
    return {
        "page": page,
        "dispatch": step["dispatch"],
        "chain": dict(chain),
        "steps": [dict(x) for x in steps],
        "replies": [dict(x) for x in replies],
    }


def clinician_status(conn: Connection, roster: Roster, now: datetime) -> list[dict[str, Any]]:
    """Every clinician of the roster: availability, on call now, last fix age, open pages."""
    t = clinician_states.c
    states = {
        row.clinician_id: row
        for row in conn.execute(select(t.clinician_id, t.availability, t.changed_at, t.via))
    }
    fixes = latest_fixes(conn)
    p = pages.c
    open_pages: dict[str, int] = dict(
        conn.execute(
            select(p.clinician_id, func.count())
            .where(p.kind == "page", p.state.in_((OPEN, *ACTIVE_PAGE_STATES)))
            .group_by(p.clinician_id)
        ).all()
    )
    on_call = roster.on_call(now)
    out = []
    for cid, clinician in roster.clinicians.items():
        state = states.get(cid)
        fix = fixes.get(cid)
        out.append(
            {
                "clinician_id": cid,
                "program": clinician.program,
                "availability": state.availability if state else Availability.AVAILABLE.value,
                "availability_since": state.changed_at if state else None,
                "on_call": cid in on_call,
                "fix_age_seconds": round((now - fix.fixed_at).total_seconds()) if fix else None,
                "open_pages": int(open_pages.get(cid, 0)),
            }
        )
    return out
