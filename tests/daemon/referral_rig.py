"""Referral tests' rig: a config, a private reactor with a fake clock for timers, MLLP peers.

Network I/O and thread results run on a private ``SelectReactor`` turned by :func:`spin`
(I/O turns, not sleeps); protocol timeouts and backoff run on a ``task.Clock`` that only the
test moves. Peers: :class:`Peer` is our own misbehaving Twisted peer (on the same reactor);
:func:`start_python_hl7_peer` and :func:`start_txhl7_peer` run the independent peers as
processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock as TaskClock

from corespond.adapters.framing import make_deframer
from corespond.adapters.hl7_referral import Person, build_ack, parse_reply
from corespond.adapters.mllp import frame, listen
from corespond.daemon.config import ProviderConfig, ReferralsConfig
from corespond.daemon.referrals import ReferralRequest

START = 1_800_000_000.0  # 2027-01-15, UTC


def provider(name: str = "csu", port: int = 1, **kwargs: Any) -> ProviderConfig:
    values: dict[str, Any] = dict(
        host="127.0.0.1",
        port=port,
        receiving_application="BHRECV",
        receiving_facility="CSU",
        ack_timeout=5.0,
        connect_timeout=5.0,
        backoff_initial=2.0,
        backoff_max=60.0,
    )
    values.update(kwargs)
    return ProviderConfig(name=name, **values)


def config(*providers: ProviderConfig, **kwargs: Any) -> ReferralsConfig:
    return ReferralsConfig(
        sending_application="CORESPOND",
        sending_facility="COUNTY-BH",
        providers=providers or (provider(),),
        poll_interval=1.0,
        **kwargs,
    )


def request(**kwargs: Any) -> ReferralRequest:
    values: dict[str, Any] = dict(
        incident_ref="INC-2027-000123",
        provider="csu",
        service_type="crisis-stabilization",
        referring_clinician="CLIN-17",
        urgency="stat",
        person=Person(
            family="ZQXPERSON",
            given="Jane",
            birth_date="1990-01-01",
            sex="F",
            phone="555-0100",
            street="12 Imaginary Lane",
        ),
        summary="Says she hears voices | needs a bed ^ tonight & follow-up",
    )
    values.update(kwargs)
    return ReferralRequest(**values)


def now() -> datetime:
    return datetime.fromtimestamp(START, UTC)


def with_port(cfg: ReferralsConfig, name: str, port: int, **kwargs: Any) -> ReferralsConfig:
    providers = tuple(
        replace(p, port=port, **kwargs) if p.name == name else p for p in cfg.providers
    )
    return replace(cfg, providers=providers)


@dataclass
class Loop:
    reactor: SelectReactor = field(default_factory=SelectReactor)
    clock: TaskClock = field(default_factory=TaskClock)

    def __post_init__(self) -> None:
        self.clock.advance(START)

    def spin(self, until: Callable[[], bool], turns: int = 3000) -> None:
        """Turn the reactor (and zero-delay timers) until ``until()`` or fail."""
        for _ in range(turns):
            self.clock.advance(0)
            if until():
                return
            self.reactor.iterate(0.005)
        raise AssertionError("the condition was not reached")

    def settle(self, turns: int = 40) -> None:
        for _ in range(turns):
            self.clock.advance(0)
            self.reactor.iterate(0.002)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle(5)


# --- our own peer, with the behaviours real engines show ------------------------------------


class PeerProtocol(Protocol):
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.deframer = make_deframer("vt-fs-cr", 10_000_000)
        self.previous: bytes | None = None

    def connectionMade(self) -> None:
        self.peer.connections += 1
        self.peer.live.append(self)

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.peer.live:
            self.peer.live.remove(self)

    def dataReceived(self, data: bytes) -> None:
        for item in self.deframer.feed(data):
            assert isinstance(item, bytes)
            self.peer.received.append(item)
            self.answer(item)

    def ack_for(self, message: bytes, code: str = "AA") -> bytes:
        return build_ack(
            parse_reply(message),
            code,
            f"P{len(self.peer.received)}",
            datetime.now(UTC),
            text="ZQXPEER rejects this" if code != "AA" else None,
        )

    def answer(self, message: bytes) -> None:
        mode = self.peer.mode
        assert self.transport is not None
        if mode == "aa":
            self.transport.write(frame(self.ack_for(message)))
        elif mode in ("ae", "ar", "ce", "cr"):
            self.transport.write(frame(self.ack_for(message, mode.upper())))
        elif mode == "drop":
            self.transport.loseConnection()
        elif mode == "silent":
            self.peer.unanswered.append((self, message))
        elif mode == "double":
            # The ACK of the previous message again, before this one's: must be ignored.
            if self.previous is not None:
                self.transport.write(frame(self.ack_for(self.previous)))
            self.transport.write(frame(self.ack_for(message)))
            self.transport.write(frame(self.ack_for(message)))
        elif mode == "wrong":
            self.transport.write(
                frame(self.ack_for(self.previous or b"MSH|^~\\&|||||||ACK|X|P|2.5.1"))
            )
        self.previous = message

    def answer_late(self) -> None:
        pass


@dataclass
class Peer:
    loop: Loop
    mode: str = "aa"
    received: list[bytes] = field(default_factory=list)
    unanswered: list[tuple[PeerProtocol, bytes]] = field(default_factory=list)
    live: list[PeerProtocol] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    listener: Any = None

    def start(self, tls: Any = None) -> Peer:
        factory = Factory.forProtocol(lambda: PeerProtocol(self))
        self.listener = listen(self.loop.reactor, 0, factory, tls=tls)
        self.port = self.listener.getHost().port
        return self

    def stop(self) -> None:
        for proto in list(self.live):
            assert proto.transport is not None
            proto.transport.loseConnection()
        if self.listener is not None:
            self.listener.stopListening()
        self.loop.settle(5)

    def control_ids(self) -> list[str | None]:
        return [parse_reply(m).control_id for m in self.received]

    def answer_late(self, code: str = "AA") -> None:
        """Answer everything held so far, on whatever connection it came in."""
        held, self.unanswered = self.unanswered, []
        for proto, message in held:
            if proto.transport is not None and proto in self.live:
                proto.transport.write(frame(proto.ack_for(message, code)))


# --- independent peers, as processes -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PYTHON_HL7_PEER = textwrap.dedent(
    """
    import asyncio, sys
    import hl7
    from hl7.mllp import start_hl7_server

    log = open(sys.argv[2], "a")

    async def handle(reader, writer):
        try:
            while not writer.is_closing():
                msg = await reader.readmessage()
                log.write(str(msg.segment("MSH")[10]) + "\\n"); log.flush()
                writer.writemessage(msg.create_ack("AA"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    async def main(port):
        async with await start_hl7_server(
            handle, host="127.0.0.1", port=port, limit=16 * 1024 * 1024
        ) as server:
            print("ready", flush=True)
            await server.serve_forever()

    asyncio.run(main(int(sys.argv[1])))
    """
)


def _wait_ready(proc: subprocess.Popen[str], marker: str, what: str) -> None:
    """Block on the child's output until it says it listens (no sleeping, no polling)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return
    raise RuntimeError(f"{what} exited before listening: {''.join(seen)[-2000:]}")


@contextmanager
def run_process(args: list[str], marker: str, what: str, cwd: Path) -> Iterator[None]:
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        _wait_ready(proc, marker, what)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stdout:
            proc.stdout.close()


@contextmanager
def python_hl7_peer(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    script = tmp_path / "pyhl7_peer.py"
    script.write_text(PYTHON_HL7_PEER)
    received = tmp_path / "pyhl7_received.txt"
    received.touch()
    with run_process(
        [sys.executable, str(script), str(port), str(received)],
        "ready",
        "python-hl7 MLLP server",
        tmp_path,
    ):
        yield port, received


@contextmanager
def txhl7_peer(tmp_path: Path, tls: tuple[Path, Path] | None = None) -> Iterator[int]:
    port = free_port()
    endpoint = f"tcp:{port}:interface=127.0.0.1"
    if tls is not None:
        cert, key = tls
        endpoint = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    twistd = str(Path(sys.executable).with_name("twistd"))
    with run_process(
        [twistd, "-n", "--pidfile=", "mllp", "--endpoint", endpoint],
        "starting on",
        "txHL7 under twistd",
        tmp_path,
    ):
        yield port


# --- builders for the daemon's builder processes (module level: they are pickled by name) ------


def build_in_pid(content: Any, profile: str) -> bytes:
    """Builds as the daemon does, and says which process built it and at which CPU priority
    (a Z-segment: ZPD-1 its pid, ZPD-2 its niceness, ZPD-3 its scheduling policy)."""
    from corespond.adapters.hl7_referral import build_message

    zpd = f"\rZPD|{os.getpid()}|{os.nice(0)}|{os.sched_getscheduler(0)}\r".encode()
    return build_message(content, profile).rstrip(b"\r") + zpd


def build_or_die(content: Any, profile: str) -> bytes:
    """Builds, except for incident ``DIE``: then the builder process dies at once."""
    from corespond.adapters.hl7_referral import build_message

    if content.incident_ref == "DIE":
        os._exit(3)
    return build_message(content, profile)
