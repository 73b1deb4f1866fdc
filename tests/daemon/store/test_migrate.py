"""Migrations: an empty database upgraded to head has exactly the models' schema."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from corespond.daemon.decision import Response
from corespond.daemon.store import migrate
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.tables import Base, decisions, incidents, snapshots
from corespond.daemon.store.writer import write_batch
from tests.daemon.store.records import decision, record, snapshot


def test_upgrade_gives_the_models_schema(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the migrations are found in the package, not the cwd
    engine = create_store_engine(db_url)
    try:
        assert migrate.current_revision(engine) is None
        assert not migrate.is_up_to_date(engine)
        assert migrate.upgrade(engine) == migrate.head_revision()
        assert migrate.is_up_to_date(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert set(inspect(conn).get_table_names()) == set(Base.metadata.tables) | {
                "alembic_version"
            }
        assert migrate.upgrade(engine) == migrate.head_revision()  # again: nothing to do
    finally:
        engine.dispose()


def test_upgrade_by_url(db_url: str) -> None:
    assert migrate.upgrade(db_url) == migrate.head_revision()


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    engine = create_store_engine(db_url)
    try:
        migrate.upgrade(engine)
        from alembic import command

        with engine.begin() as conn:
            command.downgrade(migrate.alembic_config(conn), "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        migrate.upgrade(engine)
        assert migrate.is_up_to_date(engine)
    finally:
        engine.dispose()


def _snapshot_schema(engine: Any) -> tuple[set[tuple[str, tuple[str, ...], bool]], set[str]]:
    """The snapshots table's indexes (name, columns, unique) and unique constraints' names."""
    found = inspect(engine)
    indexes = {
        (ix["name"], tuple(ix["column_names"]), bool(ix["unique"]))
        for ix in found.get_indexes("snapshots")
        if "duplicates_constraint" not in ix  # (PostgreSQL: a unique constraint's own index)
    }
    uniques = {uq["name"] for uq in found.get_unique_constraints("snapshots")}
    return indexes, uniques


def _rows(engine: Any) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {
            table.name: [tuple(row) for row in conn.execute(select(table).order_by(table.c.id))]
            for table in (incidents, snapshots, decisions)
        }


NEW_INDEX = ("ix_snapshots_incident_id_digest", ("incident_id", "digest"), True)
OLD_INDEX = (
    "ix_snapshots_incident_id_source_updated_at", ("incident_id", "source_updated_at"), False
)


def test_0013_moves_the_unique_digest_to_the_incident_with_the_rows_kept(db_url: str) -> None:
    """The snapshots table is made again on SQLite (its referring decisions kept, foreign keys
    checked and on again after); down and up again, every row and id stays as it was."""
    engine = create_store_engine(db_url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            write_batch(
                conn,
                [
                    record(snapshot(f"INC-{i}", updated=u), decision(Response.CLINICIAN))
                    for i in range(3)
                    for u in range(2)
                ],
            )
        before = _rows(engine)
        assert len(before["snapshots"]) == len(before["decisions"]) == 6
        assert _snapshot_schema(engine) == ({NEW_INDEX}, set())

        assert migrate.downgrade(engine, "0012_reportflags") == "0012_reportflags"
        indexes, uniques = _snapshot_schema(engine)
        assert OLD_INDEX in indexes and NEW_INDEX not in indexes
        assert uniques == {"uq_snapshots_digest"}
        assert _rows(engine) == before

        assert migrate.upgrade(engine) == migrate.head_revision()
        assert _snapshot_schema(engine) == ({NEW_INDEX}, set())
        assert _rows(engine) == before
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            refers = inspect(conn).get_foreign_keys("decisions")
            assert {(fk["referred_table"], tuple(fk["constrained_columns"])) for fk in refers} >= {
                ("snapshots", ("snapshot_id",))
            }
    finally:
        engine.dispose()


def test_0013_downgrade_refuses_bytes_stored_for_two_incidents(db_url: str) -> None:
    """Back to one digest for all, two incidents' equal snapshots do not fit: the downgrade
    fails and leaves the schema and the rows as they were."""
    engine = create_store_engine(db_url)
    try:
        migrate.upgrade(engine)
        rec = record(snapshot("INC-1"))
        with engine.begin() as conn:
            write_batch(conn, [rec, replace(rec, source="other")])
        before = _rows(engine)
        with pytest.raises(IntegrityError):
            migrate.downgrade(engine, "0012_reportflags")
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert _snapshot_schema(engine) == ({NEW_INDEX}, set())
        assert _rows(engine) == before
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
