"""What the tail latency at a paced rate is made of: the daemon's own trace of every batch.

    .venv/bin/python bench/store_tail.py [--rate 300] [--seconds 10] [--messages 2000]

Starts the daemon as bench/ingest.py does (TCP EIDO feed, SQLite WAL synchronous=FULL, pinned
to CPU 0) with ``CORESPOND_STORE_TRACE`` set, so that its store records per batch when the
first item was submitted, dispatched to the writer thread, picked up there, written, committed
and answered on the reactor, and every cyclic GC pause. It warms up with ``--messages``
snapshots sent with a window of 64, then paces ``--rate`` snapshots/s for ``--seconds``, stops
the daemon and prints the client's p50/p99 send-to-ack latency, the server's CPU per paced
snapshot, and for the median batch and the slowest 1 % where the time went:

- queue: submitted -> dispatched (waiting for the batch in flight to finish);
- hand-off: dispatched -> running on the writer thread;
- write: the statements; commit: COMMIT (fsync, and any WAL checkpoint it runs);
- back: committed -> the Deferreds firing on the reactor;
- gc: GC pauses that overlap the batch (any thread; the GIL stops the others);

and the WAL checkpoints: how long each step took, and how many batches (and how many of the
slowest 1 %) waited for one that ran on the writer thread. ``bench/fsync_floor.py`` measures
the disk's own commit latency at the same rate: the floor under the p99.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from ingest import drive, messages, percentile, pin, start_daemon  # noqa: E402

TRACE_ENV = "CORESPOND_STORE_TRACE"  # corespond.daemon.store.writer.TRACE_ENV
STEPS = ("queue", "hand-off", "write", "commit", "back", "gc")


def steps_of(batch: dict[str, float], pauses: list[dict[str, float]]) -> dict[str, float]:
    """Milliseconds of each step of one batch."""
    out = {
        "queue": batch["dispatched"] - batch["submitted"],
        "hand-off": batch["thread"] - batch["dispatched"],
        "write": batch["written"] - batch["thread"],
        "commit": batch["committed"] - batch["written"],
        "back": batch["back"] - batch["committed"],
    }
    out = {k: v * 1e3 for k, v in out.items()}
    start, end = batch["submitted"], batch["back"]
    out["gc"] = sum(p["ms"] for p in pauses if start <= p["at"] <= end)
    out["total"] = (end - start) * 1e3
    return out


def report(trace: list[dict[str, float]], since: float) -> None:
    batches = [t for t in trace if "batch" in t and t["submitted"] >= since]
    pauses = [t for t in trace if "gc" in t and t["at"] >= since]
    if not batches:
        print("no batches traced")
        return
    rows = sorted((steps_of(b, pauses) for b in batches), key=lambda r: r["total"])
    tail = rows[int(len(rows) * 0.99) :]
    median = rows[len(rows) // 2]
    sizes = [b["batch"] for b in batches]
    print(f"\n{len(batches)} batches, {sum(sizes)} items, mean batch {statistics.mean(sizes):.2f}")
    print(f"{'ms':<22}" + "".join(f"{s:>10}" for s in (*STEPS, "total")))
    print(f"{'median batch':<22}" + "".join(f"{median[s]:>10.2f}" for s in (*STEPS, "total")))
    print(
        f"{'slowest 1 % (mean)':<22}"
        + "".join(f"{statistics.mean(r[s] for r in tail):>10.2f}" for s in (*STEPS, "total"))
    )
    print(f"{'slowest batch':<22}" + "".join(f"{rows[-1][s]:>10.2f}" for s in (*STEPS, "total")))
    checkpoints = [t for t in trace if "checkpoint" in t and t["at"] >= since]
    for step in ("bulk", "writer"):
        ms = sorted(c["ms"] for c in checkpoints if c["checkpoint"] == step)
        if ms:
            print(f"checkpoint {step} step: {len(ms)} runs, median {statistics.median(ms):.2f} ms,"
                  f" max {ms[-1]:.2f} ms")  # fmt: skip
    # A checkpoint on the writer thread holds up every batch queued while it runs.
    on_writer = [c for c in checkpoints if c["checkpoint"] == "writer"]
    behind = [
        b for b in batches
        if any(b["submitted"] <= c["at"] + c["ms"] / 1e3 and c["at"] <= b["dispatched"]
               for c in on_writer)
    ]  # fmt: skip
    slow = {id(b) for b in sorted(batches, key=lambda b: b["back"] - b["submitted"])[-len(tail) :]}
    print(
        f"batches queued behind a writer-thread checkpoint: {len(behind)}, of them in the slowest"
        f" 1 %: {sum(id(b) in slow for b in behind)} of {len(tail)}"
    )
    by_gen: dict[int, list[float]] = {}
    for p in pauses:
        by_gen.setdefault(int(p["gc"]), []).append(p["ms"])
    for gen, ms in sorted(by_gen.items()):
        print(f"GC gen {gen}: {len(ms)} pauses, median {statistics.median(ms):.2f} ms, "
              f"max {max(ms):.2f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="warm-up, window 64")
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--keep", type=Path, help="copy the daemon's trace to this file")
    args = parser.parse_args()
    pin(1)
    paced_count = int(args.rate * args.seconds)
    frames = messages(args.messages + paced_count)
    with tempfile.TemporaryDirectory(prefix="corespond-tail-") as tmp:
        workdir = Path(tmp)
        trace_path = workdir / "trace.jsonl"
        os.environ[TRACE_ENV] = str(trace_path)
        server = start_daemon(workdir)
        try:
            drive(server.port, frames[: args.messages], 64, None)
            since = time.perf_counter()  # CLOCK_MONOTONIC: the daemon's clock too
            cpu0 = server.cpu_seconds()
            paced = drive(server.port, frames[args.messages :], 10_000, args.rate)
            cpu = server.cpu_seconds() - cpu0
            wal = sum(p.stat().st_size for p in workdir.rglob("*-wal")) / (1 << 20)
        finally:
            server.stop()
        text = trace_path.read_text() if trace_path.exists() else ""  # older code: no trace
        if args.keep:
            args.keep.write_text(json.dumps({"since": since}) + "\n" + text)
        trace = [json.loads(line) for line in text.splitlines() if line]
    p50, p99 = statistics.median(paced) * 1e3, percentile(paced, 99) * 1e3
    print(
        f"paced {args.rate:.0f}/s for {args.seconds:.0f} s: p50 {p50:.2f} ms, p99 {p99:.2f} ms,"
        f" max {max(paced) * 1e3:.2f} ms; server CPU {cpu / len(paced) * 1e6:.0f} us/snapshot;"
        f" WAL {wal:.1f} MiB at the end"
    )
    report(trace, since)


if __name__ == "__main__":
    main()
