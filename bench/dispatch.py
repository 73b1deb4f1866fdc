"""Dispatch benchmark: CAD snapshot to page at a local WCTP endpoint, with and without referrals.

    .venv/bin/python bench/dispatch.py [--rate 300] [--seconds 30] [--clinicians 500]
                                        [--no-referrals] [--postgres]

The daemon (the real Corespond app: HTTP feed, rules, SQLite store, paging with a roster of
``--clinicians`` clinicians who all have a location fix, the WCTP gateway, referrals) runs in a
child process on the real reactor, as ``corespond run`` does. This process is the CAD and the
carrier: it posts distinct snapshots to the HTTP feed at ``--rate`` per second (5% of them
behavioral-health calls inside the program's zone, the rest calls no rule sends anyone to) over
8 keep-alive connections, and serves the WCTP endpoint the daemon submits pages to. Both
timestamps come from this process's clock:

- stored: from the snapshot's scheduled send time to the feed's 200 (sent after the commit);
- page: from the behavioral-health snapshot's scheduled send time to the moment its
  wctp-SubmitRequest has arrived at the endpoint (the snapshot's call type carries a marker
  that the page text repeats);
- from the feed's 200 to the page: paging's own share (the snapshot is committed when the
  feed answers; the page may even arrive first: the 200 travels back while paging works).

Three phases, each with a fresh database and daemon, in the same run:
1. no paging: the same load, a daemon without the paging section (CAD to stored only);
2. paging: the daemon pages (the baseline of page latency);
3. paging + referrals: as 2, while the daemon builds referrals without pause
   (ReferralService.create in a loop: hl7apy build and validation in its builder process, queued
   and sent to a local MLLP peer, python-hl7's asyncio server in another process).
   Phase 3 also prints the time each page could wait behind referral work
   (bench/referrals.py, ``referral_time_in_pages``), counted by wall clock and by the
   referral units' own thread CPU, and the units of the page that could wait longest.

``--no-referrals`` leaves phase 3 out; ``--only-referrals`` runs phase 3 alone (its "time a
page could wait behind referral work", for runs of old and new code in turn). ``--postgres``
stores in PostgreSQL instead of SQLite: a server of this machine's binaries (Debian
``postgresql``) started for the run in a temporary directory, with its durable defaults (fsync,
synchronous_commit on), a fresh database per phase.

Latency is measured from the scheduled send time (no coordinated omission). The machine may be
shared: compare phases of one run, not runs. The daemon's CPU time (all its threads, read from
/proc when the load ends) is printed too: paging's minus no paging's, per page, is what paging
costs the daemon, a figure that a busy machine moves far less than latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import glob
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from referrals import PEER, free_port, referral_time_in_pages

FEED_TOKEN = "bench-feed-token-0123456789"
ZONE = (-97.9, 30.1, -97.5, 30.5)  # lon/lat box of the program's zone
CONNECTIONS = 8
MARK = re.compile(rb"BENCH(\d{7})")


# --- the daemon, in its own process ------------------------------------------------------------


def write_config(
    tmp: Path,
    *,
    paging: bool,
    wctp_port: int,
    mllp_port: int,
    clinicians: int,
    store_url: str | None = None,
) -> Path:
    (tmp / "feed.token").write_text(FEED_TOKEN + "\n")
    west, south, east, north = ZONE
    zone = {
        "type": "Polygon",
        "coordinates": [
            [[west, south], [east, south], [east, north], [west, north], [west, south]]
        ],
    }
    people = "".join(
        f"  - {{id: c-{n:04d}, name: Bench Clinician {n}, program: metro,\n"
        f'     endpoints: [{{gateway: wctp, address: "55{n:05d}"}}]}}\n'
        for n in range(clinicians)
    )
    (tmp / "roster.yaml").write_text(
        f"timezone: UTC\nclinicians:\n{people}programs:\n  - id: metro\n"
        f"    zones: [{json.dumps(zone)}]\n"
    )
    section = (
        f"paging: {{roster: {tmp / 'roster.yaml'}}}\n"
        "gateways:\n"
        f"  wctp: {{type: wctp, url: 'http://127.0.0.1:{wctp_port}/wctp', sender_id: bench,\n"
        "         max_in_flight: 16, retries: 0}\n"
        if paging
        else ""
    )
    config = tmp / "corespond.yaml"
    config.write_text(
        f"state_dir: {tmp / 'state'}\n"
        "logging: {level: warning, format: json}\n"
        f"store: {{url: '{store_url or 'sqlite:///' + str(tmp / 'bench.db')}'}}\n"
        "feeds:\n  cad:\n    format: jsonl\n"
        "    transport: {type: http, listen: {host: 127.0.0.1, port: 0}, path: /feeds/cad,\n"
        f"                token_file: {tmp / 'feed.token'}}}\n"
        f"{section}"
        "referrals:\n  sending_application: CORESPOND\n  sending_facility: COUNTY-BH\n"
        f"  providers:\n    csu: {{host: 127.0.0.1, port: {mllp_port}, "
        "receiving_application: BHRECV, receiving_facility: CSU}\n"
    )
    return config


def run_daemon(config_path: Path, referral_load: bool, gc_policy: str) -> None:
    """The child: the app on the global reactor (this is an entry point), then referrals."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    from corespond.adapters.hl7_referral import Person
    from corespond.daemon.app import Corespond
    from corespond.daemon.clock import Clock
    from corespond.daemon.config import load_config
    from corespond.daemon.feeds import HttpListener
    from corespond.daemon.log import configure_logging
    from corespond.daemon.memory import CollectorPolicy, CollectorSettings, GcProbe
    from corespond.daemon.referrals import ReferralRequest
    from corespond.daemon.responders import LocationFix
    from corespond.daemon.stall_probe import StallProbe

    config = load_config(config_path)
    configure_logging(config.logging.level, "json", sys.stderr)
    probe = GcProbe.from_environment()
    memory = None  # --gc-policy off: no freezing at all
    if gc_policy != "off":  # start: freeze once after start-up, as `corespond run` did in stop 11
        settings = CollectorSettings() if gc_policy == "on" else CollectorSettings((), 1e9)
        memory = CollectorPolicy(Clock(reactor), settings=settings)
    app = Corespond(config, reactor, memory=memory)
    state = {"running": True, "referrals": 0}
    stalls = StallProbe.from_environment(reactor)  # CORESPOND_STALL_PROBE: the late reactor
    if stalls is not None:
        reactor.callWhenRunning(stalls.start)  # type: ignore[attr-defined]

    async def referrals() -> None:
        n = 0
        while state["running"]:
            request = ReferralRequest(
                incident_ref=f"INC-{n:06d}", provider="csu", service_type="crisis-stabilization",
                referring_clinician="CLIN-17", urgency="stat",
                person=Person("Testperson", "Alex", "1990-01-01", "U", "555-0100", "1 Main St"),
                summary="Synthetic summary for the benchmark, two sentences.\nSecond line.",
            )  # fmt: skip
            await app.referrals.create(request)
            n += 1
            state["referrals"] = n

    async def start() -> None:
        await app.start()
        if app.paging is not None:
            rng = random.Random(7)
            now = datetime.now(UTC)
            west, south, east, north = ZONE
            for cid in app.paging.roster.clinicians:
                lat, lon = rng.uniform(south, north), rng.uniform(west, east)
                await app.paging.record_fix(LocationFix(cid, lat, lon, now, "bench"))
        listener = app.feeds.find("http", 0)
        assert isinstance(listener, HttpListener)
        if probe is not None:
            probe.census("ready")
        print(f"ready {listener.port}", flush=True)
        if referral_load:
            reactor.callLater(0, lambda: ensureDeferred(referrals()))  # type: ignore[attr-defined]

    async def stop() -> None:
        state["running"] = False
        if probe is not None:
            probe.census("warm", owners=True)
        await app.stop()
        if probe is not None:
            probe.close()
        print(f"referrals {state['referrals']}", flush=True)

    reactor.callWhenRunning(lambda: ensureDeferred(start()))  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", lambda: ensureDeferred(stop()))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


# --- the CAD and the carrier, in this process --------------------------------------------------


@dataclass
class Phase:
    name: str
    stored: list[float] = field(default_factory=list)
    page: list[float] = field(default_factory=list)
    after_ack: list[float] = field(default_factory=list)
    sent_bh: int = 0
    referrals: int = 0
    seconds: float = 0.0
    cpu: float = 0.0  # the daemon process's CPU seconds (all threads) from ready to the end
    windows: list[tuple[float, float]] = field(default_factory=list)  # send -> page, per page
    waited: tuple[Any, ...] = ()  # per page: behind referral work (see referral_time_in_pages)
    window: tuple[float, float] = (0.0, 0.0)  # perf_counter seconds of the load
    gc: list[dict[str, Any]] = field(default_factory=list)  # the daemon's GC probe records
    rss: tuple[float, float] = (0.0, 0.0)  # the daemon's resident MiB when ready, at the end


def process_cpu(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def snapshots(count: int, rate_bh: float, seed: int) -> list[tuple[int | None, bytes]]:
    """(marker number or None, JSON line) for ``count`` distinct snapshots."""
    from corespond.daemon.snapshot import GeoPoint, Location, Note, Snapshot, snapshot_to_json

    rng = random.Random(seed)
    west, south, east, north = ZONE
    now = datetime.now(UTC)
    out: list[tuple[int | None, bytes]] = []
    every = round(1 / rate_bh)
    for n in range(count):
        bh = n % every == every - 1
        snap = Snapshot(
            incident_id=f"urn:emergency:uid:incidentid:bench{seed}-{n}:psap.test.invalid",
            updated_at=now,
            call_type=f"EDP BENCH{n:07d}" if bh else "TRAFFIC STOP",  # a page shows 40 chars
            call_type_code="EDP" if bh else "TS",
            apco_type="EDP" if bh else "TRAFFIC",
            agency="police.test.invalid",
            notes=(Note("RP states brother hearing voices" if bh else "plate check", now),),
            location=Location(GeoPoint(rng.uniform(south, north), rng.uniform(west, east))),
        )
        out.append((n if bh else None, json.dumps(snapshot_to_json(snap)).encode()))
    return out


async def read_http(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length, chunked = 0, False
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    if not chunked:
        return head, await reader.readexactly(length) if length else b""
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        body += (await reader.readexactly(size + 2))[:-2]
    await reader.readuntil(b"\r\n")  # the empty trailer
    return head, body


class WctpEndpoint:
    """Takes every SubmitRequest, notes when the marked page arrived, confirms it."""

    def __init__(self) -> None:
        from corespond.adapters.wctp import build_confirmation

        self.arrived: dict[int, float] = {}
        body = build_confirmation(200, "Message accepted", success=True)
        self.answer = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                _head, body = await read_http(reader)
                at = time.perf_counter()
                found = MARK.search(body)
                if found:
                    self.arrived.setdefault(int(found.group(1)), at)
                writer.write(self.answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def drive(port: int, load: list[tuple[int | None, bytes]], rate: float, phase: Phase,
                endpoint: WctpEndpoint) -> None:  # fmt: skip
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    scheduled: dict[int, float] = {}
    head = (f"POST /feeds/cad HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {FEED_TOKEN}"
            "\r\nContent-Type: application/json\r\n").encode()  # fmt: skip

    acked: dict[int, float] = {}

    async def one(at: float, body: bytes, marker: int | None) -> None:
        reader, writer = await pool.get()
        writer.write(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status, _ = await read_http(reader)
        phase.stored.append(time.perf_counter() - at)
        if marker is not None:
            acked[marker] = time.perf_counter()
        assert status.startswith(b"HTTP/1.1 200"), status
        pool.put_nowait((reader, writer))

    start = time.perf_counter() + 0.1
    tasks = []
    phase.window = (start, float("inf"))
    # This process's own collector stays out of the window: a full collection here walks
    # every task still held (thousands) and stalled sending for 30-50 ms about 5 s in, which
    # the daemon's trace showed as a gap with no snapshot arriving and this bench counted as
    # page latency. What it allocates in 20-30 s is reclaimed when the collector is back.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        for i, (marker, body) in enumerate(load):
            at = start + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the load generator, not waiting for a result
            if marker is not None:
                scheduled[marker] = at
            tasks.append(asyncio.create_task(one(at, body, marker)))
        await asyncio.gather(*tasks)
    finally:
        gc.enable()
        gc.unfreeze()
    phase.seconds = time.perf_counter() - start
    phase.sent_bh = len(scheduled)
    deadline = time.perf_counter() + (30 if phase.name != "no paging" else 0)
    while len(endpoint.arrived) < len(scheduled) and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)  # the last pages are still on their way
    phase.window = (start, time.perf_counter())
    phase.page = [endpoint.arrived[m] - at for m, at in scheduled.items() if m in endpoint.arrived]
    phase.windows = [(at, endpoint.arrived[m]) for m, at in scheduled.items()
                     if m in endpoint.arrived]  # fmt: skip
    # Paging's own share: from the feed's answer (the snapshot committed) to the page.
    phase.after_ack = [endpoint.arrived[m] - acked[m] for m in acked if m in endpoint.arrived]
    while not pool.empty():
        pool.get_nowait()[1].close()


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the run (durable settings); yields its URL without a database."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if not found:
        raise SystemExit("--postgres needs the PostgreSQL server binaries (Debian postgresql)")
    bindir = Path(found[0]).parent
    root = Path(tempfile.mkdtemp(prefix="corespond-bench-pg-"))
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, LC_ALL="C", HOME=str(root))
    data = root / "data"

    def run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, env=env, **run_as)

    run(str(bindir / "initdb"), "-D", str(data), "-U", "corespond", "--auth=trust", "-E", "UTF8")
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w",
        "start")  # fmt: skip
    try:
        yield f"postgresql+psycopg://corespond@127.0.0.1:{port}"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server: str, name: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{server}/{name}"


async def run_phase(name: str, args: argparse.Namespace, wctp_port: int, mllp_port: int,
                    endpoint: WctpEndpoint, seed: int, pg: str | None) -> Phase:  # fmt: skip
    phase = Phase(name)
    endpoint.arrived.clear()
    load = snapshots(int(args.rate * args.seconds), 0.05, seed)
    with tempfile.TemporaryDirectory() as tmp:
        url = fresh_database(pg, f"bench_{seed}") if pg else None
        config = write_config(Path(tmp), paging=name != "no paging", wctp_port=wctp_port,
                              mllp_port=mllp_port, clinicians=args.clinicians,
                              store_url=url)  # fmt: skip
        migrate = [sys.executable, "-m", "corespond.daemon.cli", "db", "upgrade", "-c", str(config)]
        subprocess.run(migrate, check=True, capture_output=True)
        # Referral work's share of each page: the store's trace and the referral side's
        # reactor spans (bench/referrals.py, referral_time_in_pages).
        referral_load = name == "paging + referrals"
        trace = os.environ.get("CORESPOND_STORE_TRACE") or str(Path(tmp) / "trace.jsonl")
        probe = Path(tmp) / "gc.jsonl"  # the daemon's GC pauses and censuses (daemon/memory.py)
        env = dict(os.environ, CORESPOND_GC_PROBE=str(probe))
        if referral_load:
            env["CORESPOND_STORE_TRACE"] = trace
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--daemon", str(config),
            *(["--referral-load"] if referral_load else []),
            "--gc-policy", args.gc_policy,
            *(["--switch-interval", str(args.switch_interval)] if args.switch_interval else []),
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )  # fmt: skip
        assert child.stdout is not None
        try:
            line = (await child.stdout.readline()).decode().split()
            assert line and line[0] == "ready", line
            print(f"{name}: daemon ready, driving", file=sys.stderr, flush=True)
            ready_cpu = process_cpu(child.pid)  # start-up (imports, roster, fixes) left out
            ready_rss = resident_mib(child.pid)
            await drive(int(line[1]), load, args.rate, phase, endpoint)
            print(f"{name}: {len(phase.stored)} stored, {len(phase.page)} pages", file=sys.stderr,
                  flush=True)  # fmt: skip
            phase.cpu = process_cpu(child.pid) - ready_cpu
            phase.rss = (ready_rss, resident_mib(child.pid))
            child.send_signal(signal.SIGTERM)
            out = (await child.stdout.read()).decode().split()
            await child.wait()
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        if "referrals" in out:
            phase.referrals = int(out[out.index("referrals") + 1])
        if referral_load:
            phase.waited = referral_time_in_pages(Path(trace), phase.windows)
        if probe.exists():
            from corespond.daemon.memory import read_probe

            phase.gc = read_probe(str(probe))
    return phase


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def bench(args: argparse.Namespace) -> list[Phase]:
    endpoint = WctpEndpoint()
    server = await asyncio.start_server(endpoint.serve, "127.0.0.1", 0)
    wctp_port = server.sockets[0].getsockname()[1]
    mllp_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "peer.py"
        script.write_text(PEER)
        peer = subprocess.Popen([sys.executable, str(script), str(mllp_port)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        names = ["no paging", "paging"] + ([] if args.no_referrals else ["paging + referrals"])
        if args.only_referrals:
            names = ["paging + referrals"]
        try:
            assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
            phases = []
            with postgres_server() if args.postgres else contextlib.nullcontext() as pg:
                for seed, name in enumerate(names):
                    phases.append(
                        await run_phase(name, args, wctp_port, mllp_port, endpoint, seed, pg)
                    )
        finally:
            peer.terminate()
            peer.wait()
            server.close()
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clinicians", type=int, default=500)
    parser.add_argument("--no-referrals", action="store_true", help="leave phase 3 out")
    parser.add_argument("--only-referrals", action="store_true", help="run phase 3 alone")
    parser.add_argument("--postgres", action="store_true", help="store in PostgreSQL")
    parser.add_argument("--gc-policy", choices=["on", "start", "off"], default="on",
                        help="the daemon's collector policy (daemon/memory.py): on; start: "
                        "freeze once after start-up only; off: never freeze")  # fmt: skip
    parser.add_argument(
        "--gc-census", action="store_true",
        help="print what the daemon's collector tracks at each phase's end",
    )  # fmt: skip
    parser.add_argument(
        "--switch-interval", type=float,
        help="sys.setswitchinterval in the daemon, in seconds (Python's default: 0.005)",
    )  # fmt: skip
    parser.add_argument("--daemon", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--referral-load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.daemon is not None:
        if args.switch_interval:
            sys.setswitchinterval(args.switch_interval)
        run_daemon(args.daemon, args.referral_load, args.gc_policy)
        return
    phases = asyncio.run(bench(args))
    print(f"load: {args.rate:.0f} snapshots/s for {args.seconds:.0f} s, 5% behavioral-health, "
          f"roster of {args.clinicians} clinicians (all with a fix), "
          f"{'PostgreSQL' if args.postgres else 'SQLite'}, GC policy {args.gc_policy}")  # fmt: skip
    print(f"{'phase':<20} {'stored p50':>10} {'p99':>8} {'page p50':>9} {'p99':>8} "
          f"{'max':>8} {'pages':>9} {'referrals/s':>11}")  # fmt: skip
    for p in phases:
        pages = f"{len(p.page)}/{p.sent_bh}" if p.name != "no paging" else "-"
        page = f"{'-':>9} {'-':>8} {'-':>8}"
        if p.page:
            page = (f"{pct(p.page, 0.5):>9.1f} {pct(p.page, 0.99):>8.1f} "
                    f"{max(p.page) * 1000:>8.1f}")  # fmt: skip
        print(f"{p.name:<20} {pct(p.stored, 0.5):>10.1f} {pct(p.stored, 0.99):>8.1f} {page} "
              f"{pages:>9} {p.referrals / p.seconds:>11.1f}")  # fmt: skip
    base, loaded = phases[min(1, len(phases) - 1)], phases[-1]
    if loaded is not base and base.page and loaded.page:
        added = pct(loaded.page, 0.99) - pct(base.page, 0.99)
        print(f"referral building adds {added:+.1f} ms to page p99 "
              f"(p50 {pct(loaded.page, 0.5) - pct(base.page, 0.5):+.1f} ms)")  # fmt: skip
    for p in phases:
        if p.waited:
            parts = ", ".join(
                f"{part} p50 {pct(times, 0.5):.2f} p99 {pct(times, 0.99):.2f} "
                f"max {max(times, default=0) * 1e3:.2f}"
                for part, times in zip(("writer", "reactor", "either"), p.waited, strict=False)
            )
            waited = sum(t > 0 for t in p.waited[2])
            print(f"{p.name}: time a page could wait behind referral work ({waited} of "
                  f"{len(p.waited[2])} pages at all): {parts}")  # fmt: skip
            for what, seconds in list(p.waited[3].items())[:6]:
                print(f"  slowest 1 %: {seconds * 1e3:6.2f}  {what}")
            own = p.waited[4]
            print(f"  either, by the units' own CPU: p50 {pct(own, 0.5):.2f} "
                  f"p99 {pct(own, 0.99):.2f} max {max(own, default=0) * 1e3:.2f}")  # fmt: skip
            for counted, what, length, cpu in p.waited[5][:4]:
                print(f"  the page with the most: {counted * 1e3:.2f} of {what} "
                      f"(the unit: {length * 1e3:.2f} long, {cpu * 1e3:.2f} of CPU)")
    for p in phases:
        if p.after_ack:
            print(f"{p.name}: from the feed's 200 to the page p50 {pct(p.after_ack, 0.5):.1f}, "
                  f"p99 {pct(p.after_ack, 0.99):.1f}")  # fmt: skip
    quiet, paging = phases[0], phases[min(1, len(phases) - 1)]
    if paging is not quiet and paging.page:
        # The same load with and without paging, from ready to the last page: the difference
        # is what the pages cost, a figure other processes move far less than latency.
        per_page = (paging.cpu - quiet.cpu) / len(paging.page) * 1000
        print(f"daemon CPU: no paging {quiet.cpu:.1f} s, paging {paging.cpu:.1f} s: "
              f"{per_page:.1f} ms per page")  # fmt: skip
    print_gc(phases, args)
    print("all figures in milliseconds")


def print_gc(phases: list[Phase], args: argparse.Namespace) -> None:
    """The daemon's garbage collections during the load (all threads), and with --gc-census
    what it tracks when warm: the objects a full collection walks."""
    from corespond.daemon.memory import pause_summary

    for p in phases:
        if not p.gc:
            continue
        print(f"{p.name}: GC during the load: {pause_summary(p.gc, *p.window).line()}")
        census = {c["census"]: c for c in p.gc if "census" in c}
        if "ready" in census and "warm" in census:
            ready, warm = census["ready"], census["warm"]
            per_k = (warm["tracked"] - ready["tracked"]) / max(1, len(p.stored)) * 1000
            print(f"{p.name}: tracked objects not frozen: {ready['tracked']} when ready, "
                  f"{warm['tracked']} at the end ({per_k:+.0f} per 1,000 snapshots); "
                  f"frozen {warm['frozen']}; resident {p.rss[0]:.0f} MiB when ready, "
                  f"{p.rss[1]:.0f} MiB at the end")  # fmt: skip
            if args.gc_census:
                print(json.dumps({"phase": p.name, "ready": ready, "warm": warm}, indent=1))


if __name__ == "__main__":
    main()
