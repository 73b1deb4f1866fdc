"""The engine: SQLite pragmas and URL handling."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from corespond.daemon.store.engine import create_store_engine


@pytest.mark.parametrize(("synchronous", "level"), [("full", 2), ("NORMAL", 1)])
def test_sqlite_settings(tmp_path: Path, synchronous: str, level: int) -> None:
    path = tmp_path / "deep" / "er" / "store.db"
    engine = create_store_engine(f"sqlite:///{path}", sqlite_synchronous=synchronous)
    try:
        with engine.connect() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
        assert pragma == {
            "journal_mode": "wal",
            "synchronous": level,
            "foreign_keys": 1,
            "busy_timeout": 5000,
        }
        assert path.exists()
    finally:
        engine.dispose()


def test_sqlite_transactions_are_real(tmp_path: Path) -> None:
    engine = create_store_engine(f"sqlite:///{tmp_path / 's.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
        with pytest.raises(RuntimeError), engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
            raise RuntimeError
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 0
    finally:
        engine.dispose()


def test_bad_synchronous(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sqlite_synchronous"):
        create_store_engine(f"sqlite:///{tmp_path / 's.db'}", sqlite_synchronous="off")


def test_postgresql_url_and_password() -> None:
    engine = create_store_engine(
        "postgresql://corespond:old@db.example:5432/cr", password="from-a-file"
    )
    assert engine.url.drivername == "postgresql+psycopg"
    assert engine.url.password == "from-a-file"
    engine.dispose()


def test_unsupported_database() -> None:
    with pytest.raises(ValueError, match="unsupported database"):
        create_store_engine("mysql://x@y/z")
