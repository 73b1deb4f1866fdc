"""Where the writer's time goes, per lane, from a daemon's ``CORESPOND_STORE_TRACE`` file.

    CORESPOND_STORE_TRACE=/tmp/trace.jsonl .venv/bin/python bench/dispatch.py --seconds 10
    .venv/bin/python bench/page_trace.py /tmp/trace.jsonl

(bench/dispatch.py's daemons all write the same path: the file holds the last phase's trace.)
The store traces every unit of work on its one writer thread: ingest batches, the page work
that rode them (``ride``), and page-lane and background jobs (``job``). For each kind this
prints p50/p99/max in ms of:

- wait: submitted -> running on the writer thread (queued behind other units, and the
  hand-off to the thread);
- run: its own time on the writer (a batch: its statements and commit; a ride: its savepoint);
- back: done -> its result handled on the reactor.

Then, for the page work that waited longest (the slowest 1 %), what the writer was doing
meanwhile: the milliseconds of each kind of unit that ran between the page work's submission
and its start. Code before the lanes traced batches only: their hand-off step (dispatched ->
thread) is then the time they queued in the thread pool behind paging and referral work.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def units(trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every unit of writer work, as kind, what, submitted, thread, done, back (and committed
    for work that rode a batch: its result waits for the batch's commit)."""
    out: list[dict[str, Any]] = []
    for t in trace:
        if "batch" in t:
            kind = "batch" if t["batch"] else "batch (rides only)"
            what, done = "ingest", "committed"
        elif "job" in t:
            kind, what, done = f"job:{t['job']}", t["what"], "done"
        elif "ride" in t:
            name = ".".join([n for n in t["ride"].split(".") if n != "<locals>"][-2:])
            kind = ("ride alone " if t["alone"] else "ride ") + name
            what, done = t["ride"], "done"
        else:
            continue
        unit = {"kind": kind, "what": what, "submitted": t["submitted"], "thread": t["thread"],
                "dispatched": t["dispatched"], "done": t[done], "back": t["back"]}  # fmt: skip
        if "ride" in t:
            unit["committed"] = t["committed"]
        out.append(unit)
    return out


def report(trace: list[dict[str, Any]]) -> None:
    all_units = units(trace)
    # From the first ingest batch on: start-up work (the roster's fixes) is not the load's.
    first = min((u["submitted"] for u in all_units if u["kind"] == "batch"), default=0.0)
    all_units = [u for u in all_units if u["submitted"] >= first]
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for u in all_units:
        by_kind[str(u["kind"])].append(u)
    print(f"{'kind':<30}{'count':>7}   wait p50/p99/max     run p50/p99/max    back p50/p99")
    for kind, rows in sorted(by_kind.items()):
        wait = [(float(r["thread"]) - float(r["submitted"])) * 1e3 for r in rows]
        run = [(float(r["done"]) - float(r["thread"])) * 1e3 for r in rows]
        back = [(float(r["back"]) - float(r.get("committed", r["done"]))) * 1e3 for r in rows]
        print(f"{kind[:30]:<30}{len(rows):>7}  {pct(wait, .5):6.2f} {pct(wait, .99):6.2f} "
              f"{max(wait):7.2f}  {pct(run, .5):6.2f} {pct(run, .99):6.2f} {max(run):7.2f}  "
              f"{pct(back, .5):6.2f} {pct(back, .99):6.2f}")  # fmt: skip
    handoff = [(float(r["thread"]) - float(r["dispatched"])) * 1e3 for r in by_kind["batch"]]
    if handoff:
        print(f"batch hand-off (dispatched -> thread) p50 {pct(handoff, .5):.2f}, "
              f"p99 {pct(handoff, .99):.2f}, max {max(handoff):.2f} ms")  # fmt: skip
    whats: dict[str, int] = defaultdict(int)
    for u in all_units:
        if str(u["kind"]).startswith("job"):
            whats[f"{u['kind']} {u['what']}"] += 1
    for what, count in sorted(whats.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {count:>6}  {what}")
    # What a page waits for (recording its submission is not).
    page_kinds = ("ride", "job:page")
    pages = [
        u
        for u in all_units
        if str(u["kind"]).startswith(page_kinds) and "_record_submissions" not in u["what"]
    ]
    if not pages:
        return
    pages.sort(key=lambda u: float(u["thread"]) - float(u["submitted"]))
    slow = pages[int(len(pages) * 0.99) :]
    ahead: dict[str, float] = defaultdict(float)
    for p in slow:
        start, end = float(p["submitted"]), float(p["thread"])
        for u in all_units:
            if u is p:
                continue
            a, b = max(start, float(u["thread"])), min(end, float(u["done"]))
            if b > a:
                ahead[f"{u['kind']} {u['what']}"] += (b - a) * 1e3 / len(slow)
    print(f"slowest 1 % of page work ({len(slow)}): writer time ahead of it, mean ms")
    for what, ms in sorted(ahead.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {ms:7.2f}  {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    args = parser.parse_args()
    lines = args.trace.read_text().splitlines()
    report([json.loads(line) for line in lines if line.strip()])


if __name__ == "__main__":
    main()
