"""Paging end to end through the real daemon: a CAD snapshot posted to the HTTP feed, the rules'
decision, the nearest clinician paged through the WCTP adapter to a stand-in carrier, the
carrier's reply posted to the daemon's callback, escalation over SMS on the daemon's clock, the
signed ack link opened and answered over HTTP. Every socket is real loopback; the store is
SQLite and PostgreSQL."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred

from corespond.daemon.app import Corespond
from corespond.daemon.config import load_config
from corespond.daemon.feeds import HttpListener
from corespond.daemon.snapshot import Snapshot, snapshot_to_json
from tests.adapters.carriers import FakeCarrier, FakeMessagesApi, reply_xml
from tests.browser import free_port
from tests.daemon.paging_rig import (
    FEED_TOKEN,
    FIXES,
    INCIDENT_1,
    INCIDENT_2,
    MARKERS,
    SYSTEM_TOKEN,
    WCTP_CALLBACK_TOKEN,
    Turner,
    cad_snapshot,
    location_body,
    rows,
    sms_callback,
    write_daemon_config,
)

LINK = re.compile(r"http://127\.0\.0\.1:\d+/ack/v1\.[A-Za-z0-9_\-.]+")


@dataclass
class Daemon:
    turner: Turner
    app: Corespond
    carrier: FakeCarrier
    sms: FakeMessagesApi
    store_url: str
    web: str
    feed: str

    def post_snapshot(self, snap: Snapshot) -> Any:
        body = json.dumps(snapshot_to_json(snap)).encode()
        headers = {b"authorization": f"Bearer {FEED_TOKEN}".encode(),
                   b"content-type": b"application/json"}  # fmt: skip
        return self.turner.http("POST", self.feed, body, headers)

    def idle(self) -> None:
        assert self.app.paging is not None
        self.turner.until(self.app.paging.idle())

    def advance_minutes(self, minutes: float) -> None:
        self.turner.advance(minutes * 60)
        self.idle()

    def page(self, clinician_id: str) -> Any:
        (row,) = rows(self.store_url, "SELECT page_ref, state, gateway_id, chain_id FROM pages "
                      f"WHERE clinician_id = '{clinician_id}'")  # fmt: skip
        return row


@pytest.fixture(name="daemon")
def daemon_fixture(tmp_path: Path, db_url: str) -> Iterator[Daemon]:
    turner = Turner()
    carrier, sms = FakeCarrier(), FakeMessagesApi()
    wctp_port, sms_port = turner.serve(carrier), turner.serve(sms)
    web_port = free_port()
    config = write_daemon_config(
        tmp_path, store_url=db_url, wctp_url=f"http://127.0.0.1:{wctp_port}/wctp",
        sms_url=f"http://127.0.0.1:{sms_port}", web_port=web_port,
    )  # fmt: skip
    app = Corespond(load_config(config), turner.reactor)
    try:
        turner.until(ensureDeferred(app.start()))
        listener = app.feeds.find("http", 0)
        assert isinstance(listener, HttpListener)
        web = f"http://127.0.0.1:{web_port}"
        d = Daemon(turner, app, carrier, sms, db_url, web,
                   f"http://127.0.0.1:{listener.port}/feeds/cad")  # fmt: skip
        for cid, (lat, lon) in FIXES.items():
            fix = location_body(cid, lat, lon, turner.reactor.seconds())
            answer = turner.http(
                "POST", f"{web}/api/v1/location", fix,
                {b"authorization": f"Bearer {SYSTEM_TOKEN}".encode(),
                 b"content-type": b"application/json"},
            )  # fmt: skip
            assert answer.code == 200, answer.body
        yield d
        turner.until(ensureDeferred(app.stop()))
    finally:
        turner.close()


def test_page_reply_escalation_and_ack_link_through_the_daemon(daemon: Daemon) -> None:
    d, carrier, sms = daemon, daemon.carrier, daemon.sms
    # 1. A behavioral-health call in the metro zone: the nearest clinician is paged over WCTP.
    answer = d.post_snapshot(cad_snapshot(1, INCIDENT_1))
    assert answer.code == 200 and json.loads(answer.body)["results"][0]["snapshot"] == "new"
    d.turner.until_true(lambda: len(carrier.submits) == 1)
    d.idle()
    (submit,) = carrier.submits
    header = submit.find("wctp-SubmitHeader")
    assert header.find("wctp-Recipient").get("recipientID") == "5550101"  # c-1
    message_id = header.find("wctp-MessageControl").get("messageID")
    page_text = submit.findtext("wctp-Payload/wctp-MCR/wctp-MessageText")
    ref1, _state, gateway_id, _chain = d.page("c-1")
    assert gateway_id == message_id
    assert page_text.startswith(ref1) and LINK.search(page_text)
    assert [c.text for c in submit.findall("wctp-Payload/wctp-MCR/wctp-Choice")] == [
        "Accept", "Decline", "En route",
    ]  # fmt: skip

    # 2. The carrier pushes the clinician's multiple-choice reply to our callback; it is
    # confirmed only once committed, and the chain stops.
    cb = d.turner.http(
        "POST", f"{d.web}/gateways/wctp-main?token={WCTP_CALLBACK_TOKEN}",
        reply_xml(to=message_id, text="Accept", sender="5550101"),
        {b"content-type": b"text/xml"},
    )  # fmt: skip
    assert cb.code == 200 and b"wctp-Success" in cb.body, cb.body
    d.idle()
    assert d.page("c-1")[1] == "accepted"
    [(state, accepted_by)] = rows(d.store_url, "SELECT state, accepted_by FROM escalation_chains")
    assert (state, accepted_by) == ("accepted", "c-1")
    d.advance_minutes(6)
    d.advance_minutes(6)
    assert len(carrier.submits) == 1 and sms.posts == []

    # 3. A second call, nobody answers: after the wait, the next nearest is paged over SMS.
    assert d.post_snapshot(cad_snapshot(2, INCIDENT_2)).code == 200
    d.turner.until_true(lambda: len(carrier.submits) == 2)
    d.idle()
    header = carrier.submits[1].find("wctp-SubmitHeader")
    assert header.find("wctp-Recipient").get("recipientID") == "5550103"  # c-3
    d.advance_minutes(4)
    assert sms.posts == []  # not before its time
    d.advance_minutes(1.1)
    d.turner.until_true(lambda: len(sms.posts) == 1)
    d.idle()
    (_path, form, _auth) = sms.posts[0]
    assert form["To"] == ["+15550000102"]  # c-2
    body = form["Body"][0]
    ref2 = d.page("c-2")[0]
    assert body.startswith(ref2)
    (link,) = LINK.findall(body)

    # 4. The clinician texts back; the signed callback is matched by the page's reference.
    callback, headers = sms_callback({
        "MessageSid": "SM" + "b" * 32, "AccountSid": "AC" + "1" * 32, "From": "+15550000102",
        "To": "+15550000001", "Body": f"accept {ref2}", "SmsStatus": "received",
    })  # fmt: skip
    got = d.turner.http("POST", f"{d.web}/gateways/sms-main", callback, headers)
    assert got.code == 200, got.body
    d.idle()
    [(matched_by, outcome)] = rows(
        d.store_url,
        "SELECT r.matched_by, r.outcome FROM page_replies r JOIN pages p ON p.id = r.page_id "
        f"WHERE p.page_ref = '{ref2}'",
    )
    assert (matched_by, outcome) == ("page_ref", "applied")
    assert d.page("c-2")[1] == "accepted" and d.page("c-3")[1] == "cancelled"

    # 5. The ack link from the SMS opens the page over HTTP; its form answers it.
    shown = d.turner.http("GET", link)
    assert shown.code == 200 and ref2 in shown.body.decode()
    nonce = html.unescape(re.search(r'name=nonce value="([^"]+)"', shown.body.decode()).group(1))
    posted = d.turner.http(
        "POST", link, f"nonce={nonce}&answer=on_scene".encode(),
        {b"content-type": b"application/x-www-form-urlencoded", b"origin": d.web.encode()},
    )  # fmt: skip
    assert posted.code == 200, posted.body
    d.idle()
    assert d.page("c-2")[1] == "on_scene"

    # Nothing further is paged for either incident, however long the clock runs.
    d.advance_minutes(11)
    d.advance_minutes(11)
    assert len(carrier.submits) == 2 and len(sms.posts) == 1
    sent = [s.findtext("wctp-Payload/wctp-MCR/wctp-MessageText") for s in carrier.submits]
    sent += [p[1]["Body"][0] for p in sms.posts]
    assert not any(m in text for m in MARKERS for text in sent)
