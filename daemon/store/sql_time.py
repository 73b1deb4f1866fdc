"""SQL expressions over UTC time columns that mean the same on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, ColumnElement, String
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


class epoch_seconds(FunctionElement[int]):
    """Whole seconds since 1970 of a UTC time column (truncated)."""

    type = BigInteger()
    inherit_cache = True
    name = "epoch_seconds"


@compiles(epoch_seconds, "sqlite")
def _epoch_sqlite(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    # The column holds "YYYY-MM-DD HH:MM:SS.ffffff" in UTC (see tables.UTCDateTime).
    return f"CAST(strftime('%s', {compiler.process(element.clauses, **kw)}) AS INTEGER)"


@compiles(epoch_seconds, "postgresql")
def _epoch_postgresql(element: epoch_seconds, compiler: SQLCompiler, **kw: Any) -> str:
    arg = compiler.process(element.clauses, **kw)
    return f"CAST(floor(EXTRACT(EPOCH FROM {arg})) AS BIGINT)"


class utc_month(FunctionElement[str]):
    """``YYYY-MM`` of a UTC time column."""

    type = String()
    inherit_cache = True
    name = "utc_month"


@compiles(utc_month, "sqlite")
def _month_sqlite(element: utc_month, compiler: SQLCompiler, **kw: Any) -> str:
    # The stored text starts with the UTC date: a substring, not a date parse (much faster).
    return f"substr({compiler.process(element.clauses, **kw)}, 1, 7)"


@compiles(utc_month, "postgresql")
def _month_postgresql(element: utc_month, compiler: SQLCompiler, **kw: Any) -> str:
    arg = compiler.process(element.clauses, **kw)
    return f"to_char({arg} AT TIME ZONE 'UTC', 'YYYY-MM')"


def seconds_between(later: Any, earlier: Any) -> ColumnElement[int]:
    """Whole seconds from ``earlier`` to ``later`` (each truncated to the second first)."""
    return epoch_seconds(later) - epoch_seconds(earlier)


class epoch_month(FunctionElement[str]):
    """``YYYY-MM`` (UTC) of whole seconds since 1970: the month of an integer column, so that an
    index holding that integer covers a query grouped by month."""

    type = String()
    inherit_cache = True
    name = "epoch_month"


@compiles(epoch_month, "sqlite")
def _epoch_month_sqlite(element: epoch_month, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strftime('%Y-%m', {compiler.process(element.clauses, **kw)}, 'unixepoch')"


@compiles(epoch_month, "postgresql")
def _epoch_month_postgresql(element: epoch_month, compiler: SQLCompiler, **kw: Any) -> str:
    arg = compiler.process(element.clauses, **kw)
    return f"to_char(to_timestamp({arg}) AT TIME ZONE 'UTC', 'YYYY-MM')"
