"""The engine: SQLite pragmas and URL handling."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from corespond.daemon.store.engine import SQLITE_PAGE_SIZE, create_store_engine, json_text

# What snapshot and decision JSON can hold, with what orjson cannot encode made likely.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec=None) | st.sampled_from("\ud800\udfff\x00")),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(JSON_VALUES)
@settings(max_examples=300)
def test_json_text_reads_back_as_the_value(value: Any) -> None:
    encoded = json_text(value)
    assert repr(json.loads(encoded)) == repr(value)
    assert "\x00" not in encoded  # NUL is escaped: storable text on both databases


def test_json_text_falls_back_to_ascii_escapes() -> None:
    assert json_text({"a": ["caf\u00e9", 1]}) == '{"a":["caf\u00e9",1]}'  # orjson: UTF-8
    assert json_text({"a": "\ud800"}) == '{"a":"\\ud800"}'  # a lone surrogate: json
    assert json_text([2**64]) == "[18446744073709551616]"
    assert json_text({1: "x"}) == '{"1":"x"}'  # a key that is not a string, as json writes it


@pytest.mark.parametrize(("synchronous", "level"), [("full", 2), ("NORMAL", 1)])
def test_sqlite_settings(tmp_path: Path, synchronous: str, level: int) -> None:
    path = tmp_path / "deep" / "er" / "store.db"
    engine = create_store_engine(f"sqlite:///{path}", sqlite_synchronous=synchronous)
    try:
        with engine.connect() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in (
                    "journal_mode", "synchronous", "foreign_keys", "busy_timeout", "page_size"
                )
            }  # fmt: skip
        assert pragma == {
            "journal_mode": "wal",
            "synchronous": level,
            "foreign_keys": 1,
            "busy_timeout": 5000,
            "page_size": SQLITE_PAGE_SIZE,
        }
        assert path.exists()
    finally:
        engine.dispose()


def test_an_existing_sqlite_database_keeps_its_page_size(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA page_size=8192")  # not the size a new database gets
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE t (x INTEGER)")
    old.close()
    engine = create_store_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA page_size").scalar() == 8192
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 1
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


class _Bytes(bytes):
    pass


def test_sqlite_binds_none_and_bytes_as_null_and_blob(tmp_path: Path) -> None:
    # The engine registers sqlite3 adapters for None and bytes (a shortcut past the adapter
    # protocol): what is stored must be what the driver stores without them.
    engine = create_store_engine(f"sqlite:///{tmp_path / 's.db'}")
    values = [None, b"", b"\x00raw\xff", bytes(range(256)) * 20, _Bytes(b"sub")]
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (n INTEGER, x BLOB, y TEXT)")
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            rows = [(i, v, v) for i, v in enumerate(values)]
            cursor.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT x, typeof(x), y, typeof(y) FROM t ORDER BY n").all()
    finally:
        engine.dispose()
    expected_types = ["null"] + ["blob"] * (len(values) - 1)
    assert [(x, tx, y, ty) for x, tx, y, ty in rows] == [
        (v if v is None else bytes(v), t, v if v is None else bytes(v), t)
        for v, t in zip(values, expected_types, strict=True)
    ]


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
