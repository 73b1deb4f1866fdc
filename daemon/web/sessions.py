"""Server-side sessions of the dashboard, and the login throttle; time from the injected clock.

A session is a random id (32 bytes from the OS, URL-safe) in a ``Secure; HttpOnly;
SameSite=Strict`` cookie; the server keeps, under the id's SHA-256, who is logged in, their
role, the CSRF token of their forms and when the session ends: after ``idle_seconds`` without a
request or ``absolute_seconds`` after login, whichever comes first (CJIS 5.5.5: 30 minutes
idle). Sessions live in the daemon's memory: a restart logs everyone out, and two daemons
behind one balancer need sticky sessions.

The throttle counts failed logins per user name: after ``max_failures`` failures within
``lockout_seconds`` the name is locked for ``lockout_seconds`` (CJIS 5.5.3: 5 attempts), even
for the right password; names that do not exist are throttled the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from corespond.daemon.clock import Clock

COOKIE = b"corespond_session"
IDLE_SECONDS = 30 * 60
ABSOLUTE_SECONDS = 12 * 3600
MAX_FAILURES = 5
LOCKOUT_SECONDS = 600
MAX_SESSIONS = 10_000
MAX_TRACKED_NAMES = 10_000


@dataclass(slots=True)
class Session:
    user: str
    role: str
    clinician: str | None
    csrf: str
    started: float
    last_seen: float


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("ascii", "replace")).digest()


class Sessions:
    def __init__(
        self,
        clock: Clock,
        *,
        idle_seconds: float = IDLE_SECONDS,
        absolute_seconds: float = ABSOLUTE_SECONDS,
    ) -> None:
        self._clock = clock
        self.idle_seconds = idle_seconds
        self.absolute_seconds = absolute_seconds
        self._by_key: dict[bytes, Session] = {}

    def start(self, user: str, role: str, clinician: str | None) -> str:
        """A new session's id (for the cookie)."""
        now = self._clock.seconds()
        self._expire(now)
        if len(self._by_key) >= MAX_SESSIONS:  # the oldest go first
            oldest = sorted(self._by_key, key=lambda k: self._by_key[k].last_seen)
            for key in oldest[: len(self._by_key) - MAX_SESSIONS + 1]:
                del self._by_key[key]
        session_id = secrets.token_urlsafe(32)
        self._by_key[_key(session_id)] = Session(
            user, role, clinician, secrets.token_urlsafe(32), now, now
        )
        return session_id

    def get(self, session_id: str | None) -> Session | None:
        """The live session of ``session_id``, its idle time renewed; None when unknown or
        expired (an expired one is forgotten)."""
        if not session_id:
            return None
        key = _key(session_id)
        session = self._by_key.get(key)
        if session is None:
            return None
        now = self._clock.seconds()
        if self._expired(session, now):
            del self._by_key[key]
            return None
        session.last_seen = now
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._by_key.pop(_key(session_id), None)

    def end_user(self, user: str) -> None:
        for key in [k for k, s in self._by_key.items() if s.user == user]:
            del self._by_key[key]

    def _expired(self, session: Session, now: float) -> bool:
        return (
            now - session.last_seen >= self.idle_seconds
            or now - session.started >= self.absolute_seconds
        )

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._by_key.items() if self._expired(s, now)]:
            del self._by_key[key]

    def __len__(self) -> int:
        return len(self._by_key)


def csrf_ok(session: Session, presented: str | None) -> bool:
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
        entry = self._names.get(name)
        return entry is not None and self._clock.seconds() < entry.locked_until

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


__all__ = [
    "ABSOLUTE_SECONDS",
    "COOKIE",
    "IDLE_SECONDS",
    "LOCKOUT_SECONDS",
    "MAX_FAILURES",
    "LoginThrottle",
    "Session",
    "Sessions",
    "csrf_ok",
]
