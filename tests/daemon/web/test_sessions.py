"""Dashboard sessions in the database (SQLite and PostgreSQL), and the global login gate: a
restart or a second daemon keeps users signed in, only a hash of the id is stored, expiry on
the injected clock, logout deletes, expired rows are purged; a flood of sign-ins is answered
429 with Retry-After without hashing."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from corespond.daemon.clock import Clock
from corespond.daemon.store.tables import dashboard_sessions
from corespond.daemon.web.dashboard import Dashboard
from corespond.daemon.web.sessions import (
    LoginGate,
    SessionStore,
    create_session,
    delete_user_sessions,
    live_session,
    purge_sessions,
    session_count,
    session_key,
)
from corespond.daemon.web.site import WebSite
from tests.browser import served
from tests.daemon.web.dashboard_rig import OUTCOMES, Client, DashRig, csrf_of, dash_rig

__all__ = ["dash_rig", "served"]  # the fixtures, imported for pytest

T0 = datetime(2026, 11, 18, 9, 30, tzinfo=UTC)
IDLE, ABSOLUTE, TOUCH = timedelta(minutes=30), timedelta(hours=12), timedelta(minutes=1)


def _create(conn: Any, key: str, user: str, now: datetime, **kw: Any) -> None:
    create_session(conn, key, user, "program_manager", None, f"csrf-{key}", now,
                   idle=IDLE, absolute=ABSOLUTE, **kw)  # fmt: skip


def _live(conn: Any, key: str, now: datetime) -> Any:
    return live_session(conn, key, now, idle=IDLE, touch=TOUCH)


def test_sessions_expire_idle_and_absolute_on_both_backends(engine: Engine) -> None:
    with engine.begin() as conn:
        _create(conn, "k1", "dana", T0)
    with engine.begin() as conn:
        s = _live(conn, "k1", T0 + IDLE - timedelta(seconds=1))
        assert s is not None and (s.user, s.role, s.csrf) == ("dana", "program_manager", "csrf-k1")
        assert s.last_seen == (T0 + IDLE - timedelta(seconds=1)).timestamp()  # renewed
        assert _live(conn, "nope", T0) is None
    # Kept alive by requests every 29 minutes, it still ends 12 hours after sign-in.
    at = T0 + IDLE - timedelta(seconds=1)
    while at + IDLE - timedelta(minutes=1) < T0 + ABSOLUTE:
        at += IDLE - timedelta(minutes=1)
        with engine.begin() as conn:
            assert _live(conn, "k1", at) is not None
    with engine.begin() as conn:
        assert _live(conn, "k1", T0 + ABSOLUTE) is None
        assert session_count(conn) == 0  # an expired session found is deleted
        _create(conn, "k2", "dana", T0)
    with engine.begin() as conn:
        assert _live(conn, "k2", T0 + IDLE) is None  # idle for exactly the limit: over


def test_the_idle_time_is_written_at_most_once_a_minute(engine: Engine) -> None:
    with engine.begin() as conn:
        _create(conn, "k1", "dana", T0)
    with engine.begin() as conn:
        assert _live(conn, "k1", T0 + timedelta(seconds=59)).last_seen == T0.timestamp()
        assert (
            _live(conn, "k1", T0 + timedelta(seconds=60)).last_seen
            == (T0 + timedelta(seconds=60)).timestamp()
        )


def test_purge_deletes_only_expired_rows_and_sign_in_purges(engine: Engine) -> None:
    now = T0 + timedelta(hours=12)

    def row(key: str, started: datetime, last_seen: datetime) -> dict[str, Any]:
        return dict(
            id_hash=key,
            user_name="dana",
            role="admin",
            clinician=None,
            csrf="x",
            started_at=started,
            last_seen_at=last_seen,
            expires_at=started + ABSOLUTE,
        )

    with engine.begin() as conn:
        conn.execute(insert(dashboard_sessions), [
            row("old", T0, now - timedelta(minutes=1)),  # active, but 12 hours old
            row("idle", T0 + timedelta(hours=1), now - IDLE),
            row("live", T0 + timedelta(hours=1), now - IDLE + timedelta(seconds=1)),
        ])  # fmt: skip
    with engine.begin() as conn:
        assert purge_sessions(conn, now, idle=IDLE) == 2
        assert [r.id_hash for r in conn.execute(select(dashboard_sessions.c.id_hash))] == ["live"]
        _create(conn, "new", "dana", now + IDLE)  # a sign-in purges what has expired since
        assert sorted(r.id_hash for r in conn.execute(select(dashboard_sessions.c.id_hash))) == [
            "new"
        ]


def test_the_table_is_bounded_least_recently_used_first(engine: Engine) -> None:
    with engine.begin() as conn:
        for i in range(5):
            _create(conn, f"k{i}", "dana", T0 + timedelta(seconds=i), max_sessions=3)
        keys = sorted(r.id_hash for r in conn.execute(select(dashboard_sessions.c.id_hash)))
    assert keys == ["k2", "k3", "k4"]


def test_removing_a_user_ends_all_their_sessions(engine: Engine) -> None:
    with engine.begin() as conn:
        _create(conn, "a", "dana", T0)
        _create(conn, "b", "dana", T0)
        _create(conn, "c", "root", T0)
        assert delete_user_sessions(conn, "dana") == 2
        assert session_count(conn) == 1


def test_the_store_keeps_only_a_hash_of_the_id(engine: Engine) -> None:
    clock = task.Clock()
    clock.advance(T0.timestamp())
    store = SessionStore(engine, Clock(clock), lambda fn: succeed(fn()))
    results: list[Any] = []
    store.start("dana", "admin", None).addCallback(results.append)
    (session_id,) = results
    with engine.connect() as conn:
        (row,) = conn.execute(select(dashboard_sessions)).mappings().all()
    assert row["id_hash"] == session_key(session_id) != session_id
    assert all(session_id not in str(v) for v in row.values())
    store.get(session_id).addCallback(results.append)
    assert results[1].user == "dana"
    store.end(session_id).addCallback(results.append)
    store.get(session_id).addCallback(results.append)
    assert results[3] is None
    with engine.connect() as conn:
        assert session_count(conn) == 0


# --- the dashboard over loopback --------------------------------------------------------------


def second_dashboard(rig: DashRig) -> int:
    """Another dashboard on the same database (a restarted daemon, or a second one behind the
    balancer): its port."""
    d = rig.dashboard
    other = Dashboard(engine=d.engine, users_file=d.users_file, outcomes=OUTCOMES,
                      in_thread=d.in_thread, clock=d.clock)  # fmt: skip
    site = WebSite(reactor=rig.served.reactor)
    site.mount("/dashboard", other)
    return rig.served.listen(site)


def test_a_session_outlives_the_daemon_and_is_shared(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    assert c.login("dana").status == 303
    page = c.get("/dashboard/")
    assert page.status == 200
    other = Client(second_dashboard(dash_rig), dict(c.jar))
    assert other.get("/dashboard/csv/headline.csv").status == 200
    # Logging out on one ends the session on both, and deletes its row.
    assert other.post("/dashboard/logout", {"csrf": csrf_of(page.text)}).status == 303
    c.jar["corespond_session"] = other.jar.get("corespond_session") or c.jar["corespond_session"]
    assert c.get("/dashboard/csv/headline.csv").status == 401
    assert dash_rig.sessions() == 0


def test_a_flood_of_names_meets_the_global_limit(dash_rig: DashRig) -> None:
    dash_rig.served.call(
        setattr, dash_rig.dashboard, "gate",
        LoginGate(dash_rig.dashboard.clock, max_hashing=2, rate=1.0, burst=3),
    )  # fmt: skip
    c = dash_rig.client()
    for i in range(3):
        assert c.login(f"flood-{i}", "guess-guess-guess").status == 401
    busy = c.login("flood-4", "guess-guess-guess")
    assert busy.status == 429 and busy.header("retry-after") == "1"
    assert "Sign-in is busy" in busy.text
    assert c.login("dana").status == 429  # a real user waits too, but the daemon is not held
    dash_rig.advance(1)
    assert c.login("dana").status == 303


def test_sign_ins_beyond_the_hashes_in_flight_are_refused_at_once(
    dash_rig: DashRig, tmp_path: Path
) -> None:
    release = threading.Event()
    pool = ThreadPool(minthreads=1, maxthreads=1, name="login-test")
    pool.start()
    dash = dash_rig.dashboard

    def held_hash(fn: Any, *args: Any) -> Deferred[Any]:
        def run() -> Any:
            release.wait(30)
            return fn(*args)

        return deferToThreadPool(dash_rig.served.reactor, pool, run)

    dash_rig.served.call(setattr, dash, "gate", LoginGate(dash.clock, max_hashing=1))
    dash_rig.served.call(setattr, dash, "hash_in_thread", held_hash)
    first: list[Any] = []
    c1 = dash_rig.client()
    page = c1.get("/dashboard/login")
    worker = threading.Thread(
        target=lambda: first.append(c1.post("/dashboard/login", {
            "csrf": csrf_of(page.text), "name": "dana", "password": "dana-synthetic-pass-1"})),
    )  # fmt: skip
    try:
        worker.start()
        while dash_rig.served.call(lambda: dash.gate.hashing) == 0:
            release.wait(0.01)
        busy = dash_rig.client().login("root")
        assert busy.status == 429 and busy.header("retry-after") == "1"
        release.set()
        worker.join(30)
        assert first[0].status == 303
        assert dash_rig.served.call(lambda: dash.gate.hashing) == 0
        assert dash_rig.client().login("root").status == 303  # the slot was given back
    finally:
        release.set()
        pool.stop()


def test_a_locked_name_says_when_to_come_back(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    for _ in range(5):
        c.login("dana", "guess-guess-guess")
    locked = c.login("dana")
    assert locked.status == 429 and locked.header("retry-after") == "600"


def test_the_gate_counts_tokens_and_slots() -> None:
    clock = task.Clock()
    gate = LoginGate(Clock(clock), max_hashing=2, rate=0.5, burst=2)
    assert gate.admit() is None and gate.admit() is None
    assert gate.admit() == 1  # both slots taken
    gate.done()
    gate.done()
    assert gate.admit() == 2  # no token left: one comes every 2 s
    clock.advance(2)
    assert gate.admit() is None
    gate.done()
    clock.advance(1000)
    assert [gate.admit(), gate.admit()] == [None, None]  # the bucket holds at most burst
    gate.done()
    gate.done()
    assert gate.admit() == 2
    with pytest.raises(ValueError):
        LoginGate(Clock(clock), rate=0)


def test_the_daemon_hashes_in_a_pool_of_its_own_and_purges(tmp_path: Path, db_url: str) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from corespond.daemon.app import Corespond
    from corespond.daemon.config import load_config
    from tests.daemon.web.desks import DictDesks
    from tests.daemon.web.test_site import daemon_config

    config = daemon_config(tmp_path)
    config.write_text(
        f"store: {{url: '{db_url}'}}\n"
        + config.read_text()
        + "  users_file: users\n  login_hashes_at_once: 3\n"
        "  logins_per_second: 2\n  login_burst: 7\n  session_idle_seconds: 900\n"
    )
    reactor = MemoryReactorClock()
    desks = DictDesks()
    app = Corespond(load_config(config), reactor, page_desk=desks, clinician_desk=desks)
    try:
        app._start_web()
        dashboard = app.web_site.resource.children[b"dashboard"]
        assert isinstance(dashboard, Dashboard)
        assert app.login_threads is not None and app.login_threads.max == 3
        assert app.login_threads is not app.io_threads
        assert dashboard.hash_in_thread is not dashboard.in_thread
        gate = dashboard.gate
        assert (gate.max_hashing, gate.rate, gate.burst) == (3, 2.0, 7)
        assert dashboard.sessions.idle == timedelta(seconds=900)
        if db_url.startswith("sqlite"):  # session writes queue on the store's writer thread
            assert dashboard.sessions._run == app.store.run_on_writer
            assert app.session_threads is None
        else:  # PostgreSQL: a small pool of their own, not the I/O pool
            assert app.session_threads is not None and app.session_threads.max == 2
            assert dashboard.sessions._run != app.store.run_on_writer
        assert app._session_purge is not None and app._session_purge.running
    finally:
        app._session_purge.stop()
        for pool in (app.login_threads, app.session_threads):
            if pool is not None:
                pool.stop()
        app.engine.dispose()
