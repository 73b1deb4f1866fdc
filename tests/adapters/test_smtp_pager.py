"""The SMTP pager against Twisted's own ESMTP server, over loopback sockets."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes
from email.policy import default
from typing import Any

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock as TaskClock
from twisted.mail import smtp
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from zope.interface import implementer

from corespond.adapters.smtp_pager import SmtpPager
from corespond.daemon.clock import Clock
from corespond.daemon.pager import PageMessage, PagerError, Submitted
from tests.adapters.loopback import Loopback

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
PAGE = PageMessage("C1445-2", "att-9", "oncall@program.example", "C1445-2 Welfare check",
                   link="https://corespond.example/p/x")  # fmt: skip


@implementer(smtp.IMessage)
class Mailbox:
    def __init__(self, server: FakeSmtpServer) -> None:
        self.server, self.lines = server, []
        self.lines: list[bytes]

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Any:
        self.server.mail.append(b"\n".join(self.lines))
        return succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class Delivery:
    def __init__(self, server: FakeSmtpServer) -> None:
        self.server = server

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: by fake"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        if self.server.mode == "busy":
            raise smtp.SMTPServerError(451, "try again later")
        if user.dest.local != b"oncall":
            raise smtp.SMTPBadRcpt(user)
        if self.server.mode == "drop":
            user.protocol.transport.abortConnection()
        return lambda: Mailbox(self.server)


@implementer(IRealm)
class MailRealm:
    def __init__(self, server: FakeSmtpServer) -> None:
        self.server = server

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        return smtp.IMessageDelivery, Delivery(self.server), lambda: None


class FakeSmtpServer(Factory):
    """Twisted's ESMTP server; with ``users``, it takes mail only after AUTH (LOGIN/PLAIN)."""

    def __init__(self, users: dict[str, bytes] | None = None) -> None:
        self.mode = "ok"
        self.mail: list[bytes] = []
        self.users = users

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:
        if self.mode == "silent":
            from twisted.internet.protocol import Protocol

            return Protocol()  # type: ignore[return-value]
        if self.users is None:
            protocol = smtp.ESMTP()
            protocol.delivery = Delivery(self)
        else:
            protocol = smtp.ESMTP({b"LOGIN": LOGINCredentials, b"PLAIN": PLAINCredentials})
            protocol.portal = Portal(
                MailRealm(self), [InMemoryUsernamePasswordDatabaseDontUse(**self.users)]
            )
        protocol.factory = self
        protocol.timeout = None
        return protocol


def rig(lb: Loopback) -> tuple[SmtpPager, FakeSmtpServer, TaskClock]:
    server = FakeSmtpServer()
    port = lb.listen(server)
    timer = TaskClock()
    timer.advance(NOW.timestamp())
    pager = SmtpPager("mail-supervisors", reactor=lb.reactor, clock=Clock(timer), timer=timer,
                      host="127.0.0.1", port=port, sender="corespond@program.example",
                      starttls="none", timeout=20)  # fmt: skip
    return pager, server, timer


def test_page_is_mailed_with_ref_subject_and_attempt_message_id(loopback: Loopback) -> None:
    pager, server, _ = rig(loopback)
    assert loopback.until(pager.submit(PAGE)) == Submitted("mail-supervisors", None)
    (raw,) = server.mail
    mail = message_from_bytes(raw, policy=default)
    assert mail["Subject"] == "Page C1445-2"
    assert mail["To"] == "oncall@program.example"
    assert mail["Message-ID"] == "<att-9@corespond>"
    assert mail.get_content().rstrip("\n") == "C1445-2 Welfare check\nhttps://corespond.example/p/x"


@pytest.mark.parametrize(
    ("address", "mode", "retryable", "says"),
    [("nobody@program.example", "ok", False, "SMTP 550"), ("oncall@program.example", "busy", True,
     "SMTP 451"), ("oncall@program.example", "drop", True, "")],
)  # fmt: skip
def test_failures(loopback: Loopback, address: str, mode: str, retryable: bool, says: str) -> None:
    pager, server, _ = rig(loopback)
    server.mode = mode
    with pytest.raises(PagerError) as caught:
        loopback.until(pager.submit(PageMessage("C1-1", "a", address, "t")))
    assert caught.value.retryable is retryable and says in str(caught.value)
    assert "nobody" not in str(caught.value)
    assert not server.mail


@pytest.mark.parametrize(("password", "delivered"), [("s3cret", True), ("wrong", False)])
def test_auth_when_a_login_is_configured(
    loopback: Loopback, password: str, delivered: bool
) -> None:
    server = FakeSmtpServer(users={"corespond": b"s3cret"})
    port = loopback.listen(server)
    timer = TaskClock()
    pager = SmtpPager("mail-sup", reactor=loopback.reactor, clock=Clock(timer), timer=timer,
                      host="127.0.0.1", port=port, sender="corespond@program.example",
                      username="corespond", password=password, starttls="none",
                      timeout=20)  # fmt: skip
    d = pager.submit(PAGE)
    if delivered:
        assert loopback.until(d) == Submitted("mail-sup", None)
        assert len(server.mail) == 1
    else:
        with pytest.raises(PagerError) as caught:
            loopback.until(d)
        assert not caught.value.retryable and not server.mail
        assert "refused our AUTH" in str(caught.value) and "wrong" not in str(caught.value)


def test_required_starttls_refuses_a_relay_without_it(loopback: Loopback) -> None:
    pager, _, _ = rig(loopback)
    pager.starttls = "required"
    pager.tls = object()  # type: ignore[assignment]  # never used: the server offers no STARTTLS
    with pytest.raises(PagerError) as caught:
        loopback.until(pager.submit(PAGE))
    assert not caught.value.retryable and "STARTTLS" in str(caught.value)


def test_timeout_on_the_clock(loopback: Loopback) -> None:
    pager, server, timer = rig(loopback)
    server.mode = "silent"
    d = pager.submit(PAGE)
    loopback.turn(50)
    assert not d.called
    timer.advance(20)
    with pytest.raises(PagerError) as caught:
        loopback.until(d)
    assert caught.value.retryable and "timeout" in str(caught.value)


def test_nobody_listening(loopback: Loopback) -> None:
    pager, _, _ = rig(loopback)
    pager.port = 1
    with pytest.raises(PagerError) as caught:
        loopback.until(pager.submit(PAGE))
    assert caught.value.retryable
