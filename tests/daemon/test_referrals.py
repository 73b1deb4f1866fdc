"""Referrals: creation, Part 2 consent, and the outbox delivered to real MLLP peers.

Store tests run on SQLite and PostgreSQL (the ``engine`` fixture). Delivery runs over real
loopback sockets on a private reactor; ACK timeouts and backoff run on a fake clock.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from corespond.adapters.hl7_referral import PART2_NOTICE, parse_reply
from corespond.adapters.tls import server_tls_options
from corespond.daemon.referrals import (
    ReferralError,
    ReferralWorker,
    attach_consent,
    backoff_delay,
    cancel_referral,
    claim_due,
    create_referral,
    list_referrals,
    record_consent,
    retry_referral,
    show_referral,
)
from corespond.daemon.store.tables import (
    referral_disclosures,
    referral_messages,
    referrals,
)
from tests.adapters.tlsfiles import SERVER_NAME, make_pki
from tests.daemon.referral_rig import (
    Loop,
    Peer,
    config,
    now,
    provider,
    python_hl7_peer,
    request,
    txhl7_peer,
    with_port,
)


def message_states(engine: Engine) -> list[tuple[str, str, int]]:
    with engine.connect() as conn:
        return [
            (r.control_id, r.state, r.attempts)
            for r in conn.execute(select(referral_messages).order_by(referral_messages.c.id))
        ]


def referral_state(engine: Engine, ref: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(referrals).where(referrals.c.ref == ref)).one()


# --- creation ----------------------------------------------------------------------------------


def test_create_queues_the_message_built_once(engine: Engine) -> None:
    created = create_referral(engine, config(), request(), now())
    assert created.state == "queued" and created.control_id is not None
    with engine.connect() as conn:
        row = conn.execute(select(referral_messages)).one()
    assert row.state == "pending" and row.attempts == 0 and row.next_due == now()
    reply = parse_reply(row.message)
    assert (reply.message_type, reply.trigger, reply.control_id) == (
        "REF",
        "I12",
        created.control_id,
    )
    assert reply.originating_referral_id == created.ref
    assert b"needs a bed \\S\\ tonight \\T\\ follow-up" in row.message
    assert PART2_NOTICE.encode() not in row.message


def test_routing_rules_refuse(engine: Engine) -> None:
    cfg = config(provider(service_types=("outpatient",), regions=("north",)))
    with pytest.raises(ReferralError, match="does not take service type crisis-stabilization"):
        create_referral(engine, cfg, request(), now())
    cfg = config(provider(regions=("north",)))
    with pytest.raises(ReferralError, match="does not take region south"):
        create_referral(engine, cfg, request(region="south"), now())
    with pytest.raises(ReferralError, match="unknown provider nowhere"):
        create_referral(engine, cfg, request(provider="nowhere"), now())
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(referrals)).scalar() == 0


def test_part2_without_consent_is_held_and_not_queued(engine: Engine) -> None:
    created = create_referral(engine, config(), request(part2=True), now())
    assert created.state == "held" and created.control_id is None
    assert created.hold_reason is not None and "part2-no-consent" in created.hold_reason
    assert message_states(engine) == []
    # A consent for another provider or one that expired does not cover it either.
    with engine.begin() as conn:
        record_consent(conn, "CONS-OTHER", "elsewhere", now())
        record_consent(
            conn,
            "CONS-OLD",
            "csu",
            now() - timedelta(days=400),
            expires_at=now() - timedelta(days=1),
        )
    for ref, why in (
        ("CONS-OTHER", "does not cover provider csu"),
        ("CONS-OLD", "has expired"),
        ("CONS-NONE", "no consent CONS-NONE"),
    ):
        held = create_referral(engine, config(), request(part2=True, consent_ref=ref), now())
        assert held.state == "held" and why in (held.hold_reason or "")
    assert message_states(engine) == []


def test_part2_with_consent_carries_the_notice_and_is_disclosed_once(engine: Engine) -> None:
    with engine.begin() as conn:
        record_consent(conn, "CONS-1", "csu", now())
    created = create_referral(engine, config(), request(part2=True, consent_ref="CONS-1"), now())
    assert created.state == "queued"
    with engine.connect() as conn:
        message = conn.execute(select(referral_messages.c.message)).scalar_one()
    assert f"|{PART2_NOTICE}|P2NOTICE^".encode() in message
    loop = Loop()
    peer = Peer(loop).start()
    worker = ReferralWorker(
        engine, loop.reactor, with_port(config(), "csu", peer.port), clock=loop.clock
    )
    worker.start()
    try:
        loop.spin(lambda: worker.delivered == 1)
    finally:
        loop_stop(loop, worker, peer)
    with engine.connect() as conn:
        [d] = conn.execute(select(referral_disclosures)).all()
    consent_id = referral_state(engine, created.ref).consent_id
    assert (d.provider, d.control_id, d.consent_id) == ("csu", created.control_id, consent_id)
    assert "42 CFR Part 2" in d.what and d.disclosed_at == now()


def test_attach_consent_later_queues_a_held_referral(engine: Engine) -> None:
    held = create_referral(engine, config(), request(part2=True), now())
    with pytest.raises(ReferralError, match="held for consent"):
        retry_referral(engine, config(), held.ref, now())
    with engine.begin() as conn:
        record_consent(conn, "CONS-2", "csu", now())
    queued = attach_consent(engine, config(), held.ref, "CONS-2", now())
    assert queued.state == "queued" and referral_state(engine, held.ref).hold_reason is None
    assert [s for _, s, _ in message_states(engine)] == ["pending"]


def test_cancel_and_list(engine: Engine) -> None:
    a = create_referral(engine, config(), request(), now())
    b = create_referral(engine, config(), request(incident_ref="INC-2"), now())
    assert cancel_referral(engine, a.ref, now()) == "queued"
    with pytest.raises(ReferralError, match="already cancelled"):
        cancel_referral(engine, a.ref, now())
    with engine.connect() as conn:
        listed = list_referrals(conn)
        shown = show_referral(conn, b.ref)
    assert [r["ref"] for r in listed] == [b.ref, a.ref]
    assert [r["message_state"] for r in listed] == ["pending", "cancelled"]
    assert "person" not in shown and "summary" not in shown
    assert (
        shown["messages"][0]["control_id"] == b.control_id and "message" not in shown["messages"][0]
    )


def test_claim_one_per_provider_and_skips_live_claims(engine: Engine) -> None:
    cfg = config(provider("csu"), provider("mcrt"))
    for provider_name in ("csu", "csu", "mcrt"):
        create_referral(engine, cfg, request(provider=provider_name), now())
    lease = timedelta(seconds=30)
    with engine.begin() as conn:
        first = claim_due(conn, now(), "w1", lease=lease)
    assert sorted(c.provider for c in first) == ["csu", "mcrt"]
    with engine.begin() as conn:  # both providers have a live claim: nothing for another worker
        assert claim_due(conn, now(), "w2", lease=lease) == []
    with engine.begin() as conn:  # the lease ran out (its worker died): claimed again, same bytes
        again = claim_due(conn, now() + lease, "w2", lease=lease)
    assert sorted((c.id, c.message) for c in again) == sorted((c.id, c.message) for c in first)


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_skip_locked_on_postgresql(engine: Engine) -> None:
    cfg = config(provider("csu"), provider("mcrt"))
    create_referral(engine, cfg, request(provider="csu"), now())
    create_referral(engine, cfg, request(provider="mcrt"), now())
    lease = timedelta(seconds=30)
    with engine.begin() as held_open:
        from corespond.daemon.store.tables import referral_messages as m

        # Another daemon's transaction holds the csu row locked, not yet claimed.
        held_open.execute(select(m.c.id).where(m.c.provider == "csu").with_for_update()).all()
        with engine.begin() as conn:
            claimed = claim_due(conn, now(), "w2", lease=lease)
        assert [c.provider for c in claimed] == ["mcrt"]


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_two_daemons_never_have_one_provider_in_flight_twice(engine: Engine) -> None:
    for n in range(2):
        create_referral(engine, config(), request(incident_ref=f"I-{n}"), now())
    lease = timedelta(seconds=30)
    with engine.connect() as first:
        first_tx = first.begin()
        # As a worker claims a provider's next message: one row, not yet committed.
        [claimed] = claim_due(first, now(), "w1", lease=lease, limit=1)
        with engine.begin() as second:  # skips the locked row, cannot see the claim yet
            assert claim_due(second, now(), "w2", lease=lease) == []
        first_tx.commit()
    with engine.begin() as second:  # the committed claim is live: still nothing
        assert claim_due(second, now(), "w2", lease=lease) == []
    assert claimed.provider == "csu"


def outbox_after_a_group_commit(url: str, driver_level: bool, monkeypatch: Any) -> Any:
    """What the worker's group-commit statements do to a copy of one outbox."""
    from corespond.daemon import referrals as module
    from corespond.daemon.referrals import record_delivered_many, renew_claims
    from corespond.daemon.store.engine import create_store_engine

    monkeypatch.setattr(module, "SQLITE_DRIVER_LEVEL", driver_level)
    engine = create_store_engine(url)
    lease, at = timedelta(seconds=30), now() + timedelta(seconds=5)
    try:
        with engine.begin() as conn:
            claimed = claim_due(
                conn, at, "w1", lease=lease, limit=3, provider="csu", per_provider=3
            )
            nothing = claim_due(conn, at, "w1", lease=lease, provider="mcrt")  # w9's live claim
            record_delivered_many(conn, [(c, "AA", at) for c in claimed[:2]])
            renew_claims(conn, [c.id for c in claimed[2:]], "w1", at + 2 * lease)
        with engine.connect() as conn:
            tables = [
                conn.execute(select(t).order_by(t.c.id)).all()
                for t in (referral_messages, referrals, referral_disclosures)
            ]
    finally:
        engine.dispose()
    return claimed, nothing, tables


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_sqlite_driver_level_statements_do_what_the_core_ones_do(
    engine: Engine, tmp_path: Path, monkeypatch: Any
) -> None:
    cfg = config(provider("csu"), provider("mcrt"))
    for n in range(5):
        create_referral(engine, cfg, request(incident_ref=f"I-{n}"), now())
    create_referral(engine, cfg, request(incident_ref="I-9", provider="mcrt"), now())
    create_referral(engine, cfg, request(incident_ref="I-6"), now())
    m = referral_messages
    with engine.begin() as conn:
        ids = [r.id for r in conn.execute(select(m.c.id).order_by(m.c.id))]
        # Sent in next_due order, not id order; one not due yet; one whose claimer died; a live
        # claim of another worker on mcrt; a Part 2 referral (its disclosure says so).
        conn.execute(m.update().where(m.c.id == ids[0]).values(next_due=now() + timedelta(1)))
        conn.execute(m.update().where(m.c.id == ids[1]).values(next_due=now() + timedelta(0, 3)))
        conn.execute(m.update().where(m.c.id == ids[4]).values(next_due=now() - timedelta(0, 3)))
        conn.execute(m.update().where(m.c.id == ids[6]).values(next_due=now() - timedelta(0, 5)))
        conn.execute(
            m.update()
            .where(m.c.id == ids[3])
            .values(state="sending", claimed_by="w9", lease_until=now(), attempts=2)
        )
        conn.execute(
            m.update()
            .where(m.c.id == ids[5])
            .values(state="sending", claimed_by="w9", lease_until=now() + timedelta(1))
        )
        conn.execute(referrals.update().where(referrals.c.id == ids[4]).values(part2=True))
        conn.execute(referrals.update().where(referrals.c.id == ids[6]).values(hold_reason="x"))
    url = str(engine.url)
    engine.dispose()  # its WAL checkpointed: the file is the whole database
    copy = tmp_path / "copy.db"
    copy.write_bytes(Path(str(engine.url.database)).read_bytes())
    driver = outbox_after_a_group_commit(url, True, monkeypatch)
    core = outbox_after_a_group_commit(f"sqlite:///{copy}", False, monkeypatch)
    assert driver == core
    claimed, nothing, (messages, _, disclosures) = driver
    assert [c.id for c in claimed] == [ids[6], ids[4], ids[2]] and nothing == []
    states = ["pending", "pending", "sending", "sending", "delivered", "sending", "delivered"]
    assert [r.state for r in messages] == states
    assert sorted(d.message_id for d in disclosures) == [ids[4], ids[6]]
    assert "42 CFR Part 2" in next(d.what for d in disclosures if d.message_id == ids[4])


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_message_queued_on_the_drivers_cursor_is_the_row_the_core_insert_makes(
    engine: Engine, monkeypatch: Any
) -> None:
    """A new referral's message, claimed for this worker or not: the same row and the same
    claim whichever way it is inserted (SQLite's cursor in the daemon, Core otherwise)."""
    from corespond.daemon import referrals as module
    from corespond.daemon.referrals import (
        new_control_id,
        new_referral_ref,
        referral_content,
        store_referral,
    )

    cfg = config()
    lease = timedelta(seconds=30)
    made: dict[bool, list[Any]] = {}
    for driver_level in (True, False):
        monkeypatch.setattr(module, "SQLITE_DRIVER_LEVEL", driver_level)
        made[driver_level] = []
        for claim in (("w1", lease), None):
            req = request(incident_ref=f"I-{driver_level}-{claim is None}")
            content = referral_content(
                cfg, cfg.providers[0], req, new_referral_ref(), new_control_id(), now()
            )
            created, claimed = store_referral(
                engine, cfg.providers[0], req, content, b"MSH|x\r" * 40, now(), claim=claim
            )
            made[driver_level].append((created.id, claimed))
    m = referral_messages
    with engine.connect() as conn:
        rows = {r.referral_id: r._asdict() for r in conn.execute(select(m))}
    for (d_id, d_claimed), (c_id, c_claimed) in zip(made[True], made[False], strict=True):
        d_row, c_row = rows[d_id], rows[c_id]
        ids = [
            (row.pop("id"), row.pop("control_id"), row.pop("referral_id")) for row in (d_row, c_row)
        ]
        assert d_row == c_row
        if d_claimed is None:
            assert c_claimed is None and d_row["state"] == "pending"
        else:
            assert c_claimed is not None and d_row["state"] == "sending"
            for claimed, (row_id, control_id, _) in zip((d_claimed, c_claimed), ids, strict=True):
                assert (claimed.id, claimed.control_id) == (row_id, control_id)
            assert d_claimed.message == c_claimed.message and d_claimed.attempts == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_referral_inserted_on_the_drivers_cursor_is_the_row_the_core_insert_makes(
    engine: Engine, monkeypatch: Any
) -> None:
    """A new referral's row, as SQLite stores it (the text of its times and its JSON, the
    type of each value): the same whichever way it is inserted. Queued with a message, held
    for consent (Part 2, no consent), with a program and region and a partly known person."""
    from corespond.adapters.hl7_referral import Person
    from corespond.daemon import referrals as module
    from corespond.daemon.referrals import new_referral_ref, referral_content, store_referral

    cfg = config()
    provider = cfg.providers[0]
    kinds = [
        {},
        {"part2": True, "consent_ref": "C-NONE"},
        {"program": "youth", "region": "north",
         "person": Person(family="Ørsted", given="Zoë", phone=None, city="Springfield")},
    ]  # fmt: skip
    made: dict[bool, list[int]] = {}
    for driver_level in (True, False):
        monkeypatch.setattr(module, "SQLITE_DRIVER_LEVEL", driver_level)
        made[driver_level] = []
        for n, kind in enumerate(kinds):
            req = request(incident_ref=f"I-{n}", **kind)
            ref, control_id = new_referral_ref(), f"C{n}{driver_level}"
            content = referral_content(cfg, provider, req, ref, control_id, now())
            created, _ = store_referral(engine, provider, req, content, b"MSH|x\r", now())
            made[driver_level].append(created.id)
    with engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        names = [c.name for c in referrals.columns if c.name not in ("id", "ref")]
        query = ", ".join(f"{n}, typeof({n})" for n in names)
        rows = {
            i: cursor.execute(f"SELECT {query} FROM referrals WHERE id = ?", (i,)).fetchone()
            for i in made[True] + made[False]
        }
    for d_id, c_id in zip(made[True], made[False], strict=True):
        assert rows[d_id] == rows[c_id]
    states = [rows[i][2 * names.index("state")] for i in made[True]]
    assert states == ["queued", "held", "queued"]
    person = rows[made[True][2]][2 * names.index("person")]
    assert person == '{"family":"Ørsted","given":"Zoë","city":"Springfield"}'


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    assert backoff_delay(1, 5, 600, rand=lambda: 1.0) == 5
    assert backoff_delay(1, 5, 600, rand=lambda: 0.0) == 2.5
    assert backoff_delay(4, 5, 600, rand=lambda: 1.0) == 40
    assert backoff_delay(40, 5, 600, rand=lambda: 1.0) == 600
    assert backoff_delay(10_000, 5, 600, rand=lambda: 0.5) == 450


# --- delivery ----------------------------------------------------------------------------------


def loop_stop(loop: Loop, worker: ReferralWorker, *peers: Peer) -> None:
    d = worker.stop()
    loop.spin(lambda: d.called)
    for peer in peers:
        peer.stop()


def start_worker(engine: Engine, loop: Loop, cfg: Any, **kwargs: Any) -> ReferralWorker:
    worker = ReferralWorker(engine, loop.reactor, cfg, clock=loop.clock, rand=lambda: 1.0, **kwargs)
    worker.start()
    return worker


def test_delivers_in_order_one_in_flight(engine: Engine) -> None:
    loop = Loop()
    peer = Peer(loop).start()
    created = [
        create_referral(engine, config(), request(incident_ref=f"I-{n}"), now()) for n in range(3)
    ]
    worker = start_worker(engine, loop, with_port(config(), "csu", peer.port))
    try:
        loop.spin(lambda: worker.delivered == 3)
    finally:
        loop_stop(loop, worker, peer)
    assert peer.control_ids() == [c.control_id for c in created]
    assert peer.connections == 1  # one connection per destination, reused
    assert [s for _, s, _ in message_states(engine)] == ["delivered"] * 3
    assert all(referral_state(engine, c.ref).state == "delivered" for c in created)


def test_delivered_lines_are_written_after_the_commit_s_callback_and_by_the_stop(
    engine: Engine,
) -> None:
    """Issue 5: the callback that records a result (a page may wait behind it) does not write
    its log line; the line follows in a turn of its own, and none is lost at a stop."""
    from structlog.testing import capture_logs

    loop = Loop()
    peer = Peer(loop).start()
    created = [
        create_referral(engine, config(), request(incident_ref=f"I-{n}"), now()) for n in range(3)
    ]
    worker = start_worker(engine, loop, with_port(config(), "csu", peer.port))
    with capture_logs() as logs:
        try:
            loop.spin(lambda: worker.delivered == 3)
            # The last result was counted in the callback that just ran: its line waits.
            written = [e["control_id"] for e in logs if e["event"] == "referral.delivered"]
            assert created[-1].control_id not in written
        finally:
            loop_stop(loop, worker, peer)
    lines = [e for e in logs if e["event"] == "referral.delivered"]
    assert [e["control_id"] for e in lines] == [c.control_id for c in created]
    assert all(e["provider"] == "csu" and e["code"] == "AA" for e in lines)


@pytest.mark.parametrize("code", ["AE", "AR", "CE", "CR"])
def test_peer_error_holds_with_its_text_and_the_rest_goes_on(engine: Engine, code: str) -> None:
    loop = Loop()
    peer = Peer(loop, mode=code.lower()).start()
    first = create_referral(engine, config(), request(), now())
    worker = start_worker(engine, loop, with_port(config(), "csu", peer.port))
    try:
        loop.spin(lambda: referral_state(engine, first.ref).state == "held")
        peer.mode = "aa"
        second = create_referral(engine, config(), request(incident_ref="I-2"), now())
        worker.wake()
        loop.spin(lambda: worker.delivered == 1)
    finally:
        loop_stop(loop, worker, peer)
    held = referral_state(engine, first.ref)
    assert held.hold_reason == f"peer-error: the provider answered {code}"
    assert held.peer_error is not None and "ZQXPEER rejects this" in held.peer_error
    assert referral_state(engine, second.ref).state == "delivered"
    assert peer.control_ids() == [first.control_id, second.control_id]  # never resent on its own
    # An operator retries: the same bytes, the same MSH-10.
    retry_referral(engine, config(), first.ref, now())
    loop2 = Loop()
    peer2 = Peer(loop2).start()
    worker2 = start_worker(engine, loop2, with_port(config(), "csu", peer2.port))
    try:
        loop2.spin(lambda: worker2.delivered == 1)
    finally:
        loop_stop(loop2, worker2, peer2)
    assert peer2.received == [peer.received[0]]


def test_no_ack_in_time_closes_and_resends_the_same_bytes(engine: Engine) -> None:
    loop = Loop()
    peer = Peer(loop, mode="silent").start()
    first = create_referral(engine, config(), request(), now())
    second = create_referral(engine, config(), request(incident_ref="I-2"), now())
    worker = start_worker(engine, loop, with_port(config(), "csu", peer.port))
    try:
        loop.spin(lambda: len(peer.unanswered) == 1)
        [timed_out] = peer.live
        loop.advance(5.0)  # the ACK timeout: the connection is closed
        loop.spin(lambda: timed_out not in peer.live)
        loop.spin(lambda: message_states(engine)[0][1:] == ("pending", 1))
        # The held message does not block the next one, sent on a new connection meanwhile.
        loop.spin(lambda: len(peer.unanswered) == 2)
        peer.answer_late()  # the late ACK of the first has no connection to land on
        loop.spin(lambda: worker.delivered == 1)
        peer.mode = "aa"
        loop.advance(2.0)  # the backoff (rand=1: initial)
        loop.spin(lambda: worker.delivered == 2)
    finally:
        loop_stop(loop, worker, peer)
    assert peer.control_ids() == [first.control_id, second.control_id, first.control_id]
    assert peer.received[0] == peer.received[2]
    assert peer.connections == 2
    assert [(s, n) for _, s, n in message_states(engine)] == [("delivered", 2), ("delivered", 1)]


def test_late_ack_on_the_same_connection_is_not_matched_to_the_next(engine: Engine) -> None:
    """A peer that answers each message with the previous message's ACK first (as a late or
    duplicated ACK would arrive): only the ACK naming the message in flight completes it."""
    loop = Loop()
    peer = Peer(loop, mode="double").start()
    created = [
        create_referral(engine, config(), request(incident_ref=f"I-{n}"), now()) for n in range(3)
    ]
    worker = start_worker(engine, loop, with_port(config(), "csu", peer.port))
    try:
        loop.spin(lambda: worker.delivered == 3)
        link = worker._links["csu"]
    finally:
        loop_stop(loop, worker, peer)
    assert peer.control_ids() == [c.control_id for c in created]
    assert link.ignored == 2 + 3  # previous message's ACK twice, each duplicate three times


def test_wrong_msa2_is_ignored_until_the_timeout(engine: Engine) -> None:
    loop = Loop()
    peer = Peer(loop, mode="wrong").start()
    create_referral(engine, config(), request(), now())
    worker = start_worker(engine, loop, with_port(config(), "csu", peer.port))
    try:
        loop.spin(lambda: len(peer.received) == 1)
        loop.settle()
        assert message_states(engine)[0][1] == "sending"  # the stranger's ACK completed nothing
        loop.advance(5.0)
        loop.spin(lambda: message_states(engine)[0][1:] == ("pending", 1))
    finally:
        loop_stop(loop, worker, peer)


def test_dropped_before_the_ack_is_retried_not_delivered(engine: Engine) -> None:
    loop = Loop()
    peer = Peer(loop, mode="drop").start()
    created = create_referral(engine, config(), request(), now())
    worker = start_worker(engine, loop, with_port(config(), "csu", peer.port))
    try:
        loop.spin(lambda: message_states(engine)[0][1:] == ("pending", 1))
        assert referral_state(engine, created.ref).state == "queued"
        peer.mode = "aa"
        loop.advance(2.0)
        loop.spin(lambda: worker.delivered == 1)
    finally:
        loop_stop(loop, worker, peer)
    assert peer.control_ids() == [created.control_id] * 2


def test_unreachable_backs_off_then_holds_after_max_attempts(engine: Engine) -> None:
    loop = Loop()
    peer = Peer(loop).start()
    port = peer.port
    peer.stop()  # nothing listens there now
    cfg = with_port(config(), "csu", port, max_attempts=3)
    created = create_referral(engine, cfg, request(), now())
    worker = start_worker(engine, loop, cfg)
    try:
        loop.spin(lambda: message_states(engine)[0][1:] == ("pending", 1))
        with engine.connect() as conn:
            due = conn.execute(select(referral_messages.c.next_due)).scalar_one()
        assert due == now() + timedelta(seconds=2)
        loop.advance(2.0)
        loop.spin(lambda: message_states(engine)[0][1:] == ("pending", 2))
        loop.advance(4.0)
        loop.spin(lambda: message_states(engine)[0][1] == "held")
    finally:
        loop_stop(loop, worker)
    state = referral_state(engine, created.ref)
    assert state.state == "held" and state.hold_reason.startswith("undeliverable: connect-failed")


def test_a_restart_mid_flight_resends_only_what_was_not_acknowledged(
    engine: Engine, tmp_path: Path
) -> None:
    """The daemon dies with one message delivered and one sent but unanswered; a fresh engine
    and worker over the same database send the unanswered one again, and nothing else."""
    from corespond.daemon.store.engine import create_store_engine

    loop = Loop()
    peer = Peer(loop).start()
    cfg = with_port(config(), "csu", peer.port)
    first = create_referral(engine, cfg, request(), now())
    worker = start_worker(engine, loop, cfg)
    loop.spin(lambda: worker.delivered == 1)
    peer.mode = "silent"
    second = create_referral(engine, cfg, request(incident_ref="I-2"), now())
    worker.wake()
    loop.spin(lambda: len(peer.unanswered) == 1)
    # SIGKILL: nothing more of this worker runs; its connection dies with the process.
    for proto in list(peer.live):
        assert proto.transport is not None
        proto.transport.abortConnection()
    loop.settle()
    worker._pool.stop()

    fresh = create_store_engine(engine.url)
    try:
        loop2 = Loop()
        peer2 = Peer(loop2).start()
        worker2 = start_worker(fresh, loop2, with_port(cfg, "csu", peer2.port))
        loop2.settle()
        assert peer2.received == []  # the lease of the dead worker's claim still runs
        loop2.advance(5.0 + 5.0 + 30.0)  # ack + connect timeout + margin
        loop2.spin(lambda: worker2.delivered == 1)
        loop_stop(loop2, worker2, peer2)
    finally:
        fresh.dispose()
        peer.stop()
    assert peer2.control_ids() == [second.control_id]
    assert peer2.received[0] == peer.received[1]
    assert referral_state(engine, first.ref).state == "delivered"
    assert referral_state(engine, second.ref).state == "delivered"


# --- independent peers -------------------------------------------------------------------------


def test_python_hl7_asyncio_server(engine: Engine, tmp_path: Path) -> None:
    created = [
        create_referral(engine, config(), request(incident_ref=f"I-{n}"), now()) for n in range(3)
    ]
    with python_hl7_peer(tmp_path) as (port, received):
        loop = Loop()
        worker = start_worker(engine, loop, with_port(config(), "csu", port))
        try:
            loop.spin(lambda: worker.delivered == 3)
        finally:
            loop_stop(loop, worker)
    assert received.read_text().split() == [c.control_id for c in created]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_txhl7_under_twistd(engine: Engine, tmp_path: Path, tls: bool) -> None:
    created = [
        create_referral(engine, config(), request(incident_ref=f"I-{n}"), now()) for n in range(2)
    ]
    pki = make_pki(tmp_path) if tls else None
    with txhl7_peer(tmp_path, (pki.server_cert, pki.server_key) if pki else None) as port:
        cfg = config()
        if pki is not None:
            from corespond.daemon.config import ReferralTlsConfig

            cfg = with_port(cfg, "csu", port, tls=ReferralTlsConfig(SERVER_NAME, pki.ca_cert))
        else:
            cfg = with_port(cfg, "csu", port)
        loop = Loop()
        worker = start_worker(engine, loop, cfg)
        try:
            loop.spin(lambda: worker.delivered == 2)
        finally:
            loop_stop(loop, worker)
    assert all(referral_state(engine, c.ref).state == "delivered" for c in created)
    with engine.connect() as conn:
        codes = conn.execute(select(referral_messages.c.ack_code)).scalars().all()
    assert codes == ["AA", "AA"]


def test_tls_peer_with_an_untrusted_certificate_is_not_delivered(
    engine: Engine, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    loop = Loop()
    peer = Peer(loop).start(tls=server_tls_options(pki.server_cert, pki.server_key))
    from corespond.daemon.config import ReferralTlsConfig

    cfg = with_port(
        config(), "csu", peer.port, tls=ReferralTlsConfig(SERVER_NAME, pki.other_ca_cert)
    )
    create_referral(engine, cfg, request(), now())
    worker = start_worker(engine, loop, cfg)
    try:
        loop.spin(lambda: message_states(engine)[0][1:] == ("pending", 1))
    finally:
        loop_stop(loop, worker, peer)
    assert peer.received == []


def test_two_workers_on_one_database_deliver_each_message_once(engine: Engine) -> None:
    """Two daemons share the database: each message reaches the peer exactly once."""
    cfg = config(provider("csu"), provider("mcrt"))
    created = [
        create_referral(engine, cfg, request(provider=name, incident_ref=f"I-{n}"), now())
        for n in range(4)
        for name in ("csu", "mcrt")
    ]
    loop = Loop()
    peer = Peer(loop).start()
    cfg = with_port(with_port(cfg, "csu", peer.port), "mcrt", peer.port)
    workers = [start_worker(engine, loop, cfg, worker_id=f"w{n}") for n in range(2)]
    try:
        loop.spin(lambda: sum(w.delivered for w in workers) == len(created))
        loop.settle()
    finally:
        for worker in workers:
            d = worker.stop()
            loop.spin(lambda d=d: d.called)
        peer.stop()
    assert sorted(peer.control_ids()) == sorted(c.control_id for c in created)
    assert sum(w.delivered for w in workers) == len(created)


def stop_service(loop: Loop, service: Any) -> None:
    from twisted.internet.defer import ensureDeferred

    stopped = ensureDeferred(service.stop())
    loop.spin(lambda: stopped.called)


def test_the_service_builds_in_another_process(engine: Engine) -> None:
    """hl7apy runs in a builder process, never in the daemon's (nor in a thread of it)."""
    import os

    from corespond.daemon.referrals import ReferralService
    from tests.daemon.referral_rig import build_in_pid

    loop = Loop()
    peer = Peer(loop).start()
    cfg = with_port(config(), "csu", peer.port)
    service = ReferralService(engine, loop.reactor, cfg, clock=loop.clock, build=build_in_pid)
    service.start()
    try:
        d = service.create(request())
        loop.spin(lambda: d.called, turns=6000)
        loop.spin(lambda: service.worker.delivered == 1)
    finally:
        stop_service(loop, service)
        peer.stop()
    assert peer.control_ids() == [d.result.control_id]
    [segment] = [s for s in peer.received[0].split(b"\r") if s.startswith(b"ZPD|")]
    builder_pid, niceness, policy = (int(v) for v in segment.split(b"|")[1:4])
    assert builder_pid != os.getpid()
    assert niceness == min(19, os.nice(0) + 10)  # it yields the CPU to the daemon
    assert policy == os.SCHED_IDLE  # and is preempted by any daemon thread that wakes


def test_a_builder_that_dies_loses_no_referral(engine: Engine) -> None:
    """The builder process dies mid-build: a precise error, the referral stays queued (no
    message yet), and it is built, queued and delivered when the service starts again."""
    from corespond.daemon.referrals import ReferralBuildFailed, ReferralService
    from tests.daemon.referral_rig import build_or_die

    loop = Loop()
    peer = Peer(loop).start()
    cfg = with_port(config(), "csu", peer.port)
    service = ReferralService(engine, loop.reactor, cfg, clock=loop.clock, build=build_or_die)
    service.start()
    failures: list[Any] = []
    try:
        loop.spin(lambda: service.started.called)
        d = service.create(request(incident_ref="DIE"))
        d.addErrback(failures.append)
        loop.spin(lambda: d.called, turns=6000)
        # The next build gets a fresh process.
        ok = service.create(request(incident_ref="I-OK"))
        loop.spin(lambda: ok.called, turns=6000)
        loop.spin(lambda: service.worker.delivered == 1)
    finally:
        stop_service(loop, service)
    [failure] = failures
    assert failure.check(ReferralBuildFailed)
    assert "builder process died" in str(failure.value) and "stays queued" in str(failure.value)
    with engine.connect() as conn:
        [kept] = conn.execute(select(referrals).where(referrals.c.incident_ref == "DIE")).all()
        assert kept.state == "queued"
        assert conn.execute(
            select(func.count()).where(referral_messages.c.referral_id == kept.id)
        ).scalar() == 0
    assert service.builder.crashes == 1
    # A restart (builders that live) finds it, builds it and sends it.
    peer.stop()
    loop2 = Loop()
    peer2 = Peer(loop2).start()
    service2 = ReferralService(
        engine, loop2.reactor, with_port(cfg, "csu", peer2.port), clock=loop2.clock
    )
    service2.start()
    try:
        loop2.spin(lambda: service2.worker.delivered == 1, turns=6000)
    finally:
        stop_service(loop2, service2)
        peer2.stop()
    assert referral_state(engine, kept.ref).state == "delivered"
    assert parse_reply(peer2.received[0]).originating_referral_id == kept.ref


def test_a_message_that_does_not_validate_is_refused_and_not_kept(engine: Engine) -> None:
    from corespond.daemon.referrals import ReferralService

    loop = Loop()
    service = ReferralService(engine, loop.reactor, config(), clock=loop.clock)
    service.start()
    failures: list[Any] = []
    try:
        d = service.create(request(referring_clinician="X" * 5000))
        d.addErrback(failures.append)
        loop.spin(lambda: d.called, turns=6000)
    finally:
        stop_service(loop, service)
    [failure] = failures
    assert failure.check(ReferralError) and "does not validate" in str(failure.value)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(referrals)).scalar() == 0


@pytest.mark.parametrize("with_cert", [True, False], ids=["client-cert", "no-client-cert"])
def test_mutual_tls_provider(engine: Engine, tmp_path: Path, with_cert: bool) -> None:
    from corespond.daemon.config import ReferralTlsConfig

    pki = make_pki(tmp_path)
    loop = Loop()
    tls = server_tls_options(pki.server_cert, pki.server_key, pki.ca_cert, True)
    peer = Peer(loop).start(tls=tls)
    cert = (pki.client_cert, pki.client_key) if with_cert else (None, None)
    cfg = with_port(
        config(), "csu", peer.port, tls=ReferralTlsConfig(SERVER_NAME, pki.ca_cert, *cert)
    )
    create_referral(engine, cfg, request(), now())
    worker = start_worker(engine, loop, cfg)
    try:
        if with_cert:
            loop.spin(lambda: worker.delivered == 1)
        else:
            loop.spin(lambda: message_states(engine)[0][1:] == ("pending", 1))
    finally:
        loop_stop(loop, worker, peer)
    assert len(peer.received) == (1 if with_cert else 0)


def test_a_clean_stop_mid_flight_releases_the_message_at_once(engine: Engine) -> None:
    loop = Loop()
    peer = Peer(loop, mode="silent").start()
    create_referral(engine, config(), request(), now())
    worker = start_worker(engine, loop, with_port(config(), "csu", peer.port))
    loop.spin(lambda: len(peer.unanswered) == 1)
    loop_stop(loop, worker, peer)
    with engine.connect() as conn:
        row = conn.execute(select(referral_messages)).one()
    assert (row.state, row.attempts, row.last_error) == ("pending", 0, "daemon-stopped")
    assert row.next_due == now() and row.lease_until is None


def test_an_api_request_without_a_person_takes_the_incident_s(engine: Engine) -> None:
    """``create_from_request`` (the API) fills the person and region from the incident."""
    from dataclasses import replace

    from sqlalchemy import select

    from corespond.adapters.hl7_referral import Person
    from corespond.daemon.referrals import ReferralService
    from corespond.daemon.store.tables import referral_messages, referrals
    from corespond.daemon.store.writer import write_batch
    from tests.daemon.store.records import record, snapshot

    with engine.begin() as conn:
        write_batch(conn, [record(snapshot("CAD-7", person="Ada Q Testperson"))])
    loop = Loop()
    service = ReferralService(engine, loop.reactor, config(), clock=loop.clock)
    service.start()
    try:
        created: list[Any] = []
        service.create_from_request(
            replace(request(), incident_ref="NCAD-7", person=Person())
        ).addCallback(created.append)
        loop.spin(lambda: bool(created))
    finally:
        from twisted.internet.defer import ensureDeferred

        stopped = ensureDeferred(service.stop())
        loop.spin(lambda: stopped.called)
    assert created[0].ref
    with engine.connect() as conn:
        message = conn.execute(select(referral_messages.c.message)).scalar_one()
        person = conn.execute(select(referrals.c.person)).scalar_one()
    assert b"Testperson" in message and person["family"] == "Testperson"
