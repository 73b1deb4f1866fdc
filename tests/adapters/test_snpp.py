"""SNPP against an RFC 1861 level-2 terminal written here, over loopback sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock as TaskClock
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from corespond.adapters.snpp import SnppClientProtocol, SnppFailure, SnppPager
from corespond.adapters.tls import client_tls_options, server_tls_options
from corespond.daemon.pager import PageMessage, PagerError, Submitted
from tests.adapters.loopback import Loopback
from tests.adapters.tlsfiles import make_pki

PAGE = PageMessage("C1445-2", "att-1", "5550100", "C1445-2 Welfare check, 400 blk Main St")


class Terminal(LineOnlyReceiver):
    """A paging terminal: PAGE, MESS/DATA, SEND, LOGI, RESE, QUIT; failures by ``mode``."""

    delimiter = b"\r\n"

    def __init__(self, server: FakeSnppServer) -> None:
        self.server = server
        self.pager: str | None = None
        self.text: str | None = None
        self.data: list[str] | None = None

    def connectionMade(self) -> None:
        if self.server.mode == "silent":
            return
        self.sendLine(b"220 SNPP Gateway Ready")

    def lineReceived(self, line: bytes) -> None:
        text = line.decode()
        self.server.log.append(text)
        if self.data is not None:
            if text == ".":
                self.text, self.data = "\n".join(self.data), None
                self.sendLine(b"250 Message OK")
            else:
                self.data.append(text[1:] if text.startswith("..") else text)
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        mode = self.server.mode
        if verb == "LOGI":
            ok = arg == "corespond s3cret"
            self.sendLine(b"250 Login Accepted" if ok else b"550 Login Failed")
        elif verb == "PAGE":
            if arg == "0000":
                self.sendLine(b"550 Error, Invalid Pager ID")
            else:
                self.pager = arg
                self.sendLine(b"250 Pager ID Accepted")
        elif verb == "MESS":
            self.text = arg
            self.sendLine(b"250 Message OK")
        elif verb == "DATA":
            self.data = []
            self.sendLine(b"354 Begin Input; End with <CRLF>'.'<CRLF>")
        elif verb == "SEND":
            if mode == "down":
                self.sendLine(b"554 Error, failed (technical reason)")
            elif mode == "drop":
                self.transport.abortConnection()  # type: ignore[union-attr]
            elif mode == "hang":
                pass
            else:
                self.server.sent.append((self.pager or "", self.text or ""))
                self.sendLine(b"250 Message Sent Successfully")
        elif verb == "QUIT":
            self.sendLine(b"221 OK, Goodbye")
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.sendLine(b"500 Command Not Implemented")


class FakeSnppServer(Factory):
    def __init__(self) -> None:
        self.mode = "ok"
        self.log: list[str] = []
        self.sent: list[tuple[str, str]] = []

    def buildProtocol(self, addr: Any) -> Terminal:
        return Terminal(self)


def rig(lb: Loopback, **kwargs: Any) -> tuple[SnppPager, FakeSnppServer, TaskClock]:
    server = FakeSnppServer()
    port = lb.listen(server)
    clock = TaskClock()
    pager = SnppPager("snpp-county", reactor=lb.reactor, clock=clock, host="127.0.0.1",
                      port=port, timeout=10, **kwargs)  # fmt: skip
    return pager, server, clock


def test_one_line_page(loopback: Loopback) -> None:
    pager, server, _ = rig(loopback)
    assert loopback.until(pager.submit(PAGE)) == Submitted("snpp-county", None)
    assert server.sent == [("5550100", PAGE.text)]
    loopback.until_true(lambda: "QUIT" in server.log)
    assert server.log == ["PAGE 5550100", f"MESS {PAGE.text}", "SEND", "QUIT"]
    assert pager.two_way is False


def test_multi_line_page_with_login_uses_data_and_dot_stuffing(loopback: Loopback) -> None:
    pager, server, _ = rig(loopback, login="corespond", password="s3cret")
    page = PageMessage("C1-1", "a", "5550100", "C1-1 Welfare check\n.dot line",
                       link="https://x.example/p/1")  # fmt: skip
    loopback.until(pager.submit(page))
    assert server.sent == [("5550100", "C1-1 Welfare check\n.dot line\nhttps://x.example/p/1")]
    assert server.log[:3] == ["LOGI corespond s3cret", "PAGE 5550100", "DATA"]
    assert "..dot line" in server.log


@pytest.mark.parametrize(
    ("address", "mode", "retryable", "says"),
    [("0000", "ok", False, "SNPP 550 after PAGE"), ("5550100", "down", True, "SNPP 554 after SEND"),
     ("5550100", "drop", True, "dropped")],
)  # fmt: skip
def test_failures(loopback: Loopback, address: str, mode: str, retryable: bool, says: str) -> None:
    pager, server, _ = rig(loopback)
    server.mode = mode
    page = PageMessage("C1-1", "a", address, "text")
    with pytest.raises(PagerError) as caught:
        loopback.until(pager.submit(page))
    assert caught.value.retryable is retryable and says in str(caught.value)
    assert not server.sent


def test_bad_login_is_permanent(loopback: Loopback) -> None:
    pager, _, _ = rig(loopback, login="corespond", password="wrong")
    with pytest.raises(PagerError) as caught:
        loopback.until(pager.submit(PAGE))
    assert not caught.value.retryable and "LOGI" in str(caught.value)


@pytest.mark.parametrize("mode", ["silent", "hang"])
def test_timeout_on_the_clock(loopback: Loopback, mode: str) -> None:
    pager, server, clock = rig(loopback)
    server.mode = mode
    d = pager.submit(PAGE)
    loopback.turn(50)
    assert not d.called
    clock.advance(10)
    with pytest.raises(PagerError) as caught:
        loopback.until(d)
    assert caught.value.retryable and "timeout" in str(caught.value)


def test_nobody_listening(loopback: Loopback) -> None:
    pager, _, _ = rig(loopback)
    pager.port = 1
    with pytest.raises(PagerError) as caught:
        loopback.until(pager.submit(PAGE))
    assert caught.value.retryable and "connect" in str(caught.value)


@pytest.mark.parametrize("trusted", [True, False])
def test_snpp_over_tls(loopback: Loopback, tmp_path: Path, trusted: bool) -> None:
    pki = make_pki(tmp_path)
    server = FakeSnppServer()
    wrapped = TLSMemoryBIOFactory(server_tls_options(pki.server_cert, pki.server_key), False,
                                  server, clock=loopback.reactor)  # fmt: skip
    port = loopback.listen(wrapped)
    ca = pki.ca_cert if trusted else pki.other_ca_cert
    pager = SnppPager("snpp-tls", reactor=loopback.reactor, clock=TaskClock(), host="127.0.0.1",
                      port=port, tls=client_tls_options("127.0.0.1", ca), timeout=10)  # fmt: skip
    if trusted:
        loopback.until(pager.submit(PAGE))
        assert server.sent == [("5550100", PAGE.text)]
    else:
        with pytest.raises(PagerError) as caught:
            loopback.until(pager.submit(PAGE))
        assert caught.value.retryable and not server.sent and not server.log


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\r\n" not in b), max_size=5),
       st.integers(1, 7))  # fmt: skip
def test_fuzz_reply_lines_give_a_code_or_a_failure(lines: list[bytes], chunk: int) -> None:
    """Whatever a terminal sends, each waiting command gets a code or a failure, never a hang
    or an exception; fed whole and in small pieces alike."""
    protocol = SnppClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    outcomes: list[object] = []
    waiting = [protocol.greeted] + [protocol.command("NOOP") for _ in lines[1:]]
    for d in waiting:
        d.addBoth(outcomes.append)
    data = b"".join(line + b"\r\n" for line in lines)
    for i in range(0, len(data), chunk):
        protocol.dataReceived(data[i : i + chunk])
    protocol.connectionLost(Failure(ConnectionDone()))
    assert len(outcomes) == len(waiting)
    for outcome in outcomes:
        assert isinstance(outcome, int) or (
            isinstance(outcome, Failure) and outcome.check(SnppFailure)
        )
