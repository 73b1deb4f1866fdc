"""What one page costs the daemon: from a decision that calls for a clinician to the page
submitted, in one thread, with no other load.

    .venv/bin/python bench/page_cost.py [--pages 200] [--clinicians 500] [--postgres] [--ride]

The real paging core (:class:`PagingService`) over the real store (SQLite in WAL mode with
``synchronous=FULL``, as the daemon runs it; or PostgreSQL with its durable defaults), the
roster of ``bench/dispatch.py`` (every clinician with a fix), its database work run inline, a
gateway that takes every page at once. For each of ``--pages`` stored behavioral-health
incidents the decision is handed to the service as the pipeline does, and the bench times
until the page has been submitted and its submission recorded. Printed: wall-clock p50/p99
per page, the thread's CPU time per page, and the commits (each one an fsync) per page.

``--ride``: paging's transactions go through the store's writer as the daemon's do on SQLite
(:meth:`IncidentStore.ride_next_batch`): the page's own in a transaction of its own at once (no
ingest batch comes here), on the writer's held connection, the submissions riding the next.
Without it, each is a transaction on a connection from the pool (the code before the lanes).

``--follow``: each incident's snapshot is stored through the store's writer with the paging
core as its follower, as the daemon runs: the chain, its first step and its page in the
snapshot's own transaction (the figures include storing the snapshot).

``--instructions``: under callgrind, count only the pages' loop (instrumentation switched on
and off around it with ``callgrind_control``), as ``bench/classify_instructions.py`` does; the
program total divided by ``--pages`` is the instructions per page, which load does not move.
SQLite's statement trace (the "run by SQLite" count, not the daemon's) is left off then:

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.out \\
        .venv/bin/python bench/page_cost.py --follow --pages 100 --instructions
    callgrind_annotate /tmp/cg.out | head   # "PROGRAM TOTALS" / 100

``bench/dispatch.py`` measures the same path end to end under ingest load on a shared
machine, where other processes move the figures; CPU time and commits per page move far
less, and say what the paging core itself costs.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch import ZONE, fresh_database, postgres_server, write_config
from ingest_threads import instrument


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--clinicians", type=int, default=500)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--statements", action="store_true", help="list the SQL per page")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the pages here")
    parser.add_argument("--ride", action="store_true", help="through the store's writer lanes")
    parser.add_argument(
        "--instructions", action="store_true",
        help="under callgrind: count only the pages (see above)",
    )  # fmt: skip
    parser.add_argument(
        "--follow", action="store_true",
        help="the chain in the snapshot's own transaction (the store's follower), as the daemon",
    )  # fmt: skip
    args = parser.parse_args()
    server = postgres_server() if args.postgres else contextlib.nullcontext()
    with server as pg, tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args, pg)


def run(tmp: Path, args: argparse.Namespace, pg: str | None) -> None:
    from sqlalchemy import event
    from twisted.internet.defer import maybeDeferred, succeed
    from twisted.internet.task import Clock

    from corespond.daemon.decision import Decision, Response
    from corespond.daemon.escalation import PagingService, PagingSettings
    from corespond.daemon.log import configure_logging
    from corespond.daemon.pager import Submitted
    from corespond.daemon.responders import LocationFix
    from corespond.daemon.roster import load_roster
    from corespond.daemon.snapshot import GeoPoint, Location, Note, Snapshot
    from corespond.daemon.store.engine import create_store_engine
    from corespond.daemon.store.migrate import upgrade
    from corespond.daemon.store.writer import IncidentStore, SnapshotRecord, write_batch

    configure_logging("warning", "json", sys.stderr)  # as bench/dispatch.py runs the daemon
    url = fresh_database(pg, "page_cost") if pg else f"sqlite:///{tmp / 'bench.db'}"
    write_config(tmp, paging=True, wctp_port=1, mllp_port=1, clinicians=args.clinicians)
    roster = load_roster(tmp / "roster.yaml")
    engine = create_store_engine(url)
    upgrade(engine)
    commits = [0]
    event.listen(engine, "commit", lambda conn: commits.__setitem__(0, commits[0] + 1))
    statements: Counter[str] = Counter()

    def counted(conn: Any, cursor: Any, sql: str, *rest: Any) -> None:
        statements[" ".join(sql.split())[:100]] += 1

    event.listen(engine, "before_cursor_execute", counted)
    # On SQLite, every statement SQLite itself ran (the writer's and paging's driver-level
    # statements, savepoints, BEGIN and COMMIT included), on every connection from here on.
    ran = [0]
    run_by_sqlite: Counter[str] = Counter()
    engine.dispose()

    def count_run(sql: str) -> None:
        ran[0] += 1
        if args.statements:
            run_by_sqlite[" ".join(re.sub(r"'[^']*'|\b\d+(\.\d+)?\b", "?", sql).split())[:100]] += 1

    def traced(dbapi_conn: Any, _: Any) -> None:
        if hasattr(dbapi_conn, "set_trace_callback"):
            dbapi_conn.set_trace_callback(count_run)

    if not args.instructions:  # (the trace costs SQLite and Python ~0.3M instructions a page)
        event.listen(engine, "connect", traced)
    submitted: list[float] = []

    class Gateway:
        def submit(self, message: Any) -> Any:
            submitted.append(time.perf_counter())
            return succeed(Submitted("wctp", f"w-{len(submitted)}"))

    reactor = Clock()
    reactor.advance(datetime.now(UTC).timestamp())
    writer_cpu = [0.0]  # CPU in the writer's transactions (what a page's ride holds it for)

    def on_writer(fn: Any) -> Any:
        started = time.thread_time()
        try:
            return maybeDeferred(fn)
        finally:
            writer_cpu[0] += time.thread_time() - started

    store = IncidentStore(
        engine, reactor, run_in_thread=on_writer, run_read_in_thread=maybeDeferred,
        checkpoint_seconds=None,
    )  # fmt: skip
    store.start()
    # Reads (the choice made before a page's transaction, positions) on a reader connection,
    # as the daemon makes them.
    lanes: dict[str, Any] = {}
    if args.ride or args.follow:
        lanes |= {
            "ride": partial(store.ride_next_batch, within=0),
            # (the next page's transaction, as the next ingest batch in the daemon)
            "ride_later": partial(store.ride_next_batch, within=60, urgent=False),
        }
    service = PagingService(
        engine, roster, {"wctp": Gateway()}, reactor, PagingSettings(worker_id="bench"),
        run_in_thread=maybeDeferred, run_read=store.run_read, **lanes,
    )  # fmt: skip
    service.start()
    rng = random.Random(7)
    west, south, east, north = ZONE
    now = datetime.now(UTC)
    for cid in roster.clinicians:
        point = rng.uniform(south, north), rng.uniform(west, east)
        service.record_fix(LocationFix(cid, *point, now, "bench"))
    decision = Decision(True, "mental-health", Response.CLINICIAN, 0.9, ("bench",), (), "bench")
    records = [
        SnapshotRecord(
            "cad", "cad", "jsonl", now, f"bench-{n}".encode(),
            Snapshot(
                incident_id=f"bench-{n}", updated_at=now, call_type="EDP", apco_type="EDP",
                notes=(Note("synthetic", now),),
                location=Location(GeoPoint(rng.uniform(south, north), rng.uniform(west, east))),
            ),
            decision,
        )
        for n in range(args.pages)
    ]  # fmt: skip
    if args.follow:  # stored one by one below, each with its chain
        store.follow_with(service)
        stored: list[Any] = [None] * len(records)
    else:
        with engine.begin() as conn:
            stored = write_batch(conn, records)  # type: ignore[assignment]
    walls, cpus = [], []
    commits[0] = 0
    writer_cpu[0] = 0.0
    ran[0] = 0
    statements.clear()
    run_by_sqlite.clear()
    profiler = cProfile.Profile(time.thread_time) if args.profile else None  # CPU, not wall
    if args.instructions:
        _instrument(True)
    for record, one in zip(records, stored, strict=True):
        reactor.advance(0.05)
        if profiler:
            profiler.enable()
        before = len(submitted)
        wall, cpu = time.perf_counter(), time.thread_time()
        if args.follow:
            store.store_snapshot(record).addCallback(partial(service.followed, record))
        else:
            service.observe(record, one)  # type: ignore[arg-type]
        if len(submitted) == before:
            service.wake()  # (the code before the fast path paged from its worker's pass)
        cpus.append(time.thread_time() - cpu)
        walls.append(time.perf_counter() - wall)
        if profiler:
            profiler.disable()
        assert len(submitted) == before + 1, "the page was not submitted"
    if args.instructions:
        _instrument(False)
    service.stop()
    store.stop()
    engine.dispose()
    if profiler:
        profiler.dump_stats(args.profile)
    walls.sort()
    print(f"{args.pages} pages, roster of {args.clinicians}, {'PostgreSQL' if pg else 'SQLite'}"
          f"{', riding' if args.ride else ''}"
          f"{', in the snapshot transaction (its snapshot included)' if args.follow else ''}:"
          f" wall p50 {walls[len(walls) // 2] * 1000:.1f} ms,"
          f" p99 {walls[int(len(walls) * 0.99)] * 1000:.1f} ms;"
          f" CPU {sum(cpus) / len(cpus) * 1000:.2f} ms per page"
          f"{f' ({writer_cpu[0] / args.pages * 1000:.2f} ms on the writer)' if lanes else ''};"
          f" {commits[0] / args.pages:.1f} commits,"
          f" {sum(statements.values()) / args.pages:.1f} statements per page through"
          f" SQLAlchemy{'' if pg or args.instructions else f', {ran[0] / args.pages:.1f} run by'}"
          f"{'' if pg or args.instructions else ' SQLite'}")  # fmt: skip
    if args.statements:
        for sql, count in statements.most_common():
            print(f"  {count / args.pages:5.2f}  {sql}")
        if run_by_sqlite:
            print("run by SQLite (literals as ?):")
        for sql, count in run_by_sqlite.most_common():
            print(f"  {count / args.pages:5.2f}  {sql}")


def _instrument(on: bool) -> None:
    """Callgrind's instrumentation of this process on or off (bench/ingest_threads.py's)."""
    instrument(os.getpid(), on)


if __name__ == "__main__":
    main()
