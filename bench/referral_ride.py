"""A new referral's statements riding an ingest batch on SQLite: the writer's CPU per referral.

    .venv/bin/python bench/referral_ride.py [--referrals 1000] [--encounter] [--src DIR]

In the daemon on SQLite, ``store_referral_in`` (the referral, its message, its claim, the
rollups' referral flags) runs in a savepoint of the next ingest batch's transaction
(``IncidentStore.ride_later``), and a page whose snapshot arrives meanwhile waits for it (issue
5: referral building adds at most 1 ms to any page). This runs the same savepoint as the
writer does, one referral a transaction, in a fresh database at the head schema, and prints the
thread's CPU time of each ride (median, p99, max). ``--encounter``: each referral's incident
has an encounter, so that its rollups follow it (the bench/dispatch.py load has none).
``--src DIR`` runs the code of another tree (DIR/corespond/{daemon,adapters,rules}): old and
new code in turn in the same minutes. CPU time, not wall time: other processes on the machine
change it little; under ``valgrind --tool=callgrind``, two runs with different ``--referrals``
give the instructions of a ride.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--referrals", type=int, default=1000)
    parser.add_argument("--encounter", action="store_true", help="each incident has one")
    parser.add_argument("--src", help="a tree DIR/corespond/... to run instead")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.src:
        sys.path.insert(0, args.src)

    from corespond.daemon import referrals as r
    from corespond.daemon.encounters import Prefill, create_encounter
    from corespond.daemon.store import migrate
    from corespond.daemon.store.engine import create_store_engine
    from corespond.daemon.store.writer import _in_savepoint
    from tests.daemon.referral_rig import config, now, request

    warm, n = 200, args.referrals
    cfg = config()
    provider, at, lease = cfg.providers[0], now(), timedelta(seconds=30)
    message = b"MSH|^~\\&|" + b"x" * 600  # as long as a REF^I12
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/store.db"
        migrate.upgrade(url)
        engine = create_store_engine(url)
        conn = engine.connect()
        work = []
        for i in range(warm + n):
            req = request(incident_ref=f"INC-{i:06d}")
            ref, control_id = r.new_referral_ref(), r.new_control_id()
            work.append((req, r.referral_content(cfg, provider, req, ref, control_id, at)))
        if args.encounter:
            from corespond.daemon import rollups

            if hasattr(rollups, "prepare_referral_upkeep"):  # as the daemon does at start
                rollups.prepare_referral_upkeep()
            with conn.begin():
                for i in range(warm, warm + n):
                    prefill = Prefill(program="alpha", call_received_at=at, agency="PD",
                                      zone="Z1", cad_incident_no=f"INC-{i:06d}")  # fmt: skip
                    create_encounter(conn, prefill, at)

        def ride(i: int) -> None:
            req, content = work[i]
            ok, value = _in_savepoint(
                conn,
                lambda c: r.store_referral_in(
                    c, provider, req, content, message, at, claim=("w1", lease)
                ),
            )
            assert ok, value

        def delivered() -> None:  # as the sender does: no live claim left behind
            conn.exec_driver_sql(
                "UPDATE referral_messages SET state = 'delivered' WHERE state = 'sending'"
            )

        with conn.begin():
            for i in range(warm):
                ride(i)
            delivered()
        costs = []
        for i in range(warm, warm + n):
            with conn.begin():
                started = time.thread_time_ns()
                ride(i)
                costs.append((time.thread_time_ns() - started) / 1e6)
                delivered()
        conn.close()
        engine.dispose()
    costs.sort()
    print(f"store_referral_in riding a transaction, CPU ms ({n} referrals"
          f"{', each with an encounter' if args.encounter else ''}): median "
          f"{costs[n // 2]:.3f} p99 {costs[int(n * 0.99)]:.3f} max {costs[-1]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
