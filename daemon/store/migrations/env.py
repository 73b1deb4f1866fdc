"""Alembic environment: migrations run on the connection that migrate.py hands over.

``alembic -c alembic.ini ...`` (for writing new revisions) uses ``sqlalchemy.url`` from the ini
file or the CORESPOND_DATABASE_URL environment variable instead.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.tables import Base

target_metadata = Base.metadata


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite can alter a table only by copying it: later revisions use batch operations.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    url = os.environ.get("CORESPOND_DATABASE_URL") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("set sqlalchemy.url or CORESPOND_DATABASE_URL")
    engine = create_store_engine(url)
    try:
        with engine.begin() as conn:
            run_on(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported")
run()
