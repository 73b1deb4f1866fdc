"""Dashboard sessions, kept in the database; the login throttles; time from the injected clock.

A session is a random id (32 bytes from the OS, URL-safe) in a ``Secure; HttpOnly;
SameSite=Strict`` cookie; the database keeps, under the id's SHA-256 (never the id itself), who
is logged in, their role, the CSRF token of their forms and when the session ends: after
``idle_seconds`` without a request or ``absolute_seconds`` after login, whichever comes first
(CJIS 5.5.5: 30 minutes idle). A restart keeps everyone signed in, and daemons behind one
balancer share the sessions of their database. Logging out deletes the row; expired rows are
deleted at each sign-in and by :meth:`SessionStore.purge` (the daemon runs it every few
minutes). The idle time is renewed at most once a ``touch_seconds`` per session, so a page and
its CSV downloads cost one write, not one each.

Every database call runs through ``run`` (the daemon's: the store's writer thread on SQLite,
a small pool of its own on PostgreSQL), never on the reactor.

:class:`LoginThrottle` counts failed logins per user name: after ``max_failures`` failures
within ``lockout_seconds`` the name is locked for ``lockout_seconds`` (CJIS 5.5.3: 5 attempts),
even for the right password; names that do not exist are throttled the same way.
:class:`LoginGate` bounds what all sign-ins together may cost: at most ``max_hashing``
password hashes at once and ``rate`` attempts a second (``burst`` at once), whatever the names;
beyond that a sign-in is answered 429 with Retry-After at once, without hashing.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, delete, func, insert, or_, select, update
from twisted.internet.defer import Deferred, succeed

from corespond.daemon.clock import Clock
from corespond.daemon.store.tables import dashboard_sessions

T = TypeVar("T")
RunInThread = Callable[[Callable[[], Any]], Deferred[Any]]

COOKIE = b"corespond_session"
IDLE_SECONDS = 30 * 60
ABSOLUTE_SECONDS = 12 * 3600
TOUCH_SECONDS = 60
PURGE_SECONDS = 600
MAX_FAILURES = 5
LOCKOUT_SECONDS = 600
MAX_SESSIONS = 10_000
MAX_TRACKED_NAMES = 10_000
MAX_HASHING = 2
LOGIN_RATE = 5.0  # sign-in attempts a second, all names together
LOGIN_BURST = 20


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    role: str
    clinician: str | None
    csrf: str
    started: float
    last_seen: float


def session_key(session_id: str) -> str:
    """What the database keeps of a session id: its SHA-256, hex."""
    return hashlib.sha256(session_id.encode("ascii", "replace")).hexdigest()


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# --- one transaction each, plain values out --------------------------------------------------


def create_session(
    conn: Connection,
    key: str,
    user: str,
    role: str,
    clinician: str | None,
    csrf: str,
    now: datetime,
    *,
    idle: timedelta,
    absolute: timedelta,
    max_sessions: int = MAX_SESSIONS,
) -> None:
    """A new session row; expired ones deleted first, and the least recently used beyond
    ``max_sessions`` (a flood of sign-ins must not grow the table without bound)."""
    purge_sessions(conn, now, idle=idle)
    s = dashboard_sessions.c
    count = conn.execute(select(func.count()).select_from(dashboard_sessions)).scalar_one()
    if count >= max_sessions:
        oldest = (
            select(s.id_hash).order_by(s.last_seen_at, s.id_hash).limit(count - max_sessions + 1)
        )
        conn.execute(delete(dashboard_sessions).where(s.id_hash.in_(oldest.scalar_subquery())))
    conn.execute(
        insert(dashboard_sessions).values(
            id_hash=key, user_name=user, role=role, clinician=clinician, csrf=csrf,
            started_at=now, last_seen_at=now, expires_at=now + absolute,
        )
    )  # fmt: skip


def live_session(
    conn: Connection, key: str, now: datetime, *, idle: timedelta, touch: timedelta
) -> Session | None:
    """The session stored under ``key`` if it has not expired, its idle time renewed (when
    older than ``touch``); an expired one is deleted."""
    s = dashboard_sessions.c
    row = conn.execute(select(dashboard_sessions).where(s.id_hash == key)).mappings().first()
    if row is None:
        return None
    if now >= row["expires_at"] or now - row["last_seen_at"] >= idle:
        conn.execute(delete(dashboard_sessions).where(s.id_hash == key))
        return None
    last_seen = row["last_seen_at"]
    if now - last_seen >= touch:
        conn.execute(update(dashboard_sessions).where(s.id_hash == key).values(last_seen_at=now))
        last_seen = now
    return Session(
        row["user_name"], row["role"], row["clinician"], row["csrf"],
        row["started_at"].timestamp(), last_seen.timestamp(),
    )  # fmt: skip


def delete_session(conn: Connection, key: str) -> None:
    conn.execute(delete(dashboard_sessions).where(dashboard_sessions.c.id_hash == key))


def delete_user_sessions(conn: Connection, user: str) -> int:
    result = conn.execute(delete(dashboard_sessions).where(dashboard_sessions.c.user_name == user))
    return int(result.rowcount or 0)


def purge_sessions(conn: Connection, now: datetime, *, idle: timedelta) -> int:
    """Delete every expired session; how many."""
    s = dashboard_sessions.c
    result = conn.execute(
        delete(dashboard_sessions).where(or_(s.expires_at <= now, s.last_seen_at <= now - idle))
    )
    return int(result.rowcount or 0)


def session_count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(dashboard_sessions)).scalar_one())


class SessionStore:
    """The dashboard's sessions in the database; every method's Deferred fires after the
    commit."""

    def __init__(
        self,
        engine: Engine,
        clock: Clock,
        run: RunInThread,
        *,
        idle_seconds: float = IDLE_SECONDS,
        absolute_seconds: float = ABSOLUTE_SECONDS,
        touch_seconds: float = TOUCH_SECONDS,
    ) -> None:
        self.engine = engine
        self._clock = clock
        self._run = run
        self.idle = timedelta(seconds=idle_seconds)
        self.absolute = timedelta(seconds=absolute_seconds)
        self.touch = timedelta(seconds=min(touch_seconds, idle_seconds / 10))

    def _tx(self, fn: Callable[[Connection], T]) -> Deferred[T]:
        def work() -> T:
            with self.engine.begin() as conn:
                return fn(conn)

        d: Deferred[T] = self._run(work)
        return d

    def _now(self) -> datetime:
        return _at(self._clock.seconds())

    def start(self, user: str, role: str, clinician: str | None) -> Deferred[str]:
        """A new session's id (for the cookie), once stored."""
        session_id = secrets.token_urlsafe(32)
        key, csrf, now = session_key(session_id), secrets.token_urlsafe(32), self._now()
        return self._tx(
            lambda c: create_session(c, key, user, role, clinician, csrf, now,
                                     idle=self.idle, absolute=self.absolute)
        ).addCallback(lambda _: session_id)  # fmt: skip

    def get(self, session_id: str | None) -> Deferred[Session | None]:
        """The live session of ``session_id``, its idle time renewed; None when unknown or
        expired (an expired one is deleted)."""
        if not session_id or len(session_id) > 128:
            return succeed(None)
        key, now = session_key(session_id), self._now()
        return self._tx(lambda c: live_session(c, key, now, idle=self.idle, touch=self.touch))

    def end(self, session_id: str | None) -> Deferred[None]:
        if not session_id:
            return succeed(None)
        key = session_key(session_id)
        return self._tx(lambda c: delete_session(c, key))

    def end_user(self, user: str) -> Deferred[int]:
        return self._tx(lambda c: delete_user_sessions(c, user))

    def purge(self) -> Deferred[int]:
        now = self._now()
        return self._tx(lambda c: purge_sessions(c, now, idle=self.idle))


def csrf_ok(session: Session, presented: str | None) -> bool:
    """Whether ``presented`` is the session's CSRF token (constant time)."""
    return presented is not None and hmac.compare_digest(
        session.csrf.encode(), presented.encode("utf-8", "replace")
    )


@dataclass(slots=True)
class _Failures:
    times: list[float] = field(default_factory=list)
    locked_until: float = 0.0


class LoginThrottle:
    """Failed logins per user name; a name with ``max_failures`` recent failures is locked."""

    def __init__(
        self,
        clock: Clock,
        *,
        max_failures: int = MAX_FAILURES,
        lockout_seconds: float = LOCKOUT_SECONDS,
    ) -> None:
        self._clock = clock
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self._names: dict[str, _Failures] = {}

    def locked(self, name: str) -> bool:
        return self.locked_for(name) > 0

    def locked_for(self, name: str) -> int:
        """Whole seconds until ``name`` may try again; 0 when it is not locked."""
        entry = self._names.get(name)
        if entry is None:
            return 0
        return max(0, math.ceil(entry.locked_until - self._clock.seconds()))

    def failed(self, name: str) -> None:
        now = self._clock.seconds()
        if name not in self._names and len(self._names) >= MAX_TRACKED_NAMES:
            self._forget_old(now)
        entry = self._names.setdefault(name, _Failures())
        entry.times = [t for t in entry.times if now - t < self.lockout_seconds] + [now]
        if len(entry.times) >= self.max_failures:
            entry.locked_until = now + self.lockout_seconds
            entry.times = []

    def succeeded(self, name: str) -> None:
        self._names.pop(name, None)

    def _forget_old(self, now: float) -> None:
        for name in [
            n
            for n, e in self._names.items()
            if now >= e.locked_until and all(now - t >= self.lockout_seconds for t in e.times)
        ]:
            del self._names[name]
        if len(self._names) >= MAX_TRACKED_NAMES:
            # A flood of names: forget the oldest counts, never a lock (flooding must not be a
            # way to unlock a name).
            unlocked = [n for n, e in self._names.items() if now >= e.locked_until]
            for name in unlocked[: len(unlocked) // 2 + 1]:
                del self._names[name]


class LoginGate:
    """What all sign-ins together may cost: ``max_hashing`` password hashes at a time and a
    token bucket of ``rate`` attempts a second (``burst`` at once). :meth:`admit` says at once
    whether an attempt may hash; every admitted attempt calls :meth:`done` when its hash ends.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        max_hashing: int = MAX_HASHING,
        rate: float = LOGIN_RATE,
        burst: int = LOGIN_BURST,
    ) -> None:
        if max_hashing < 1 or rate <= 0 or burst < 1:
            raise ValueError("a login gate needs max_hashing >= 1, rate > 0 and burst >= 1")
        self._clock = clock
        self.max_hashing = max_hashing
        self.rate = rate
        self.burst = burst
        self.hashing = 0
        self._tokens = float(burst)
        self._filled_at = clock.seconds()

    def admit(self) -> int | None:
        """None: go ahead (one hash slot and one token taken). Otherwise the whole seconds
        after which to try again (for Retry-After)."""
        now = self._clock.seconds()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._filled_at) * self.rate)
        self._filled_at = now
        if self.hashing >= self.max_hashing:
            return 1
        if self._tokens < 1.0:
            return max(1, math.ceil((1.0 - self._tokens) / self.rate))
        self._tokens -= 1.0
        self.hashing += 1
        return None

    def done(self) -> None:
        self.hashing = max(0, self.hashing - 1)


__all__ = [
    "ABSOLUTE_SECONDS",
    "COOKIE",
    "IDLE_SECONDS",
    "LOCKOUT_SECONDS",
    "MAX_FAILURES",
    "LoginGate",
    "LoginThrottle",
    "Session",
    "SessionStore",
    "create_session",
    "csrf_ok",
    "delete_session",
    "delete_user_sessions",
    "live_session",
    "purge_sessions",
    "session_count",
    "session_key",
]
