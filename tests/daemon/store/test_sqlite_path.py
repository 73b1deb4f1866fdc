"""SQLite's driver-level hot path stores exactly what the SQLAlchemy Core path stores."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from corespond.daemon.decision import Response
from corespond.daemon.snapshot import (
    IncidentStatus,
)
from corespond.daemon.store import writer
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.writer import StoredSnapshot, write_batch
from tests.daemon.store.records import at, decision, record, reject, snapshot

TABLES = ("incidents", "snapshots", "decisions", "rejected_messages")


@pytest.fixture
def two_engines(sqlite_template: Path, tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    engines = []
    for name in ("driver.db", "core.db"):
        shutil.copyfile(sqlite_template, tmp_path / name)
        engines.append(create_store_engine(f"sqlite:///{tmp_path / name}"))
    yield engines[0], engines[1]
    for engine in engines:
        engine.dispose()


def batches() -> list[list[Any]]:
    """New incidents, updates, late and repeated snapshots, odd text and times, rejects."""
    plus_two = timezone(timedelta(hours=2))
    first = record(snapshot("INC-1", updated=1), decision(Response.CLINICIAN), received=2)
    odd = snapshot("INC-\x00\ud800é", updated=3, call_type="WELFARE \x00 CHECK", narrative="é\x00")
    return [
        [first, record(snapshot("INC-2", updated=1), received=2), reject(b"\x00bad")],
        [
            record(snapshot("INC-1", updated=5), decision(Response.NONE), received=6),
            first,  # a repeat of a stored snapshot
            record(snapshot("INC-1", updated=3, call_type="LATE"), received=7),
            record(snapshot("INC-2", updated=9, status=IncidentStatus.CLOSED), received=9),
            record(odd, decision(Response.POLICE, category="x\x00y"), received=8),
        ],
        [
            # Times in another zone and naive (taken as UTC) are stored as the same UTC text.
            replace(
                record(snapshot("INC-3", updated=2), received=4),
                received_at=datetime(2031, 3, 4, 7, 6, 11, 123456, tzinfo=plus_two),
            ),
            replace(
                record(snapshot("INC-4", updated=2), received=4),
                received_at=at(4).replace(tzinfo=None, microsecond=0),
            ),
            reject(b"{", received=5),
        ],
    ]


def dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row as stored (text, not decoded values)."""
    with engine.connect() as conn:
        return {
            table: [
                tuple(row) for row in conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY id")
            ]
            for table in TABLES
        }


def write_all(engine: Engine) -> list[list[StoredSnapshot | int]]:
    out = []
    for items in batches():
        with engine.begin() as conn:
            out.append(write_batch(conn, items))
    return out


def test_driver_level_rows_equal_core_rows(
    two_engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    driver, core = two_engines
    with driver.connect() as conn:
        statements = writer._dialect_statements(conn)
    assert statements.driver_level
    driver_results = write_all(driver)
    monkeypatch.setitem(
        writer._STATEMENTS,
        "sqlite",
        replace(statements, driver_level=False, binds=writer._CORE_BINDS),
    )
    core_results = write_all(core)
    assert driver_results == core_results
    driver_rows, core_rows = dump(driver), dump(core)
    assert driver_rows == core_rows
    assert len(driver_rows["snapshots"]) == 8 and len(driver_rows["rejected_messages"]) == 2


def test_sqlite_finds_incidents_and_snapshots_by_index(engine: Engine) -> None:
    """No batch statement scans a whole table (the row-value IN (VALUES ...) form did)."""
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite query plans")
    statements: list[str] = []

    def seen(statement: str) -> None:  # as SQLite ran it, the values in place
        if statement.lstrip().upper().startswith("SELECT") and "max(id)" not in statement:
            statements.append(statement)

    stored = [
        record(snapshot("INC-1", updated=1), decision(Response.CLINICIAN)),
        record(snapshot("INC-2", updated=1)),
    ]
    with engine.begin() as conn:
        write_batch(conn, stored)
    with engine.begin() as conn:
        # The batch runs on the driver's own cursor: SQLite's trace sees every statement.
        driver = conn.connection.driver_connection
        driver.set_trace_callback(seen)  # type: ignore[union-attr]
        try:
            write_batch(
                conn,
                [
                    record(snapshot("INC-1", updated=2), decision(Response.NONE)),
                    record(snapshot("INC-2", updated=2)),
                    stored[1],
                ],
            )
        finally:
            driver.set_trace_callback(None)  # type: ignore[union-attr]
    # existing digests, incidents and the previous decision
    assert len(statements) == 3, statements
    with engine.connect() as conn:
        for statement in statements:
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement).all()
            scans = [
                row[3] for row in plan if row[3].startswith("SCAN") and "CONSTANT" not in row[3]
            ]
            assert scans == [], statement


def test_driver_errors_are_raised_as_sqlalchemy_raises_them(engine: Engine) -> None:
    """The store retries and reports by DBAPIError; the driver-level path raises the same."""
    bad = replace(record(snapshot("INC-1")), feed=None)  # feed is NOT NULL
    with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
        write_batch(conn, [bad])
    assert caught.value.orig is not None
