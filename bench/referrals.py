"""Referral delivery benchmark: our outbox worker against python-hl7's MLLP client, one peer.

    .venv/bin/python bench/referrals.py [--referrals 300] [--rounds 3]

One loopback peer for both: python-hl7's asyncio MLLP server (a separate process) that ACKs
every message AA. Both senders send the same stored REF^I12 messages, one in flight.

- corespond: the daemon's ReferralWorker on the Twisted reactor, over SQLite (WAL, FULL): each
  referral is claimed from the outbox, sent, its ACK matched by MSA-2 and the result committed
  (delivered, acknowledged and committed), one message in flight; the commit of a result runs
  while the next message is on the wire, results grouped (``referrals.claim_ahead``, 8);
- baseline: python-hl7's asyncio client (`hl7.mllp.open_hl7_connection`) writing the same
  messages and reading each ACK, with no database at all.

Each side runs in a process of its own, started the same way (interpreter start-up and imports
are outside the timed window of both), in rounds that alternate which side goes first; between
rounds the outbox is reset to due. Each round prints both rates, their ratio and each side's
CPU per message; the summary is the median ratio. Both sides connect inside the timed window.
``--variant old:src=DIR`` also runs our side from another checkout (DIR/corespond/{daemon,
adapters,rules}) every round: old and new code interleaved in the same minutes; ``switch=S``
(sys.setswitchinterval) and ``claim=N`` (claim_ahead) vary the rest.

Also printed: hl7apy build rate (one thread) for the first REF^I12 messages the run queues
(the rest are copies with their own MSH-10, referral and incident ids; ``--build-all`` builds
every one with hl7apy, as before).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PEER = textwrap.dedent(
    """
    import asyncio, sys
    from hl7.mllp import start_hl7_server

    async def handle(reader, writer):
        try:
            while not writer.is_closing():
                msg = await reader.readmessage()
                writer.writemessage(msg.create_ack("AA"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    async def main(port):
        async with await start_hl7_server(handle, host="127.0.0.1", port=port,
                                          limit=16 * 1024 * 1024) as server:
            print("ready", flush=True)
            await server.serve_forever()

    asyncio.run(main(int(sys.argv[1])))
    """
)
BUILT_WITH_HL7APY = 20  # messages built for real (the build rate); the rest are copies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(port: int, claim_ahead: int = 8) -> Any:
    from corespond.daemon.config import ProviderConfig, ReferralsConfig

    return ReferralsConfig(
        sending_application="CORESPOND",
        sending_facility="COUNTY-BH",
        providers=(
            ProviderConfig(
                "csu", "127.0.0.1", port, receiving_application="BHRECV", receiving_facility="CSU"
            ),
        ),
        poll_interval=0.5,
        claim_ahead=claim_ahead,
    )


def queue_referrals(url: str, count: int, port: int, build_all: bool) -> float:
    """Queue ``count`` referrals; the hl7apy build + validate + queue rate of those built."""
    from corespond.adapters.hl7_referral import Person, ReferralContent, build_message
    from corespond.daemon.referrals import ReferralRequest, create_referral
    from corespond.daemon.store import migrate
    from corespond.daemon.store.engine import create_store_engine

    migrate.upgrade(url)
    engine = create_store_engine(url)
    config = make_config(port)
    first: list[tuple[ReferralContent, bytes]] = []

    def build(content: ReferralContent, profile: str) -> bytes:
        if build_all or not first:
            message = build_message(content, profile)
            first[:] = [(content, message)]
            return message
        # A copy of the first message with this referral's own ids (same length: the same bytes
        # on the wire, distinct MSH-10s for the ACK match).
        was, message = first[0]
        for old, new in (
            (was.control_id, content.control_id),
            (was.referral_ref, content.referral_ref),
            (was.incident_ref, content.incident_ref),
        ):
            assert len(old) == len(new) and message.count(old.encode()) >= 1
            message = message.replace(old.encode(), new.encode())
        return message

    built = time.perf_counter()
    for n in range(count):
        if n == BUILT_WITH_HL7APY:
            built = n / (time.perf_counter() - built)
        create_referral(
            engine,
            config,
            ReferralRequest(
                incident_ref=f"INC-{n:06d}",
                provider="csu",
                service_type="crisis-stabilization",
                referring_clinician="CLIN-17",
                urgency="stat",
                person=Person("Testperson", "Alex", "1990-01-01", "U", "555-0100", "1 Main St"),
                summary="Synthetic summary for the benchmark, two sentences.\nSecond line.",
            ),
            datetime.now(UTC),
            build=build,
        )
    if count <= BUILT_WITH_HL7APY:
        built = count / (time.perf_counter() - built)
    engine.dispose()
    return built


def reset_outbox(url: str) -> None:
    """Every message due again, as if just queued (for the next round)."""
    from sqlalchemy import delete, update

    from corespond.daemon.store.engine import create_store_engine
    from corespond.daemon.store.tables import referral_disclosures, referral_messages, referrals

    engine = create_store_engine(url)
    with engine.begin() as conn:
        conn.execute(
            update(referral_messages).values(
                state="pending", attempts=0, ack_code=None, acked_at=None, lease_until=None,
                claimed_by=None, next_due=datetime(2000, 1, 1, tzinfo=UTC), last_error=None,
            )
        )  # fmt: skip
        conn.execute(update(referrals).values(state="queued", delivered_at=None))
        conn.execute(delete(referral_disclosures))
    engine.dispose()


def stored_messages(url: str) -> list[bytes]:
    from sqlalchemy import select

    from corespond.daemon.store.engine import create_store_engine
    from corespond.daemon.store.tables import referral_messages

    engine = create_store_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(referral_messages.c.message).order_by(referral_messages.c.id))
        out = [r.message for r in rows]
    engine.dispose()
    return out


# --- the two sides, each run in a process of its own ---------------------------------------


async def _baseline(port: int, messages: list[bytes]) -> dict[str, float]:
    import hl7
    from hl7.mllp import open_hl7_connection

    parsed = [hl7.parse(m.decode()) for m in messages]
    start, cpu = time.perf_counter(), time.process_time()
    switches = _switches()
    reader, writer = await open_hl7_connection("127.0.0.1", port, limit=16 * 1024 * 1024)
    for message in parsed:
        writer.writemessage(message)
        await writer.drain()
        ack = await reader.readmessage()
        assert str(ack.segment("MSA")[1]) == "AA"
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    writer.close()
    switches = _switches() - switches
    return {
        "rate": len(parsed) / elapsed,
        "cpu_us": cpu / len(parsed) * 1e6,
        "switches": switches / len(parsed),
    }


def baseline(url: str, port: int) -> dict[str, float]:
    return asyncio.run(_baseline(port, stored_messages(url)))


def _switches() -> float:
    """Context switches of this process so far: each GIL hand-off between two threads that
    both want it costs one or two (a futex wait), as does each wait for the peer."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return float(usage.ru_nvcsw + usage.ru_nivcsw)


def ours(url: str, port: int, count: int, claim_ahead: int) -> dict[str, float]:
    from sqlalchemy import event
    from twisted.internet import reactor

    from corespond.daemon.referrals import ReferralWorker
    from corespond.daemon.store.engine import create_store_engine

    engine = create_store_engine(url)
    worker = ReferralWorker(engine, reactor, make_config(port, claim_ahead))
    times: dict[str, float] = {}
    counts = {"transactions": 0}
    event.listen(engine, "commit", lambda _conn: counts.__setitem__(
        "transactions", counts["transactions"] + 1))  # fmt: skip
    counted = worker._after_delivered  # the end is seen when the last result is committed

    def after_delivered(*args: Any) -> None:
        counted(*args)
        if worker.delivered == count:
            times["end"] = time.perf_counter()
            times["cpu"] = time.process_time() - times["cpu"]
            times["sys"] = os.times().system - times["sys"]
            times["switches"] = _switches() - times["switches"]
            times["reactor"] = time.thread_time() - times["reactor"]
            counts["transactions"] -= counts.pop("transactions_before")
            worker.stop().addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    worker._after_delivered = after_delivered  # type: ignore[method-assign]

    def start() -> None:
        times["start"] = time.perf_counter()
        times["cpu"] = time.process_time()
        times["sys"] = os.times().system
        times["switches"] = _switches()
        times["reactor"] = time.thread_time()
        counts["transactions_before"] = counts["transactions"]
        worker.start()

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    engine.dispose()
    return {
        "rate": count / (times["end"] - times["start"]),
        "cpu_us": times["cpu"] / count * 1e6,
        "reactor_us": times["reactor"] / count * 1e6,
        "sys_us": times["sys"] / count * 1e6,
        "switches": times["switches"] / count,
        "commits": worker.commits / count,
        "transactions": counts["transactions"] / count,
    }


def peer_cpu(pid: int) -> float:
    """The peer process's CPU seconds so far (Linux; in clock ticks of 10 ms), or 0: the
    peer does the same work for both sides, and a side that makes it slower shows here."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_side(side: str, args: argparse.Namespace, url: str, port: int, spec: dict[str, str]) -> Any:
    env = dict(os.environ)
    if spec.get("src"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [spec["src"], env.get("PYTHONPATH")]))
    command = [
        sys.executable, __file__, "--side", side, "--url", url, "--port", str(port),
        "--referrals", str(args.referrals),
        "--claim-ahead", spec.get("claim", str(args.claim_ahead)),
        "--switch-interval", spec.get("switch", str(args.switch_interval)),
    ]  # fmt: skip
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- what referral work adds to a page (bench/dispatch.py's paging + referrals phase) ----------

Interval = tuple[float, float]


def merged(intervals: list[Interval]) -> list[Interval]:
    """The union of ``intervals``, as sorted disjoint intervals."""
    out: list[Interval] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def intersected(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    """Where two unions (each sorted and disjoint) overlap."""
    out: list[Interval] = []
    i = j = 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if b > a:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def without(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    """``xs`` less ``ys`` (both sorted and disjoint)."""
    out: list[Interval] = []
    j = 0
    for a, b in xs:
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < b:
            if ys[k][0] > a:
                out.append((a, ys[k][0]))
            a = max(a, ys[k][1])
            k += 1
        if b > a:
            out.append((a, b))
    return out


def measure(xs: list[Interval], a: float, b: float) -> float:
    """How much of [a, b] the union ``xs`` covers."""
    total = 0.0
    for x, y in xs[max(0, bisect.bisect_left(xs, (a, a)) - 1) :]:
        if x >= b:
            break
        total += max(0.0, min(y, b) - max(x, a))
    return total


def is_referral_work(label: str) -> bool:
    """A writer job of the referral side (its function's qualified name, as traced)."""
    return label.startswith(("Referral", "AutoReferrals", "CertificateWatch")) or (
        "referral" in label.lower()
    )


def referral_time_in_pages(
    trace: Path, windows: list[Interval]
) -> tuple[
    list[float], list[float], list[float], dict[str, float], list[float],
    list[tuple[float, str, float, float]],
]:
    """For each page (its window: the CAD's send time to the page's arrival, perf_counter
    seconds of this machine's monotonic clock), in seconds: (writer, reactor, either) time it
    could have waited behind referral work. From the store's trace and the referral side's
    reactor spans (``CORESPOND_STORE_TRACE``, daemon/referral_trace.py):

    - writer: referral work ran on the writer while an ingest batch or page work was queued
      for it (a page's snapshot or its ride waits behind at most one such job), or inside an
      ingest batch (the savepoint of referral work riding it: the batch's snapshots commit
      after it), or in a transaction of its own that no batch came for in time (its
      statements and its commit);
    - reactor: the reactor ran referral callbacks while no batch or page work of the window
      ran on the writer (so the page's next step may have been waiting for the reactor);
    - either: the union of both (the page waits for one thing at a time);
    - for the slowest 1 % of pages by "either", the mean seconds of each kind of work
      (writer job or reactor callback, by name);
    - "either" counted by the units' own thread CPU: each unit's share of a page's "either"
      times the unit's CPU over its length. A unit longer than its CPU waited itself, for
      the GIL another daemon thread held or for a core another process had; what ran
      meanwhile was not referral work;
    - and for the one page with the most "either", every unit it counts: (seconds counted,
      what, the unit's length, the unit's own thread CPU), most first.

    Bounds from above: the page's own snapshot and ride are not told from the others in its
    window, and the reactor part counts its network legs too."""
    rows = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    waiting: list[Interval] = []  # batches and page work queued for the writer
    running: list[Interval] = []  # ... and running on it
    referral: dict[str, list[Interval]] = {}  # referral transactions running on the writer
    cpu: dict[tuple[str, Interval], float] = {}  # each referral unit's own thread CPU seconds
    page_rides = 0  # rides of the batch whose line comes next that a page may wait for
    for r in rows:
        if "ride" in r and is_referral_work(r["ride"]):
            # Referral work riding a batch (in a savepoint), or alone when none came in time
            # (then its commit is the referral's too).
            end = r["committed"] if r.get("alone") else r["done"]
            what = "writer: " + r["ride"] + " (rode)"
            referral.setdefault(what, []).append((r["thread"], end))
            cpu[(what, (r["thread"], end))] = r.get("cpu", float("nan"))
            continue
        if "ride" in r and "_record_submissions" not in r["ride"]:
            page_rides += 1
        if "batch" in r:  # (its rides' lines come just before it)
            rides, page_rides = page_rides, 0
            if not r["batch"] and not rides:
                continue  # a transaction of referral work (or what was sent) alone
        if "batch" in r or "ride" in r:
            if "ride" in r and "_record_submissions" in r["ride"]:
                continue  # recording what was sent: no page waits for it
            waiting.append((r["submitted"], r["thread"]))
            running.append((r["thread"], r.get("committed", r.get("done", r["thread"]))))
            if r.get("batch"):  # its snapshots wait, in the batch, for what rides it
                waiting.append((r["thread"], r["committed"]))
        elif "job" in r:
            if r["job"] == "page":
                waiting.append((r["submitted"], r["thread"]))
                running.append((r["thread"], r["done"]))
            elif is_referral_work(r["what"]):
                what = "writer: " + r["what"]
                referral.setdefault(what, []).append((r["thread"], r["done"]))
                cpu[(what, (r["thread"], r["done"]))] = r.get("cpu", float("nan"))
    spans_path = Path(str(trace) + ".referrals")
    reactor: dict[str, list[Interval]] = {}
    if spans_path.exists():
        for line in spans_path.read_text().splitlines():
            span = json.loads(line)
            what = "reactor: " + span["what"]
            reactor.setdefault(what, []).append((span["start"], span["end"]))
            cpu[(what, (span["start"], span["end"]))] = span.get("cpu", float("nan"))
    waiting, running = merged(waiting), merged(running)
    parts = {what: intersected(waiting, merged(ivs)) for what, ivs in referral.items()}
    parts.update({what: without(merged(ivs), running) for what, ivs in reactor.items()})
    writer_part = merged([i for w, ivs in parts.items() if w.startswith("writer") for i in ivs])
    reactor_part = merged([i for w, ivs in parts.items() if w.startswith("reactor") for i in ivs])
    either = merged(writer_part + reactor_part)
    total = [measure(either, a, b) for a, b in windows]
    slow = sorted(range(len(windows)), key=lambda n: total[n])[int(len(windows) * 0.99) :]
    worst = {
        what: sum(measure(ivs, *windows[n]) for n in slow) / max(1, len(slow))
        for what, ivs in parts.items()
    }
    # Each unit's share of a page's "either", and the same share of the unit's own thread
    # CPU: a unit much longer than its CPU was itself waiting (for the GIL another daemon
    # thread held, or for a core another process had), and what ran meanwhile was not
    # referral work.
    by_start = sorted((start, end, what, seconds) for (what, (start, end)), seconds in cpu.items())
    starts = [u[0] for u in by_start]
    longest = max((u[1] - u[0] for u in by_start), default=0.0)
    page_units: list[list[tuple[float, str, float, float]]] = []
    for a, b in windows:
        units = []
        for start, end, what, seconds in by_start[bisect.bisect_left(starts, a - longest) :]:
            if start >= b:
                break
            if end > a and (counted := measure(parts[what], max(a, start), min(b, end))) > 0:
                units.append((counted, what, end - start, seconds))
        page_units.append(units)
    own_cpu = [
        sum(c * min(1.0, s / length) if length > 0 else 0.0 for c, _, length, s in units)
        for units in page_units
    ]
    most = max(range(len(windows)), key=lambda n: total[n], default=None)
    return (
        [measure(writer_part, a, b) for a, b in windows],
        [measure(reactor_part, a, b) for a, b in windows],
        total,
        {what: t for what, t in sorted(worst.items(), key=lambda kv: -kv[1]) if t > 0},
        own_cpu,
        sorted(page_units[most], reverse=True) if most is not None else [],
    )


def side_main(args: argparse.Namespace) -> None:
    from corespond.daemon.log import configure_logging

    # As the daemon logs (JSON lines, level info), to nowhere: the lines' cost counts, a
    # terminal's does not.
    configure_logging("info", "json", open(os.devnull, "w"))  # noqa: SIM115
    if args.switch_interval > 0:
        sys.setswitchinterval(args.switch_interval)
    if args.side == "baseline":
        result = baseline(args.url, args.port)
    else:
        result = ours(args.url, args.port, args.referrals, args.claim_ahead)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--referrals", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--claim-ahead", type=int, default=8)
    parser.add_argument("--switch-interval", type=float, default=0.0, help="both sides")
    parser.add_argument("--build-all", action="store_true", help="every message with hl7apy")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE,...",
        help="also run our side with src=DIR (a tree DIR/corespond/...), switch=S or claim=N, "
        "every round, interleaved (repeatable)",
    )
    parser.add_argument("--side", choices=("baseline", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side_main(args)
        return
    from corespond.daemon.log import configure_logging

    configure_logging("warning", "json", open(os.devnull, "w"))  # noqa: SIM115
    port = free_port()
    sides: list[tuple[str, dict[str, str]]] = [("baseline", {}), ("corespond", {})]
    for variant in args.variant:
        label, _, spec = variant.partition(":")
        sides.append((label, dict(kv.split("=", 1) for kv in spec.split(",") if kv)))
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "peer.py"
        script.write_text(PEER)
        peer = subprocess.Popen(
            [sys.executable, str(script), str(port)], stdout=subprocess.PIPE, text=True
        )
        results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in sides}
        try:
            assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
            url = f"sqlite:///{tmp}/bench.db"
            built = queue_referrals(url, args.referrals, port, args.build_all)
            size = len(stored_messages(url)[0])
            print(f"referrals: {args.referrals}, message size {size} bytes")
            print(f"hl7apy build + validate + queue (one thread): {built:,.0f} referrals/s")
            for n in range(args.rounds):
                order = sides[n % len(sides) :] + sides[: n % len(sides)]
                for name, spec in order:
                    reset_outbox(url)
                    side = "baseline" if name == "baseline" else "ours"
                    before = peer_cpu(peer.pid)
                    result = run_side(side, args, url, port, spec)
                    result["peer_us"] = (peer_cpu(peer.pid) - before) / args.referrals * 1e6
                    results[name].append(result)
                base = results["baseline"][-1]
                line = (
                    f"round {n + 1}: python-hl7 {base['rate']:,.0f}/s "
                    f"({base['cpu_us']:,.0f} us CPU/msg, {base['switches']:.1f} switches, "
                    f"peer {base['peer_us']:,.0f} us CPU/msg)"
                )
                for name, _ in sides[1:]:
                    mine = results[name][-1]
                    line += (
                        f"; {name} {mine['rate']:,.0f}/s = {mine['rate'] / base['rate']:.2f}x "
                        f"({mine['cpu_us']:,.0f} us CPU/referral: {mine['reactor_us']:,.0f} on "
                        f"the reactor, {mine['sys_us']:,.0f} in the kernel; "
                        f"{mine['switches']:.1f} switches, peer {mine['peer_us']:,.0f} us, "
                        f"{mine['transactions']:.2f} commits/referral)"
                    )
                print(line, flush=True)
        finally:
            peer.terminate()
            peer.wait()
    for name, _ in sides[1:]:
        ratios = [
            o["rate"] / b["rate"] for o, b in zip(results[name], results["baseline"], strict=True)
        ]
        cpu = statistics.median(o["cpu_us"] for o in results[name])
        print(
            f"{name}: median {statistics.median(ratios):.2f}x python-hl7's client "
            f"(min {min(ratios):.2f}, max {max(ratios):.2f}); median {cpu:,.0f} us CPU per "
            "referral, delivered + ACK + committed"
        )


if __name__ == "__main__":
    main()
