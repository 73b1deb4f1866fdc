"""Referral delivery with claims ahead and group commits; referral metrics; certificate expiry.

Delivery runs over real loopback sockets on a private reactor (see ``referral_rig``); the
database work goes through a one-thread pool the test can hold, as the store's writer thread
would be held by a slow fsync, so that what happens while a commit is pending is observable.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, select
from structlog.testing import capture_logs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from corespond.daemon.config import ListenConfig, ReferralTlsConfig, ServerTlsConfig
from corespond.daemon.referral_metrics import (
    ReferralMetrics,
    certificate_checks,
    check_certificates,
)
from corespond.daemon.referrals import ReferralWorker, create_referral
from corespond.daemon.store.tables import referral_messages
from tests.adapters.tlsfiles import SERVER_NAME, make_pki
from tests.daemon.referral_rig import Loop, Peer, config, now, provider, request, with_port


class HeldWriter:
    """A one-thread "writer" whose work can be held back: what runs while commits wait."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.pool = ThreadPool(1, 1, name="test-writer")
        self.pool.start()
        self.holding = False
        self.held: list[tuple[Any, Deferred[Any]]] = []

    def __call__(self, fn: Any) -> Deferred[Any]:
        if not self.holding:
            return deferToThreadPool(self.loop.reactor, self.pool, fn)
        d: Deferred[Any] = Deferred()
        self.held.append((fn, d))
        return d

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for fn, d in held:
            deferToThreadPool(self.loop.reactor, self.pool, fn).chainDeferred(d)

    def stop(self) -> None:
        self.pool.stop()


def states(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(referral_messages.c.state).order_by(referral_messages.c.id))
            .scalars()
            .all()
        )


def test_the_next_message_goes_while_the_last_ack_is_committed(engine: Engine) -> None:
    """With commits held back, the claimed messages still go, one in flight at a time;
    nothing counts as delivered before its commit, and the results commit in groups."""
    loop = Loop()
    peer = Peer(loop).start()
    created = [
        create_referral(engine, config(), request(incident_ref=f"I-{n}"), now()) for n in range(4)
    ]
    writer = HeldWriter(loop)
    worker = ReferralWorker(
        engine,
        loop.reactor,
        with_port(config(), "csu", peer.port),
        clock=loop.clock,
        run_in_thread=writer,
    )
    worker.start()
    try:
        loop.spin(lambda: len(peer.received) >= 1)  # claimed (all four), the first sent
        writer.holding = True
        loop.spin(lambda: len(peer.received) == 4)
        loop.settle()
        assert worker.delivered == 0 and worker.commits == 0
        assert states(engine) == ["sending"] * 4  # acknowledged, not yet committed
        writer.release()
        loop.spin(lambda: worker.delivered == 4)
    finally:
        d = worker.stop()
        loop.spin(lambda: d.called)
        peer.stop()
        writer.stop()
    assert peer.control_ids() == [c.control_id for c in created]
    assert peer.connections == 1
    assert worker.commits < 4  # the results held back went in one group
    assert states(engine) == ["delivered"] * 4


def test_an_ack_arriving_while_groups_change_hands_is_committed(engine: Engine) -> None:
    """A group commit starts (taking the results gathered so far) while a message waits for
    its ACK: that ACK's result goes into the next group, never into the one already taken
    (a result counted as delivered must be committed as delivered)."""
    loop = Loop()
    peer = Peer(loop, mode="silent").start()
    for n in range(3):
        create_referral(engine, config(), request(incident_ref=f"I-{n}"), now())
    writer = HeldWriter(loop)
    worker = ReferralWorker(
        engine, loop.reactor, with_port(config(), "csu", peer.port), clock=loop.clock,
        run_in_thread=writer,
    )  # fmt: skip
    worker.start()
    try:
        loop.spin(lambda: len(peer.unanswered) == 1)
        writer.holding = True
        peer.answer_late()  # the first result: its commit is held
        loop.spin(lambda: len(peer.unanswered) == 1 and len(peer.received) == 2)
        peer.answer_late()  # the second result waits for the next group
        loop.spin(lambda: len(peer.received) == 3)  # the third is on the wire
        writer.release()  # the first group commits, the second group (result two) starts
        loop.spin(lambda: worker.delivered == 2)
        peer.answer_late()  # the third result arrives after its group changed hands
        loop.spin(lambda: worker.delivered == 3)
        loop.settle()
    finally:
        d = worker.stop()
        loop.spin(lambda: d.called)
        peer.stop()
        writer.stop()
    assert states(engine) == ["delivered"] * 3


def test_a_crash_before_the_group_commit_resends_the_same_bytes(engine: Engine) -> None:
    """The documented window: ACKs received, results not yet committed, the daemon dies.
    After the lease, those messages (and only those) go again, byte for byte."""
    from corespond.daemon.store.engine import create_store_engine

    loop = Loop()
    peer = Peer(loop).start()
    cfg = with_port(config(), "csu", peer.port)
    done = create_referral(engine, cfg, request(incident_ref="I-0"), now())
    writer = HeldWriter(loop)
    worker = ReferralWorker(engine, loop.reactor, cfg, clock=loop.clock, run_in_thread=writer)
    worker.start()
    loop.spin(lambda: worker.delivered == 1)
    late = [create_referral(engine, cfg, request(incident_ref=f"I-{n}"), now()) for n in (1, 2)]
    worker.wake()
    loop.spin(lambda: len(peer.received) == 2)
    writer.holding = True  # the next commits never happen: the daemon dies first
    loop.spin(lambda: len(peer.received) == 3)
    loop.settle()
    for proto in list(peer.live):  # SIGKILL
        assert proto.transport is not None
        proto.transport.abortConnection()
    loop.settle()
    worker._pool.stop()
    writer.stop()

    fresh = create_store_engine(engine.url)
    try:
        loop2 = Loop()
        peer2 = Peer(loop2).start()
        worker2 = ReferralWorker(
            fresh, loop2.reactor, with_port(cfg, "csu", peer2.port), clock=loop2.clock
        )
        worker2.start()
        loop2.settle()
        assert peer2.received == []  # their lease still runs
        loop2.advance(5.0 + 5.0 + 30.0)
        loop2.spin(lambda: worker2.delivered == 2)
        d = worker2.stop()
        loop2.spin(lambda: d.called)
        peer2.stop()
    finally:
        fresh.dispose()
        peer.stop()
    assert peer2.control_ids() == [c.control_id for c in late]
    assert peer2.received == peer.received[1:]
    assert done.control_id not in peer2.control_ids()


def test_claims_ahead_are_bounded_and_released_on_stop(engine: Engine) -> None:
    cfg = config(claim_ahead=2)
    for n in range(5):
        create_referral(engine, cfg, request(incident_ref=f"I-{n}"), now())
    loop = Loop()
    peer = Peer(loop, mode="silent").start()
    worker = ReferralWorker(
        engine, loop.reactor, with_port(cfg, "csu", peer.port), clock=loop.clock
    )
    worker.start()
    loop.spin(lambda: len(peer.unanswered) == 1)
    loop.settle()
    assert states(engine) == ["sending", "sending", "pending", "pending", "pending"]
    d = worker.stop()
    loop.spin(lambda: d.called)
    peer.stop()
    with engine.connect() as conn:
        rows = conn.execute(select(referral_messages).order_by(referral_messages.c.id)).all()
    assert [(r.state, r.attempts) for r in rows] == [("pending", 0)] * 5
    assert [r.last_error for r in rows[:2]] == ["daemon-stopped"] * 2


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_metrics_count_after_the_commit(engine: Engine) -> None:
    from twisted.internet.defer import ensureDeferred

    from corespond.daemon.referrals import ReferralService

    registry = CollectorRegistry()
    loop = Loop()
    peer = Peer(loop).start()
    cfg = with_port(config(provider("csu"), provider("mcrt")), "csu", peer.port)
    service = ReferralService(
        engine, loop.reactor, cfg, clock=loop.clock, metrics=ReferralMetrics(registry)
    )
    service.start()
    try:
        d = service.create(request())
        loop.spin(lambda: d.called, turns=6000)
        loop.spin(lambda: service.worker.delivered == 1)
        peer.mode = "ae"
        service.create(request(incident_ref="I-2"))
        loop.spin(lambda: sample(registry, "corespond_referrals_held_total",
                                 provider="csu", reason="peer-error") == 1, turns=6000)  # fmt: skip
        held = service.create(request(part2=True))
        loop.spin(lambda: held.called)
        service.worker.poll()
        loop.spin(lambda: sample(registry, "corespond_referral_outbox_depth", provider="csu") == 0)
        stranger = b"MSH|^~\\&|X|Y|Z|W|20270101||ACK|Q1|P|2.5.1\rMSA|AA|NOPE\r"
        unknown = service.listener.handle(stranger, "peer")
        loop.spin(lambda: unknown.called)
    finally:
        stopped = ensureDeferred(service.stop())
        loop.spin(lambda: stopped.called)
        peer.stop()
    assert sample(registry, "corespond_referrals_queued_total", provider="csu") == 2
    assert sample(registry, "corespond_referrals_delivered_total", provider="csu") == 1
    assert sample(registry, "corespond_referrals_held_total",
                  provider="csu", reason="part2-no-consent") == 1  # fmt: skip
    assert sample(registry, "corespond_referral_ack_seconds_count", provider="csu") == 2
    assert sample(registry, "corespond_referral_outbox_depth", provider="mcrt") == 0
    assert sample(registry, "corespond_hl7_inbound_total", type="ACK", result="unmatched") == 1


def test_certificates_expiring_within_30_days_warn(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)  # certificates valid for two more days
    cfg = config(
        provider(tls=ReferralTlsConfig(SERVER_NAME, pki.ca_cert, pki.client_cert, pki.client_key))
    )
    cfg = cfg.__class__(
        **{
            **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
            "listen": ListenConfig(
                "127.0.0.1", 0, ServerTlsConfig(pki.server_cert, pki.server_key, pki.ca_cert)
            ),
        }
    )
    checks = certificate_checks(cfg)
    assert [c.use for c in checks] == [
        "provider csu client",
        "provider csu ca",
        "listener server",
        "listener client ca",
    ]
    registry = CollectorRegistry()
    metrics = ReferralMetrics(registry)
    today = datetime.now(UTC)
    with capture_logs() as logs:
        assert check_certificates(checks, today - timedelta(days=60), metrics) == []
        expiring = check_certificates(checks, today, metrics)
    assert [c.use for c, _ in expiring] == [c.use for c in checks]
    warnings = [e for e in logs if e["event"] == "tls.certificate.expiring"]
    assert len(warnings) == 4 and all(e["log_level"] == "warning" for e in warnings)
    assert warnings[0]["path"] == str(pki.client_cert)
    labels = {"use": "provider csu client", "path": str(pki.client_cert)}
    assert registry.get_sample_value("corespond_tls_certificate_expiring", labels) == 1
    left = registry.get_sample_value("corespond_tls_certificate_expiry_seconds", labels)
    assert left is not None and 0 < left <= 3 * 86400
