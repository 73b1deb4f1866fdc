"""The real daemon, as a separate process: start, ingest over real sockets, reload, stop, kill."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from corespond.adapters.eido import eido_document
from corespond.daemon.snapshot import GeoPoint, Location, Note, Snapshot, snapshot_to_json
from tests.daemon.daemon_process import DaemonProcess

pytestmark = pytest.mark.process

TOKEN = "process-test-token-0123456789"
T0 = datetime(2026, 11, 26, 20, 0, tzinfo=UTC)


def write_config(
    tmp: Path, *, extra_feed: str = "", broken: bool = False, http_port: int = 0
) -> Path:
    (tmp / "token").write_text(TOKEN + "\n")
    (tmp / "spool").mkdir(exist_ok=True)
    config = tmp / "corespond.yaml"
    config.write_text(
        f"""
state_dir: {tmp / "state"}
logging: {{level: info, format: json}}
feeds:
  cad-eido:
    format: eido
    transport:
      type: http
      listen: {{host: 127.0.0.1, port: {http_port}}}
      path: /feeds/cad-eido
      token_file: {tmp / "token"}
  cad-lines:
    format: jsonl
    transport:
      type: tcp
      listen: {{host: 127.0.0.1, port: 0}}
      framing: newline
      ack: ack-nak
{extra_feed}
"""
        + ("  broken: {format: nonsense}\n" if broken else "")
    )
    return config


def snapshot(n: int, text: str = "RP states brother hearing voices", minutes: int = 0) -> Snapshot:
    return Snapshot(
        incident_id=f"urn:emergency:uid:incidentid:proc{n}:psap.test.invalid",
        updated_at=T0 + timedelta(minutes=minutes),
        call_type="EMOTIONALLY DISTURBED PERSON",
        call_type_code="EDP",
        apco_type="EDP",
        agency="police.test.invalid",
        notes=(Note(text, T0),),
    )


def post(port: int, body: bytes, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/feeds/cad-eido", data=body, method="POST",
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {token}"} if token else {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def send_lines(port: int, lines: list[bytes]) -> bytes:
    """Send newline-framed messages; return the answers, one ACK or NAK byte per message
    (each answer is the byte and a line feed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"".join(line + b"\n" for line in lines))
        answers = b""
        while answers.count(b"\n") < len(lines):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answers += chunk
        return answers.replace(b"\n", b"")


def started(daemon: DaemonProcess) -> dict[str, int]:
    ports: dict[str, int] = {}
    while len(ports) < 2:
        line = daemon.wait_log(
            lambda e: e.get("event") in ("feed.http.listening", "feed.tcp.listening")
        )
        ports["http" if line["event"] == "feed.http.listening" else "tcp"] = line["port"]
    daemon.wait_datagram("READY=1")
    return ports


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corespond.daemon.cli", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_ingest_reload_and_clean_stop(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    daemon = DaemonProcess(config, tmp_path)
    try:
        ports = started(daemon)
        body = json.dumps(eido_document(snapshot(1))).encode()
        assert post(ports["http"], body) == (
            200, {"results": [{"incident_id": snapshot(1).incident_id, "snapshot": "new"}]}
        )  # fmt: skip
        status, answer = post(ports["http"], body)
        assert status == 200 and answer["results"][0]["snapshot"] == "duplicate"
        status, answer = post(ports["http"], b'{"$id": "x", ')
        assert status == 400 and answer["error"] == "malformed-json"
        assert post(ports["http"], body, token="wrong")[0] == 401

        weapon = snapshot(2, "SUBJ states he has a knife", minutes=1)
        lines = [
            json.dumps(snapshot_to_json(snapshot(2))).encode(),
            json.dumps(snapshot_to_json(weapon)).encode(),
            b'{"id": "no-time"}',
        ]
        assert send_lines(ports["tcp"], lines) == b"\x06\x06\x15"
        changed = daemon.wait_event("cad.snapshot.stored", changed=True, response="police")
        assert changed["incident_id"] == weapon.incident_id
        assert changed["old_response"] == "clinician"

        # A broken configuration is refused whole; the daemon says so and keeps running.
        write_config(tmp_path, broken=True)
        daemon.send_signal(signal.SIGHUP)
        aborted = daemon.wait_event("config.reload.aborted")
        assert any("broken" in e for e in aborted["errors"])
        daemon.wait_datagram("READY=1")
        assert post(ports["http"], body)[0] == 200

        # A good one is applied: a new feed starts, the others keep their sockets.
        spool = tmp_path / "spool"
        write_config(
            tmp_path,
            extra_feed=f"""  cad-files:
    format: jsonl
    transport: {{type: spool, directory: {spool}, poll_interval_seconds: 0.2}}
""",
        )
        daemon.send_signal(signal.SIGHUP)
        daemon.wait_datagram("RELOADING=1")
        complete = daemon.wait_event("config.reload.complete")
        assert complete["changes"] == ["started spool:cad-files"]
        (spool / "one.jsonl").write_bytes(json.dumps(snapshot_to_json(snapshot(3))).encode())
        daemon.wait_event("cad.snapshot.stored", incident_id=snapshot(3).incident_id)

        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    assert "STOPPING=1" in daemon.datagrams
    summary = daemon.stderr.decode()
    assert "snapshots stored           4" in summary, summary
    assert "incidents 3, snapshots 4, decisions 4, rejects 2" in summary, summary
    # No log line carries the narrative, a name or the token.
    text = json.dumps(daemon.log)
    assert "hearing voices" not in text and "has a knife" not in text and TOKEN not in text

    listed = cli("incidents", "list", "--json", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    ids = {json.loads(line)["external_id"] for line in listed.stdout.splitlines()}
    assert ids == {snapshot(n).incident_id for n in (1, 2, 3)}
    shown = cli("incidents", "show", snapshot(2).incident_id, "--json", "-c", str(config))
    detail = json.loads(shown.stdout)
    assert detail["incident"]["response"] == "police"
    assert [d["decision"]["response"] for d in detail["decisions"]] == ["clinician", "police"]


def test_startup_failure_exits_non_zero(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    config = write_config(tmp_path, http_port=blocker.getsockname()[1])
    daemon = DaemonProcess(config, tmp_path)
    try:
        assert daemon.finish() == 1
    finally:
        daemon.kill()
        blocker.close()
    assert b"cannot start" in daemon.stderr


def test_sigkill_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    """Kill -9 in the middle of a stream; every acknowledged snapshot is in the store."""
    config = write_config(tmp_path)
    daemon = DaemonProcess(config, tmp_path)
    acked: list[str] = []
    try:
        ports = started(daemon)
        with socket.create_connection(("127.0.0.1", ports["tcp"]), timeout=30) as sock:
            snaps = [snapshot(100 + n) for n in range(400)]
            payload = b"".join(json.dumps(snapshot_to_json(s)).encode() + b"\n" for s in snaps)
            sock.sendall(payload)
            received = b""
            while received.count(b"\n") < 150:
                received += sock.recv(4096)
            daemon.proc.kill()  # SIGKILL, mid-stream
            try:
                while chunk := sock.recv(4096):
                    received += chunk
            except OSError:
                pass
        answers = received.split(b"\n")[:-1]  # an answer cut by the kill does not count
        assert set(answers) <= {b"\x06"}
        acked = [s.incident_id for s in snaps[: len(answers)]]
    finally:
        daemon.kill()
    listed = cli("incidents", "list", "--json", "--limit", "1000", "-c", str(config))
    stored = {json.loads(line)["external_id"] for line in listed.stdout.splitlines()}
    assert set(acked) <= stored
    # A restarted daemon takes the resend of everything: nothing twice.
    daemon = DaemonProcess(config, tmp_path)
    try:
        ports = started(daemon)
        acks = send_lines(ports["tcp"], [json.dumps(snapshot_to_json(s)).encode() for s in snaps])
        assert acks == b"\x06" * len(snaps)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    listed = cli("incidents", "list", "--json", "--limit", "1000", "-c", str(config))
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 400 and all(r["snapshot_count"] == 1 for r in rows)


def test_paging_starts_a_chain_from_a_decision(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    roster = Path(__file__).parent.parent / "fixtures" / "paging" / "roster.yaml"
    config.write_text(config.read_text() + f"paging:\n  roster: {roster}\n")
    daemon = DaemonProcess(config, tmp_path)
    try:
        ports = started(daemon)
        snap = dataclasses.replace(snapshot(7), location=Location(GeoPoint(30.25, -97.75)))
        assert send_lines(ports["tcp"], [json.dumps(snapshot_to_json(snap)).encode()]) == b"\x06"
        chain = daemon.wait_event("escalation.chain.started", incident_id=snap.incident_id)
        assert chain["program"] == "metro" and chain["kind"] == "dispatch"
        # Nobody has a location fix yet: the page steps find no candidate and the chain goes
        # straight on to the supervisors (no gateway is configured here: the notices fail).
        daemon.wait_event("escalation.step.done", action="supervisor")
        daemon.wait_event("page.submit.failed", outcome="undeliverable")
        daemon.send_signal(signal.SIGHUP)
        complete = daemon.wait_event("config.reload.complete")
        assert complete["changes"] == ["no feed changed", "paging roster reloaded"]
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    outcomes = [e["outcome"] for e in daemon.log if e.get("event") == "escalation.step.done"]
    assert outcomes == ["no-candidate", "no-candidate", "notified"]
    text = json.dumps(daemon.log)
    # The roster's pager addresses, whole: a bare "5550" also matched a peer's port (45550).
    addresses = re.findall(r'address: "([^"]+)"', roster.read_text())
    assert addresses and not [a for a in addresses if a in text]
    assert "hearing voices" not in text
