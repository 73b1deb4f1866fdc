"""Two writers on one PostgreSQL: overlapping batches at the same time stay consistent."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from corespond.daemon.decision import Response
from corespond.daemon.store.queries import audit_incidents, totals
from corespond.daemon.store.tables import snapshots
from corespond.daemon.store.writer import write_batch
from tests.daemon.store.records import decision, record, snapshot

ROUNDS = 30
INCIDENTS = 6


def batches(writer: int) -> list[list[Any]]:
    """Both writers send every snapshot (as two daemons behind one feed might), in different
    orders and cuts, so that batches overlap on snapshots and on incidents."""
    out = []
    for r in range(ROUNDS):
        items = [
            record(
                snapshot(f"C-{i}", updated=r * 10 + i, call_type=f"R{r}"),
                decision(list(Response)[(r + i) % 4]),
                received=r,
            )
            for i in range(INCIDENTS)
        ]
        out.append(items if writer == 0 else items[::-1])
    return out


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_two_writers(engine: Engine, backend: str) -> None:
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    results: list[list[Any]] = [[], []]

    def run(writer: int) -> None:
        try:
            barrier.wait(timeout=30)
            for items in batches(writer):
                with engine.begin() as conn:
                    results[writer] += write_batch(conn, items)
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []

    with engine.connect() as conn:
        assert totals(conn).incidents == INCIDENTS
        assert totals(conn).snapshots == ROUNDS * INCIDENTS == totals(conn).decisions
        assert audit_incidents(conn) == []
        assert conn.execute(select(func.count(func.distinct(snapshots.c.digest)))).scalar() == (
            ROUNDS * INCIDENTS
        )
    # Each snapshot is new for exactly one of the writers; both agree on its id.
    by_id: dict[int, list[str]] = {}
    for writer_results in results:
        for r in writer_results:
            by_id.setdefault(r.snapshot_id, []).append(r.state.value)
    assert len(by_id) == ROUNDS * INCIDENTS
    assert all(sorted(states) == ["duplicate", "new"] for states in by_id.values())
