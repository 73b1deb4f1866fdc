"""The demo's encounters, end to end: a real daemon process seeds them into an empty store on
its first start (once), and `corespond report outcomes` reports on them."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.daemon.daemon_process import DaemonProcess
from tests.daemon.test_process import cli, started, write_config

pytestmark = pytest.mark.process


def test_the_demo_seeds_encounters_once_and_the_report_reads_them(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text() + "outcomes:\n  demo_encounters: 400\n  demo_months: 2\n")
    for run in range(2):
        daemon = DaemonProcess(config, tmp_path)
        try:
            started(daemon)
            assert daemon.stop(signal.SIGTERM) == 0
        finally:
            daemon.kill()
        seeded = [e for e in daemon.log if e.get("event") == "outcomes.demo.seeded"]
        assert [e["count"] for e in seeded] == ([400] if run == 0 else [])
    today = datetime.now(UTC).date()
    report = cli(
        "report", "outcomes", "-c", str(config), "--format", "json",
        "--from", (today - timedelta(days=70)).isoformat(), "--to", today.isoformat(),
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    doc = json.loads(report.stdout)
    encounters = next(m for m in doc["metrics"] if m["key"] == "encounters")
    assert encounters["values"]["all"]["value"] == 400
