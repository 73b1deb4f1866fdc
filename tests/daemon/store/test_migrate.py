"""Migrations: an empty database upgraded to head has exactly the models' schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from corespond.daemon.store import migrate
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.tables import Base


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
