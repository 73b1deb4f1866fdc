"""The disk's own durable-write latency: the floor under any send-to-ack p99 at synchronous=FULL.

    .venv/bin/python bench/fsync_floor.py [--rate 300] [--seconds 10] [--pages 4]
        [--page-size 4096] [--dir /var/tmp]

What a WAL commit of SQLite with synchronous=FULL asks of the disk, without SQLite: write
``--pages`` frames of ``--page-size`` bytes (and their 24-byte headers, as SQLite writes them:
two pwrites a frame) at the next offset of a preallocated file that is reused from its start,
as the WAL is after a checkpoint, then fdatasync it. Paced at ``--rate`` commits a second (one
snapshot per batch, as at 300 snapshots/s), or back to back with ``--rate 0``. Prints the
latency of each commit's writes and fdatasync: p50, p99, p99.9 and max, in milliseconds.
A daemon that acknowledges only after such a commit cannot have a lower p99 than this one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HEADER = 24
FILE_BYTES = 4 << 20  # a WAL that a timer checkpoints twice a second stays about this size


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def commits(directory: str, rate: float, seconds: float, pages: int, page_size: int) -> list[float]:
    """Seconds per commit (writes plus fdatasync), ``rate`` a second for ``seconds``."""
    frame = HEADER + page_size
    page, header = os.urandom(page_size), os.urandom(HEADER)
    latencies: list[float] = []
    fd, path = tempfile.mkstemp(prefix="corespond-fsync-", dir=directory)
    try:
        os.write(fd, b"\0" * FILE_BYTES)  # written and synced once: later commits overwrite
        os.fsync(fd)
        offset = 0
        count = int(rate * seconds) if rate > 0 else 2000
        start = time.perf_counter()
        for i in range(count):
            if rate > 0:  # paced: wait for this commit's turn, without drifting
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            if offset + pages * frame > FILE_BYTES:
                offset = 0
            t0 = time.perf_counter()
            for _ in range(pages):
                os.pwrite(fd, header, offset)
                os.pwrite(fd, page, offset + HEADER)
                offset += frame
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300.0, help="commits/s; 0: back to back")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pages", type=int, default=4, help="WAL frames per commit")
    parser.add_argument("--page-size", type=int, default=4096, help="bytes a frame's page")
    parser.add_argument("--dir", default="/var/tmp", help="a directory on the database's disk")
    args = parser.parse_args()
    ms = [s * 1e3 for s in commits(args.dir, args.rate, args.seconds, args.pages, args.page_size)]
    pace = f"{args.rate:.0f}/s" if args.rate > 0 else "back to back"
    print(
        f"fdatasync after {args.pages} frames of {args.page_size} B, {len(ms)} commits {pace}"
        f" in {args.dir}: "
        f"p50 {percentile(ms, 50):.2f} ms, p99 {percentile(ms, 99):.2f} ms, "
        f"p99.9 {percentile(ms, 99.9):.2f} ms, max {max(ms):.2f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
