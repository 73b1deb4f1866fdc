"""Paging with the real daemon process killed with SIGKILL at the worst moments: while the
carrier holds the page's submit (nothing committed about it), and after the page was taken but
before the clinician's reply. The carrier is a stand-in WCTP server in the test's own reactor;
the daemon is restarted on the same store and web port each time."""

from __future__ import annotations

import json
import queue
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from lxml import etree
from twisted.web.server import Request, Site

from corespond.daemon.snapshot import snapshot_to_json
from tests.adapters.carriers import FakeCarrier, reply_xml
from tests.browser import ServedReactor, free_port, served
from tests.daemon.daemon_process import DEADLINE, DaemonProcess
from tests.daemon.paging_rig import (
    FEED_TOKEN,
    FIXES,
    INCIDENT_1,
    MARKERS,
    SYSTEM_TOKEN,
    WCTP_CALLBACK_TOKEN,
    cad_snapshot,
    location_body,
    rows,
    write_daemon_config,
)

pytestmark = pytest.mark.process
__all__ = ["served"]  # the fixture, imported for pytest


class SignallingCarrier(FakeCarrier):
    """The stand-in carrier, telling the test thread of every submit it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.received: queue.Queue[etree._Element] = queue.Queue()

    def render_POST(self, request: Request) -> bytes | int:
        before = len(self.submits)
        answer = super().render_POST(request)
        if len(self.submits) > before:
            self.received.put(self.submits[-1])
        return answer


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=DEADLINE) as response:
        return response.status, response.read()


def start(config: Path, tmp: Path) -> tuple[DaemonProcess, int]:
    daemon = DaemonProcess(config, tmp)
    feed = daemon.wait_event("feed.http.listening")["port"]
    daemon.wait_datagram("READY=1")
    return daemon, feed


def submitted(op: etree._Element) -> tuple[str, str]:
    header = op.find("wctp-SubmitHeader")
    recipient = header.find("wctp-Recipient").get("recipientID")
    return recipient, header.find("wctp-MessageControl").get("messageID")


def test_sigkill_during_and_after_a_submit_pages_once_and_the_reply_lands(
    served: ServedReactor, tmp_path: Path
) -> None:
    carrier = SignallingCarrier()
    carrier.mode = "hang"  # the carrier reads the submit and holds its answer
    wctp_port = served.listen(Site(carrier, reactor=served.reactor))
    web_port = free_port()
    store = f"sqlite:///{tmp_path / 'store.db'}"
    config = write_daemon_config(
        tmp_path, store_url=store, wctp_url=f"http://127.0.0.1:{wctp_port}/wctp",
        sms_url="http://127.0.0.1:9/", web_port=web_port,
    )  # fmt: skip
    web = f"http://127.0.0.1:{web_port}"

    # 1. The page is on the wire when the daemon dies: nothing about it was committed.
    daemon, feed = start(config, tmp_path)
    try:
        for cid, (lat, lon) in FIXES.items():
            status, _ = post(f"{web}/api/v1/location", location_body(cid, lat, lon, time.time()),
                             {"Authorization": f"Bearer {SYSTEM_TOKEN}",
                              "Content-Type": "application/json"})  # fmt: skip
            assert status == 200
        body = json.dumps(snapshot_to_json(cad_snapshot(1, INCIDENT_1))).encode()
        status, _ = post(f"http://127.0.0.1:{feed}/feeds/cad", body,
                         {"Authorization": f"Bearer {FEED_TOKEN}",
                          "Content-Type": "application/json"})  # fmt: skip
        assert status == 200
        first = submitted(carrier.received.get(timeout=DEADLINE))
        assert first[0] == "5550101"  # c-1, the nearest
        daemon.proc.kill()
        daemon.finish()
    finally:
        daemon.kill()
    assert not any(e.get("event") == "page.sent" for e in daemon.log)

    # 2. Restarted: once the dead worker's claim lapses the same page goes again, with the same
    # message id (a carrier that deduplicates drops it); the step is not run again. This time
    # the carrier takes it, and the daemon dies before the clinician answers.
    served.call(setattr, carrier, "mode", "ok")
    daemon, _ = start(config, tmp_path)
    try:
        again = submitted(carrier.received.get(timeout=DEADLINE))
        assert again == first
        daemon.wait_event("page.sent", gateway="wctp-main")
        daemon.proc.kill()
        daemon.finish()
    finally:
        daemon.kill()

    # 3. Restarted again: nothing is sent, and the clinician's reply, pushed by the carrier to
    # the new process, is matched to the page and stops the chain.
    daemon, _ = start(config, tmp_path)
    try:
        status, answer = post(
            f"{web}/gateways/wctp-main?token={WCTP_CALLBACK_TOKEN}",
            reply_xml(to=first[1], text="Accept", sender="5550101"),
            {"Content-Type": "text/xml"},
        )
        assert status == 200 and b"wctp-Success" in answer
        daemon.wait_event("page.reply.received", outcome="applied", matched_by="gateway_id")
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    logs = json.dumps(daemon.log)
    assert all(marker not in logs for marker in MARKERS) and "5550101" not in logs
    assert carrier.received.empty() and len(served.call(lambda: list(carrier.submits))) == 2
    pages = rows(store, "SELECT page_ref, state, delivery, gateway_id FROM pages")
    assert [(state, delivery, gid) for _ref, state, delivery, gid in pages] == [
        ("accepted", "submitted", first[1])
    ]  # fmt: skip
    steps = rows(store, "SELECT step, state FROM escalation_steps ORDER BY step")
    assert steps == [(0, "done"), (1, "cancelled")]
    assert len(served.call(lambda: list(carrier.held))) == 1  # the first was never answered
