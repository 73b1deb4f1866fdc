"""Outcome report benchmark: the full report over N synthetic encounters, SQL against Python.

    .venv/bin/python bench/report.py [--encounters 1000000] [--runs 3]
        [--backends sqlite,postgresql] [--cache DIR]

For each backend: seed N synthetic encounters (18 months, two programs; the SQLite database is
kept in --cache and reused by later runs with the same N), then time, in the same run,

- ``sql``: :func:`outcome_report` (every metric, aggregation in SQL), without grouping and
  ``--by month``;
- ``python``: the baseline, loading the rows into Python and aggregating there
  (:func:`reference_aggregates`, the test oracle) for the same report.

PostgreSQL runs on a temporary server started as tests/conftest.py does (fsync off). Reported:
the best and median wall time of --runs, the best CPU time of this process (SQLite's whole
work; the figure to compare on a shared machine), and the ratio python/sql. The machine is shared (2
cores, other sessions running), so figures vary from run to run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, func, select, text  # noqa: E402

from corespond.daemon.outcomes import ReportRequest, assemble_report, outcome_report  # noqa: E402
from corespond.daemon.outcomes_reference import reference_aggregates  # noqa: E402
from corespond.daemon.store.engine import create_store_engine  # noqa: E402
from corespond.daemon.store.migrate import upgrade  # noqa: E402
from corespond.daemon.store.tables import encounters  # noqa: E402
from corespond.daemon.synthetic_encounters import seed_encounters  # noqa: E402
from tests.conftest import _free_port, _pg_bin  # noqa: E402

START, END = date(2025, 1, 1), date(2026, 6, 30)
SEED = 2026
CHUNK = 50_000  # encounters seeded per transaction


def seeded(engine: Engine, count: int) -> None:
    with engine.connect() as conn:
        have = conn.execute(select(func.count()).select_from(encounters)).scalar_one()
    if have == count:
        return
    if have:
        raise SystemExit(f"database holds {have} encounters, not {count}: remove it")
    started = time.perf_counter()
    done = 0
    while done < count:
        n = min(CHUNK, count - done)
        # Each chunk is its own stretch of the 18 months' persons: ids continue across chunks.
        with engine.begin() as conn:
            seed_encounters(conn, n, START, END, seed=SEED + done, programs=("alpha", "beta"))
        done += n
        print(f"  seeded {done}/{count}", file=sys.stderr, flush=True)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    print(f"  seeding took {time.perf_counter() - started:.0f} s", file=sys.stderr)


def timed(fn: Callable[[], Any], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each run (CPU: this process's, which is all of SQLite's work
    and none of a PostgreSQL server's)."""
    wall, cpu = [], []
    for _ in range(runs):
        started, used = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - used)
    return wall, cpu


def measure(engine: Engine, runs: int, baseline_runs: int) -> list[dict[str, Any]]:
    rows = []
    for by in (None, "month"):
        req = ReportRequest(START, END, by=by)

        def sql(req: ReportRequest = req) -> Any:
            with engine.connect() as conn:
                return outcome_report(conn, req)

        def python(req: ReportRequest = req) -> Any:
            with engine.connect() as conn:
                return assemble_report(req, reference_aggregates(conn, req))

        sql_times, sql_cpu = timed(sql, runs)
        py_times, _ = timed(python, baseline_runs)
        rows.append(
            {
                "by": by or "-",
                "sql_best": min(sql_times),
                "sql_cpu": min(sql_cpu),
                "sql_median": statistics.median(sql_times),
                "python_best": min(py_times),
                "ratio": min(py_times) / min(sql_times),
            }
        )
    return rows


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server (as tests/conftest.py starts one); yields a URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise SystemExit("PostgreSQL server binaries not found (Debian package postgresql)")
    root = Path(tempfile.mkdtemp(prefix="corespond-bench-pg-"))
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    env = dict(os.environ, LC_ALL="C", HOME=str(root))
    data, log, port = root / "data", root / "server.log", _free_port()

    def run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, env=env, **run_as)

    run(initdb, "-D", str(data), "-U", "corespond", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        "-c shared_buffers=256MB -c work_mem=64MB"
    )
    run(pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    try:
        admin = create_store_engine(f"postgresql+psycopg://corespond@127.0.0.1:{port}/postgres")
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("CREATE DATABASE bench"))
        admin.dispose()
        yield f"postgresql+psycopg://corespond@127.0.0.1:{port}/bench"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encounters", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline-runs", type=int, default=1)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    results = []
    for backend in args.backends.split(","):
        print(f"{backend}: {args.encounters} encounters", file=sys.stderr)
        with contextlib.ExitStack() as stack:
            if backend == "sqlite":
                url = f"sqlite:///{args.cache / f'corespond-report-{args.encounters}.db'}"
            else:
                url = stack.enter_context(postgres())
            engine = create_store_engine(url, sqlite_synchronous="normal")
            stack.callback(engine.dispose)
            upgrade(engine)
            seeded(engine, args.encounters)
            for row in measure(engine, args.runs, args.baseline_runs):
                results.append({"backend": backend, **row})
    print(f"{'backend':<11} {'by':<6} {'sql best':>9} {'sql median':>11} {'sql cpu':>8} "
          f"{'python best':>12} {'python/sql':>10}")  # fmt: skip
    for r in results:
        print(f"{r['backend']:<11} {r['by']:<6} {r['sql_best']:>8.2f}s {r['sql_median']:>10.2f}s "
              f"{r['sql_cpu']:>7.2f}s {r['python_best']:>11.2f}s {r['ratio']:>9.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
