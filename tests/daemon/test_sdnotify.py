"""sd_notify over a real unix datagram socket, the watchdog on a fake clock, the unit file."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock as FakeReactor

from corespond.daemon.clock import Clock
from corespond.daemon.sdnotify import SystemdNotifier, Watchdog

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)  # a missing datagram fails the test instead of hanging it
    yield str(path), sock
    sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(10)
    return False


def test_notifications_are_sent_as_exact_datagrams(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    notifier = SystemdNotifier(path)
    assert notifier.enabled
    assert notifier.ready()
    assert received(sock) == f"READY=1\nMAINPID={os.getpid()}"
    notifier.status("running 3 feed components\nsecond line")
    assert received(sock) == "STATUS=running 3 feed components second line"
    notifier.watchdog()
    assert received(sock) == "WATCHDOG=1"
    notifier.stopping()
    assert received(sock) == "STOPPING=1"
    notifier.extend_timeout(90)
    assert received(sock) == "EXTEND_TIMEOUT_USEC=90000000"


def test_reloading_carries_the_monotonic_time(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    SystemdNotifier(path).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", received(sock))
    assert match is not None
    assert before <= int(match.group(1)) <= after


def test_the_socket_comes_from_the_environment(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    SystemdNotifier(environ={"NOTIFY_SOCKET": path}).stopping()
    assert received(sock) == "STOPPING=1"


def test_the_abstract_namespace() -> None:
    name = f"corespond-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    try:
        assert SystemdNotifier("@" + name).ready()
        assert received(sock).startswith("READY=1\n")
    finally:
        sock.close()


def test_without_systemd_nothing_is_sent() -> None:
    notifier = SystemdNotifier(environ={})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog()


def test_a_missing_socket_never_raises(tmp_path: Path) -> None:
    assert not SystemdNotifier(str(tmp_path / "gone.sock")).ready()
    assert not SystemdNotifier("vsock:2:1234").ready()


def watchdog_env(**extra: str) -> dict[str, str]:
    return {"WATCHDOG_USEC": "10000000", **extra}


def test_the_watchdog_pings_at_half_the_interval_while_healthy(
    listener: tuple[str, socket.socket],
) -> None:
    path, sock = listener
    reactor = FakeReactor()
    health = {"ok": True}
    dog = Watchdog.from_environment(
        SystemdNotifier(path), Clock(reactor), lambda: health["ok"], watchdog_env()
    )
    assert dog is not None and dog.interval == 5.0
    dog.start()
    assert received(sock) == "WATCHDOG=1"  # at once
    reactor.advance(4.9)
    assert nothing_waiting(sock)
    reactor.advance(0.1)
    assert received(sock) == "WATCHDOG=1"
    health["ok"] = False
    reactor.advance(5)
    reactor.advance(5)
    assert nothing_waiting(sock)
    health["ok"] = True
    reactor.advance(5)
    assert received(sock) == "WATCHDOG=1"
    assert dog.pings == 3
    dog.stop()
    reactor.advance(50)
    assert nothing_waiting(sock) and not reactor.getDelayedCalls()


def test_a_failing_health_check_means_no_ping(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener

    def broken() -> bool:
        raise RuntimeError("store gone")

    reactor = FakeReactor()
    dog = Watchdog(SystemdNotifier(path), Clock(reactor), broken, 1.0)
    dog.start()
    reactor.advance(3)
    assert nothing_waiting(sock) and dog.pings == 0
    dog.stop()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"},
    ],
)
def test_no_watchdog_unless_it_is_for_us(env: dict[str, str], tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "n.sock"))
    assert Watchdog.from_environment(notifier, Clock(FakeReactor()), lambda: True, env) is None


def test_watchdog_pid_matching_ours_is_honoured(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "n.sock"))
    env = watchdog_env(WATCHDOG_PID=str(os.getpid()))
    assert Watchdog.from_environment(notifier, Clock(FakeReactor()), lambda: True, env)
    # No notify socket, no watchdog: nobody would hear the pings.
    off = SystemdNotifier(environ={})
    assert (
        Watchdog.from_environment(off, Clock(FakeReactor()), lambda: True, watchdog_env()) is None
    )


# --- the unit ----------------------------------------------------------------------------------


def test_the_unit_file_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants the executables to exist: point the unit at this checkout's command.
    command = shutil.which("corespond") or str(REPO / ".venv" / "bin" / "corespond")
    if not Path(command).exists():
        pytest.skip("the corespond command is not installed")
    text = (REPO / "systemd" / "corespond.service").read_text()
    unit = tmp_path / "corespond.service"
    unit.write_text(text.replace("/usr/bin/corespond", command))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_the_unit_has_the_promised_settings() -> None:
    lines = (REPO / "systemd" / "corespond.service").read_text().splitlines()
    settings = {line.split("=", 1)[0] for line in lines if "=" in line and line[0] != "#"}
    for key in (
        "Type", "NotifyAccess", "ExecReload", "WatchdogSec", "User", "StateDirectory",
        "ProtectSystem", "NoNewPrivileges", "CapabilityBoundingSet", "SystemCallFilter",
        "RestrictAddressFamilies", "UMask",
    ):  # fmt: skip
        assert key in settings, key
    assert "Type=notify" in lines
    sysusers = (REPO / "systemd" / "corespond.sysusers").read_text()
    assert re.search(r"^u\s+corespond\s", sysusers, re.MULTILINE)
