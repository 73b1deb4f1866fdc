"""The database engine: SQLite (WAL) embedded by default, PostgreSQL for production."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

SQLITE_SYNCHRONOUS = ("full", "normal")

# The page size of a new SQLite database (an existing one keeps its own: WAL mode cannot
# change it). A snapshot row is about 6 KB, so on 4 KiB pages it spills into an overflow page.
# 16 KiB pages write fewer WAL frames per snapshot in big batches (0.7 instead of 2.2), but at
# one snapshot a commit (the 300/s regime) each dirty page goes to the WAL whole: 168 KiB per
# snapshot instead of 50. On the quiet machine (stop 11) neither the store's CPU per snapshot
# (bench/ingest_stages.py --stage store: 85-112 us on 4 KiB, 86-104 on 16 KiB) nor `make bench`
# (2,134-2,495/s against 2,168-2,351/s) told them apart, and the paced tail
# (bench/store_tail.py, p99 5.8-20.4 ms against 12.0-27.3) leaned to 4 KiB: SQLite's default
# stays, with 3.4 times less written per snapshot at low rates.
SQLITE_PAGE_SIZE = 4096

# sqlite3 binds an exact int, float, str or bytearray as it is; any other value (None and bytes
# too) first goes through its adapter protocol: a look-up in the adapters registered, then
# getattr(PrepareProtocol, "__adapt__"), which fails by formatting an AttributeError message,
# then the value's own __conform__. About 1,800 instructions a value under callgrind, for a
# NULL or a BLOB bound as they would be anyway; the writer binds a snapshot's raw bytes and a
# few NULLs per snapshot. Registered adapters are found first and give the value back as it
# is (bytes(b) is b itself; {}.get(None) is None), so what is stored does not change. The
# registry is the process's: every sqlite3 connection binds these two the same way as before.
sqlite3.register_adapter(bytes, bytes)
_as_null: Callable[[None], None] = dict[None, None]().get  # a C call
sqlite3.register_adapter(type(None), _as_null)

# Set on a connection (``conn.execution_options(corespond_read_only=True)``) whose transactions
# only read: on SQLite they then begin DEFERRED instead of IMMEDIATE.
READ_ONLY = "corespond_read_only"


def create_store_engine(
    url: str | URL,
    *,
    sqlite_synchronous: str = "full",
    password: str | None = None,
    echo: bool = False,
) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``).

    ``password`` replaces any password in the URL: secrets come from files, not config.
    SQLite: the parent directory is created; WAL, ``synchronous`` FULL (survives power loss)
    or NORMAL (survives a process crash), foreign keys on, a 5 s busy timeout, and write
    transactions that take the write lock when they begin so that two writers (the daemon and
    ``corespond replay``) wait for each other instead of failing half way.
    """
    parsed = make_url(url)
    if password is not None:
        parsed = parsed.set(password=password)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, sqlite_synchronous, echo)
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(
            parsed,
            echo=echo,
            pool_pre_ping=True,
            json_serializer=json_text,
        )
    raise ValueError(
        f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql"
    )


# ASCII escapes: a NUL or lone surrogate from a feed stays storable JSON text. One encoder for
# all: json.dumps with arguments would build a new one per value.
_ascii_json_text: Callable[[Any], str] = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":")
).encode


def json_text(value: Any) -> str:
    """``value`` as compact JSON text, for the JSON columns (every snapshot binds two).

    orjson encodes them in about 40 % of json's time (27 -> 11 us a snapshot). It writes
    non-ASCII characters as UTF-8 and NUL as ``\\u0000``, both storable on SQLite and
    PostgreSQL; what it cannot encode (a lone surrogate, an integer beyond 64 bits, a key
    that is not a string) goes to json with ASCII escapes. The writer's driver-level
    statements encode with this function too, so that their JSON text is what SQLAlchemy
    would have bound.
    """
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return _ascii_json_text(value)


def _sqlite_engine(url: URL, synchronous: str, echo: bool) -> Engine:
    synchronous = synchronous.lower()
    if synchronous not in SQLITE_SYNCHRONOUS:
        raise ValueError(f"sqlite_synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}")
    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    if not in_memory:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        echo=echo,
        connect_args={"check_same_thread": False},
        json_serializer=json_text,
    )

    @event.listens_for(engine, "connect")
    def configure(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own transaction handling is switched off; the "begin" hook below
        # emits BEGIN itself (the SQLAlchemy-documented recipe for correct SQLite transactions).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # before anything is written
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(conn: Any) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine
