"""Store write benchmark: write_batch on SQLite (WAL, synchronous=FULL), per-snapshot cost.

    taskset -c 1 .venv/bin/python bench/store_write.py [--batches 32,64,256] [--runs 3]
        [--snapshots 6144] [--url postgresql+psycopg://...]

Realistic records: demo incidents (open, update, close), in source-time order so that a batch
mixes new incidents with updates of earlier ones; raw bytes are the EIDO document (3-4 KB);
an incident's outcome changes on one update in ten. Each run writes into a fresh
database. Reported: microseconds per snapshot for write_batch alone ("write") and with the
durable commit ("total"), and the CPU time (process time) of the latter, and of the commit
alone (WAL writes and fsync, mostly the kernel's).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from corespond.daemon.decision import Response  # noqa: E402
from corespond.daemon.demo import incident_lifecycles  # noqa: E402
from corespond.daemon.snapshot import snapshot_to_json  # noqa: E402
from corespond.daemon.store.engine import create_store_engine  # noqa: E402
from corespond.daemon.store.migrate import upgrade  # noqa: E402
from corespond.daemon.store.writer import SnapshotRecord, write_batch  # noqa: E402
from tests.daemon.store.records import decision  # noqa: E402


def raw_of(snap: object) -> bytes:
    try:
        from corespond.adapters.eido import eido_document

        return json.dumps(eido_document(snap)).encode()  # type: ignore[arg-type]
    except Exception:  # the EIDO adapter is being edited elsewhere: a same-size stand-in
        return json.dumps(snapshot_to_json(snap), indent=2).encode() * 2  # type: ignore[arg-type]


def records(count: int, seed: int = 1) -> list[SnapshotRecord]:
    rng = random.Random(seed)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    snaps = [s for life in incident_lifecycles(rng, count // 3 + 1, start) for s in life]
    snaps.sort(key=lambda s: s.updated_at)
    # Most incidents keep their outcome from one update to the next; one update in ten changes.
    responses = [Response.NONE, Response.NONE, Response.CLINICIAN, Response.CO_RESPONSE]
    outcome: dict[str, Response] = {}
    out = []
    for i, snap in enumerate(snaps[:count]):
        if snap.incident_id not in outcome or rng.random() < 0.1:
            outcome[snap.incident_id] = rng.choice(responses)
        response = outcome[snap.incident_id]
        out.append(
            SnapshotRecord(
                feed="bench",
                source="bench",
                format="eido-1.0",
                received_at=snap.updated_at + timedelta(seconds=1 + i % 7),
                raw=raw_of(snap),
                snapshot=snap,
                decision=decision(response),
            )
        )
    return out


def run(
    url: str | None, batch: int, recs: list[SnapshotRecord]
) -> tuple[float, float, float, float]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        engine = create_store_engine(url or f"sqlite:///{tmp}/bench.db")
        upgrade(engine)
        if url:  # PostgreSQL: start empty
            with engine.begin() as conn:
                for table in ("decisions", "snapshots", "incidents", "rejected_messages"):
                    conn.exec_driver_sql(f"DELETE FROM {table}")
        warm, rest = recs[: batch * 2], recs[batch * 2 :]
        for i in range(0, len(warm), batch):
            with engine.begin() as conn:
                write_batch(conn, warm[i : i + batch])
        write = total = cpu = commit = 0.0
        gc.collect()
        for i in range(0, len(rest), batch):
            chunk = rest[i : i + batch]
            c0 = time.process_time()
            t0 = time.perf_counter()
            with engine.begin() as conn:
                t1 = time.perf_counter()
                write_batch(conn, chunk)
                t2 = time.perf_counter()
                c2 = time.process_time()
            t3 = time.perf_counter()
            write += t2 - t1
            total += t3 - t0
            cpu += time.process_time() - c0
            commit += time.process_time() - c2
        engine.dispose()
        n = len(rest) / 1e6
        return write / n, total / n, cpu / n, commit / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="32,64,256")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--snapshots", type=int, default=6144)
    parser.add_argument("--url", default=None)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    recs = records(args.snapshots + 2 * max(batches))
    size = statistics.mean(len(r.raw) for r in recs)
    print(f"{len(recs)} records, raw {size:.0f} B on average")
    for batch in batches:
        results = [run(args.url, batch, recs) for _ in range(args.runs)]
        writes = " ".join(f"{r[0]:6.1f}" for r in results)
        totals = " ".join(f"{r[1]:6.1f}" for r in results)
        cpus = " ".join(f"{r[2]:6.1f}" for r in results)
        commits = " ".join(f"{r[3]:6.1f}" for r in results)
        print(
            f"batch {batch:4d} us/snapshot: write_batch {writes} | with commit {totals}"
            f" | CPU with commit {cpus} | CPU of the commit {commits}"
        )


if __name__ == "__main__":
    main()
