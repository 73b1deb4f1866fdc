"""Writing snapshots, decisions and rejects: one transaction per batch, group-committed.

:func:`write_batch` is the synchronous unit of work (SQLAlchemy Core, a handful of round trips
for a whole batch). :class:`IncidentStore` runs it on one dedicated writer thread and batches
whatever was submitted while the previous batch was being written (group commit), so that the
cost of a durable commit is shared by every snapshot that arrived meanwhile.

A batch has exactly the effect of writing its items one at a time in order: the flags returned
for each snapshot (became current, decision changed) are computed in that order.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import chain
from typing import Any, Protocol, TypeVar

import msgspec
import orjson
import structlog
from sqlalchemy import Connection, Engine, Table, bindparam, insert, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from corespond.daemon.decision import Decision
from corespond.daemon.errors import SafeMessage
from corespond.daemon.ingest import SnapshotState
from corespond.daemon.log import lines_held
from corespond.daemon.memory import PauseRecorder
from corespond.daemon.slotted import fast_init
from corespond.daemon.snapshot import (
    Snapshot,
    snapshot_protected_json,
    snapshot_public_json,
    utc,
)
from corespond.daemon.store.engine import READ_ONLY, json_text
from corespond.daemon.store.queries import DECISION_COLUMNS, decision_from_row
from corespond.daemon.store.tables import (
    clean_text,
    decisions,
    incidents,
    rejected_messages,
    snapshots,
    sqlite_datetime_text,
)

__all__ = [
    "Followed",
    "Follower",
    "IncidentStore",
    "RejectRecord",
    "SnapshotRecord",
    "SnapshotState",
    "StoreClosed",
    "StoreError",
    "StoredSnapshot",
    "clean_text",
    "follow_in",
    "write_batch",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Bound on the values of one IN (...) list: SQLite and PostgreSQL both cap bound parameters.
_IN_CHUNK = 400


@fast_init
@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """A parsed, classified snapshot to store. ``source`` namespaces the incident ids."""

    feed: str
    source: str
    format: str
    received_at: datetime
    raw: bytes
    snapshot: Snapshot
    decision: Decision


@fast_init
@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    incident_pk: int
    external_id: str
    snapshot_id: int
    state: SnapshotState
    became_current: bool  # this snapshot is now the incident's current state
    decision_changed: bool  # the incident's current outcome changed (new incident included)
    # What the outcome changed from, when it changed (None for a new incident, and when it did
    # not change: loading every previous decision would cost the hot path for nothing).
    previous_decision: Decision | None
    # What the store's follower did for this snapshot in the same transaction (None when it
    # was not asked: see Follower).
    followed: Followed | None = None


@dataclass(frozen=True, slots=True)
class Followed:
    """The outcome of a :class:`Follower`'s work for one snapshot, committed with it: its
    value, or (``ok`` False) the exception that rolled the work back (the snapshot stands)."""

    ok: bool
    value: Any


class Follower(Protocol):
    """Work that a new snapshot calls for, done in the transaction that stores the snapshot:
    the escalation's chain and first page for a call that needs a clinician, committed with
    the snapshot instead of in a second transaction after it (see
    :meth:`IncidentStore.follow_with`)."""

    def wants(self, record: SnapshotRecord) -> bool:
        """On the reactor, when the batch is put together: may ``record`` call for work?
        (The batch then counts as page work: see _dispatch_batch.)"""

    def follow(self, conn: Connection, record: SnapshotRecord, stored: StoredSnapshot) -> Any:
        """On the writer thread, in a savepoint after the batch's own statements: the work,
        for a new snapshot ``wants`` said yes to; its value reaches the reactor as
        ``StoredSnapshot.followed``."""


@fast_init
@dataclass(frozen=True, slots=True)
class RejectRecord:
    """A message that could not be parsed, to keep verbatim with the reason."""

    feed: str
    format: str
    received_at: datetime
    raw: bytes
    code: str
    reason: str
    where: str | None
    origin_name: str | None


class StoreClosed(SafeMessage, Exception):
    """Submitted to an :class:`IncidentStore` after :meth:`IncidentStore.stop`."""


# --- statements, built once (building a statement costs more than executing a small one) -----

# By the unique index on (incident_id, digest): one index seek per pair on PostgreSQL too.
_EXISTING_SNAPSHOTS = select(
    snapshots.c.incident_id, snapshots.c.digest, snapshots.c.id
).where(
    tuple_(snapshots.c.incident_id, snapshots.c.digest).in_(bindparam("pairs", expanding=True))
)
_SELECT_INCIDENTS = (
    select(
        incidents.c.id,
        incidents.c.source,
        incidents.c.external_id,
        incidents.c.snapshot_count,
        incidents.c.first_received_at,
        incidents.c.last_received_at,
        incidents.c.current_snapshot_id,
        incidents.c.current_decision_id,
        incidents.c.behavioral_health,
        incidents.c.category,
        incidents.c.response,
        snapshots.c.source_updated_at,
        snapshots.c.received_at,
    )
    .select_from(incidents.outerjoin(snapshots, snapshots.c.id == incidents.c.current_snapshot_id))
    # One source per statement: SQLite (3.40) finds rows by a row-value IN (VALUES ...) only by
    # scanning the whole table, but uses the unique index for source = ? AND external_id IN.
    .where(
        incidents.c.source == bindparam("source"),
        incidents.c.external_id.in_(bindparam("external_ids", expanding=True)),
    )
    .order_by(incidents.c.id)  # lock order: two writers cannot deadlock on incidents
)
_SELECT_DECISIONS = select(decisions.c.id, *DECISION_COLUMNS).where(
    decisions.c.id.in_(bindparam("ids", expanding=True))
)
_INSERT_DECISIONS = insert(decisions).returning(decisions.c.id, decisions.c.snapshot_id)
_INSERT_REJECTS = insert(rejected_messages).returning(
    rejected_messages.c.id, sort_by_parameter_order=True
)
_UPDATE_INCIDENT = update(incidents).where(incidents.c.id == bindparam("incident_pk"))


def _same(value: T) -> T:
    return value


@dataclass(frozen=True, slots=True)
class _Binds:
    """How the hot path hands times and JSON values over: as Python objects to SQLAlchemy
    (which converts them), or already converted for the driver."""

    time: Callable[[datetime | None], Any]
    json: Callable[[Any], Any]
    # sqlite3 binds only exact int, float, str and bytearray without its adapter protocol,
    # whose failed look-ups (__adapt__, __conform__) cost a bool about 3,000 instructions:
    # on SQLite, flags go to the driver as the 0 and 1 that Boolean binds.
    flag: Callable[[bool], Any]


# Formatting a datetime costs more than a dict look-up, and a batch binds the same few times
# again and again (received, source and opening times): remember the latest ones.
_SQLITE_TIMES: dict[datetime, str | None] = {}
_SQLITE_TIMES_MAX = 4096


def _sqlite_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    text = _SQLITE_TIMES.get(value)
    if text is None:
        if len(_SQLITE_TIMES) >= _SQLITE_TIMES_MAX:
            _SQLITE_TIMES.clear()
        text = _SQLITE_TIMES[value] = sqlite_datetime_text(value)
    return text


def _sqlite_json(value: Any) -> str:
    return "[]" if value == [] else json_text(value)  # no rules, no evidence: most decisions


def _snapshot_json_dicts(snap: Snapshot) -> tuple[dict[str, Any], dict[str, Any]]:
    return snapshot_public_json(snap), snapshot_protected_json(snap)


_encode = msgspec.json.Encoder().encode
# msgspec writes a float from 1e16 on as 1e16 where orjson (json_text) writes 1e+16.
_PLAIN_FLOAT = 1e15


def _snapshot_json_texts(snap: Snapshot) -> tuple[str, str]:
    """``json_text(snapshot_public_json(snap))`` and the same of the protected part: the
    same text, from msgspec's encoder over the snapshot's own values.

    msgspec writes the slotted dataclasses Unit, Caution, Disposition and Person, the StrEnum
    and UTC datetimes itself, with the keys in the order the dicts have them (notes put the
    time first: they stay dicts). The two dicts with a dict per unit, note and person, every
    time formatted on its own, cost about 7 us a snapshot, this about 6 (and fewer
    instructions: see the README's ingest section). Text msgspec refuses (a lone surrogate),
    times outside UTC and floats it would write otherwise take the dicts' way.
    tests/daemon/store/test_sqlite_path.py holds the two to the same text.
    """
    loc = snap.location
    point = loc.point if loc is not None else None
    plain = point is None or (abs(point.lat) < _PLAIN_FLOAT and abs(point.lon) < _PLAIN_FLOAT)
    if plain and _utc_times(snap):
        location = None
        if loc is not None:
            location = {
                "lat": point.lat if point else None,
                "lon": point.lon if point else None,
                "city": loc.city,
                "state": loc.state,
            }
        try:
            # The keys of snapshot_public_json, as a literal: a dict built from PUBLIC_KEYS
            # and an attrgetter cost 2 us more a snapshot.
            public = _encode(
                {
                    "id": snap.incident_id,
                    "updated_at": snap.updated_at,
                    "status": snap.status,
                    "number": snap.incident_number,
                    "call_type": snap.call_type,
                    "call_type_code": snap.call_type_code,
                    "apco_type": snap.apco_type,
                    "priority": snap.priority,
                    "agency": snap.agency,
                    "zone": snap.zone,
                    "opened_at": snap.opened_at,
                    "closed_at": snap.closed_at,
                    "location": location,
                    "units": snap.units,
                    "cautions": snap.cautions,
                    "dispositions": snap.dispositions,
                }
            )
            protected = _encode(
                {
                    "address": loc.address if loc is not None else None,
                    "notes": [{"time": n.time, "text": n.text} for n in snap.notes],
                    "persons": snap.persons,
                }
            )
            return public.decode(), protected.decode()
        except (UnicodeEncodeError, TypeError, msgspec.EncodeError):
            pass
    return json_text(snapshot_public_json(snap)), json_text(snapshot_protected_json(snap))


def _utc_times(snap: Snapshot) -> bool:
    """Whether every time of ``snap`` is an aware UTC datetime (what parsers make)."""
    for value in (snap.updated_at, snap.opened_at, snap.closed_at, *[n.time for n in snap.notes]):
        if value is not None and value.tzinfo is not UTC:
            return False
    return True


def _decision_json_texts(decision: Decision) -> tuple[str, str]:
    """``json_text`` of a decision's rules (as a list) and of its evidence_json(): msgspec
    writes the tuple of rule ids as a list, and each Evidence (a slotted dataclass) itself
    with its fields in evidence_json()'s order. (orjson's own way with a slotted dataclass
    cost 17k instructions an object under callgrind; dicts for orjson, 14.3k a decision;
    msgspec over the Evidence, 11.6k.)"""
    rules, evidence = decision.rules, decision.evidence
    try:
        return (
            _encode(rules).decode() if rules else "[]",
            _encode(evidence).decode() if evidence else "[]",
        )
    except (UnicodeEncodeError, TypeError, msgspec.EncodeError):  # a lone surrogate
        return json_text(list(rules)), json_text(decision.evidence_json())


_CORE_BINDS = _Binds(time=_same, json=_same, flag=_same)
# Exactly what UTCDateTime, JSON and Boolean bind on SQLite (the same functions underneath).
_SQLITE_BINDS = _Binds(time=_sqlite_time, json=_sqlite_json, flag=int)


@dataclass(frozen=True, slots=True)
class _DialectStatements:
    insert_incidents: Any  # INSERT .. ON CONFLICT DO NOTHING
    insert_snapshots: Any  # the same, RETURNING id, incident_id, digest
    select_incidents: Any  # FOR UPDATE on PostgreSQL
    # SQLite: the hot inserts and updates go to the driver's executemany (see _DriverInsert).
    driver_level: bool
    binds: _Binds


_STATEMENTS: dict[str, _DialectStatements] = {}


# --- SQLite: the batch on the driver's own cursor ---------------------------------------------
#
# SQLAlchemy's per-statement work (events, parameter processing, result wrapping, and above all
# rendering the expanding IN lists of the selects at every execution) costs several times what
# SQLite itself spends on these rows: a batch of one snapshot ran 8 statements at about 60 us
# of SQLAlchemy each. On SQLite every statement of a batch therefore goes to the sqlite3
# cursor of the transaction's connection, with SQL text built once per shape. A write
# transaction on SQLite holds the database's write lock (BEGIN IMMEDIATE; a deferred one fails
# to upgrade if anything changed since it read), so the writer numbers new rows itself, from
# max(id) + 1 on - the ids SQLite would have assigned (no AUTOINCREMENT); one query per batch
# reads max(id) of the three tables - and inserts them with the driver's executemany, values
# bound as UTCDateTime and JSON would bind them (_SQLITE_BINDS). Driver errors are raised as
# SQLAlchemy's DBAPIError, as the Core path raises them (see _write_batch).


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _marks(count: int) -> str:
    return ", ".join("?" * count)


# The tables the SQLite writer numbers itself, and one statement for the max(id) of all three:
# a statement costs more than SQLite's work for it (three statements were a sixth of a
# one-snapshot batch's statements).
_NUMBERED = (incidents.name, snapshots.name, decisions.name)
_MAX_IDS = "SELECT " + ", ".join(f"(SELECT max(id) FROM {_quoted(t)})" for t in _NUMBERED)
_SQLITE = "corespond_sqlite_batch"  # conn.info key, set for the length of one write_batch


class _SqliteBatch:
    """The driver's cursor for one batch, and the next free id of each numbered table."""

    __slots__ = ("_next_ids", "cursor", "snapshot_rows")

    def __init__(self, conn: Connection) -> None:
        self.cursor: sqlite3.Cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        self._next_ids: dict[str, int] | None = None
        # The new snapshots' rows (id first), inserted once their new incidents are in.
        self.snapshot_rows: list[tuple[Any, ...]] = []

    def ids(self, table: str, count: int) -> range:
        """``count`` new ids for ``table``, read at the first insert of a batch."""
        next_ids = self._next_ids
        if next_ids is None:
            row = self.cursor.execute(_MAX_IDS).fetchone()
            next_ids = self._next_ids = {
                t: (top or 0) + 1 for t, top in zip(_NUMBERED, row, strict=True)
            }
        first = next_ids[table]
        next_ids[table] = first + count
        return range(first, first + count)


def _sqlite_batch(conn: Connection) -> _SqliteBatch | None:
    batch: _SqliteBatch | None = conn.info.get(_SQLITE)
    return batch


# Rows a multi-row INSERT takes at most: 64 rows of the widest table (incidents, 24 columns)
# bind 1,536 values, under SQLite's default limit of 32,766 bound values (3.32 on); before
# 3.32 the limit was 999, which 32 rows keep under.
_ROWS_PER_INSERT = 64 if sqlite3.sqlite_version_info >= (3, 32) else 32
_INSERT_TEXTS: dict[tuple[str, int], str] = {}


@dataclass(frozen=True, slots=True)
class _DriverInsert:
    """``INSERT INTO table (id, columns...)`` with ids numbered by the writer (SQLite only)."""

    table: str
    columns: tuple[str, ...]
    sql: str

    @classmethod
    def of(cls, table: Table, columns: tuple[str, ...]) -> _DriverInsert:
        names = ", ".join(_quoted(c) for c in ("id", *columns))
        return cls(
            table=table.name,
            columns=columns,
            sql=f"INSERT INTO {_quoted(table.name)} ({names}) VALUES ({_marks(len(columns) + 1)})",
        )

    def insert(self, batch: _SqliteBatch, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` that start with their id (numbered by :meth:`_SqliteBatch.ids`).

        Several rows a statement (``VALUES (...), (...)``), in runs of _ROWS_PER_INSERT rows
        and then the powers of two below it, so that a table has at most eight statement
        texts for the driver's statement cache. Each execution of a statement is a statement
        transaction in SQLite (a savepoint, and a copy of every page it first writes) and a
        reset in the driver: executemany paid them once per row."""
        cursor = batch.cursor
        start, left = 0, len(rows)
        size = _ROWS_PER_INSERT
        while left:
            while size > left:
                size >>= 1
            while left >= size:
                values = list(chain.from_iterable(rows[start : start + size]))
                cursor.execute(self._text(size), values)
                start += size
                left -= size

    def _text(self, count: int) -> str:
        key = (self.table, count)
        text = _INSERT_TEXTS.get(key)
        if text is None:
            row = f"({_marks(len(self.columns) + 1)})"
            head = self.sql.rsplit(" VALUES ", 1)[0]
            text = _INSERT_TEXTS[key] = f"{head} VALUES {', '.join([row] * count)}"
        return text

    def as_dicts(self, rows: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """The same rows as SQLAlchemy Core takes them."""
        columns = self.columns
        return [dict(zip(columns, row, strict=True)) for row in rows]


_SNAPSHOT_COLUMNS = (
    "incident_id", "feed", "format", "received_at", "source_updated_at", "digest", "raw",
    "public", "protected",
)  # fmt: skip
_DECISION_COLUMNS = (
    "snapshot_id", "incident_id", "created_at", "ruleset", "behavioral_health", "category",
    "response", "score", "rules", "evidence", "changed",
)  # fmt: skip
_PLACEHOLDER_COLUMNS = (
    "source", "external_id", "status", "updated_at", "first_received_at", "last_received_at",
    "snapshot_count", "behavioral_health", "response",
)  # fmt: skip
# Every column of an incident row but its id: on SQLite a new incident goes in whole, once
# the batch knows its current snapshot (a placeholder and its update cost a statement more and
# index entries written twice); the Core path inserts a placeholder and updates it.
_INCIDENT_COLUMNS = (
    "source", "external_id", "incident_number", "status", "call_type", "call_type_code",
    "apco_type", "priority", "agency", "zone", "lat", "lon", "opened_at", "closed_at",
    "updated_at", "first_received_at", "last_received_at", "snapshot_count",
    "current_snapshot_id", "current_decision_id", "behavioral_health", "category", "response",
)  # fmt: skip
_DRIVER_SNAPSHOTS = _DriverInsert.of(snapshots, _SNAPSHOT_COLUMNS)
_DRIVER_DECISIONS = _DriverInsert.of(decisions, _DECISION_COLUMNS)
_DRIVER_INCIDENTS = _DriverInsert.of(incidents, _PLACEHOLDER_COLUMNS)
_DRIVER_NEW_INCIDENTS = _DriverInsert.of(incidents, _INCIDENT_COLUMNS)
# What a batch sets on an incident that it already holds: every column a current snapshot
# determines, or only the counts and times when all of the batch's snapshots came late.
_CURRENT_COLUMNS = _INCIDENT_COLUMNS[2:]
_COUNT_COLUMNS = ("first_received_at", "last_received_at", "snapshot_count")


def _update_text(columns: tuple[str, ...]) -> str:
    assignments = ", ".join(f"{_quoted(c)} = ?" for c in columns)
    return f"UPDATE {_quoted(incidents.name)} SET {assignments} WHERE id = ?"


_DRIVER_UPDATE_CURRENT = _update_text(_CURRENT_COLUMNS)
_DRIVER_UPDATE_COUNTS = _update_text(_COUNT_COLUMNS)


class _InSelect:
    """A SELECT with one ``IN (?, ...)`` list, its text built once per list length (SQLite)."""

    __slots__ = ("_template", "_texts")

    def __init__(self, template: str) -> None:
        self._template = template  # "{marks}" where the IN list's marks go
        self._texts: dict[int, str] = {}

    def rows(self, batch: _SqliteBatch, values: Sequence[Any], *before: Any) -> list[Any]:
        text = self._texts.get(len(values))
        if text is None:
            text = self._texts[len(values)] = self._template.format(marks=_marks(len(values)))
        return batch.cursor.execute(text, (*before, *values)).fetchall()


# The same statements as _SELECT_INCIDENTS and _SELECT_DECISIONS.
_DRIVER_INCIDENTS_SELECT = _InSelect(
    "SELECT i.id, i.source, i.external_id, i.snapshot_count, i.first_received_at,"
    " i.last_received_at, i.current_snapshot_id, i.current_decision_id, i.behavioral_health,"
    " i.category, i.response, s.source_updated_at, s.received_at"
    " FROM incidents AS i LEFT OUTER JOIN snapshots AS s ON s.id = i.current_snapshot_id"
    " WHERE i.source = ? AND i.external_id IN ({marks}) ORDER BY i.id"
)
_DRIVER_DECISIONS_SELECT = _InSelect(
    "SELECT id, behavioral_health, category, response, score, rules, evidence, ruleset"
    " FROM decisions WHERE id IN ({marks})"
)


# _EXISTING_SNAPSHOTS on SQLite, text by number of pairs: an OR of (incident_id, digest) pairs,
# which SQLite runs as one seek of the unique index per pair. (The row value form, (incident_id,
# digest) IN (VALUES ...), scans the whole index instead: check with EXPLAIN QUERY PLAN.)
_EXISTING_TEXTS: dict[int, str] = {}


def _driver_existing(batch: _SqliteBatch, pairs: Sequence[tuple[int, str]]) -> list[Any]:
    text = _EXISTING_TEXTS.get(len(pairs))
    if text is None:
        text = _EXISTING_TEXTS[len(pairs)] = (
            "SELECT incident_id, digest, id FROM snapshots WHERE "
            + " OR ".join(["(incident_id = ? AND digest = ?)"] * len(pairs))
        )
    return batch.cursor.execute(text, list(chain.from_iterable(pairs))).fetchall()


def _sqlite_datetime(text: str | None) -> datetime | None:
    """What UTCDateTime reads back from SQLite's text: an aware UTC datetime."""
    return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _DecisionRow:
    """A decisions row read by the driver, JSON decoded, as decision_from_row reads rows."""

    id: int
    behavioral_health: bool
    category: str | None
    response: str
    score: float
    rules: list[str]
    evidence: list[dict[str, Any]]
    ruleset: str


# --- the unit of work ------------------------------------------------------------------------


def write_batch(
    conn: Connection, items: Sequence[SnapshotRecord | RejectRecord]
) -> list[StoredSnapshot | int]:
    """Store ``items`` in the caller's transaction; one result per item, in order.

    A snapshot gives a :class:`StoredSnapshot`, a reject the id of its quarantine row.
    """
    if not _dialect_statements(conn).driver_level:
        return _write_batch(conn, items)
    # The ids the SQLite path numbers itself are read once per batch, and only for this
    # batch: the caller may write these tables in other ways between two batches.
    batch = conn.info[_SQLITE] = _SqliteBatch(conn)
    try:
        return _write_batch(conn, items)
    except sqlite3.Error as err:
        # As SQLAlchemy raises it (the store retries by it); the message quotes no data.
        raise DBAPIError.instance(None, None, err, sqlite3.Error, hide_parameters=True) from err
    finally:
        del conn.info[_SQLITE]
        batch.cursor.close()


def _write_batch(
    conn: Connection, items: Sequence[SnapshotRecord | RejectRecord]
) -> list[StoredSnapshot | int]:
    results: list[StoredSnapshot | int | None] = [None] * len(items)
    rejects = [(i, r) for i, r in enumerate(items) if isinstance(r, RejectRecord)]
    if rejects:
        for (i, _), reject_id in zip(
            rejects, _insert_rejects(conn, [r for _, r in rejects]), strict=True
        ):
            results[i] = reject_id
    pending = [
        _Pending(i, r, hashlib.sha256(r.raw).hexdigest())
        for i, r in enumerate(items)
        if isinstance(r, SnapshotRecord)
    ]
    if pending:
        _write_snapshots(conn, pending, results)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


class _Pending:
    """A snapshot of the batch, with what the batch reads of it more than once."""

    # A plain slotted class: a dataclass's __init__ and __post_init__ cost two Python calls.
    __slots__ = ("digest", "index", "key", "received_at", "record", "updated_at")

    def __init__(self, index: int, record: SnapshotRecord, digest: str) -> None:
        self.index = index
        self.record = record
        self.digest = digest
        snap = record.snapshot
        incident_id = snap.incident_id
        if not incident_id.isascii() or "\x00" in incident_id:  # (clean_text's own test)
            incident_id = clean_text(incident_id) or ""
        self.key = (record.source, incident_id)
        # utc() converts even a UTC value (astimezone makes a new object): parsers make UTC.
        received_at, updated_at = record.received_at, snap.updated_at
        self.received_at = received_at if received_at.tzinfo is UTC else utc(received_at)
        self.updated_at = updated_at if updated_at.tzinfo is UTC else utc(updated_at)


_NEW = SnapshotState.NEW


@dataclass(slots=True)
class _IncidentState:
    """An incident's row while the batch is applied to it, in item order."""

    pk: int
    external_id: str
    snapshot_count: int
    first_received_at: datetime | None
    last_received_at: datetime | None
    # (source time, received time, snapshot id) of the current snapshot: the newest wins.
    rank: tuple[datetime, datetime, int] | None
    outcome: tuple[bool, str | None, str] | None  # of the current decision
    decision_id: int | None  # the current decision, when it is a stored one
    decision: Decision | None = None  # the current decision, when it came in this batch
    current: _Pending | None = None  # set when a snapshot of this batch became current
    snapshot_id: int | None = None
    touched: bool = False
    new: bool = False  # SQLite: numbered here, inserted whole at the end of the batch


def _insert_rejects(conn: Connection, records: list[RejectRecord]) -> list[int]:
    rows = conn.execute(
        _INSERT_REJECTS,
        [
            {
                "feed": r.feed,
                "format": r.format,
                "received_at": r.received_at,
                "code": r.code,
                "reason": clean_text(r.reason),
                "where": clean_text(r.where),
                "origin_name": clean_text(r.origin_name),
                "digest": hashlib.sha256(r.raw).hexdigest(),
                "raw": r.raw,
            }
            for r in records
        ],
    )
    return [row.id for row in rows]


def _write_snapshots(
    conn: Connection, pending: list[_Pending], results: list[StoredSnapshot | int | None]
) -> None:
    # Repeats are per incident (the unique index on incident_id, digest): the same bytes from
    # two sources are two incidents' snapshots. Inside the batch only the first of each
    # (incident, digest) can be new.
    first: dict[tuple[tuple[str, str], str], _Pending] = {}
    for p in pending:
        first.setdefault((p.key, p.digest), p)
    # Locked first, then looked up: no other writer adds a snapshot to a locked incident.
    states = _lock_incidents(conn, sorted({key for key, _ in first}))
    # An incident this batch numbers (SQLite) does not exist yet: it has no snapshots.
    known = _existing_snapshots(
        conn, [(state.pk, d) for k, d in first if not (state := states[k]).new]
    )
    candidates = [p for p in first.values() if (states[p.key].pk, p.digest) not in known]

    if candidates:
        inserted = _insert_snapshots(conn, candidates, states)
        # Lost a race with another writer on the same bytes: theirs stands, ours is a repeat.
        lost = [p for p in candidates if (states[p.key].pk, p.digest) not in inserted]
        if lost:
            known.update(_existing_snapshots(conn, [(states[p.key].pk, p.digest) for p in lost]))
            candidates = [p for p in candidates if (states[p.key].pk, p.digest) in inserted]
        _apply(conn, candidates, inserted, states, results)
    # An incident created here whose every snapshot lost such a race stays empty: drop it.
    empty = [s.pk for s in states.values() if s.snapshot_count == 0]
    if empty:
        conn.execute(incidents.delete().where(incidents.c.id.in_(empty)))

    # Everything else repeats a snapshot stored before, or earlier in this batch.
    for p in pending:
        if results[p.index] is not None:
            continue
        state = states[p.key]
        snapshot_id = known.get((state.pk, p.digest))
        if snapshot_id is None:
            original = results[first[(p.key, p.digest)].index]
            assert isinstance(original, StoredSnapshot)
            snapshot_id = original.snapshot_id
        results[p.index] = StoredSnapshot(
            incident_pk=state.pk,
            external_id=state.external_id,
            snapshot_id=snapshot_id,
            state=SnapshotState.DUPLICATE,
            became_current=False,
            decision_changed=False,
            previous_decision=None,
        )


def _chunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


def _existing_snapshots(
    conn: Connection, pairs: list[tuple[int, str]]
) -> dict[tuple[int, str], int]:
    """(incident pk, digest) -> snapshot id for the pairs already stored."""
    found: dict[tuple[int, str], int] = {}
    batch = _sqlite_batch(conn)
    for chunk in _chunks(pairs):
        if batch is not None:
            rows: Any = _driver_existing(batch, chunk)
        else:
            rows = conn.execute(_EXISTING_SNAPSHOTS, {"pairs": list(chunk)})
        for incident_pk, digest, snapshot_id in rows:
            found[(incident_pk, digest)] = snapshot_id
    return found


def _dialect_statements(conn: Connection) -> _DialectStatements:
    name = conn.dialect.name
    if name not in _STATEMENTS:
        if name == "postgresql":
            dialect_insert: Any = postgresql.insert
        elif name == "sqlite":
            dialect_insert = sqlite.insert
        else:
            raise ValueError(f"unsupported database {name!r}")
        _STATEMENTS[name] = _DialectStatements(
            insert_incidents=dialect_insert(incidents).on_conflict_do_nothing(
                index_elements=[incidents.c.source, incidents.c.external_id]
            ),
            insert_snapshots=dialect_insert(snapshots)
            .on_conflict_do_nothing(index_elements=[snapshots.c.incident_id, snapshots.c.digest])
            .returning(snapshots.c.id, snapshots.c.incident_id, snapshots.c.digest),
            select_incidents=_SELECT_INCIDENTS.with_for_update(of=incidents)
            if name == "postgresql"
            else _SELECT_INCIDENTS,
            driver_level=name == "sqlite",
            binds=_SQLITE_BINDS if name == "sqlite" else _CORE_BINDS,
        )
    return _STATEMENTS[name]


def _lock_incidents(
    conn: Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], _IncidentState]:
    """The incidents for ``keys``, created when missing, locked until the transaction ends.

    Rows are locked source by source (in ``keys`` order, sorted) in id order, and created in
    key order, so that two writers on one PostgreSQL cannot deadlock on them (SQLite writers
    are serialized by BEGIN IMMEDIATE).
    """
    states = _select_incidents(conn, keys)
    missing = [k for k in keys if k not in states]
    if not missing:
        return states
    batch = _sqlite_batch(conn)
    if batch is not None:
        # Nobody else can create them (the write lock): number them now, insert them whole
        # at the end of the batch (_apply), before the rows that refer to them.
        ids = batch.ids(incidents.name, len(missing))
        for key, pk in zip(missing, ids, strict=True):
            states[key] = _IncidentState(pk, key[1], 0, None, None, None, None, None, new=True)
        return states
    sql = _dialect_statements(conn)
    placeholders = [_placeholder(source, external_id, sql.binds) for source, external_id in missing]
    conn.execute(sql.insert_incidents, _DRIVER_INCIDENTS.as_dicts(placeholders))
    states.update(_select_incidents(conn, missing))
    return states


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _placeholder(source: str, external_id: str, binds: _Binds) -> tuple[Any, ...]:
    """An incident row (_PLACEHOLDER_COLUMNS), filled in by the update at the end of the
    batch; never committed as is."""
    epoch = binds.time(_EPOCH)
    return (source, external_id, "active", epoch, epoch, epoch, 0, binds.flag(False), "none")


def _select_incidents(
    conn: Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], _IncidentState]:
    states: dict[tuple[str, str], _IncidentState] = {}
    stmt = _dialect_statements(conn).select_incidents
    batch = _sqlite_batch(conn)
    by_source: dict[str, list[str]] = {}
    for source, external_id in keys:
        by_source.setdefault(source, []).append(external_id)
    queries = [
        (source, chunk)
        for source, external_ids in by_source.items()
        for chunk in _chunks(external_ids)
    ]
    for source, chunk in queries:
        rows: Any
        if batch is not None:
            rows = _DRIVER_INCIDENTS_SELECT.rows(batch, chunk, source)
        else:
            rows = conn.execute(stmt, {"source": source, "external_ids": list(chunk)})
        # Unpacked as tuples: attribute access on rows costs more than the query here.
        for (
            pk, source, external_id, count, first_received, last_received, snapshot_id,
            decision_id, behavioral_health, category, response, source_updated, received,
        ) in rows:  # fmt: skip
            if batch is not None:  # the driver's text, read as UTCDateTime and Boolean read it
                first_received = _sqlite_datetime(first_received)
                last_received = _sqlite_datetime(last_received)
                source_updated = _sqlite_datetime(source_updated)
                received = _sqlite_datetime(received)
                behavioral_health = bool(behavioral_health)
            rank = outcome = None
            if snapshot_id is not None:
                rank = (source_updated, received, snapshot_id)
                outcome = (behavioral_health, category, response)
            states[(source, external_id)] = _IncidentState(
                pk=pk,
                external_id=external_id,
                snapshot_count=count,
                first_received_at=first_received if count else None,
                last_received_at=last_received if count else None,
                rank=rank,
                outcome=outcome,
                decision_id=decision_id,
            )
    return states


def _insert_snapshots(
    conn: Connection, candidates: list[_Pending], states: dict[tuple[str, str], _IncidentState]
) -> dict[tuple[int, str], int]:
    """Insert the candidates; (incident pk, digest) -> new snapshot id for those that were not
    there yet."""
    sql = _dialect_statements(conn)
    time = sql.binds.time
    batch = _sqlite_batch(conn)
    # The driver binds the JSON columns as text; SQLAlchemy's JSON type encodes the dicts.
    columns: Callable[[Snapshot], tuple[Any, Any]] = (
        _snapshot_json_texts if batch is not None else _snapshot_json_dicts
    )
    params = [
        (
            states[p.key].pk,
            (record := p.record).feed,
            record.format,
            time(p.received_at),
            time(p.updated_at),
            p.digest,
            record.raw,
            *columns(record.snapshot),
        )
        for p in candidates
    ]
    if batch is not None:
        # The digests are not there (checked under the write lock): every row goes in, after
        # the batch's new incidents (_apply).
        ids = batch.ids(snapshots.name, len(params))
        batch.snapshot_rows = [(i, *row) for i, row in zip(ids, params, strict=True)]
        return {
            (row[0], row[5]): snapshot_id for row, snapshot_id in zip(params, ids, strict=True)
        }
    rows = conn.execute(sql.insert_snapshots, _DRIVER_SNAPSHOTS.as_dicts(params))
    return {(incident_pk, digest): snapshot_id for snapshot_id, incident_pk, digest in rows}


def _apply(
    conn: Connection,
    candidates: list[_Pending],
    inserted: dict[tuple[int, str], int],
    states: dict[tuple[str, str], _IncidentState],
    results: list[StoredSnapshot | int | None],
) -> None:
    """Decide, in item order, what each new snapshot does to its incident; write it down."""
    sql = _dialect_statements(conn)
    batch = _sqlite_batch(conn)
    time, flag = sql.binds.time, sql.binds.flag
    decision_params: list[tuple[Any, ...]] = []
    previous_to_load: dict[int, int] = {}  # item index -> stored decision id
    for p in candidates:
        state = states[p.key]
        snapshot_id = inserted[(state.pk, p.digest)]
        rank = (p.updated_at, p.received_at, snapshot_id)
        became_current = state.rank is None or rank > state.rank
        outcome = _outcome(p.record.decision)
        changed = became_current and outcome != state.outcome
        previous = state.decision if changed else None
        if changed and previous is None and state.decision_id is not None:
            previous_to_load[p.index] = state.decision_id
        if became_current:
            state.rank, state.outcome = rank, outcome
            state.decision, state.decision_id = p.record.decision, None
            state.current, state.snapshot_id = p, snapshot_id
        state.snapshot_count += 1
        if state.first_received_at is None or p.received_at < state.first_received_at:
            state.first_received_at = p.received_at
        if state.last_received_at is None or p.received_at > state.last_received_at:
            state.last_received_at = p.received_at
        state.touched = True
        decision = p.record.decision
        rules: Any
        evidence: Any
        if batch is not None:
            rules, evidence = _decision_json_texts(decision)
        else:
            rules, evidence = list(decision.rules), decision.evidence_json()
        decision_params.append(
            (
                snapshot_id,
                state.pk,
                time(p.received_at),
                decision.ruleset,
                flag(decision.behavioral_health),
                outcome[1],  # the category, cleaned
                outcome[2],  # the response
                decision.score,
                rules,
                evidence,
                flag(changed),
            )
        )
        # (Positional: keywords cost a Python call more to match.)
        results[p.index] = StoredSnapshot(
            state.pk, state.external_id, snapshot_id, _NEW, became_current, changed, previous
        )
    if previous_to_load:
        _fill_previous(conn, previous_to_load, results)
    if not decision_params:
        return
    if batch is not None:
        ids = batch.ids(decisions.name, len(decision_params))
        decision_rows = [(i, *row) for i, row in zip(ids, decision_params, strict=True)]
        decision_ids = {row[1]: row[0] for row in decision_rows}
    else:
        rows = conn.execute(_INSERT_DECISIONS, _DRIVER_DECISIONS.as_dicts(decision_params))
        decision_ids = {snapshot_id: decision_id for decision_id, snapshot_id in rows}
    # One statement per shape: incidents with a new current snapshot, incidents that only
    # received late ones (each row ends with the incident's id), and new ones (SQLite).
    new_incidents: list[tuple[Any, ...]] = []
    current: list[tuple[Any, ...]] = []
    late: list[tuple[Any, ...]] = []
    for (source, external_id), state in states.items():
        if state.touched:
            values = _incident_values(state, decision_ids, sql.binds)
            if state.new:  # (always with a current snapshot: its first one is in the batch)
                new_incidents.append((state.pk, source, external_id, *values))
            else:
                (current if state.current is not None else late).append((*values, state.pk))
    if batch is not None:  # parents first: the foreign keys are checked row by row
        if new_incidents:
            _DRIVER_NEW_INCIDENTS.insert(batch, new_incidents)
        _DRIVER_SNAPSHOTS.insert(batch, batch.snapshot_rows)
        _DRIVER_DECISIONS.insert(batch, decision_rows)
        if current:
            batch.cursor.executemany(_DRIVER_UPDATE_CURRENT, current)
        if late:
            batch.cursor.executemany(_DRIVER_UPDATE_COUNTS, late)
        return
    for columns, shaped in ((_CURRENT_COLUMNS, current), (_COUNT_COLUMNS, late)):
        if shaped:
            keys = (*columns, "incident_pk")
            conn.execute(_UPDATE_INCIDENT, [dict(zip(keys, row, strict=True)) for row in shaped])


def _outcome(decision: Decision) -> tuple[bool, str | None, str]:
    """What a dispatcher acts on (see Decision.same_outcome), as the incident row holds it."""
    # _value_: the member's plain attribute (.value is a property, and binding the StrEnum
    # itself sends it through sqlite3's adapter look-ups).
    return (decision.behavioral_health, clean_text(decision.category), decision.response._value_)


def _fill_previous(
    conn: Connection, to_load: dict[int, int], results: list[StoredSnapshot | int | None]
) -> None:
    ids = sorted(set(to_load.values()))
    loaded: dict[int, Decision] = {}
    batch = _sqlite_batch(conn)
    for chunk in _chunks(ids):
        rows: Any
        if batch is not None:
            rows = [
                _DecisionRow(
                    id, bool(bh), category, response, score, orjson.loads(rules),
                    orjson.loads(evidence), ruleset,
                )
                for id, bh, category, response, score, rules, evidence, ruleset in (
                    _DRIVER_DECISIONS_SELECT.rows(batch, chunk)
                )
            ]  # fmt: skip
        else:
            rows = conn.execute(_SELECT_DECISIONS, {"ids": chunk})
        loaded.update((row.id, decision_from_row(row)) for row in rows)
    for index, decision_id in to_load.items():
        result = results[index]
        assert isinstance(result, StoredSnapshot)
        results[index] = replace(result, previous_decision=loaded[decision_id])


def _incident_values(
    state: _IncidentState, decision_ids: dict[int, int], binds: _Binds
) -> tuple[Any, ...]:
    """The incident's columns after the batch: _CURRENT_COLUMNS when a snapshot of the batch
    became its current one, else _COUNT_COLUMNS. A tuple in column order: building a dict
    per incident and reading it back by name cost more than the statement's binding."""
    time = binds.time
    counts = (time(state.first_received_at), time(state.last_received_at), state.snapshot_count)
    current = state.current
    if current is None:
        return counts
    assert state.snapshot_id is not None and state.outcome is not None
    snap = current.record.snapshot
    point = snap.location.point if snap.location else None
    behavioral_health, category, response = state.outcome  # the current decision's, cleaned
    return (
        clean_text(snap.incident_number),
        snap.status._value_,
        clean_text(snap.call_type),
        clean_text(snap.call_type_code),
        clean_text(snap.apco_type),
        clean_text(snap.priority),
        clean_text(snap.agency),
        clean_text(snap.zone),
        point.lat if point else None,
        point.lon if point else None,
        time(snap.opened_at),
        time(snap.closed_at),
        time(current.updated_at),
        *counts,
        state.snapshot_id,
        decision_ids[state.snapshot_id],
        binds.flag(behavioral_health),
        category,
        response,
    )


# --- group commit under Twisted --------------------------------------------------------------

RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]

# Worth retrying the whole batch: PostgreSQL deadlock / serialization failure, a dropped
# connection, SQLite still locked after its busy timeout.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})


class StoreError(SafeMessage, Exception):
    """A batch could not be committed. The message names the error, never the data."""


# Set to a file path, the store records where the time of each batch went, and every cyclic
# GC pause, and writes them there as JSON lines when it stops (bench/store_tail.py reads it).
TRACE_ENV = "CORESPOND_STORE_TRACE"


class _Trace:
    """Per-batch timings (perf_counter seconds) and GC pauses, kept in memory until stop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: list[str] = []
        self.batch: dict[str, float] = {}  # the batch in flight: only one at a time
        self.pauses = PauseRecorder(self.lines)

    def batch_done(self, size: int, first_submitted: float) -> None:
        b = self.batch
        back = time.perf_counter()
        self.lines.append(
            f'{{"batch":{size},"submitted":{first_submitted:.6f},'
            f'"dispatched":{b.get("dispatched", 0):.6f},"thread":{b.get("thread", 0):.6f},'
            f'"written":{b.get("written", 0):.6f},"committed":{b.get("committed", 0):.6f},'
            f'"back":{back:.6f}}}'
        )
        self.batch = {}

    def job(self, job: _Job, dispatched: float) -> None:
        """One unit of other writers' work (a background job) on the writer."""
        ran = job.ran or (0.0, 0.0, 0.0)
        self.lines.append(
            f'{{"job":"{job.lane}","what":"{job.label}","submitted":{job.queued:.6f},'
            f'"dispatched":{dispatched:.6f},"thread":{ran[0]:.6f},"done":{ran[1]:.6f},'
            f'"cpu":{ran[2]:.6f},"back":{time.perf_counter():.6f}}}'
        )

    def rides(self, riders: list[_Rider], alone: bool) -> None:
        """The work that rode the batch just traced (its timings are the batch's)."""
        b = self.batch
        back = time.perf_counter()
        for r in riders:
            ran = r.ran or (0.0, 0.0, 0.0)
            self.lines.append(
                f'{{"ride":"{r.label}","submitted":{r.queued:.6f},'
                f'"dispatched":{b.get("dispatched", 0):.6f},"thread":{ran[0]:.6f},'
                f'"done":{ran[1]:.6f},"cpu":{ran[2]:.6f},'
                f'"committed":{b.get("committed", 0):.6f},'
                f'"back":{back:.6f},"alone":{"true" if alone else "false"}}}'
            )

    def checkpoint(self, step: str, started: float) -> None:
        ms = (time.perf_counter() - started) * 1e3
        self.lines.append(f'{{"checkpoint":"{step}","at":{started:.6f},"ms":{ms:.3f}}}')

    def close(self) -> None:
        self.pauses.remove()
        with open(self.path, "w") as out:
            out.write("\n".join(self.lines) + "\n")


# WAL checkpoints on SQLite. By default the connection that commits runs a checkpoint when the
# WAL has passed 1,000 pages: it copies them into the database and fsyncs it inside that
# commit, about once per 100 one-snapshot batches - a pause that every snapshot queued behind
# it waits for. The store's own connection does not checkpoint; a timer does it instead.
# PASSIVE checkpoints on a thread of their own copy the WAL (no lock that a writer needs):
# the first copies the bulk, and up to _BULK_PASSES - 1 more copy what was committed
# meanwhile, until one finds nothing left to copy - then the next write starts the WAL over
# (a WAL whose every frame was copied when a write begins is reset; frames written during a
# checkpoint would otherwise keep it growing). A pass reports the WAL as it was when the
# pass began, so "nothing left" is a pass that finds every frame copied and the WAL no longer
# than the pass before found it (shorter: a write started it over meanwhile). When the
# passes do not catch up (a reader holds old frames, or commits keep coming), the next tick
# tries again; only once the WAL holds more than _WAL_BYTES_BOUND of pages does one more
# checkpoint run on the writer thread, between batches. That one was the second step of every
# tick before: its copy and the database fsync (3-5 ms median, 10-20 ms at worst on a busy
# disk) held up the snapshots queued behind it, at every tick, and were a third of the
# slowest 1 % at 300 snapshots/s. Connections other than the store's keep SQLite's automatic
# checkpoints.
# The tick is short so that each bulk pass is small. The pass writes what the commits since the
# last one dirtied into the database file and fsyncs it; a commit whose own fsync lands beside
# that one waits for the disk to write both. Every 0.5 s (at 300 one-snapshot batches a
# second), commits beside a bulk pass took over 10 ms 6-15 times as often as the others
# (1.2-3.0 % against 0.2-0.5 %; bench/store_tail.py, three runs); every 0.15 s, a third of the
# copy a pass, no more often than the others (0-0.4 % against 0-0.3 %), and snapshots over
# 10 ms fell in each of three interleaved pairs (518 -> 355, 914 -> 463, 374 -> 109 of 3,000,
# load 3-4), for no more CPU per snapshot. The WAL's bound is unchanged (_WAL_BYTES_BOUND).
CHECKPOINT_SECONDS = 0.15
_CHECKPOINT = "PRAGMA wal_checkpoint(PASSIVE)"
_BULK_PASSES = 4
_WAL_BYTES_BOUND = 8 << 20

# A statement that writes several rows inside a transaction (a batch's multi-row inserts) and a
# savepoint (a page's chain, steps and page riding a batch) keep the prior content of the pages
# they change in a statement journal, to undo just that part. SQLite keeps the first 64 KiB in
# memory and spills the rest to a new temporary file: the random leaves of the digest index
# alone pass that, and so does a page's work, so nearly every batch and every page created,
# wrote and deleted a file in /var/tmp (strace). In memory on the writer's
# connection only (temp_store also governs sorts and temporary tables, which readers may make
# large); the journal never outlives its transaction, so durability is unchanged.
STATEMENT_JOURNALS_IN_MEMORY = "PRAGMA temp_store=MEMORY"


class _WalCheckpoints:
    """The store's timer-driven checkpoints of an SQLite WAL (see CHECKPOINT_SECONDS)."""

    def __init__(
        self, store: IncidentStore, reactor: Any, seconds: float, run: RunInThread | None
    ) -> None:
        self.store = store
        self.reactor = reactor
        self.seconds = seconds
        self.pool = ThreadPool(0, 1, name="corespond-store-checkpoint")
        self.run: RunInThread = run or (lambda fn: deferToThreadPool(reactor, self.pool, fn))
        self.loop: LoopingCall | None = None
        self.busy = False
        self.commits = 0  # batches committed since the last checkpoint began

    def start(self) -> None:
        self.pool.start()
        self.loop = LoopingCall(self.tick)
        self.loop.clock = self.reactor
        self.loop.start(self.seconds, now=False)

    def stop(self) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        self.pool.stop()

    def tick(self) -> None:
        if self.busy or not self.commits:
            return
        self.busy, self.commits = True, 0
        d = self.run(self.bulk)
        d.addCallback(self.rest)
        d.addErrback(self.failed)
        d.addBoth(self.done)

    def bulk(self) -> bool:
        """Off the writer thread: False when the writer thread must finish (see above)."""
        trace = self.store._trace
        raw = self.store.engine.raw_connection()
        try:
            driver: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
            (page_size,) = driver.execute("PRAGMA page_size").fetchone()
            before: int | None = None  # the WAL's frames when the last pass began, all copied
            for _ in range(_BULK_PASSES):
                started = time.perf_counter()
                busy, frames, copied = driver.execute(_CHECKPOINT).fetchone()
                if trace is not None:
                    trace.checkpoint("bulk", started)
                if busy or frames != copied:
                    before = None
                elif before is not None and frames <= before:
                    return True
                else:
                    before = frames
        finally:
            raw.close()
        return bool(frames * page_size <= _WAL_BYTES_BOUND)

    def rest(self, enough: bool) -> Deferred[None] | None:
        """What the passes left, on the writer thread between batches (see _BULK_PASSES)."""
        if enough:
            return None
        return self.store.run_on_writer(self.store._checkpoint_on_writer)

    def failed(self, failure: Failure) -> None:
        # The next tick tries again; meanwhile the WAL only grows.
        log.warning("store.checkpoint.failed", error=_describe(failure.value))

    def done(self, _: object) -> None:
        self.busy = False


def _in_savepoint(conn: Connection, fn: Callable[[Connection], T]) -> tuple[bool, T | Exception]:
    """``fn(conn)`` in a savepoint of ``conn``'s transaction: (True, its value), or (False,
    its exception) with its statements rolled back and the transaction going on.

    The savepoint is the driver's own statement: SQLAlchemy's begin_nested() cost more than
    the work it wraps (about 0.25 ms a statement, two per savepoint)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute(_SAVEPOINT)
    try:
        outcome: tuple[bool, T | Exception] = (True, fn(conn))
    except Exception as err:
        driver.execute(_ROLLBACK_TO)
        outcome = (False, err)
    driver.execute(_RELEASE)
    return outcome


def follow_in(
    conn: Connection, follower: Follower, record: SnapshotRecord, stored: StoredSnapshot
) -> StoredSnapshot:
    """The follower's work for one stored snapshot in a savepoint of ``conn``'s transaction
    (as the store runs it after a batch's own statements): ``stored`` with what it did."""
    ok, value = _in_savepoint(conn, lambda c: follower.follow(c, record, stored))
    return replace(stored, followed=Followed(ok, value))


# --- the writer's lanes ------------------------------------------------------------------------
#
# Everything that writes an SQLite database shares the store's one writer thread (SQLite lets one
# connection write at a time). Its work comes in lanes, and the store, not the thread pool's
# FIFO, decides what runs next whenever the writer is free:
# - ingest batches, with the work their new snapshots call for (``follow_with``: a chain and
#   its first page, in a savepoint after the batch's own statements; such a batch carries page
#   work), and page work riding them (``ride_next_batch``: a savepoint inside the next
#   batch's transaction, or its own transaction when no batch comes within a short bound);
#   work no page waits for rides too (``ride_later``: a referral stored, a page's sending
#   recorded), saving itself a commit, but never in a batch that carries page work;
# - background work (``run_on_writer(fn)``: referral results, ACK group commits, sessions,
#   encounters, checkpoints), only when no urgent work waits, and one job at a time, so that a
#   page waits behind at most one background job. After BACKGROUND_EVERY urgent units in a row
#   one background job goes anyway: a busy feed never starves it.
# While page work waits for its batch the writer starts nothing in the background lane.
# (A page lane of jobs in their own transactions had no caller: every transaction a page waits
# for rides a batch, and the first step's choice is read on a reader. It was removed.)
BACKGROUND_LANE = "background"
BACKGROUND_EVERY = 8
_SAVEPOINT = "SAVEPOINT corespond_ride"
_ROLLBACK_TO = "ROLLBACK TO SAVEPOINT corespond_ride"
_RELEASE = "RELEASE SAVEPOINT corespond_ride"
# How long ridden work waits for an ingest batch before it goes in a transaction of its own.
RIDE_WITHIN = 0.002
# ... and work that no page waits for (a commit saved: at 300 snapshots/s a batch comes first).
RIDE_LATER_WITHIN = 0.05


def _label(fn: Callable[..., Any]) -> str:
    """What a unit of work is, for the trace: its function's name."""
    fn = getattr(fn, "func", fn)  # a partial
    name = getattr(fn, "trace_label", None) or getattr(fn, "__qualname__", None) or "work"
    return str(name).replace('"', "")


class _Job:
    """A callable queued for the writer thread in one lane (it runs its own transaction)."""

    __slots__ = ("done", "fn", "label", "lane", "queued", "ran")

    def __init__(self, fn: Callable[[], Any], lane: str, queued: float) -> None:
        self.fn = fn
        self.lane = lane
        self.queued = queued
        self.done: Deferred[Any] = Deferred()
        self.label = ""
        # On the writer, when traced: perf_counter seconds at start and end, thread CPU seconds.
        self.ran: tuple[float, float, float] | None = None


class _Rider:
    """``fn(conn)`` waiting to ride the next batch's transaction (in a savepoint)."""

    __slots__ = ("alone", "done", "fn", "label", "queued", "ran", "timer", "urgent")

    def __init__(self, fn: Callable[[Connection], Any], queued: float, urgent: bool) -> None:
        self.fn = fn
        self.queued = queued
        self.urgent = urgent  # page work: the writer keeps itself free for it
        self.done: Deferred[Any] = Deferred()
        self.alone = False  # no batch came in time: goes in a transaction of its own
        self.timer: Any = None
        self.label = ""
        self.ran: tuple[float, float, float] | None = None  # (as _Job's)


class IncidentStore:
    """Group-committing writer with one dedicated writer thread, and a small reader pool.

    Submissions queue up; whenever no batch is being written, everything queued (up to
    ``batch_max``) goes into one :func:`write_batch` transaction. Every Deferred fires on the
    reactor thread after its batch committed; when a batch fails, each of its Deferreds
    errbacks with :class:`StoreError` (the caller must not acknowledge) and the next batch
    goes ahead.

    ``run_in_thread`` / ``run_read_in_thread`` run a callable off the reactor and return a
    Deferred of its result; they default to the store's own thread pools (tests inject their
    own to decide when a write completes). On an SQLite file, every ``checkpoint_seconds``
    the store checkpoints the WAL (see CHECKPOINT_SECONDS), its first step through
    ``run_checkpoint_in_thread`` (by default a thread of its own).
    """

    def __init__(
        self,
        engine: Engine,
        reactor: Any,
        *,
        batch_max: int = 256,
        attempts: int = 3,
        run_in_thread: RunInThread | None = None,
        run_read_in_thread: RunInThread | None = None,
        checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
        run_checkpoint_in_thread: RunInThread | None = None,
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        self.engine = engine
        self.batch_max = batch_max
        self.attempts = attempts
        self._writer_pool = ThreadPool(0, 1, name="corespond-store-writer")
        self._reader_pool = ThreadPool(0, 2, name="corespond-store-reader")
        self._run_write: RunInThread = run_in_thread or (
            lambda fn: deferToThreadPool(reactor, self._writer_pool, fn)
        )
        self._run_read: RunInThread = run_read_in_thread or (
            lambda fn: deferToThreadPool(reactor, self._reader_pool, fn)
        )
        self._queue: deque[
            tuple[SnapshotRecord | RejectRecord, Deferred[Any] | _Slot, float]
        ] = deque()
        self._writing = False
        self._started = False
        self._closed = False
        self._drains: list[Deferred[None]] = []
        self._healthy = True
        self._reactor = reactor
        # Other writers' work (see BACKGROUND_LANE), and page work waiting to ride a batch.
        self._background: deque[_Job] = deque()
        self._riders: list[_Rider] = []
        self._follower: Follower | None = None
        self._urgent_run = 0  # urgent units run in a row while background work waited
        self._trace: _Trace | None = None
        # The writer thread's connection, held between batches: checking one out of the pool
        # and returning it (a rollback) cost a one-snapshot batch about 15 % of its CPU.
        self._conn: Connection | None = None
        # Timer-driven WAL checkpoints, on SQLite files; not with injected writes unless the
        # checkpoints' thread is injected too (the reactor may then be a test clock).
        self._checkpoints: _WalCheckpoints | None = None
        database = engine.url.database or ""
        if (
            checkpoint_seconds is not None
            and (run_in_thread is None or run_checkpoint_in_thread is not None)
            and engine.dialect.name == "sqlite"
            and database not in ("", ":memory:")
            and not database.startswith("file::memory:")
        ):
            self._checkpoints = _WalCheckpoints(
                self, reactor, checkpoint_seconds, run_checkpoint_in_thread
            )

    @property
    def healthy(self) -> bool:
        """False while the last batch failed; True after a good one (and before any)."""
        return self._healthy

    @property
    def queued(self) -> int:
        """Submissions waiting for a batch (not counting the one being written)."""
        return len(self._queue)

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        trace = os.environ.get(TRACE_ENV)
        if trace and self._trace is None:
            self._trace = _Trace(trace)
        self._writer_pool.start()
        self._reader_pool.start()
        if self._checkpoints is not None:
            self._checkpoints.start()
        self._next_batch()

    def store_snapshot(self, record: SnapshotRecord) -> Deferred[StoredSnapshot]:
        return self._submit(record)

    def store_reject(self, record: RejectRecord) -> Deferred[int]:
        return self._submit(record)

    def store_many(
        self, records: Sequence[SnapshotRecord | RejectRecord]
    ) -> Deferred[list[StoredSnapshot | int | Failure]]:
        """Submit ``records`` in order with one Deferred for all of them: it fires once every
        one is written, with each one's result (as :meth:`store_snapshot` and
        :meth:`store_reject` give it) or, where its batch failed, that Failure. A Deferred
        and its callbacks per snapshot cost about 9 us of the reactor's time."""
        if self._closed:
            return fail(StoreClosed("the store is stopping"))
        group = _Group(len(records))
        queued = time.perf_counter()
        for i, record in enumerate(records):
            self._queue.append((record, _Slot((group, i)), queued))
        self._next_batch()
        return group.done

    def drain(self) -> Deferred[None]:
        """Fires when everything submitted so far (every lane) is written (or failed)."""
        if not self._writing and not self._pending():
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drains.append(waiter)
        return waiter

    def stop(self) -> Deferred[None]:
        """Refuse new work, finish what was submitted, then stop the threads."""
        self._closed = True
        for rider in self._riders:  # no batch is coming any more: each goes on its own now
            self._ride_alone(rider, dispatch=False)
        if not self._started:
            while self._queue:
                self._queue.popleft()[1].errback(StoreClosed("the store was stopped unstarted"))
            waiting: list[_Job | _Rider] = [*self._background, *self._riders]
            for unit in waiting:
                unit.done.errback(StoreClosed("the store was stopped unstarted"))
            self._background.clear()
            self._riders = []
            self._release_drains()
            return succeed(None)
        self._next_batch()

        def stopped(_: object) -> None:
            self._started = False
            if self._checkpoints is not None:
                self._checkpoints.stop()
            self._writer_pool.stop()
            self._reader_pool.stop()
            self._close_connection()
            if self._trace is not None:
                self._trace.close()
                self._trace = None

        return self.drain().addCallback(stopped)

    def run_on_writer(self, fn: Callable[[], T]) -> Deferred[T]:
        """``fn()`` on the store's one writer thread, between group commits, in the background
        lane.

        For other writers of an SQLite database (paging, referrals, sessions): SQLite lets one
        connection write at a time, and a connection that finds the lock taken waits in
        SQLite's busy handler, which *sleeps* (1, 2, 5 ... 100 ms). Writers that share this
        thread queue instead, in order; ``fn`` runs its own transaction: work no page waits
        for (work a page waits for rides a batch: :meth:`ride_next_batch`).
        """
        if self._closed and not self._started:
            return fail(StoreClosed("the store is stopped"))
        job = _Job(fn, BACKGROUND_LANE, time.perf_counter())
        if self._trace is not None:
            job.label = _label(fn)
        self._background.append(job)
        self._next_batch()
        return job.done

    def follow_with(self, follower: Follower | None) -> None:
        """From the next batch on, ``follower`` does the work a new snapshot calls for inside
        the snapshot's own transaction (one follower; None: none). A page then needs one
        commit from the CAD's snapshot, not two: the snapshot's, then its chain's riding the
        batch after it. The follower's failure rolls back its savepoint only: the snapshot
        is stored and acknowledged all the same, and ``StoredSnapshot.followed`` says why."""
        self._follower = follower

    def ride_later(self, fn: Callable[[Connection], T]) -> Deferred[T]:
        """``fn(conn)`` in a batch within RIDE_LATER_WITHIN: work no page waits for."""
        return self.ride_next_batch(fn, RIDE_LATER_WITHIN, urgent=False)

    def ride_next_batch(
        self, fn: Callable[[Connection], T], within: float = RIDE_WITHIN, *, urgent: bool = True
    ) -> Deferred[T]:
        """``fn(conn)`` inside the next ingest batch's transaction, in a savepoint after the
        batch's own statements; or, when no batch is dispatched within ``within`` seconds, in a
        transaction of its own on the writer's connection. The Deferred fires with ``fn``'s
        result once that transaction has committed: work that says a page is due is durable
        before the page goes. ``fn``'s own error rolls back its savepoint only (the batch
        goes on); when the batch fails, ``fn`` goes again in a transaction of its own, and
        the Deferred errbacks (StoreError) only if that fails too. A batch retried after a
        transient error runs ``fn`` again in the new transaction.

        Urgent work (a page waits for it) holds background work back while it waits; work that
        is not (``urgent=False``: recording what was sent) only saves itself a commit."""
        if self._closed and not self._started:
            return fail(StoreClosed("the store is stopped"))
        rider = _Rider(fn, time.perf_counter(), urgent)
        if self._trace is not None:
            rider.label = _label(fn)
        self._riders.append(rider)
        if within <= 0 or self._closed:
            rider.alone = True
        else:
            rider.timer = self._reactor.callLater(within, self._ride_alone, rider)
        self._next_batch()
        return rider.done

    def run_read(self, fn: Callable[[Connection], T]) -> Deferred[T]:
        """``fn(conn)`` in a read-only transaction on a reader thread, never on the reactor."""

        def read() -> T:
            with self.engine.connect() as conn:
                conn.execution_options(**{READ_ONLY: True})
                return fn(conn)

        return self._run_read(read)

    # --- internals ---------------------------------------------------------------------------

    def _submit(self, item: SnapshotRecord | RejectRecord) -> Deferred[Any]:
        if self._closed:
            return fail(StoreClosed("the store is stopping"))
        done: Deferred[Any] = Deferred()
        self._queue.append((item, done, time.perf_counter()))
        self._next_batch()
        return done

    def _pending(self) -> bool:
        return bool(self._queue or self._background or self._riders)

    def _ride_alone(self, rider: _Rider, dispatch: bool = True) -> None:
        """No batch took ``rider`` in time: it goes in a transaction of its own."""
        if rider.timer is not None and rider.timer.active():
            rider.timer.cancel()
        rider.timer = None
        rider.alone = True
        if dispatch:
            self._next_batch()

    def _next_batch(self) -> None:
        """The writer is free: start the next unit of work, by lane (see BACKGROUND_LANE)."""
        if self._writing or not self._started:
            return
        if self._background and self._urgent_run >= BACKGROUND_EVERY:
            self._dispatch_job(self._background.popleft())
        elif self._queue or any(r.alone for r in self._riders):
            self._dispatch_batch()
        elif any(r.urgent for r in self._riders):
            return  # page work waits (briefly) for a batch: the writer stays free for both
        elif self._background:
            self._dispatch_job(self._background.popleft())
        elif not self._riders:
            self._release_drains()

    def _dispatch_batch(self) -> None:
        batch = [self._queue.popleft() for _ in range(min(self.batch_max, len(self._queue)))]
        follower = self._follower
        follow: list[tuple[int, SnapshotRecord]] = []
        if follower is not None:
            for i, (item, _, _) in enumerate(batch):
                if isinstance(item, SnapshotRecord) and follower.wants(item):
                    follow.append((i, item))
        riders, self._riders = self._riders, []
        if follow or any(r.urgent for r in riders):
            # A page waits for this batch: work no page waits for (a referral stored, what was
            # sent recorded) takes the next one, unless its time is up.
            self._riders = [r for r in riders if not (r.urgent or r.alone)]
            riders = [r for r in riders if r.urgent or r.alone]
        else:
            # One unit of work no page waits for a batch (those whose time is up go all the
            # same): a page's snapshot arriving meanwhile waits for this batch, so for one
            # such unit (a referral's statements, a group of results), not for all that
            # piled up since the last batch.
            patient = [r for r in riders if not (r.urgent or r.alone)]
            if len(patient) > 1:
                self._riders = patient[1:]
                riders = [r for r in riders if r.urgent or r.alone or r is patient[0]]
        for rider in riders:
            if rider.timer is not None and rider.timer.active():
                rider.timer.cancel()
            rider.timer = None
        self._writing = True
        if self._background:
            self._urgent_run += 1
        items = [item for item, _, _ in batch]
        if self._trace is not None:
            self._trace.batch["dispatched"] = time.perf_counter()
        self._run_write(lambda: self._write(items, riders, follower, follow)).addBoth(
            self._answer_batch, batch, riders
        )

    def _dispatch_job(self, job: _Job) -> None:
        self._writing = True
        self._urgent_run = 0  # (every job is background work)
        dispatched = time.perf_counter()
        fn = job.fn
        if self._trace is not None:

            def fn() -> Any:
                started, cpu = time.perf_counter(), time.thread_time()
                try:
                    return job.fn()
                finally:
                    job.ran = (started, time.perf_counter(), time.thread_time() - cpu)

        self._run_write(fn).addBoth(self._job_done, job, dispatched)

    def _job_done(self, result: Any, job: _Job, dispatched: float) -> None:
        self._writing = False
        if self._trace is not None:
            self._trace.job(job, dispatched)
        if isinstance(result, Failure):
            job.done.errback(result)
        else:
            job.done.callback(result)
        self._next_batch()

    @staticmethod
    def _ride(conn: Connection, rider: _Rider, traced: bool) -> tuple[bool, Any]:
        """In the writer thread: ``rider`` in a savepoint of the batch's transaction."""
        started, cpu = (time.perf_counter(), time.thread_time()) if traced else (0.0, 0.0)
        outcome = _in_savepoint(conn, rider.fn)
        if traced:
            rider.ran = (started, time.perf_counter(), time.thread_time() - cpu)
        return outcome

    def _write(
        self,
        items: list[SnapshotRecord | RejectRecord],
        riders: Sequence[_Rider] = (),
        follower: Follower | None = None,
        follow: Sequence[tuple[int, SnapshotRecord]] = (),
    ) -> tuple[list[StoredSnapshot | int], list[tuple[bool, Any]]]:
        """In the writer thread: one transaction, retried when the failure is transient.

        The batch's items, the follower's work for those of ``follow`` (index, record) that
        are new snapshots, then the work riding the batch, each in a savepoint: their results (for a
        rider, whether it succeeded and its value or exception)."""
        trace = self._trace.batch if self._trace is not None else None
        if trace is not None:
            trace["thread"] = time.perf_counter()
        attempt = 1
        while True:
            try:
                conn = self._connection()
                with conn.begin():
                    results = write_batch(conn, items) if items else []
                    for i, record in follow:
                        stored = results[i]
                        if isinstance(stored, StoredSnapshot) and stored.state is _NEW:
                            assert follower is not None
                            results[i] = follow_in(conn, follower, record, stored)
                    if trace is not None:
                        trace["written"] = time.perf_counter()
                    ridden = [self._ride(conn, r, trace is not None) for r in riders]
                if trace is not None:
                    trace["committed"] = time.perf_counter()
                return results, ridden
            except BaseException as err:
                self._close_connection()  # whatever went wrong, the next try starts afresh
                if not isinstance(err, DBAPIError):
                    raise
                if attempt >= self.attempts or not _transient(err):
                    raise
                log.warning(
                    "store.batch.retried", attempt=attempt, size=len(items), error=_describe(err)
                )
                attempt += 1

    def _connection(self) -> Connection:
        """In the writer thread: the connection it holds, opened when there is none."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self.engine.connect()
            if conn.dialect.name == "sqlite":
                driver = conn.connection.driver_connection
                driver.execute(STATEMENT_JOURNALS_IN_MEMORY)  # type: ignore[union-attr]
                if self._checkpoints is not None:  # the timer checkpoints instead
                    driver.execute("PRAGMA wal_autocheckpoint=0")  # type: ignore[union-attr]
        return conn

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as err:  # a broken connection: the pool drops it
                log.warning("store.connection.close_failed", error=_describe(err))

    def _checkpoint_on_writer(self) -> None:
        """In the writer thread: copy what was committed since the bulk checkpoint began."""
        conn = self._conn
        if conn is None:
            return
        started = time.perf_counter()
        conn.connection.driver_connection.execute(_CHECKPOINT).fetchall()  # type: ignore[union-attr]
        if self._trace is not None:
            self._trace.checkpoint("writer", started)

    def _answer_batch(
        self,
        result: tuple[list[StoredSnapshot | int], list[tuple[bool, Any]]] | Failure,
        batch: list[tuple[Any, Deferred[Any] | _Slot, float]],
        riders: list[_Rider],
    ) -> None:
        """:meth:`_written`, the batch's log lines (one a snapshot) flushed together at the
        end: one write to the log's stream instead of one a line (see lines_held)."""
        with lines_held():
            self._written(result, batch, riders)

    def _written(
        self,
        result: tuple[list[StoredSnapshot | int], list[tuple[bool, Any]]] | Failure,
        batch: list[tuple[Any, Deferred[Any] | _Slot, float]],
        riders: list[_Rider],
    ) -> None:
        self._writing = False
        if self._urgent_run and not self._background:
            self._urgent_run = 0
        if self._trace is not None:
            first = min([b[2] for b in batch[:1]] + [r.queued for r in riders])
            self._trace.rides(riders, alone=not batch)
            self._trace.batch_done(len(batch), first)
        if isinstance(result, Failure):
            self._healthy = False
            cause = result.value
            description = _describe(cause) if cause is not None else "unknown"
            log.error("store.batch.failed", size=len(batch), error=description)
            error = StoreError(f"the store could not commit: {description}")
            error.__cause__ = cause
            for _, done, _ in batch:
                done.errback(error)
            if batch:
                # The riders only shared the failed batch's transaction (a bad record, a commit
                # that failed): each goes again in a transaction of its own, and its caller is
                # told only if that fails too. A page's chain is not lost to a stranger's row.
                for rider in riders:
                    rider.alone = True
                self._riders[:0] = riders
            else:
                for rider in riders:
                    rider.done.errback(error)
        else:
            self._healthy = True
            if self._checkpoints is not None:
                self._checkpoints.commits += 1
            results, ridden = result
            for (_, done, _), value in zip(batch, results, strict=True):
                done.callback(value)
            for rider, (ok, value) in zip(riders, ridden, strict=True):
                if ok:
                    rider.done.callback(value)
                else:
                    rider.done.errback(Failure(value))
        self._next_after_answers()

    def _next_after_answers(self) -> None:
        """:meth:`_next_batch`, once the reactor has written the answers just given.

        An answer (a feed's ACK, an HTTP 200) leaves at the reactor's next pass over its
        sockets, not when it is written to the transport. Handed over at once, the next batch
        had the writer thread take the GIL and the core (the daemon runs on one) at that pass
        and hold them through its statements, up to its commit's fsync: the answers waited
        for the next batch's write (bench/store_tail.py: 1.6 ms median, 5.3 ms p90 for the
        snapshots whose next batch went first, 0.3 / 2.2 ms for the others). Through the
        reactor's thread-call queue, the next batch goes after that pass: one reactor
        iteration later (tens of us), with whatever that pass read in it too.
        """
        call = getattr(self._reactor, "callFromThread", None)
        if call is None or not self._pending():  # a test clock; or nothing to write next
            self._next_batch()
        else:
            call(self._next_batch)

    def _release_drains(self) -> None:
        drains, self._drains = self._drains, []
        for waiter in drains:
            waiter.callback(None)


class _Group:
    """The results of one :meth:`IncidentStore.store_many`, fired when the last arrives."""

    __slots__ = ("done", "left", "results")

    def __init__(self, size: int) -> None:
        self.done: Deferred[list[StoredSnapshot | int | Failure]] = Deferred()
        self.results: list[StoredSnapshot | int | Failure] = [0] * size
        self.left = size
        if not size:
            self.done.callback([])

    def set(self, index: int, value: StoredSnapshot | int | Failure) -> None:
        self.results[index] = value
        self.left -= 1
        if not self.left:
            self.done.callback(self.results)


class _Slot(tuple[_Group, int]):
    """One record's place in a :class:`_Group` (``_Slot((group, index))``), answered like its
    own Deferred would be. A tuple: made in C, where a class with an __init__ was a Python
    call per snapshot."""

    __slots__ = ()

    def callback(self, value: StoredSnapshot | int) -> None:
        group, index = self
        group.set(index, value)

    def errback(self, error: BaseException | Failure) -> None:
        group, index = self
        group.set(index, error if isinstance(error, Failure) else Failure(error))


def _sqlstate(err: DBAPIError) -> str | None:
    return getattr(err.orig, "sqlstate", None) or getattr(err.orig, "pgcode", None)


def _transient(err: DBAPIError) -> bool:
    if err.connection_invalidated or _sqlstate(err) in _TRANSIENT_SQLSTATES:
        return True
    return "database is locked" in str(err.orig)


def _describe(err: BaseException) -> str:
    """The kind of a database error, never its message: those quote statement parameters."""
    if isinstance(err, DBAPIError):
        state = _sqlstate(err)
        kind = f"{type(err).__name__}/{type(err.orig).__name__}"
        return f"{kind} (sqlstate {state})" if state else kind
    return type(err).__name__
