"""The inbound MLLP listener: RRI^I12 outcomes and enhanced-mode ACKs matched to referrals,
bad input answered AE/AR with the reason and kept verbatim. Senders: python-hl7's
``mllp_send`` (a process) and our own MLLP client, plain and over mutual TLS."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from corespond.adapters import mllp
from corespond.adapters.hl7_referral import parse_reply
from corespond.adapters.tls import client_tls_options
from corespond.daemon.config import ListenConfig, ServerTlsConfig
from corespond.daemon.referrals import (
    CreatedReferral,
    ReferralListener,
    claim_due,
    create_referral,
    record_delivered,
)
from corespond.daemon.store.tables import hl7_inbound, referral_outcomes, referrals
from tests.adapters.tlsfiles import SERVER_NAME, make_pki
from tests.daemon.referral_rig import Loop, config, now, request


def delivered_referral(engine: Engine) -> CreatedReferral:
    created = create_referral(engine, config(), request(), now())
    with engine.begin() as conn:
        [claimed] = claim_due(conn, now(), "w", lease=timedelta(seconds=30))
        record_delivered(conn, claimed, "AA", now())
    return created


def rri(ref: str, control_id: str, status: str = "A", msh10: str = "RRI-1") -> bytes:
    return (
        f"MSH|^~\\&|BHRECV|CSU|CORESPOND|COUNTY-BH|20270116101500||RRI^I12^RRI_I12|{msh10}|P|"
        f"2.5.1\rMSA|AA|{control_id}\rRF1|{status}^Accepted^HL70283|||||{ref}^CORESPOND|"
        f"20270120093000\rPRD|RT\rPID|1||{ref}^^^CORESPOND^PI\r"
    ).encode()


def start_listener(
    engine: Engine, loop: Loop, tls: ServerTlsConfig | None = None
) -> ReferralListener:
    cfg = replace(config(), listen=ListenConfig("127.0.0.1", 0, tls), max_message_bytes=4096)
    listener = ReferralListener(engine, loop.reactor, cfg, clock=loop.clock)
    listener.start()
    return listener


def stop_listener(loop: Loop, listener: ReferralListener) -> None:
    from twisted.internet.defer import ensureDeferred

    d = ensureDeferred(listener.stop())
    loop.spin(lambda: d.called)


def inbound_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(hl7_inbound).order_by(hl7_inbound.c.id)))


def test_mllp_send_rri_records_the_outcome(engine: Engine, tmp_path: Path) -> None:
    created = delivered_referral(engine)
    assert created.control_id is not None
    loop = Loop()
    listener = start_listener(engine, loop)
    message = tmp_path / "rri.hl7"
    message.write_bytes(rri(created.ref, created.control_id).replace(b"\r", b"\n"))
    mllp_send = str(Path(sys.executable).with_name("mllp_send"))
    proc = subprocess.Popen(
        [mllp_send, "--loose", "-f", str(message), "-p", str(listener.port), "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        loop.spin(lambda: proc.poll() is not None, turns=6000)
    finally:
        stop_listener(loop, listener)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert proc.returncode == 0, out
    ack = parse_reply(out.strip().replace("\n", "\r").encode())
    assert (ack.ack_code, ack.acked_control_id) == ("AA", "RRI-1")
    [row] = inbound_rows(engine)
    assert (row.message_type, row.control_id, row.error_code) == ("RRI", "RRI-1", None)
    with engine.connect() as conn:
        referral = conn.execute(select(referrals)).one()
        outcome = conn.execute(select(referral_outcomes)).one()
    assert referral.outcome == "accepted" and referral.id == row.referral_id
    assert referral.appointment_at == outcome.appointment_at
    assert outcome.appointment_at is not None and outcome.appointment_at.day == 20


def send_frames(
    loop: Loop, port: int, frames: list[bytes], expect: int, tls: Any = None
) -> list[bytes]:
    """Our own raw sender: the replies to ``frames`` (``expect`` of them)."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from corespond.adapters.framing import make_deframer

    replies: list[bytes] = []
    closed: list[bool] = []

    class Sender(Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            closed.append(True)

        def connectionMade(self) -> None:
            assert self.transport is not None
            for f in frames:
                self.transport.write(f)

        def dataReceived(self, data: bytes) -> None:
            replies.extend(m for m in deframer.feed(data) if isinstance(m, bytes))

    deframer = make_deframer("vt-fs-cr", 100_000)
    endpoint = TCP4ClientEndpoint(loop.reactor, "127.0.0.1", port)
    sender = Sender()
    if tls is None:
        d = connectProtocol(endpoint, sender)
    else:
        d = endpoint.connect(
            TLSMemoryBIOFactory(tls, True, Factory.forProtocol(lambda: sender), clock=loop.reactor)
        )
    loop.spin(lambda: len(replies) >= expect or bool(closed))
    loop.settle()
    d.addCallback(lambda p: p.transport.loseConnection() if not closed else None)
    loop.settle()
    return replies


def test_bad_input_is_answered_with_the_reason_and_kept(engine: Engine) -> None:
    created = delivered_referral(engine)
    loop = Loop()
    listener = start_listener(engine, loop)
    garbage = b"this is not HL7 \x00\xff"
    unknown = rri("R-NOBODY", "CR-NOBODY", msh10="RRI-9")
    bad_status = rri(created.ref, created.control_id or "", status="Q", msh10="RRI-8")
    try:
        assert listener.port is not None
        replies = send_frames(
            loop,
            listener.port,
            [
                mllp.frame(garbage),
                mllp.frame(unknown),
                mllp.frame(bad_status),
                mllp.frame(b"MSH|" + b"x" * 5000),
            ],
            expect=4,
        )
    finally:
        stop_listener(loop, listener)
    acks = [parse_reply(r) for r in replies]
    assert [(a.ack_code, a.acked_control_id) for a in acks] == [
        ("AR", None),
        ("AE", "RRI-9"),
        ("AE", "RRI-8"),
        ("AR", None),
    ]
    assert acks[0].ack_text is not None and "does not start with an MSH" in acks[0].ack_text
    assert acks[1].ack_text is not None and "unknown-referral" in acks[1].ack_text
    assert acks[2].ack_text is not None and "RF1-1" in acks[2].ack_text
    assert acks[3].ack_text is not None and "oversize" in acks[3].ack_text
    rows = inbound_rows(engine)
    assert [r.error_code for r in rows] == [
        "missing-field",
        "unknown-referral",
        "invalid-field",
        "oversize",
    ]
    assert rows[0].raw == garbage and rows[1].raw == unknown  # verbatim
    with engine.connect() as conn:
        assert conn.execute(select(referrals.c.outcome)).scalar() is None


def test_enhanced_mode_ack_is_matched_and_not_answered(engine: Engine) -> None:
    created = delivered_referral(engine)
    loop = Loop()
    listener = start_listener(engine, loop)
    app_ack = (
        f"MSH|^~\\&|BHRECV|CSU|CORESPOND|COUNTY-BH|20270116||ACK^I12^ACK|A-5|P|2.5.1\r"
        f"MSA|AA|{created.control_id}\r"
    ).encode()
    try:
        assert listener.port is not None
        # The RRI after the ACK is answered; the ACK itself is not.
        replies = send_frames(
            loop,
            listener.port,
            [mllp.frame(app_ack), mllp.frame(rri(created.ref, "", msh10="R2"))],
            expect=1,
        )
    finally:
        stop_listener(loop, listener)
    assert [parse_reply(r).acked_control_id for r in replies] == ["R2"]
    rows = inbound_rows(engine)
    assert (rows[0].message_type, rows[0].acked_control_id) == ("ACK", created.control_id)
    assert rows[0].referral_id is not None and rows[0].error_code is None


@pytest.mark.parametrize("client_cert", [True, False], ids=["with-client-cert", "without"])
def test_mutual_tls_listener(engine: Engine, tmp_path: Path, client_cert: bool) -> None:
    created = delivered_referral(engine)
    pki = make_pki(tmp_path)
    loop = Loop()
    listener = start_listener(
        engine, loop, ServerTlsConfig(pki.server_cert, pki.server_key, pki.ca_cert, True)
    )
    cert = (pki.client_cert, pki.client_key) if client_cert else (None, None)
    tls = client_tls_options(SERVER_NAME, pki.ca_cert, *cert)
    try:
        assert listener.port is not None
        if client_cert:
            replies = send_frames(
                loop,
                listener.port,
                [mllp.frame(rri(created.ref, created.control_id or ""))],
                1,
                tls=tls,
            )
            assert parse_reply(replies[0]).ack_code == "AA"
        else:
            replies = send_frames(
                loop,
                listener.port,
                [mllp.frame(rri(created.ref, created.control_id or ""))],
                1,
                tls=tls,
            )
            assert replies == []  # the handshake is refused: nothing read, nothing answered
    finally:
        stop_listener(loop, listener)
    assert len(inbound_rows(engine)) == (1 if client_cert else 0)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.binary(max_size=200)
    | st.builds(
        lambda tail: b"MSH|^~\\&|A|B|C|D|2027||RRI^I12|X|P|2.5.1\r" + tail, st.binary(max_size=120)
    )
)
def test_fuzz_whatever_arrives_is_kept_and_answered(engine: Engine, data: bytes) -> None:
    from corespond.daemon.referrals import store_inbound

    result = store_inbound(engine, data, "127.0.0.1:9", now())
    with engine.connect() as conn:
        row = conn.execute(select(hl7_inbound).where(hl7_inbound.c.id == result.inbound_id)).one()
    assert row.raw == data
    if result.ack is not None:
        assert parse_reply(result.ack).ack_code in ("AA", "AE", "AR")
        assert (parse_reply(result.ack).ack_code == "AA") == (row.error_code is None)
