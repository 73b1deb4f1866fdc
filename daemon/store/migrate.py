"""Schema migrations (Alembic), found inside the installed package so they run from any cwd."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from corespond.daemon.store.engine import create_store_engine

# Held (per transaction) while a daemon migrates, so that two daemons starting together on one
# PostgreSQL do not both try. The value is arbitrary but fixed: "corespond" in ASCII, truncated.
_MIGRATION_LOCK = 0x636F726573706F6E


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("corespond.daemon.store.migrations")))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_up_to_date(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()


def upgrade(engine_or_url: Engine | str, revision: str = "head") -> str:
    """Bring the schema to ``revision`` in one transaction; returns the revision reached."""
    engine = (
        engine_or_url if isinstance(engine_or_url, Engine) else create_store_engine(engine_or_url)
    )
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            command.upgrade(alembic_config(conn), revision)
        reached = current_revision(engine)
        assert reached is not None
        return reached
    finally:
        if engine is not engine_or_url:
            engine.dispose()
