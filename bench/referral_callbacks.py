"""The reactor's CPU in each referral callback: what a page could wait behind (issue 5).

    .venv/bin/python bench/referral_callbacks.py [--referrals 300] [--gap 0.03] [--src DIR]

The real ReferralService (hl7apy builds in its builder process, metrics in a registry, JSON
log lines to /dev/null as the daemon writes them) creates ``--referrals`` referrals, one every
``--gap`` seconds, over SQLite; each is stored, handed to the provider's sender, written to a
python-hl7 MLLP peer (a process of its own) that ACKs it AA, and its result committed. Store
work rides the store's writer (IncidentStore, as the daemon wires it on SQLite); with no
ingest here, each rider runs alone when its wait is up.

With the referral trace on (daemon/referral_trace.py), each stretch of reactor time in a
referral callback is recorded; this bench records the reactor thread's CPU time
(``time.thread_time``) of each stretch as well as its wall time, and prints per label n, p50,
p99 and max of both, in ms. CPU time, not wall time, is what to compare on a loaded machine
(a stretch's wall time includes waits for the GIL). ``--src DIR`` runs another tree's code
(DIR/corespond/{daemon,adapters,rules}): old and new code in turn in the same minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    if args.src:
        sys.path.insert(0, args.src)
    tmp = tempfile.mkdtemp(prefix="refcb-")
    os.environ["CORESPOND_STORE_TRACE"] = f"{tmp}/trace.jsonl"

    from prometheus_client import CollectorRegistry
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    from corespond.daemon import referral_trace
    from corespond.daemon.log import configure_logging
    from corespond.daemon.referral_metrics import ReferralMetrics
    from corespond.daemon.referrals import ReferralService
    from corespond.daemon.store import migrate
    from corespond.daemon.store.engine import create_store_engine
    from corespond.daemon.store.writer import IncidentStore
    from tests.daemon.referral_rig import PYTHON_HL7_PEER, config, free_port, provider, request

    assert referral_trace.__file__.startswith(args.src or str(ROOT)), referral_trace.__file__
    cpu: list[tuple[float, float, float, str]] = []
    profs: dict[str, Any] = {}
    if args.profile:
        import cProfile

    def timed_run(self: Any, fn: Any, *a: Any, label: str = "") -> Any:
        if self._depth:
            return fn(*a)
        self._depth += 1
        t0, c0 = time.perf_counter(), time.thread_time()
        prof = None
        if args.profile:
            prof = profs.get(label) or profs.setdefault(label, cProfile.Profile())
            prof.enable()
        try:
            return fn(*a)
        finally:
            if prof is not None:
                prof.disable()
            cpu.append((time.thread_time() - c0, t0, time.perf_counter(), label))
            self._depth -= 1

    referral_trace.ReactorSpans.run = timed_run  # type: ignore[method-assign]
    configure_logging("info", "json", open(os.devnull, "w"))  # noqa: SIM115

    port = free_port()
    script = Path(tmp) / "peer.py"
    script.write_text(PYTHON_HL7_PEER)
    peer = subprocess.Popen(
        [sys.executable, str(script), str(port), os.devnull], stdout=subprocess.PIPE, text=True
    )
    assert peer.stdout is not None and "ready" in peer.stdout.readline()

    url = f"sqlite:///{tmp}/store.db"
    migrate.upgrade(url)
    engine = create_store_engine(url)
    store = IncidentStore(engine, reactor)
    store.start()
    cfg = config(provider(port=port), build_processes=1)
    service = ReferralService(
        engine, reactor, cfg, run_in_thread=store.run_on_writer, ride=store.ride_later,
        ride_commits=partial(store.ride_next_batch, within=0.01, urgent=False),
        ride_claims=store.ride_later, metrics=ReferralMetrics(CollectorRegistry()),
    )  # fmt: skip
    n = args.referrals + args.warm
    result: dict[str, Any] = {}

    async def drive() -> None:
        from twisted.internet.task import deferLater

        service.start()
        await service.started
        for first, last in ((0, args.warm), (args.warm, n)):
            created = []
            for i in range(first, last):
                created.append(service.create(request(incident_ref=f"INC-{i:06d}")))
                await deferLater(reactor, args.gap, lambda: None)
            for d in created:
                await d
            while service.worker.delivered < last:
                await deferLater(reactor, 0.05, lambda: None)
            if first == 0:
                cpu.clear()
        await service.stop()
        await store.stop()

    def done(r: Any) -> None:
        result["error"] = None if not hasattr(r, "getTraceback") else r.getTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(drive()).addBoth(done))
    reactor.run()
    peer.terminate()
    peer.wait()
    for label, prof in profs.items():  # one file per label: FILE.<label>
        prof.dump_stats(f"{args.profile}.{label.replace(' ', '_')}")
    if result["error"]:
        raise SystemExit(result["error"])
    by: dict[str, list[tuple[float, float]]] = {}
    for c, s, e, label in cpu:
        by.setdefault(label, []).append((c * 1000, (e - s) * 1000))
    return {k: v for k, v in by.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--referrals", type=int, default=300)
    parser.add_argument("--warm", type=int, default=30)
    parser.add_argument("--gap", type=float, default=0.03, help="seconds between creates")
    parser.add_argument("--src", help="a tree DIR/corespond/... to run instead")
    parser.add_argument("--profile", help="cProfile of each label's callbacks to FILE.<label>")
    parser.add_argument("--json", action="store_true", help="raw spans as JSON (one line)")
    args = parser.parse_args()
    by = run(args)
    if args.json:
        print(json.dumps(by))
        return
    print(f"{'what':<44}{'n':>5}  cpu ms: {'p50':>6} {'p99':>6} {'max':>6}   wall: p50 max")
    every: list[float] = []
    for label, xs in sorted(by.items(), key=lambda kv: -statistics.median(c for c, _ in kv[1])):
        c = [x[0] for x in xs]
        w = [x[1] for x in xs]
        every += c
        print(
            f"{label[:44]:<44}{len(xs):>5}  {pct(c, .5):13.3f} {pct(c, .99):6.3f} "
            f"{max(c):6.3f}   {pct(w, .5):.3f} {max(w):.3f}"
        )
    print(f"{'all callbacks':<44}{len(every):>5}  {pct(every, .5):13.3f} "
          f"{pct(every, .99):6.3f} {max(every):6.3f}")  # fmt: skip
    print(f"reactor CPU in referral callbacks per referral: {sum(every) / args.referrals:.3f} ms")


if __name__ == "__main__":
    main()
