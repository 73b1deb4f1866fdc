"""The real daemon as a process: a referral queued by the CLI is delivered to python-hl7's
MLLP server, and the provider's RRI^I12 sent with mllp_send closes the loop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon.daemon_process import DaemonProcess
from tests.daemon.referral_rig import python_hl7_peer

pytestmark = pytest.mark.process


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corespond.daemon.cli", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_to_provider_and_back(tmp_path: Path) -> None:
    with python_hl7_peer(tmp_path) as (port, received):
        config = tmp_path / "corespond.yaml"
        config.write_text(
            f"state_dir: {tmp_path / 'state'}\n"
            "logging: {level: info, format: json}\n"
            "referrals:\n"
            "  sending_application: CORESPOND\n"
            "  sending_facility: COUNTY-BH\n"
            "  poll_interval: 0.2\n"
            "  providers:\n"
            f"    csu: {{host: 127.0.0.1, port: {port}, receiving_application: BHRECV,\n"
            "          receiving_facility: CSU}\n"
            "  listen: {host: 127.0.0.1, port: 0}\n"
        )
        assert cli("db", "upgrade", "-c", str(config)).returncode == 0
        summary = tmp_path / "summary.txt"
        summary.write_text("ZQXNARRATIVE hears voices, needs a bed tonight\n")
        made = cli(
            "referrals",
            "create",
            "INC-77",
            "--provider",
            "csu",
            "--service",
            "crisis",
            "--clinician",
            "CLIN-1",
            "--urgency",
            "stat",
            "--summary-file",
            str(summary),
            "--json",
            "-c",
            str(config),
        )
        assert made.returncode == 0, made.stderr
        created = json.loads(made.stdout)
        daemon = DaemonProcess(config, tmp_path)
        try:
            listening = daemon.wait_event("hl7.listener.started")
            daemon.wait_event("referral.delivered", control_id=created["control_id"])
            rri = tmp_path / "rri.hl7"
            rri.write_text(
                "MSH|^~\\&|BHRECV|CSU|CORESPOND|COUNTY-BH|20270116||RRI^I12^RRI_I12|RRI-1|P|2.5.1\n"
                f"MSA|AA|{created['control_id']}\n"
                f"RF1|A|||||{created['ref']}^CORESPOND\n"
            )
            mllp_send = str(Path(sys.executable).with_name("mllp_send"))
            sent = subprocess.run(
                [mllp_send, "--loose", "-f", str(rri), "-p", str(listening["port"]), "127.0.0.1"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert sent.returncode == 0 and "MSA|AA|RRI-1" in sent.stdout, sent.stdout
            daemon.wait_event("hl7.inbound.stored", state="accepted")
            assert daemon.stop(signal.SIGTERM) == 0
        finally:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.finish()
    assert received.read_text().split() == [created["control_id"]]
    listed = cli("referrals", "list", "--json", "-c", str(config))
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["state"], row["ack_code"], row["outcome"]) == ("delivered", "AA", "accepted")
    # No protected information in the daemon's log or the command's.
    assert "ZQX" not in json.dumps(daemon.log) + made.stderr
    assert (
        "ZQXNARRATIVE"
        in cli("referrals", "show", created["ref"], "--phi", "-c", str(config)).stdout
    )
