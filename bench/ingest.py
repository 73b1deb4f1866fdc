"""Ingest benchmark: the real daemon in its own process, driven over TCP from this one.

    .venv/bin/python bench/ingest.py [--messages 30000] [--window 64] [--rate 300] [--seconds 10]

The daemon runs `corespond run` with an EIDO feed on a TCP listener (STX/ETX framing, an ACK
byte per message written only after the snapshot is durably committed) and SQLite in WAL mode
with synchronous=FULL. It is pinned to CPU 0; this client to CPU 1. Every message is a distinct,
realistic EIDO snapshot (3-4 KB: notes, persons, PIDF-LO location).

Two figures for each server:
- sustained: snapshots/s with `--window` messages in flight, and the send-to-ack latency;
- paced: p50/p99 latency at a fixed `--rate` (the design peak, 300/s) for `--seconds`;
- CPU us/snap: the server's CPU time (all threads, from /proc) over the sustained run, per
  snapshot: on a shared machine this moves far less than the throughput does;
- capacity: the sustained run again, last, with `--capacity-window` messages in flight (256)
  for `--capacity-messages` more. With 64 in flight on one connection the daemon's core waits:
  while a batch's fsync runs, the reactor has parsed every frame it was sent and the client
  sends no more until the ACKs come back. Group commit of concurrent snapshots needs
  concurrency to show what one core can take; more in flight means larger batches and longer
  waits (its p50/p99 are those of a saturated server, not of a CAD at its peak: the paced
  figures are).

The baseline is measured in the same run: bench/naive_server.py, the same parser and
classifier behind the same framing, but one ORM session and one commit per snapshot, as a
straightforward implementation would do. Peak RSS is the server's VmHWM.

Last, the daemon's garbage collections during the sustained and the paced runs (all threads:
collections per generation, the longest pause, p99, pauses over 5 ms), from its GC probe
(CORESPOND_GC_PROBE, daemon/memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STX, ETX, ACK = b"\x02", b"\x03", 0x06


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def messages(count: int, seed: int = 1) -> list[bytes]:
    """Distinct EIDO snapshots: incidents with three updates each, framed with STX/ETX."""
    from corespond.adapters.eido import eido_document
    from corespond.daemon.demo import incident_lifecycles

    rng = random.Random(seed)
    out: list[bytes] = []
    start = datetime(2026, 11, 1, tzinfo=UTC)
    n = 0
    while len(out) < count:
        for lifecycle in incident_lifecycles(rng, 200, start + timedelta(days=n), first=n * 200):
            for snap in lifecycle:
                out.append(STX + json.dumps(eido_document(snap)).encode() + ETX)
        n += 1
    return out[:count]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    probe: Path | None = None  # the daemon's GC probe file, written when it stops
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)  # perf_counter

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


def daemon_config(workdir: Path, port: int) -> Path:
    """The daemon's configuration for the benchmark (written into ``workdir``)."""
    config = workdir / "bench.yaml"
    config.write_text(
        f"""
state_dir: {workdir / "state"}
store: {{sqlite_synchronous: full, batch_max: 256}}
logging: {{level: info, format: json}}
feeds:
  bench:
    format: eido
    transport:
      type: tcp
      listen: {{host: 127.0.0.1, port: {port}}}
      framing: stx-etx
      ack: ack-nak
"""
    )
    return config


def start_daemon(workdir: Path) -> Server:
    port = free_port()
    config = daemon_config(workdir, port)
    notify = workdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(120)
    proc = subprocess.Popen(
        [sys.executable, "-m", "corespond.daemon.cli", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        env=dict(os.environ, NOTIFY_SOCKET=str(notify), CORESPOND_GC_PROBE=str(workdir / "gc")),
        preexec_fn=lambda: pin(0),
    )
    while b"READY=1" not in sock.recv(4096):
        pass
    sock.close()
    return Server("corespond (group commit, Core)", proc, port, workdir / "gc")


def start_naive(workdir: Path) -> Server:
    port = free_port()
    ready = workdir / "naive.ready"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "naive_server.py"), str(port),
         str(workdir / "naive.db"), str(ready)],
        preexec_fn=lambda: pin(0),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ready.exists():  # the naive server has no sd_notify; poll its ready file
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("naive server failed to start")
        time.sleep(0.05)
    return Server("naive (ORM, one commit per snapshot)", proc, port)


def drive(
    port: int,
    frames: list[bytes],
    window: int,
    rate: float | None,
    times: list[tuple[float, float]] | None = None,
) -> list[float]:
    """Send every frame, keeping at most ``window`` unacknowledged (or pacing at ``rate``);
    returns the send-to-ack latency of each, in seconds. ``times`` receives each frame's
    (sent, acknowledged) perf_counter times, in order: CLOCK_MONOTONIC, the daemon's clock
    too, so that bench/store_tail.py can place each snapshot in the daemon's trace."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent_at: deque[float] = deque()
    latencies: list[float] = []
    next_send = 0
    start = time.perf_counter()
    while len(latencies) < len(frames):
        now = time.perf_counter()
        can_send = next_send < len(frames) and len(sent_at) < window
        if can_send and rate is not None and now < start + next_send / rate:
            can_send = False
        if can_send:
            batch = []
            while next_send < len(frames) and len(sent_at) < window:
                if rate is not None and time.perf_counter() < start + next_send / rate:
                    break
                batch.append(frames[next_send])
                sent_at.append(time.perf_counter())
                next_send += 1
            sock.sendall(b"".join(batch))
            sock.setblocking(False)
        else:
            timeout = None
            if rate is not None and next_send < len(frames):
                timeout = max(0.0, start + next_send / rate - now)
            sock.settimeout(timeout)
        try:
            data = sock.recv(65536)
        except (BlockingIOError, TimeoutError):
            data = None
        sock.setblocking(True)
        if data == b"":
            raise SystemExit("server closed the connection")
        if data:
            acked = time.perf_counter()
            for byte in data:
                if byte != ACK:
                    raise SystemExit(f"server refused a message (byte {byte:#x})")
                sent = sent_at.popleft()
                latencies.append(acked - sent)
                if times is not None:
                    times.append((sent, acked))
    sock.close()
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(server: Server, frames: list[bytes], args: argparse.Namespace) -> dict[str, float]:
    warm = frames[: min(500, len(frames) // 10)]
    drive(server.port, warm, args.window, None)
    body = frames[len(warm) :]
    split = len(body) - int(args.rate * args.seconds)
    sustained, paced_frames = body[:split], body[split:]
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    lat = drive(server.port, sustained, args.window, None)
    elapsed, cpu = time.perf_counter() - t0, server.cpu_seconds() - cpu0
    server.windows["sustained"] = (t0, t0 + elapsed)
    t1 = time.perf_counter()
    paced = drive(server.port, paced_frames, 10_000, args.rate)
    server.windows[f"paced @{args.rate:.0f}/s"] = (t1, time.perf_counter())
    return sustained_figures(server, lat, elapsed, cpu, len(sustained)) | {
        "paced_p50_ms": statistics.median(paced) * 1000,
        "paced_p99_ms": percentile(paced, 99) * 1000,
    }


def measure_capacity(server: Server, frames: list[bytes], window: int) -> dict[str, float]:
    """The sustained run again with ``window`` frames in flight (after :func:`measure`)."""
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    lat = drive(server.port, frames, window, None)
    elapsed, cpu = time.perf_counter() - t0, server.cpu_seconds() - cpu0
    server.windows[f"capacity, {window} in flight"] = (t0, t0 + elapsed)
    return sustained_figures(server, lat, elapsed, cpu, len(frames))


def sustained_figures(
    server: Server, lat: list[float], elapsed: float, cpu: float, count: int
) -> dict[str, float]:
    return {
        "rate": count / elapsed,
        "cpu_us": cpu / count * 1e6,
        "sustained_p50_ms": statistics.median(lat) * 1000,
        "sustained_p99_ms": percentile(lat, 99) * 1000,
        "rss_mib": server.peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--naive-messages", type=int, default=8_000)
    parser.add_argument("--capacity-window", type=int, default=256)
    parser.add_argument("--capacity-messages", type=int, default=15_000)
    args = parser.parse_args()
    pin(1)
    paced_count = int(args.rate * args.seconds)
    total = args.messages + paced_count + args.capacity_messages
    print(f"generating {total} EIDO snapshots ...", flush=True)
    frames = messages(total)
    size = statistics.mean(len(f) for f in frames)
    print(f"mean message size {size:.0f} bytes; window {args.window}; paced at {args.rate:.0f}/s "
          f"for {args.seconds:.0f} s; server on CPU 0, client on CPU 1\n", flush=True)  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    capacity: dict[str, dict[str, float]] = {}
    gc_lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="corespond-bench-") as tmp:
        # The naive server's capacity run is shorter: one commit each, it gains nothing from
        # more in flight, and a long run of it tells no more.
        runs = (
            (start_naive, args.naive_messages, args.capacity_messages // 10),
            (start_daemon, args.messages, args.capacity_messages),
        )
        for start, count, capacity_count in runs:
            workdir = Path(tmp) / start.__name__
            workdir.mkdir()
            server = start(workdir)
            try:
                n = count + paced_count
                results[server.name] = measure(server, frames[:n], args)
                more = frames[n : n + capacity_count]
                window = args.capacity_window
                capacity[server.name] = measure_capacity(server, more, window)
            finally:
                server.stop()
            gc_lines += gc_summary(server)
    header = f"{'server':<40} {'snapshots/s':>11} {'p50 ms':>7} {'p99 ms':>7} " \
             f"{'@' + str(int(args.rate)) + '/s p50':>10} {'p99':>7} {'peak RSS':>9} " \
             f"{'CPU us/snap':>11}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<40} {r['rate']:>11.0f} {r['sustained_p50_ms']:>7.2f} "
              f"{r['sustained_p99_ms']:>7.2f} {r['paced_p50_ms']:>10.2f} {r['paced_p99_ms']:>7.2f} "
              f"{r['rss_mib']:>6.0f} MiB {r['cpu_us']:>11.0f}")  # fmt: skip
    print(f"capacity: the sustained run again with {args.capacity_window} in flight")
    for name, r in capacity.items():
        print(f"{name:<40} {r['rate']:>11.0f} {r['sustained_p50_ms']:>7.2f} "
              f"{r['sustained_p99_ms']:>7.2f} {'-':>10} {'-':>7} "
              f"{r['rss_mib']:>6.0f} MiB {r['cpu_us']:>11.0f}")  # fmt: skip
    naive, tuned = list(results.values())
    print(f"\ntuned / naive throughput: {tuned['rate'] / naive['rate']:.1f}x "
          f"({args.window} in flight)")  # fmt: skip
    for line in gc_lines:
        print(line)


def gc_summary(server: Server) -> list[str]:
    """One line per measuring window: the daemon's collections in it."""
    if server.probe is None or not server.probe.exists():
        return []
    from corespond.daemon.memory import pause_summary, read_probe

    records: list[dict[str, Any]] = read_probe(str(server.probe))
    return [
        f"GC in corespond, {name}: {pause_summary(records, *window).line()}"
        for name, window in server.windows.items()
    ]


if __name__ == "__main__":
    main()
