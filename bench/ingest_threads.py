"""Where the daemon's CPU per snapshot goes, by thread, under bench/ingest.py's sustained load.

    .venv/bin/python bench/ingest_threads.py [--messages 6000] [--window 64]
        [--wrap none|cprofile|callgrind] [--out DIR]

The daemon of bench/ingest.py (`corespond run`, TCP STX/ETX EIDO feed, an ACK per snapshot
after the commit, SQLite WAL synchronous=FULL) pinned to CPU 0, driven with ``--window``
frames in flight. After a warm-up it measures ``--messages`` snapshots and prints, per
snapshot, the CPU time of each of the daemon's threads (from /proc; the threads are named
after their Python thread, so the reactor, the store writer and the checkpoints show apart).

``--wrap cprofile``: every thread runs under cProfile (timer: its thread's CPU time); the
profiles cover the measured snapshots only and are written to ``--out`` as ``<thread>.prof``,
and their top functions printed. For the shape only: the profiler multiplies the reactor's
time about fourfold, and the pool threads' waits in their queues showed up as time. For
shares, ``--py-spy PATH --py-spy-args=--gil`` (samples of the thread holding the GIL).
``--wrap callgrind``: the daemon runs under valgrind
(``--separate-threads=yes``, instrumentation on only while the measured snapshots go
through); prints the instructions per snapshot of each thread and of the whole process.
Use fewer messages there (about 1,500: valgrind is ~50 times slower).

What bench/ingest_stages.py cannot see is here: the socket, the reactor, the hand-over to
and from the writer thread, the WAL checkpoint thread and the kernel's time. The difference
between this run's instructions and ``ingest_stages.py --stage feed --batch 26`` (the same
code, the TCP feed's protocol and framing included, in one thread) is that part, less what
batch sizes move (the daemon forms batches of 25-29 under this load).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from ingest import daemon_config, drive, free_port, messages, pin  # noqa: E402

from corespond.daemon.store.writer import TRACE_ENV  # noqa: E402

START, STOP = signal.SIGUSR1, signal.SIGUSR2


# --- in the daemon's process ---------------------------------------------------------------


def child(out: str, profile: bool, switch: float | None, argv: list[str]) -> int:
    """Run ``corespond`` with named OS threads and, with ``profile``, cProfile on each thread:
    cleared at START, written at STOP (both signals come from the driver)."""
    profiles: dict[str, cProfile.Profile] = {}
    lock = threading.Lock()

    def name_os_thread(name: str) -> None:
        with contextlib.suppress(OSError):
            Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[-15:])

    original_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        name_os_thread(self.name)
        if not profile:
            original_run(self)
            return
        prof = cProfile.Profile(time.thread_time)
        with lock:
            profiles[self.name] = prof
        prof.enable()
        try:
            original_run(self)
        finally:
            prof.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    if switch is not None:
        sys.setswitchinterval(switch)
    name_os_thread("reactor")
    if profile:
        main = profiles["reactor"] = cProfile.Profile(time.thread_time)

        def start(*_: Any) -> None:
            with lock:
                for prof in profiles.values():
                    prof.clear()  # from this thread: the GIL makes it whole
            main.enable()

        def stop(*_: Any) -> None:
            main.disable()
            with lock:
                for name, prof in profiles.items():
                    stats = pstats.Stats(prof)
                    stats.dump_stats(os.path.join(out, f"{name}.prof"))

        signal.signal(START, start)
        signal.signal(STOP, stop)
    from corespond.daemon.cli import main as corespond

    return corespond(argv)


# --- in the driver --------------------------------------------------------------------------


def thread_cpu(pid: int) -> dict[str, tuple[float, float, int, int]]:
    """User and system CPU seconds, voluntary and involuntary context switches so far of
    each thread of ``pid``, by name (summed)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[float, float, int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = dict(
                line.split(":\t", 1) for line in (task / "status").read_text().splitlines()
            )
        except OSError:
            continue
        user, system, voluntary, involuntary = out.get(comm, (0.0, 0.0, 0, 0))
        out[comm] = (
            user + int(fields[11]) / tick,
            system + int(fields[12]) / tick,
            voluntary + int(status["voluntary_ctxt_switches"]),
            involuntary + int(status["nonvoluntary_ctxt_switches"]),
        )
    return out


def start_daemon(
    workdir: Path, wrap: str, log: Path | None = None, switch: float | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = daemon_config(workdir, port)
    notify = workdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(900)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(workdir)]
    if wrap == "cprofile":
        command.append("--profile")
    if switch is not None:
        command.append(f"--switch-interval={switch}")
    command += ["--", "run", "-c", str(config)]
    if wrap == "callgrind":
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={workdir / 'callgrind.out'}", *command,
        ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL if log is None else log.open("wb"),
        stderr=subprocess.DEVNULL if wrap == "callgrind" else None,
        env=dict(os.environ, NOTIFY_SOCKET=str(notify), **{TRACE_ENV: str(workdir / "trace")}),
        preexec_fn=lambda: pin(0),
    )
    while b"READY=1" not in sock.recv(4096):
        pass
    sock.close()
    return proc, port


def callgrind_totals(workdir: Path) -> dict[str, int]:
    """Instructions of each thread's callgrind dump (``callgrind.out-NN``)."""
    totals: dict[str, int] = {}
    for dump in sorted(workdir.glob("callgrind.out*")):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                totals[dump.name] = max(totals.get(dump.name, 0), int(line.split()[1]))
    return totals


def batch_sizes(trace: Path) -> list[int]:
    """The size of each ingest batch the store wrote (its trace, written when it stops)."""
    if not trace.exists():
        return []
    sizes = []
    for line in trace.read_text().splitlines():
        if line.startswith('{"batch":'):
            size = int(line.split(",", 1)[0].split(":")[1])
            if size:
                sizes.append(size)
    return sizes


def instrument(pid: int, on: bool) -> None:
    command = ["callgrind_control", "-i", "on" if on else "off", str(pid)]
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--wrap", choices=("none", "cprofile", "callgrind"), default="none")
    parser.add_argument("--out", type=Path, help="keep profiles and dumps here")
    parser.add_argument(
        "--switch-interval", type=float, help="sys.setswitchinterval in the daemon (seconds)"
    )
    parser.add_argument(
        "--py-spy", help="sample the measured snapshots with this py-spy (raw stacks to --out)"
    )
    parser.add_argument(
        "--py-spy-args", nargs="*", default=[], help="more py-spy options (--gil, --native)"
    )
    parser.add_argument("--log", type=Path, help="write the daemon's log lines here")
    parser.add_argument("--top", type=int, default=30, help="functions printed per profile")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        raise SystemExit(child(args.child, args.profile, args.switch_interval, args.rest))
    pin(1)
    frames = messages(args.warmup + args.messages)
    with tempfile.TemporaryDirectory(prefix="corespond-threads-") as tmp:
        workdir = args.out or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        proc, port = start_daemon(workdir, args.wrap, args.log, args.switch_interval)
        try:
            drive(port, frames[: args.warmup], args.window, None)
            if args.wrap == "cprofile":
                proc.send_signal(START)
            elif args.wrap == "callgrind":
                instrument(proc.pid, True)
            spy = None
            if args.py_spy:
                spy = subprocess.Popen(
                    [args.py_spy, "record", "--pid", str(proc.pid), "--format", "raw",
                     "--threads", "--nonblocking", "--rate", "1000", *args.py_spy_args,
                     "-o", str(workdir / "py-spy.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(1)  # py-spy attaches
            before, started = thread_cpu(proc.pid), time.perf_counter()
            drive(port, frames[args.warmup :], args.window, None)
            elapsed, after = time.perf_counter() - started, thread_cpu(proc.pid)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            if args.wrap == "cprofile":
                proc.send_signal(STOP)
                time.sleep(2)  # the daemon writes the profiles
            elif args.wrap == "callgrind":
                instrument(proc.pid, False)
        finally:
            proc.terminate()
            proc.wait(timeout=600)
        n = args.messages
        batches = batch_sizes(workdir / "trace")
        print(f"{n} snapshots in {elapsed:.2f} s ({n / elapsed:.0f}/s), window {args.window}, "
              f"wrap {args.wrap}; daemon CPU us per snapshot, by thread:")  # fmt: skip
        if batches:
            print(f"  store batches: {len(batches)} (warm-up included), mean size "
                  f"{sum(batches) / len(batches):.1f}, largest {max(batches)}")  # fmt: skip
        zero = (0.0, 0.0, 0, 0)
        spent = {
            name: [a - b for a, b in zip(after[name], before.get(name, zero), strict=True)]
            for name in after
        }
        print(f"  {'thread':<16} {'user':>8} {'system':>8} {'total':>8}   "
              "context switches per snapshot: voluntary, involuntary")  # fmt: skip
        spent["total"] = [sum(s[i] for s in spent.values()) for i in range(4)]
        for name in sorted(spent, key=lambda k: (k == "total", -sum(spent[k][:2]))):
            user, system, voluntary, involuntary = spent[name]
            if user + system > 0:
                print(f"  {name:<16} {user / n * 1e6:8.1f} {system / n * 1e6:8.1f} "
                      f"{(user + system) / n * 1e6:8.1f}   "
                      f"{voluntary / n:6.2f} {involuntary / n:6.2f}")  # fmt: skip
        if args.wrap == "callgrind":
            totals = callgrind_totals(workdir)
            print("instructions per snapshot, by thread dump:")
            for name, count in totals.items():
                if count:
                    print(f"  {name:<24} {count / n / 1e3:9.1f}k")
            print(f"  {'total':<24} {sum(totals.values()) / n / 1e3:9.1f}k")
        if args.wrap == "cprofile":
            for prof in sorted(workdir.glob("*.prof")):
                stats = pstats.Stats(str(prof))
                if stats.total_tt * 1e6 / n < 1:  # type: ignore[attr-defined]
                    continue
                print(f"\n=== {prof.stem}: {stats.total_tt * 1e6 / n:.1f} us per snapshot "  # type: ignore[attr-defined]
                      "(profiled CPU) ===")  # fmt: skip
                stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
