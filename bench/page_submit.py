"""What submitting one page costs the daemon's reactor: a WCTP SubmitRequest through the
daemon's own gateway stack to a local endpoint, one page at a time.

    .venv/bin/python bench/page_submit.py [--pages 500] [--profile FILE]

The pager is the one the daemon builds from its configuration (:func:`build_gateways`: the
WCTP adapter inside its GatewayQueue, over the HTTP client's persistent connection pool), on
the real reactor, in this process's main thread, with the JSON logging ``bench/dispatch.py``
runs the daemon with. The endpoint (``bench/dispatch.py``'s, confirming every page) runs in a child
process, so this process's reactor thread CPU time (``time.thread_time``) is the client's
alone: printed per page, with the wall-clock p50/p99 of a submission. ``--instructions``: under
callgrind, the instructions of the measured pages only (program total / ``--pages``):

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.out \\
        .venv/bin/python bench/page_submit.py --pages 200 --instructions
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch import WctpEndpoint
from page_cost import _instrument


def serve() -> None:
    """The endpoint, in a child process: its port on stdout, then serving until killed."""

    async def main() -> None:
        endpoint = WctpEndpoint()
        server = await asyncio.start_server(endpoint.serve, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--warm", type=int, default=50)
    parser.add_argument("--profile", type=Path, help="write a cProfile (CPU) of the pages here")
    parser.add_argument(
        "--instructions", action="store_true",
        help="under callgrind: count only the measured pages (as bench/page_cost.py)",
    )  # fmt: skip
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    port = [int(child.stdout.readline())]

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from corespond.daemon.clock import Clock
    from corespond.daemon.config import GatewayConfig
    from corespond.daemon.gateways import build_gateways
    from corespond.daemon.log import configure_logging
    from corespond.daemon.pager import PageMessage

    configure_logging("warning", "json", sys.stderr)  # as bench/dispatch.py runs the daemon
    config = GatewayConfig(
        name="wctp", type="wctp", timeout_seconds=15.0, retries=3, max_in_flight=4,
        backoff_initial_seconds=2.0, backoff_max_seconds=60.0,
        url=f"http://127.0.0.1:{port[0]}/wctp", sender_id="bench",
    )  # fmt: skip
    (pager,) = build_gateways([config], reactor, Clock(reactor), None).values()  # type: ignore[arg-type]
    walls: list[float] = []
    cpu = [0.0]
    profiler = cProfile.Profile(time.thread_time) if args.profile else None

    async def run() -> None:
        for n in range(args.warm + args.pages):
            message = PageMessage(
                page_ref=f"C{n}-1", attempt_id=f"{n}.0", address="5550101",
                text=f"C{n}-1 EDP, zone Z9, Testville. Reply ACCEPT, DECLINE or ENROUTE C{n}-1",
                link=f"https://corespond.example/p/C{n}-1?for=c-101",
            )  # fmt: skip
            measured = n >= args.warm
            if n == args.warm and args.instructions:
                _instrument(True)
            if measured and profiler:
                profiler.enable()
            wall, started_cpu = time.perf_counter(), time.thread_time()
            await pager.submit(message)
            if measured:
                cpu[0] += time.thread_time() - started_cpu
                walls.append(time.perf_counter() - wall)
                if profiler:
                    profiler.disable()

    def stop(result: Any) -> Any:
        reactor.stop()  # type: ignore[attr-defined]
        return result

    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: Deferred.fromCoroutine(run()).addBoth(stop)
    )
    reactor.run()  # type: ignore[attr-defined]
    if args.instructions:
        _instrument(False)
    child.kill()
    if profiler:
        profiler.dump_stats(args.profile)
    walls.sort()
    print(f"{args.pages} WCTP submissions at {datetime.now(UTC):%H:%M}: wall p50"
          f" {walls[len(walls) // 2] * 1000:.2f} ms, p99 {walls[int(len(walls) * 0.99)] * 1000:.2f}"
          f" ms; reactor CPU {cpu[0] / args.pages * 1000:.3f} ms per page")  # fmt: skip


if __name__ == "__main__":
    main()
