"""Schema migrations (Alembic), found inside the installed package so they run from any cwd."""

from __future__ import annotations

from collections.abc import Callable
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
    reached = _migrate(engine_or_url, command.upgrade, revision)
    assert reached is not None
    return reached


def downgrade(engine_or_url: Engine | str, revision: str) -> str | None:
    """Take the schema back to ``revision`` in one transaction; returns the revision reached."""
    return _migrate(engine_or_url, command.downgrade, revision)


def _migrate(
    engine_or_url: Engine | str, run: Callable[[Config, str], None], revision: str
) -> str | None:
    engine = (
        engine_or_url if isinstance(engine_or_url, Engine) else create_store_engine(engine_or_url)
    )
    try:
        with engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                _sqlite_foreign_keys(conn, on=False)
            try:
                with conn.begin():
                    if conn.dialect.name == "postgresql":
                        conn.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
                        )
                    run(alembic_config(conn), revision)
                    if sqlite:
                        _check_foreign_keys(conn)
            finally:
                if sqlite:
                    _sqlite_foreign_keys(conn, on=True)
        return current_revision(engine)
    finally:
        if engine is not engine_or_url:
            engine.dispose()


def _sqlite_foreign_keys(conn: Connection, *, on: bool) -> None:
    """SQLite: foreign key enforcement on or off for ``conn``.

    A migration that makes a table again in Alembic's batch mode (SQLite cannot drop a
    constraint) drops the old table, which enforcement would refuse (or cascade) while other
    tables refer to it; the pragma is a no-op inside a transaction, so it is set on the
    driver's connection before the migration's transaction begins (SQLAlchemy would begin
    one for a statement) and set back after it ends. _check_foreign_keys checks every row
    before the commit instead.
    """
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    dbapi.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def _check_foreign_keys(conn: Connection) -> None:
    """Raise (and so roll the migration back) if any row refers to a row that is not there."""
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        tables = sorted({row[0] for row in broken})  # table names only: no data in the message
        raise RuntimeError(f"migration left rows with missing parents in {', '.join(tables)}")
