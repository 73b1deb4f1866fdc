"""bench/referrals.py's measure of the time a page could wait behind referral work (phase 3
of bench/dispatch.py), on hand-made traces: referral work that rides an ingest batch counts
on the writer, and a transaction of referral work alone is not taken for page work; counted
by the units' own CPU, a unit that waited counts only what it ran."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "referrals.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_referrals", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def ride(what: str, submitted: float, ran: tuple[float, float], committed: float,
         alone: bool = False, cpu: float | None = None) -> dict[str, Any]:  # fmt: skip
    """A unit riding a batch; its thread CPU is its whole length unless ``cpu`` says less."""
    return {"ride": what, "submitted": submitted, "dispatched": ran[0], "thread": ran[0],
            "done": ran[1], "cpu": ran[1] - ran[0] if cpu is None else cpu,
            "committed": committed, "back": committed, "alone": alone}  # fmt: skip


def batch(size: int, submitted: float, thread: float, committed: float) -> dict[str, Any]:
    return {"batch": size, "submitted": submitted, "dispatched": thread, "thread": thread,
            "written": thread, "committed": committed, "back": committed}  # fmt: skip


def waits(bench: ModuleType, tmp_path: Path, rows: list[dict[str, Any]],
          spans: list[dict[str, Any]], window: tuple[float, float]) -> Any:  # fmt: skip
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    Path(str(trace) + ".referrals").write_text("".join(json.dumps(s) + "\n" for s in spans))
    writer, reactor, either, worst, own_cpu, units = bench.referral_time_in_pages(trace, [window])
    return writer[0], reactor[0], either[0], worst, own_cpu[0], units


def test_referral_work_riding_a_batch_counts_on_the_writer(
    bench: ModuleType, tmp_path: Path
) -> None:
    # A batch of snapshots (t 10.000-10.010) carries a referral's statements (10.004-10.007):
    # the batch's snapshots commit 3 ms later for them.
    rows = [
        ride("store_referral_in", 9.990, (10.004, 10.007), 10.010),
        batch(3, 9.999, 10.000, 10.010),
    ]
    writer, reactor, either, worst, own_cpu, units = waits(
        bench, tmp_path, rows, [], (9.995, 10.030)
    )
    assert writer == pytest.approx(0.003) and reactor == 0 and either == pytest.approx(0.003)
    assert list(worst) == ["writer: store_referral_in (rode)"]
    assert own_cpu == pytest.approx(0.003)
    ((counted, what, length, cpu),) = units
    assert what == "writer: store_referral_in (rode)"
    assert (counted, length, cpu) == pytest.approx((0.003, 0.003, 0.003))


def test_a_unit_that_waited_counts_only_its_own_cpu(bench: ModuleType, tmp_path: Path) -> None:
    # The same ride, 3 ms long but 1 ms of its thread's CPU (it waited for the GIL or a core),
    # and a reactor callback 1 ms long with 0.5 ms of CPU, outside the batch.
    rows = [
        ride("store_referral_in", 9.990, (10.004, 10.007), 10.010, cpu=0.001),
        batch(3, 9.999, 10.000, 10.010),
    ]
    spans = [{"start": 10.012, "end": 10.013, "cpu": 0.0005, "what": "ACK"}]
    writer, reactor, either, _, own_cpu, units = waits(
        bench, tmp_path, rows, spans, (9.995, 10.030)
    )
    assert (writer, reactor, either) == pytest.approx((0.003, 0.001, 0.004))  # by wall clock
    assert own_cpu == pytest.approx(0.0015)
    assert [u[1] for u in units] == ["writer: store_referral_in (rode)", "reactor: ACK"]


def test_a_referral_transaction_alone_is_referral_work_not_page_work(
    bench: ModuleType, tmp_path: Path
) -> None:
    # No batch came for the poll's claim: it went alone (10.000-10.004, its commit included)
    # while a snapshot waited (submitted 10.001); a referral callback ran on the reactor
    # meanwhile (10.002-10.003), which a page's batch running would have hidden.
    rows = [
        ride("ReferralWorker._claim_in", 9.950, (10.000, 10.002), 10.004, alone=True),
        batch(0, 9.950, 10.000, 10.004),
        batch(1, 10.001, 10.004, 10.006),
    ]
    spans = [{"start": 10.002, "end": 10.003, "cpu": 0.001, "what": "result of store_referral_in"}]
    writer, reactor, either, *_ = waits(bench, tmp_path, rows, spans, (10.001, 10.020))
    assert writer == pytest.approx(0.003)  # 10.001-10.004: the snapshot waited behind it
    assert reactor == pytest.approx(0.001) and either == pytest.approx(0.003)


def test_page_work_riding_alone_still_hides_the_reactor(
    bench: ModuleType, tmp_path: Path
) -> None:
    # A page's own ride, alone (10.000-10.004): a referral callback then is not counted.
    rows = [
        ride("EscalationService._page_in", 9.998, (10.000, 10.002), 10.004, alone=True),
        batch(0, 9.998, 10.000, 10.004),
    ]
    spans = [{"start": 10.001, "end": 10.003, "cpu": 0.002, "what": "ACK"}]
    assert waits(bench, tmp_path, rows, spans, (9.990, 10.020))[:5] == (0, 0, 0, {}, 0)
