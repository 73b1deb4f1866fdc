"""Referral delivery benchmark: our outbox worker against python-hl7's MLLP client, one peer.

    .venv/bin/python bench/referrals.py [--referrals 500]

One loopback peer for both: python-hl7's asyncio MLLP server (a separate process) that ACKs
every message AA. Both senders send the same stored REF^I12 messages, one in flight.

- corespond: the daemon's ReferralWorker on the Twisted reactor, over SQLite (WAL, FULL): each
  referral is claimed from the outbox, sent, its ACK matched by MSA-2 and the result committed
  (delivered, acknowledged and committed), one message in flight; the commit of a result runs
  while the next message is on the wire, results grouped (``referrals.claim_ahead``, 8);
- baseline: python-hl7's asyncio client (`hl7.mllp.open_hl7_connection`) writing the same
  messages and reading each ACK, with no database at all.

Also printed: hl7apy build rate (one thread) for the REF^I12 messages that the run queues.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def queue_referrals(url: str, count: int, port: int) -> tuple[object, float]:
    from corespond.adapters.hl7_referral import Person
    from corespond.daemon.config import ProviderConfig, ReferralsConfig
    from corespond.daemon.referrals import ReferralRequest, create_referral
    from corespond.daemon.store import migrate
    from corespond.daemon.store.engine import create_store_engine

    migrate.upgrade(url)
    engine = create_store_engine(url)
    config = ReferralsConfig(
        sending_application="CORESPOND",
        sending_facility="COUNTY-BH",
        providers=(
            ProviderConfig(
                "csu", "127.0.0.1", port, receiving_application="BHRECV", receiving_facility="CSU"
            ),
        ),
        poll_interval=0.5,
    )
    start = time.perf_counter()
    for n in range(count):
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
        )
    built = count / (time.perf_counter() - start)
    engine.dispose()
    return config, built


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


async def baseline(port: int, messages: list[bytes]) -> float:
    import hl7
    from hl7.mllp import open_hl7_connection

    parsed = [hl7.parse(m.decode()) for m in messages]
    reader, writer = await open_hl7_connection("127.0.0.1", port, limit=16 * 1024 * 1024)
    start, cpu = time.perf_counter(), time.process_time()
    for message in parsed:
        writer.writemessage(message)
        await writer.drain()
        ack = await reader.readmessage()
        assert str(ack.segment("MSA")[1]) == "AA"
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    writer.close()
    print(f"python-hl7 client: {cpu / len(parsed) * 1e3:.2f} ms CPU per message")
    return len(parsed) / elapsed


def ours(url: str, config: object, count: int) -> float:
    from sqlalchemy import event
    from twisted.internet import reactor

    from corespond.daemon.referrals import ReferralWorker
    from corespond.daemon.store.engine import create_store_engine

    engine = create_store_engine(url)
    worker = ReferralWorker(engine, reactor, replace(config))  # type: ignore[type-var]
    times: dict[str, float] = {}
    counts: dict[str, int] = {"transactions": 0}
    event.listen(engine, "commit", lambda _conn: counts.__setitem__(
        "transactions", counts["transactions"] + 1))  # fmt: skip

    def check() -> None:
        if worker.delivered >= count:
            times["end"] = time.perf_counter()
            counts["commits"] = getattr(worker, "commits", -1)  # -1: a worker before groups
            times["cpu"] = time.process_time() - times["cpu"]
            times["reactor"] = time.thread_time() - times["reactor"]
            counts["transactions"] -= counts.pop("transactions_before")
            worker.stop().addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
        else:
            reactor.callLater(0.001, check)  # type: ignore[attr-defined]

    def start() -> None:
        times["start"] = time.perf_counter()
        times["cpu"] = time.process_time()
        times["reactor"] = time.thread_time()
        counts["transactions_before"] = counts["transactions"]
        worker.start()
        check()

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    engine.dispose()
    print(f"corespond worker: {counts['commits']} group commits for {count} results, "
          f"{counts['transactions'] / count:.2f} transactions (commits) per referral, "
          f"{times['cpu'] / count * 1e6:,.0f} us CPU (all threads) per referral, "
          f"{times['reactor'] / count * 1e6:,.0f} us of it on the reactor thread")  # fmt: skip
    return count / (times["end"] - times["start"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--referrals", type=int, default=500)
    args = parser.parse_args()
    from corespond.daemon.log import configure_logging

    # As the daemon logs (JSON lines, level info), to nowhere: the lines' cost counts, a
    # terminal's does not.
    configure_logging("info", "json", open(os.devnull, "w"))  # noqa: SIM115
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "peer.py"
        script.write_text(PEER)
        peer = subprocess.Popen(
            [sys.executable, str(script), str(port)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
            url = f"sqlite:///{tmp}/bench.db"
            config, built = queue_referrals(url, args.referrals, port)
            messages = stored_messages(url)
            base = asyncio.run(baseline(port, messages))
            mine = ours(url, config, args.referrals)
        finally:
            peer.terminate()
            peer.wait()
    print(f"referrals: {args.referrals}, message size {len(messages[0])} bytes")
    print(f"hl7apy build + validate + queue (one thread): {built:,.0f} referrals/s")
    print(f"python-hl7 client, no database (baseline):      {base:,.0f} messages/s acknowledged")
    print(
        f"corespond worker, delivered + ACK + committed:   {mine:,.0f} referrals/s "
        f"({mine / base:.2f}x the baseline)"
    )


if __name__ == "__main__":
    main()
