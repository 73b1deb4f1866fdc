"""E-mail as a last-resort, one-way page: a supervisor mailbox or a carrier's PIN@ gateway.

One ESMTP session per page with ``twisted.mail.smtp.ESMTPSenderFactory``: STARTTLS is
``required`` (refuse a server that does not offer it), ``opportunistic`` (use it when offered)
or ``none``; AUTH when a user name is configured (the password is read from a file). A 250 only
means the relay took the message. A 5xx answer (an unknown mailbox, a refused sender, a failed
AUTH) is permanent for this page; a 4xx, a refused or dropped connection and the adapter's
timeout are retryable. The adapter makes one attempt: GatewayQueue owns retries.

The message carries the page text and link only, ``Subject: Page <ref>`` and our attempt id in
``Message-ID``, so a relay that logs headers logs nothing protected.
"""

from __future__ import annotations

import io
from email.message import EmailMessage
from email.policy import default
from email.utils import format_datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.mail.smtp import (
    AUTHDeclinedError,
    ESMTPSenderFactory,
    SMTPClientError,
    SMTPConnectError,
    TLSRequiredError,
)
from twisted.python.failure import Failure

from corespond.daemon.clock import Clock
from corespond.daemon.pager import PageMessage, PagerError, Submitted

STARTTLS_MODES = ("required", "opportunistic", "none")


def page_email(message: PageMessage, *, sender: str, now: Any, domain: str) -> bytes:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = message.address
    mail["Subject"] = f"Page {message.page_ref}"
    mail["Date"] = format_datetime(now)
    mail["Message-ID"] = f"<{message.attempt_id}@{domain}>"
    mail["Auto-Submitted"] = "auto-generated"
    body = message.text if message.link is None else f"{message.text}\n{message.link}"
    mail.set_content(body + "\n")
    # LF line ends: Twisted's sender turns them into CRLF and dot-stuffs on the way out.
    return mail.as_bytes(policy=default)


class SmtpPager:
    """One relay. ``submit`` is one ESMTP session, bounded by ``timeout``."""

    two_way = False

    def __init__(
        self,
        name: str,
        *,
        reactor: Any,
        clock: Clock,
        timer: IReactorTime,
        host: str,
        port: int = 587,
        sender: str,
        username: str | None = None,
        password: str | None = None,
        starttls: str = "required",
        tls: IOpenSSLClientConnectionCreator | None = None,
        helo_domain: str = "corespond",
        timeout: float = 30.0,
    ) -> None:
        if starttls not in STARTTLS_MODES:
            raise ValueError(f"starttls must be one of {', '.join(STARTTLS_MODES)}")
        if starttls != "none" and tls is None:
            raise ValueError("STARTTLS needs client TLS options (tls)")
        self.name, self.reactor, self.clock, self.timer = name, reactor, clock, timer
        self.host, self.port, self.sender = host, port, sender
        self.username, self.password = username, password
        self.starttls, self.tls = starttls, tls
        self.helo_domain, self.timeout = helo_domain, timeout

    def submit(self, message: PageMessage) -> Deferred[Submitted]:
        mail = page_email(message, sender=self.sender, now=self.clock.now(),
                          domain=self.helo_domain)  # fmt: skip
        result: Deferred[Any] = Deferred()
        factory = ESMTPSenderFactory(
            self.username.encode() if self.username else None,
            self.password.encode() if self.password else None,
            self.sender,
            [message.address],
            io.BytesIO(mail),
            result,
            retries=0,
            timeout=None,  # ours, on the injected clock, below
            contextFactory=self.tls if self.starttls != "none" else None,
            heloFallback=False,
            requireAuthentication=self.username is not None,
            requireTransportSecurity=self.starttls == "required",
            hostname=self.helo_domain,
        )
        factory.noisy = False
        connector = self.reactor.connectTCP(self.host, self.port, factory, timeout=self.timeout)
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            connector.disconnect()

        timer = self.timer.callLater(self.timeout, expire)

        def done(outcome: Any) -> Any:
            if timer.active():
                timer.cancel()
            if isinstance(outcome, Failure):
                return Failure(self._error(outcome, bool(timed_out)))
            return Submitted(self.name, None)

        result.addBoth(done)
        return result

    def _error(self, failure: Failure, timed_out: bool) -> PagerError:
        if timed_out:
            return PagerError(self.name, f"timeout: no answer within {self.timeout:g} s",
                              retryable=True)  # fmt: skip
        value = failure.value
        if isinstance(value, TLSRequiredError):
            return PagerError(self.name, "the relay offers no STARTTLS", retryable=False)
        if isinstance(value, AUTHDeclinedError):
            return PagerError(self.name, "the relay refused our AUTH", retryable=False)
        if isinstance(value, SMTPConnectError):
            return PagerError(self.name, "connect: cannot connect", retryable=True)
        if isinstance(value, SMTPClientError) and value.code and value.code > 0:
            code = int(value.code)
            return PagerError(self.name, f"SMTP {code}", retryable=not 500 <= code < 600)
        return PagerError(self.name, f"dropped: {type(value).__name__}", retryable=True)
