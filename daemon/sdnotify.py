"""systemd's notify protocol: a few datagrams on ``$NOTIFY_SOCKET``, no libsystemd.

``READY=1`` once listeners are up, ``RELOADING=1`` around a reload, ``STOPPING=1`` on the way
out, ``STATUS=`` for ``systemctl status``, and ``WATCHDOG=1`` from a looping call on the reactor
while the daemon is healthy: a wedged reactor stops the pings and systemd restarts the service.
Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing. Sending never raises: a lost
notification must not take the daemon down.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog
from twisted.internet.task import LoopingCall

from corespond.daemon.clock import Clock

log = structlog.get_logger(__name__)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotifier:
    """Sends notifications to the service manager.

    ``socket_path`` defaults to ``$NOTIFY_SOCKET``; a leading ``@`` means the abstract namespace.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if socket_path is None:
            socket_path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
        self._address: str | bytes | None = None
        if socket_path:
            if socket_path.startswith("@"):
                self._address = b"\0" + socket_path[1:].encode()
            elif socket_path.startswith("/"):
                self._address = socket_path
            else:  # vsock: and other forms this daemon has no need for
                log.warning("systemd.notify.unsupported", reason="NOTIFY_SOCKET is not a unix path")

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True if it was sent."""
        if self._address is None:
            return False
        data = "\n".join(assignments).encode()
        try:
            # A socket per datagram, as sd_notify(3) does: nothing to leak or to close.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self._address)
        except OSError as err:
            log.warning("systemd.notify.failed", error=err.strerror or str(err))
            return False
        return True

    def ready(self) -> bool:
        return self.send("READY=1", f"MAINPID={os.getpid()}")

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) insists on MONOTONIC_USEC; older ones ignore it.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send("STATUS=" + " ".join(text.splitlines()))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (a long migration)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


class Watchdog:
    """Sends ``WATCHDOG=1`` every ``interval`` seconds while ``healthy()`` says so.

    The looping call runs on the reactor, so a ping also proves the reactor turns; ``healthy``
    adds what the reactor cannot see (the store commits, say).
    """

    def __init__(
        self,
        notifier: SystemdNotifier,
        clock: Clock,
        healthy: Callable[[], bool],
        interval: float,
    ) -> None:
        if interval <= 0:
            raise ValueError("the watchdog interval must be positive")
        self.notifier = notifier
        self.clock = clock
        self.healthy = healthy
        self.interval = interval
        self.pings = 0
        self._was_healthy = True
        self._call: LoopingCall | None = None

    @classmethod
    def from_environment(
        cls,
        notifier: SystemdNotifier,
        clock: Clock,
        healthy: Callable[[], bool],
        environ: Mapping[str, str] | None = None,
    ) -> Watchdog | None:
        """The watchdog systemd asked for (``WATCHDOG_USEC``, half of it), or None."""
        env = os.environ if environ is None else environ
        usec = env.get("WATCHDOG_USEC")
        if not usec or not notifier.enabled:
            return None
        pid = env.get("WATCHDOG_PID")
        if pid and pid.strip() != str(os.getpid()):
            return None  # meant for another process (we were started by something else)
        try:
            value = int(usec)
        except ValueError:
            log.warning("systemd.watchdog.invalid", reason="WATCHDOG_USEC is not a number")
            return None
        if value <= 0:
            return None
        return cls(notifier, clock, healthy, value / 2 / 1_000_000)

    def start(self) -> None:
        if self._call is None:
            self._call = self.clock.looping_call(self.interval, self._tick, now=True)
            log.info("systemd.watchdog.started", seconds=self.interval)

    def stop(self) -> None:
        if self._call is not None and self._call.running:
            self._call.stop()
        self._call = None

    def _tick(self) -> None:
        try:
            healthy = bool(self.healthy())
        except Exception:
            log.exception("systemd.watchdog.check.failed")
            healthy = False
        if healthy:
            if not self._was_healthy:
                log.info("systemd.watchdog.healthy")
            if self.notifier.watchdog():
                self.pings += 1
        elif self._was_healthy:
            log.error("systemd.watchdog.unhealthy", reason="health check failed; not pinging")
        self._was_healthy = healthy


__all__ = ["SystemdNotifier", "Watchdog", "monotonic_usec"]
