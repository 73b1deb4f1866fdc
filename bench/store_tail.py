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

Then snapshot by snapshot (the client's send and ACK times are on the daemon's clock): each
paced snapshot placed in its batch, with "in" (send -> submitted: TCP, read, parse, classify)
and "out" (answered on the reactor -> ACK read by the client) around its batch's steps; for the
slowest 1 % and every snapshot over 10 ms, which step was largest and what it overlapped (a
checkpoint beside its commit or while it queued, a background job on the writer, a GC pause
over 1 ms); each kind of checkpoint's share of the window; the share of commits over 5 and
10 ms beside a checkpoint against the others; and the slowest 10, step by step.
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
from typing import Any

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


# Per snapshot, the steps it waited in (ms), in order: "in" is send -> submitted to the store
# (the client's send, TCP, the reactor's read, parse and classification), "out" is answered on
# the reactor -> the ACK read by the client. The rest are its batch's (see steps_of).
SNAPSHOT_STEPS = ("in", "queue", "hand-off", "write", "commit", "back", "out")
SLOW_MS = 10.0


def overlaps(start: float, end: float, spans: list[tuple[float, float]]) -> bool:
    return any(s < end and start < e for s, e in spans)


def per_snapshot(
    times: list[tuple[float, float]], trace: list[dict[str, Any]], since: float
) -> list[dict[str, Any]]:
    """Each paced snapshot placed in the batch that stored it, with its own steps (ms).

    One connection: the daemon stores the snapshots in the order they were sent, so the n-th
    paced snapshot is the n-th item of the batches traced since ``since``. Only a batch's first
    item has its submission time traced: a later item's "in" is taken as the median first
    item's (capped at what it waited before dispatch), the rest of its wait is "queue"."""
    batches = sorted(
        (t for t in trace if "batch" in t and t["submitted"] >= since and t["batch"]),
        key=lambda t: t["dispatched"],
    )
    if sum(b["batch"] for b in batches) != len(times):
        return []
    firsts: list[float] = []
    items: list[tuple[dict[str, Any], int]] = []
    for b in batches:
        items += [(b, k) for k in range(b["batch"])]
    for (sent, _), (b, k) in zip(times, items, strict=True):
        if k == 0:
            firsts.append(b["submitted"] - sent)
    typical_in = statistics.median(firsts) if firsts else 0.0
    out = []
    for (sent, acked), (b, k) in zip(times, items, strict=True):
        before = b["dispatched"] - sent
        into = b["submitted"] - sent if k == 0 else min(typical_in, before)
        steps = {
            "in": into,
            "queue": before - into,
            "hand-off": b["thread"] - b["dispatched"],
            "write": b["written"] - b["thread"],
            "commit": b["committed"] - b["written"],
            "back": b["back"] - b["committed"],
            "out": acked - b["back"],
        }
        row = {s: v * 1e3 for s, v in steps.items()}
        row.update(total=(acked - sent) * 1e3, sent=sent, acked=acked, batch=b)
        out.append(row)
    return out


def attribute(rows: list[dict[str, Any]], trace: list[dict[str, Any]], since: float) -> None:
    """Where the slowest 1 % of snapshots (and every one over SLOW_MS) waited, one by one."""
    if not rows:
        print("\nper snapshot: the trace's batches do not match the paced snapshots")
        return
    spans: dict[str, list[tuple[float, float]]] = {"bulk": [], "writer": []}
    for c in trace:
        if "checkpoint" in c and c["at"] >= since - 1:
            spans[c["checkpoint"]].append((c["at"], c["at"] + c["ms"] / 1e3))
    # GC pauses of 1 ms or more (a young collection takes 0.1-0.7 ms, and comes every few)
    pauses = [(p["at"], p["at"] + p["ms"] / 1e3) for p in trace if "gc" in p and p["ms"] >= 1]
    jobs = [(j["thread"], j["done"]) for j in trace if "job" in j and j["thread"]]
    ordered = sorted(rows, key=lambda r: r["total"])
    tail = ordered[int(len(ordered) * 0.99) :]
    slow = [r for r in rows if r["total"] > SLOW_MS]
    p99 = ordered[int(len(ordered) * 0.99)]["total"]
    print(
        f"\nper snapshot: {len(rows)} paced, {len(slow)} over {SLOW_MS:.0f} ms"
        f" ({len(slow) / len(rows) * 100:.2f} %); p99 {p99:.2f} ms"
    )
    print(f"{'ms':<22}" + "".join(f"{s:>9}" for s in (*SNAPSHOT_STEPS, "total")))
    for name, group in (
        ("median snapshot", [ordered[len(ordered) // 2]]),
        ("slowest 1 % (mean)", tail),
    ):
        print(f"{name:<22}" + "".join(
            f"{statistics.mean(r[s] for r in group):>9.2f}" for s in (*SNAPSHOT_STEPS, "total")
        ))  # fmt: skip

    def causes(r: dict[str, Any]) -> list[str]:
        """What the snapshot's batch (and the one it queued behind) overlapped."""
        b = r["batch"]
        found = []
        for kind, kind_spans in spans.items():
            # its own commit, or the commit it queued behind (the queue step's span)
            if overlaps(b["written"], b["committed"], kind_spans):
                found.append(f"own commit beside a {kind} checkpoint")
            elif r["queue"] > 1 and overlaps(r["sent"], b["dispatched"], kind_spans):
                found.append(f"queued while a {kind} checkpoint ran")
        if overlaps(r["sent"], r["acked"], jobs):
            found.append("a background job on the writer")
        if overlaps(r["sent"], r["acked"], pauses):
            found.append("a GC pause over 1 ms")
        return found or ["none of these"]

    for name, group in (("slowest 1 %", tail), (f"over {SLOW_MS:.0f} ms", slow)):
        if not group:
            continue
        largest: dict[str, int] = {}
        overlapped: dict[str, int] = {}
        for r in group:
            step = max(SNAPSHOT_STEPS, key=lambda s: r[s])
            largest[step] = largest.get(step, 0) + 1
            for cause in causes(r):
                overlapped[cause] = overlapped.get(cause, 0) + 1
        print(
            f"{name}, {len(group)} snapshots: largest step "
            + ", ".join(f"{s} {n}" for s, n in sorted(largest.items(), key=lambda x: -x[1]))
        )
        print("  overlapping: " + ", ".join(
            f"{c} {n}" for c, n in sorted(overlapped.items(), key=lambda x: -x[1])
        ))  # fmt: skip
    # The base rate: how much of the paced window each kind of checkpoint covered.
    window = (rows[0]["sent"], rows[-1]["acked"])
    length = window[1] - window[0]
    for kind, kind_spans in spans.items():
        covered = sum(min(e, window[1]) - max(s, window[0]) for s, e in kind_spans
                      if s < window[1] and e > window[0])  # fmt: skip
        share = covered / length * 100
        print(f"{kind} checkpoints: {len(kind_spans)}, {share:.1f} % of the paced window")
    # Does a checkpoint slow the commits beside it? Slow commits among those that ran beside
    # one, against the others (the disk's own stalls, which the other sessions' I/O moves).
    batches = {id(r["batch"]): r["batch"] for r in rows}.values()
    for kind, kind_spans in spans.items():
        beside = [b for b in batches if overlaps(b["written"], b["committed"], kind_spans)]
        apart = [b for b in batches if not overlaps(b["written"], b["committed"], kind_spans)]
        if not beside or not apart:
            continue
        line = []
        for slow_ms in (5.0, 10.0):
            a = sum((b["committed"] - b["written"]) * 1e3 > slow_ms for b in beside)
            n = sum((b["committed"] - b["written"]) * 1e3 > slow_ms for b in apart)
            line.append(
                f"over {slow_ms:.0f} ms {a}/{len(beside)} ({a / len(beside) * 100:.1f} %)"
                f" against {n}/{len(apart)} ({n / len(apart) * 100:.1f} %)"
            )
        print(f"commits beside a {kind} checkpoint: " + "; ".join(line))
    print("slowest 10 snapshots (ms: " + " / ".join(SNAPSHOT_STEPS) + "; overlapping):")
    for r in ordered[-10:]:
        print(f"  {r['total']:7.2f}: " + " / ".join(f"{r[s]:.1f}" for s in SNAPSHOT_STEPS)
              + f"; batch of {r['batch']['batch']}; " + ", ".join(causes(r)))  # fmt: skip


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
            times: list[tuple[float, float]] = []
            paced = drive(server.port, frames[args.messages :], 10_000, args.rate, times)
            cpu = server.cpu_seconds() - cpu0
            wal = sum(p.stat().st_size for p in workdir.rglob("*-wal")) / (1 << 20)
        finally:
            server.stop()
        text = trace_path.read_text() if trace_path.exists() else ""  # older code: no trace
        if args.keep:
            args.keep.write_text(json.dumps({"since": since, "times": times}) + "\n" + text)
        trace = [json.loads(line) for line in text.splitlines() if line]
    p50, p99 = statistics.median(paced) * 1e3, percentile(paced, 99) * 1e3
    print(
        f"paced {args.rate:.0f}/s for {args.seconds:.0f} s: p50 {p50:.2f} ms, p99 {p99:.2f} ms,"
        f" max {max(paced) * 1e3:.2f} ms; server CPU {cpu / len(paced) * 1e6:.0f} us/snapshot;"
        f" WAL {wal:.1f} MiB at the end"
    )
    report(trace, since)
    attribute(per_snapshot(times, trace, since), trace, since)


if __name__ == "__main__":
    main()
