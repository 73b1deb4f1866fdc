"""The demo peers' own parts: the carrier-side WCTP builders and parser, the SMS send form, the
provider's answers and RRI^I12, and the stop summary's counts over a real store."""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree
from sqlalchemy import Engine
from twisted.internet.task import Clock as TaskClock
from twisted.internet.testing import MemoryReactorClock

from corespond.adapters.hl7_referral import parse_reply
from corespond.adapters.wctp import (
    InboundReply,
    InboundStatus,
    build_message_reply,
    build_status_info,
    build_submit_request,
    parse_inbound,
    parse_submit_request,
    parse_wctp,
)
from corespond.daemon.app import activity_lines
from corespond.daemon.clock import Clock
from corespond.daemon.config import ConfigError, DemoPeersConfig, load_config
from corespond.daemon.demo_peers import (
    DemoPeers,
    DemoPeersError,
    DemoProvider,
    _chosen,
    _Later,
    build_rri,
    parse_send_form,
)
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.pager import DeliveryState, PageAnswer, PageMessage
from corespond.daemon.store import tables as t
from corespond.daemon.store.activity import activity_since

NOW = datetime(2027, 1, 15, 12, 0, tzinfo=UTC)


def page(**kwargs: Any) -> PageMessage:
    values: dict[str, Any] = dict(
        page_ref="C1445-2", attempt_id="7.0", address="5550101",
        text="C1445-2 EMOTIONALLY DISTURBED PERSON, D1 Demoville. Reply ACCEPT",
        answers=(PageAnswer.ACCEPT, PageAnswer.DECLINE, PageAnswer.EN_ROUTE), link=None,
    )  # fmt: skip
    values.update(kwargs)
    return PageMessage(**values)


def test_the_carrier_reads_what_the_pager_submits() -> None:
    body = build_submit_request(page(), sender_id="corespond", security_code="s3",
                                now=NOW, send_responses_to="https://x.example/cb")  # fmt: skip
    submit = parse_submit_request(body)
    assert (submit.message_id, submit.sender_id, submit.recipient) == ("7.0", "corespond",
                                                                       "5550101")
    assert submit.choices == ("Accept", "Decline", "En route")
    assert submit.text.startswith("C1445-2 ") and submit.send_responses_to == "https://x.example/cb"
    one_way = parse_submit_request(build_submit_request(page(), sender_id="c", security_code=None,
                                                        now=NOW, two_way=False))  # fmt: skip
    assert one_way.choices == ()


def test_the_carrier_replies_and_notifies_in_what_the_daemon_parses() -> None:
    reply = parse_inbound(parse_wctp(build_message_reply("7.0", "Decline", replier="5550101")))
    assert reply == InboundReply("7.0", "5550101", "Decline", True)
    status = parse_inbound(parse_wctp(build_status_info("7.0", "DELIVERED")))
    assert status == InboundStatus("7.0", DeliveryState.DELIVERED, None)


def test_a_submit_without_a_message_id_is_refused_precisely() -> None:
    body = build_submit_request(page(), sender_id="c", security_code=None, now=NOW)
    body = body.replace(b'messageID="7.0"', b"")
    with pytest.raises(RejectedMessage) as caught:
        parse_submit_request(body)
    assert caught.value.code == "missing-field"
    assert caught.value.where == "/wctp-Operation/wctp-SubmitRequest/wctp-SubmitHeader/" \
        "wctp-MessageControl"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_submit_parser_only_ever_rejects(data: bytes) -> None:
    try:
        parse_submit_request(data)
    except RejectedMessage as err:
        assert err.code


_names = st.sampled_from(["wctp-SubmitRequest", "wctp-SubmitHeader", "wctp-Originator",
                          "wctp-MessageControl", "wctp-Recipient", "wctp-Payload", "wctp-MCR",
                          "wctp-Choice", "wctp-MessageText", "wctp-Alphanumeric"])  # fmt: skip
_attrs = st.dictionaries(st.sampled_from(["senderID", "messageID", "recipientID",
                                          "sendResponsesToID"]),
                         st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                                 max_size=140), max_size=3)  # fmt: skip
_tree = st.recursive(
    st.tuples(_names, _attrs, st.just([])),
    lambda kids: st.tuples(_names, _attrs, st.lists(kids, max_size=4)),
    max_leaves=12,
)


def _xml(node: Any) -> etree._Element:
    name, attrs, kids = node
    element = etree.Element(name, **attrs)
    for kid in kids:
        element.append(_xml(kid))
    return element


@settings(max_examples=300, deadline=None)
@given(_tree)
def test_fuzz_submit_shaped_documents_parse_or_reject_precisely(node: Any) -> None:
    root = etree.Element("wctp-Operation", wctpVersion="wctp-dtd-v1r3")
    root.append(_xml(node))
    try:
        submit = parse_submit_request(etree.tostring(root))
    except RejectedMessage as err:
        assert err.code in ("missing-field", "invalid-field", "unsupported")
        assert err.where is None or err.where.startswith("/")
    else:
        assert submit.message_id and submit.recipient


def test_the_sms_send_form_needs_to_and_body() -> None:
    form = parse_send_form(b"To=%2B15550000102&Body=C1445-2+call&StatusCallback=http%3A%2F%2Fx")
    assert form == {"To": "+15550000102", "Body": "C1445-2 call", "StatusCallback": "http://x"}
    with pytest.raises(RejectedMessage) as caught:
        parse_send_form(b"To=%2B1555")
    assert (caught.value.code, caught.value.where) == ("missing-field", "Body")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_sms_send_form_only_ever_rejects(data: bytes) -> None:
    try:
        form = parse_send_form(data)
    except RejectedMessage as err:
        assert err.code in ("malformed", "missing-field", "oversize")
    else:
        assert form["To"] and form["Body"]


REF = (
    b"MSH|^~\\&|CORESPOND|DEMO-BH|BHRECV|CSU|20270115120000||REF^I12^REF_I12|CR00AA|T|2.5.1\r"
    b"RF1|P^Pending^HL70283|||||RABC123^CORESPOND|20270115120000\r"
)


def provider(**kwargs: Any) -> tuple[DemoProvider, TaskClock, list[Any]]:
    clock = TaskClock()
    clock.advance(NOW.timestamp())
    sent: list[Any] = []
    settings_ = DemoPeersConfig(wctp_port=1, sms_port=2, mllp_port=3, **kwargs)
    peer = DemoProvider(clock, Clock(clock), _Later(Clock(clock)), random.Random(1), settings_,
                        listener=lambda: None)  # fmt: skip
    peer._send_rri = lambda acked, status: sent.append((acked.control_id, status))  # type: ignore[method-assign]
    return peer, clock, sent


def test_the_provider_answers_a_resend_with_the_same_ack_and_sends_one_rri() -> None:
    peer, clock, sent = provider(ae_share=0.0, rri_share=1.0, reply_delay_seconds=2)
    first = peer.handle(REF, "127.0.0.1:1")
    assert first is not None and parse_reply(first).ack_code == "AA"
    assert parse_reply(first).acked_control_id == "CR00AA"
    assert peer.handle(REF, "127.0.0.1:1") == first  # the same bytes again
    clock.advance(5)
    assert sent == [("CR00AA", sent[0][1])] and sent[0][1] in "APR"


def test_the_provider_refuses_with_ae_and_then_sends_no_rri() -> None:
    peer, clock, sent = provider(ae_share=1.0, rri_share=1.0)
    answer = peer.handle(REF, None)
    assert answer is not None and parse_reply(answer).ack_code == "AE"
    clock.advance(60)
    assert sent == []


def test_the_rri_names_the_referral_and_the_appointment() -> None:
    acked = parse_reply(REF)
    rri = parse_reply(build_rri(acked, "A", "DP1", NOW, NOW + timedelta(days=1)))
    assert (rri.message_type, rri.trigger, rri.acked_control_id) == ("RRI", "I12", "CR00AA")
    assert rri.originating_referral_id == "RABC123" and rri.referral_status == "accepted"
    assert rri.appointment_at == (NOW + timedelta(days=1)).replace(second=0)


def test_which_calls_are_referred_is_the_same_on_every_look() -> None:
    picks = [_chosen(7, f"26-{100000 + n}", 0.5) for n in range(200)]
    assert picks == [_chosen(7, f"26-{100000 + n}", 0.5) for n in range(200)]
    assert 60 < sum(picks) < 140
    assert not any(_chosen(7, "26-1", 0.0) for _ in range(3))


def _incident(conn: Any, n: int) -> int:
    return int(conn.execute(t.incidents.insert().values(
        source="s", external_id=f"e{n}", incident_number=f"26-{n}", status="active",
        updated_at=NOW, first_received_at=NOW, last_received_at=NOW, snapshot_count=1,
        behavioral_health=True, response="clinician",
    ).returning(t.incidents.c.id)).scalar_one())  # fmt: skip


def _chain(conn: Any, incident_pk: int, state: str, steps: list[tuple[str, str]]) -> int:
    chain = int(conn.execute(t.escalation_chains.insert().values(
        incident_pk=incident_pk, kind="dispatch", program="north", response="clinician",
        steps=[], state=state, created_at=NOW, pages_sent=0,
        accepted_by="c-101" if state == "accepted" else None,
        closed_at=NOW if state != "open" else None,
    ).returning(t.escalation_chains.c.id)).scalar_one())  # fmt: skip
    for n, (action, step_state) in enumerate(steps):
        conn.execute(t.escalation_steps.insert().values(
            chain_id=chain, step=n, action=action, due_at=NOW, state=step_state))  # fmt: skip
    return chain


def _page(conn: Any, chain: int, incident_pk: int, ref: str, kind: str, state: str) -> None:
    step = conn.execute(t.escalation_steps.select().where(
        t.escalation_steps.c.chain_id == chain)).first()  # fmt: skip
    conn.execute(t.pages.insert().values(
        page_ref=ref, chain_id=chain, step_id=step.id, incident_pk=incident_pk, kind=kind,
        clinician_id="c-101" if kind == "page" else None, state=state, text="t", created_at=NOW,
        answered_at=NOW if state in ("accepted", "declined") else None, endpoints=[],
        endpoint_index=0, delivery="submitted", submitted_at=NOW,
    ))  # fmt: skip


def test_the_summary_counts_pages_answers_escalations_and_referrals(engine: Engine) -> None:
    from corespond.daemon.store.activity import accepted_without_referral

    with engine.begin() as conn:
        a, b, c = (_incident(conn, n) for n in (1, 2, 3))
        first = _chain(conn, a, "accepted", [("page", "done"), ("page", "cancelled")])
        _page(conn, first, a, "C1-1", "page", "accepted")
        second = _chain(conn, b, "exhausted", [("page", "done"), ("page", "done"),
                                               ("supervisor", "done"), ("dispatch", "done")])
        _page(conn, second, b, "C2-1", "page", "declined")
        _page(conn, second, b, "C2-2", "page", "open")
        _page(conn, second, b, "C2-3", "notice", "sent")
        third = _chain(conn, c, "accepted", [("page", "done")])
        _page(conn, third, c, "C3-1", "page", "accepted")
        ref = int(conn.execute(t.referrals.insert().values(
            ref="R1", incident_ref="26-1", provider="demo-csu", service_type="x",
            urgency="asap", referring_clinician="c-101", state="delivered", part2=False,
            created_at=NOW, updated_at=NOW, person={}, outcome="accepted",
        ).returning(t.referrals.c.id)).scalar_one())  # fmt: skip
        for n, code in enumerate((None, "AA")):  # a resend: the latest message counts
            conn.execute(t.referral_messages.insert().values(
                referral_id=ref, control_id=f"CR{n}", provider="demo-csu", profile="ref-i12",
                state="acked", attempts=1, next_due=NOW, created_at=NOW, message=b"x",
                ack_code=code))  # fmt: skip
    with engine.connect() as conn:
        got = activity_since(conn, NOW - timedelta(minutes=1))
        later = activity_since(conn, NOW + timedelta(minutes=1))
        waiting = accepted_without_referral(conn, NOW - timedelta(minutes=1))
    assert (got.pages_sent, got.clinician_pages, got.accepted, got.declined, got.unanswered) \
        == (5, 4, 2, 1, 1)
    assert (got.chains, got.escalated, got.reached_supervisor, got.reached_dispatch) \
        == (3, 1, 1, 1)
    assert [(r.state, r.ack_code, r.outcome, r.count) for r in got.referrals] \
        == [("delivered", "AA", "accepted", 1)]
    assert (later.pages_sent, later.chains, later.referral_total) == (0, 0, 0)
    assert [w.incident_number for w in waiting] == ["26-3"]
    text = "\n".join(activity_lines(got))
    assert "pages sent                 5" in text and "(ACK AA, RRI accepted)" in text


def test_demo_peers_config_is_checked_precisely(tmp_path: Path) -> None:
    path = tmp_path / "corespond.yaml"
    path.write_text("demo:\n  peers: {wctp_port: 0, sms_port: 8942, answer_share: 1.5}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    found = [str(p) for p in caught.value.problems]
    assert any("'demo.peers.wctp_port'" in p for p in found), found
    assert any("'demo.peers.answer_share'" in p for p in found), found
    assert any("'demo.peers'" in p and "mllp_port" in p for p in found), found
    path.write_text("demo:\n  peers: {wctp_port: 1, sms_port: 2, mllp_port: 3}\n")
    peers = load_config(path).demo.peers  # type: ignore[union-attr]
    assert peers == DemoPeersConfig(wctp_port=1, sms_port=2, mllp_port=3)


def test_the_demo_config_asks_for_every_peer() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "config" / "demo.yaml")
    assert config.demo is not None and config.demo.peers is not None
    peers = config.demo.peers
    assert config.web is not None and peers.avl_system in {s.name for s in config.web.systems}
    assert config.referrals is not None and config.referrals.provider(
        peers.referral_provider or ""
    ) is not None
    by_type = {g.type: g for g in config.gateways}
    assert by_type["wctp"].url == f"http://127.0.0.1:{peers.wctp_port}/wctp"
    assert by_type["sms"].url == f"http://127.0.0.1:{peers.sms_port}"
    assert config.referrals.providers[0].port == peers.mllp_port
    assert config.paging is not None and len(config.paging.roster.clinicians) >= 24


def test_peers_that_name_nothing_configured_stop_the_start() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "config" / "demo.yaml")
    assert config.demo is not None and config.demo.peers is not None
    wrong = dataclasses.replace(
        config, demo=dataclasses.replace(
            config.demo, peers=dataclasses.replace(config.demo.peers, avl_system="nobody")),
    )  # fmt: skip
    clock = TaskClock()
    with pytest.raises(DemoPeersError, match="avl_system 'nobody'"):
        DemoPeers(wrong, clock, Clock(clock), engine=None, in_thread=lambda f: None,
                  referrals=None, referral_listener=lambda: None)  # fmt: skip


def test_the_simulator_holds_closes_back_and_still_sends_them() -> None:
    from corespond.adapters.eido import eido_document
    from corespond.adapters.newworld import newworld_document
    from corespond.daemon.demo import CadSimulator, SimulatorTargets

    reactor = MemoryReactorClock()
    reactor.advance(NOW.timestamp())
    sim = CadSimulator(reactor, Clock(reactor), SimulatorTargets(tcp_host="127.0.0.1", tcp_port=9),
                       incidents=3, interval=1.0, seed=7, eido_document=eido_document,
                       newworld_document=newworld_document, close_after=30.0)  # fmt: skip
    sim.start()
    sent: list[tuple[float, str]] = []
    for _ in range(60):
        reactor.advance(1.0)
        while reactor.tcpClients:
            factory = reactor.tcpClients.pop(0)[2]
            [line] = factory.buildProtocol(None).lines
            sent.append((reactor.seconds() - NOW.timestamp(), json.loads(line)["status"]))
    closes = [at for at, status in sent if status == "closed"]
    opens = [at for at, status in sent if status != "closed"]
    assert len(closes) >= 3 and opens  # every close is sent (resends may repeat one)
    assert min(closes) >= 30 + min(opens)
    assert not sim._loop.running  # type: ignore[attr-defined]


def test_a_rerun_numbers_its_incidents_after_those_the_store_holds() -> None:
    from corespond.adapters.eido import eido_document
    from corespond.adapters.newworld import newworld_document
    from corespond.daemon.demo import CadSimulator, SimulatorTargets

    reactor = MemoryReactorClock()
    sim = CadSimulator(reactor, Clock(reactor), SimulatorTargets(tcp_host="127.0.0.1", tcp_port=9),
                       incidents=2, interval=1.0, seed=7, eido_document=eido_document,
                       newworld_document=newworld_document, first=40)  # fmt: skip
    numbers = {json.loads(payload)["number"] for _, payload, _, _ in sim._queue}
    assert numbers == {"26-100040", "26-100041"}


def test_the_cad_units_eido_is_a_fix_and_a_status_of_the_unit() -> None:
    from corespond.adapters.eido import snapshot_from_eido
    from corespond.adapters.eido_units import unit_locations_of_message
    from corespond.daemon.demo import unit_eido

    doc = unit_eido("MCT-N1", "OutOfService", (40.02, -105.27), NOW)
    found = unit_locations_of_message(json.dumps(doc).encode(), statuses=True)
    assert found.problems == ()
    [fix] = found.fixes
    assert (fix.unit, fix.latitude, fix.longitude, fix.fixed_at) == ("MCT-N1", 40.02, -105.27, NOW)
    [status] = found.statuses
    assert (status.unit, status.status, status.at) == ("MCT-N1", "OutOfService", NOW)
    snapshot = snapshot_from_eido(doc)  # the feed stores it like any EIDO: no call type, no page
    assert snapshot.call_type is None and [u.id for u in snapshot.units] == ["MCT-N1"]


FORM_HTML = b"""<!doctype html><p><a href="/ack/t0k">back</a></p>
<form method=post><input type=hidden name=nonce value="n&amp;1">
<select name=disposition><option value="">-</option><option value=arrest selected>A</option>
</select><select name=gender><option value="">-</option><option value=woman>W</option></select>
<label><input type=checkbox name=actions value=assessment checked>a</label>
<label><input type=checkbox name=actions value=naloxone>n</label>
<input name=language value=es><textarea name=notes>two
lines</textarea><button type=submit name=action value=save>Save</button></form>
<nav><a href="/encounter/t0k/referral">Refer</a></nav>
<form><input name=other value=x></form>"""


def test_the_phone_reads_a_form_as_a_browser_submits_it() -> None:
    from corespond.daemon.demo_peers import read_html_form

    form = read_html_form(FORM_HTML)
    assert form.fields == [("nonce", "n&1"), ("disposition", "arrest"), ("gender", ""),
                           ("actions", "assessment"), ("language", "es"),
                           ("notes", "two\nlines")]  # fmt: skip
    assert form.links == ["/ack/t0k", "/encounter/t0k/referral"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode)
       | st.lists(st.sampled_from([b"<form>", b"</form>", b"<select name=s>", b"</select>",
                                   b"<option value=v selected>", b"<textarea name=t>",
                                   b"</textarea>", b"<input type=checkbox name=c checked>",
                                   b"<a href=x>", b"<input>", b"&amp;", b"text"]),
                  max_size=30).map(b"".join))  # fmt: skip
def test_fuzz_the_phones_form_reader_never_fails(html: bytes) -> None:
    from corespond.daemon.demo_peers import read_html_form

    form = read_html_form(html)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in form.fields)
