"""Where the daemon's CPU time per snapshot goes: the ingest path, stage by stage, one thread.

    taskset -c 1 .venv/bin/python bench/ingest_stages.py [--messages 4000] [--batch 64] [--read 16]

The same EIDO frames as bench/ingest.py (demo incidents, 3-4 KB), through the daemon's own
code without sockets or threads: parse (EidoFormat.parse), classify (the default rules),
store (write_batch + durable commit on SQLite WAL synchronous=FULL, ``--batch`` snapshots a
transaction, as group commit forms them under load), and the whole path through
:class:`~corespond.daemon.pipeline.Pipeline` (records, Deferreds, metrics, the log line per
snapshot written as JSON to /dev/null), with the store's writer "thread" run inline every
``--batch`` submissions (``--read N``: N frames handed over at once, as the TCP feed does with
the frames of one read). ``feed`` adds the TCP feed's own part: the frames with their STX/ETX,
``--chunk`` bytes at a time (the daemon reads up to 64 KiB), through the TCP feed's protocol
(deframing, one ``many`` per read, the ACKs written to a StringTransport), the writer run
whenever ``--batch`` snapshots wait. Figures are CPU time (``time.process_time``), best of
``--repeat``, per snapshot. What this leaves out against bench/ingest.py: the socket and
the reactor, and the hand-over between the reactor and the writer thread (bench/ingest_threads.py
measures the daemon whole).

For instruction counts that do not move with the machine's load, run one stage under callgrind
with instrumentation switched on only for the timed loop (``--callgrind``; instructions per
snapshot = the total it prints / messages): ``valgrind --tool=callgrind --instr-atstart=no
.venv/bin/python bench/ingest_stages.py --messages 1000 --repeat 1 --stage pipeline
--callgrind``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from corespond.adapters.eido import EidoFormat
from corespond.adapters.tcp_feed import TcpFeedFactory
from corespond.daemon import pipeline as pipeline_module
from corespond.daemon.clock import Clock
from corespond.daemon.ingest import Origin
from corespond.daemon.log import configure_logging
from corespond.daemon.pipeline import FeedContext, IngestMetrics, Pipeline
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.migrate import upgrade
from corespond.daemon.store.writer import (
    STATEMENT_JOURNALS_IN_MEMORY,
    IncidentStore,
    SnapshotRecord,
    write_batch,
)
from corespond.rules.engine import RuleClassifier
from corespond.rules.loader import load_ruleset

BENCH = Path(__file__).resolve().parent
STAGES = ("parse", "classify", "store", "pipeline", "feed")


class _WallTime:
    """What the pipeline's clock reads (the reactor's ``seconds``), without a reactor."""

    seconds = staticmethod(time.time)


class _Silent:
    """The per-snapshot lines, writing nothing (``--no-line``)."""

    def __call__(self, *values: Any) -> None:
        pass


def load_frames(count: int) -> list[bytes]:
    """bench/ingest.py's messages without STX/ETX (as the deframer hands them on), kept in
    a cache file: generating them costs more than the stages, and runs compare the same."""
    cache = Path(tempfile.gettempdir()) / f"corespond-ingest-stages-{count}.bin"
    if not cache.exists():
        sys.path.insert(0, str(BENCH))
        from ingest import messages

        cache.write_bytes(b"".join(messages(count)))
    return [f[1:] for f in cache.read_bytes().split(b"\x03") if f]


def html_notes(frame: bytes) -> bytes:
    """``frame`` with each note as a paragraph of HTML, as CADs send EIDO notes: every update
    of an incident repeats its notes, so this shows what reading the HTML costs."""
    doc = orjson.loads(frame)
    for note in doc.get("notesComponent", ()):
        note["notesActionComments"] = f"<p>{note['notesActionComments']}</p>"
    return orjson.dumps(doc)


def fresh_engine(workdir: Path, n: int) -> Any:
    url = f"sqlite:///{workdir / f'stages-{n}.db'}"
    upgrade(url)
    return create_store_engine(url, sqlite_synchronous="full")


class Timer:
    """Times the loops (``with timer:``), optionally under cProfile or callgrind."""

    def __init__(self, profile: bool, callgrind: bool) -> None:
        self.profile, self.callgrind = profile, callgrind
        self.seconds: list[float] = []
        self._profiler: cProfile.Profile | None = None
        self._start = 0.0

    def _instrument(self, on: bool) -> None:
        command = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True)

    def __enter__(self) -> None:
        gc.collect()
        if self.callgrind:
            self._instrument(True)
        if self.profile:
            self._profiler = cProfile.Profile()
            self._profiler.enable()
        self._start = time.process_time()

    def __exit__(self, *_: object) -> None:
        self.seconds.append(time.process_time() - self._start)
        if self._profiler:
            self._profiler.disable()
            pstats.Stats(self._profiler).sort_stats("tottime").print_stats(45)
            self._profiler = None
        if self.callgrind:
            self._instrument(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--read",
        type=int,
        default=1,
        help="pipeline stage: frames handed over together (a TCP read holds about 16 of these)",
    )
    parser.add_argument(
        "--chunk", type=int, default=65536, help="feed stage: bytes handed over per read"
    )
    parser.add_argument(
        "--no-line",
        action="store_true",
        help="pipeline/feed: the per-snapshot log line not written (its cost is the difference)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--html-notes",
        action="store_true",
        help="each note as the HTML5 the EIDO spec gives it (<p>...</p>) instead of plain text",
    )
    parser.add_argument("--stage", choices=(*STAGES, "all", "none"), default="all")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed loops")
    parser.add_argument("--callgrind", action="store_true", help="see the module's text")
    args = parser.parse_args()
    with open(os.devnull, "w") as devnull:
        configure_logging("info", "json", devnull)
        if args.no_line:
            pipeline_module._stored_line = _Silent()  # type: ignore[assignment]
            pipeline_module._duplicate_line = _Silent()  # type: ignore[assignment]
        run(args)


def run(args: argparse.Namespace) -> None:
    frames = load_frames(args.messages)
    if args.html_notes:
        frames = [html_notes(f) for f in frames]
    fmt = EidoFormat()
    classifier = RuleClassifier(load_ruleset())
    stages = STAGES if args.stage == "all" else () if args.stage == "none" else (args.stage,)
    snaps = [fmt.parse(f) for f in frames] if {"classify", "store"} & set(stages) else []
    decisions = [classifier.classify(s) for s in snaps]
    origin = Origin("bench", "127.0.0.1:9")
    runs = 0
    with tempfile.TemporaryDirectory(prefix="corespond-stages-") as tmp:
        workdir = Path(tmp)

        def parse(timer: Timer) -> None:
            with timer:
                for f in frames:
                    fmt.parse(f)

        def classify(timer: Timer) -> None:
            with timer:
                for s in snaps:
                    classifier.classify(s)

        def store(timer: Timer) -> None:
            nonlocal runs
            runs += 1
            engine = fresh_engine(workdir, runs)
            now = datetime.now(UTC)
            records = [
                SnapshotRecord("bench", "bench", "eido", now, f, s, d)
                for f, s, d in zip(frames, snaps, decisions, strict=True)
            ]
            with engine.connect() as conn:  # the pool's one connection, set as the writer's
                conn.connection.driver_connection.execute(STATEMENT_JOURNALS_IN_MEMORY)
            with timer:
                for i in range(0, len(records), args.batch):
                    with engine.begin() as conn:
                        write_batch(conn, records[i : i + args.batch])
            engine.dispose()

        def inline_pipeline() -> tuple[Any, IncidentStore, list[Callable[[], Any]], Pipeline]:
            """A fresh store whose "writer thread" runs when the loop empties ``queued``."""
            nonlocal runs
            runs += 1
            engine = fresh_engine(workdir, runs)
            queued: list[Callable[[], Any]] = []

            def run_in_thread(fn: Callable[[], Any]) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                queued.append(lambda: d.callback(fn()))
                return d

            store = IncidentStore(engine, None, run_in_thread=run_in_thread)
            store.start()
            metrics = IngestMetrics(CollectorRegistry())
            pipe = Pipeline(store, classifier, Clock(_WallTime()), metrics)  # type: ignore[arg-type]
            return engine, store, queued, pipe

        def pipeline(timer: Timer) -> None:
            engine, _, queued, pipe = inline_pipeline()
            ingest = pipe.ingest_for(FeedContext("bench", "bench", fmt, 1 << 20))
            step = args.read
            with timer:
                for i in range(0, len(frames), step):
                    if step == 1:
                        ingest(frames[i], origin)
                    else:  # as the TCP feed hands over the frames of one read
                        ingest.many(frames[i : i + step], origin)
                    done = min(i + step, len(frames))
                    if done // args.batch > i // args.batch or done == len(frames):
                        while queued:  # the writer thread's turn: write, commit, answer
                            queued.pop(0)()
            assert pipe.counts.new == len(frames), pipe.counts
            engine.dispose()

        def feed(timer: Timer) -> None:
            engine, store, queued, pipe = inline_pipeline()
            ingest = pipe.ingest_for(FeedContext("bench", "bench", fmt, 1 << 20))
            factory = TcpFeedFactory(
                ingest, feed="bench", framing="stx-etx", ack="ack-nak",
                max_message_bytes=1 << 20, clock=pipe.clock, idle_timeout=None,
            )  # fmt: skip
            proto = factory.buildProtocol(None)
            assert proto is not None
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 9))
            proto.makeConnection(transport)
            acks = 0
            with timer:
                for i in range(0, len(wire), args.chunk):
                    proto.dataReceived(wire[i : i + args.chunk])
                    if store.queued >= args.batch or i + args.chunk >= len(wire):
                        while queued:  # the writer thread's turn: write, commit, answer
                            queued.pop(0)()
                        acks += len(transport.value())
                        transport.clear()
            assert acks == len(frames) == pipe.counts.new, (acks, pipe.counts)
            engine.dispose()

        wire = b"".join(b"\x02" + f + b"\x03" for f in frames)
        fns = {
            "parse": parse, "classify": classify, "store": store, "pipeline": pipeline,
            "feed": feed,
        }  # fmt: skip
        per: dict[str, float] = {}
        for stage in stages:
            timer = Timer(args.profile, args.callgrind)
            for _ in range(args.repeat):
                fns[stage](timer)
            per[stage] = min(timer.seconds)
    n = len(frames)
    print(f"{n} EIDO snapshots, batch {args.batch}, CPU us per snapshot (best of {args.repeat})")
    for stage in stages:
        print(f"  {stage:<9} {per[stage] / n * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
