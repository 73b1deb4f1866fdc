"""SNPP (RFC 1861) levels 1 and 2: a one-way page to a paging terminal over TCP (port 444).

One connection per page: wait for the ``220`` greeting, ``LOGI`` when credentials are set,
``PAGE <pager id>``, the text with ``MESS`` (one line) or ``DATA`` (several lines, dot-stuffed,
ended by a lone ``.``), ``SEND``, ``QUIT``. Every answer is a three-digit code: ``2xx`` goes on,
``5xx`` stops. ``550`` (administrative failure, e.g. an unknown pager id), ``500``/``503``
(the terminal does not speak what we sent) and ``552`` are permanent for this page; ``421``
(the terminal hangs up), ``554`` (technical failure), a dropped connection and the adapter's
timeout are retryable. SNPP gives no reply from the person, so the pager is ``two_way=False``.

A connection lost after ``SEND`` went out but before its ``250`` cannot tell whether the
terminal queued the page; it is reported retryable, and a repeat is possible there (SNPP has no
message id to deduplicate on).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from corespond.daemon.pager import PageMessage, PagerError, Submitted

_REPLY = re.compile(rb"^([0-9]{3})(?:[ -](.*))?$")
PERMANENT_CODES = frozenset({500, 501, 502, 503, 550, 552})
MAX_LINE = 1024


class SnppFailure(Exception):
    def __init__(self, code: int | None, step: str) -> None:
        super().__init__(step)
        self.code, self.step = code, step


class SnppClientProtocol(LineOnlyReceiver):
    """Sends one command at a time and hands each reply line to whoever waits for it."""

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self) -> None:
        self._waiting: deque[Deferred[int]] = deque()
        self._early: deque[int] = deque()
        self._lost: Failure | None = None
        self.greeted: Deferred[int] = self._expect()

    def _expect(self) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        if self._lost is not None:
            d.errback(self._lost)
        elif self._early:
            d.callback(self._early.popleft())
        else:
            self._waiting.append(d)
        return d

    def lineReceived(self, line: bytes) -> None:
        found = _REPLY.match(line.rstrip(b"\r"))
        if found is None:
            self._fail(SnppFailure(None, "an answer without a reply code"))
            return
        code = int(found.group(1))
        if code == 214 and line[3:4] == b"-":
            return  # multi-line help text; the final line carries the code that counts
        if self._waiting:
            self._waiting.popleft().callback(code)
        else:
            self._early.append(code)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(SnppFailure(None, "an answer line over the length limit"))

    def _fail(self, err: Exception) -> None:
        self._lost = Failure(err)
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(self._lost)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def command(self, line: str) -> Deferred[int]:
        self.sendLine(line.encode("utf-8"))
        return self._expect()

    def send_data(self, text: str) -> Deferred[int]:
        for line in text.splitlines() or [""]:
            raw = line.encode("utf-8")
            self.sendLine(b"." + raw if raw.startswith(b".") else raw)
        self.sendLine(b".")
        return self._expect()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._lost is None:
            self._lost = Failure(SnppFailure(None, "the connection closed"))
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(self._lost)


def _clean(text: str) -> str:
    # SNPP is a line protocol: no control characters inside a line.
    return "".join(ch if ch.isprintable() else " " for ch in text)


class SnppPager:
    """One SNPP terminal. ``submit`` is one connection, one page, bounded by ``timeout``."""

    two_way = False

    def __init__(
        self,
        name: str,
        *,
        reactor: Any,
        clock: IReactorTime,
        host: str,
        port: int = 444,
        login: str | None = None,
        password: str | None = None,
        tls: IOpenSSLClientConnectionCreator | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.name, self.reactor, self.clock = name, reactor, clock
        self.host, self.port, self.tls = host, port, tls
        self.login, self.password, self.timeout = login, password, timeout

    def submit(self, message: PageMessage) -> Deferred[Submitted]:
        protocols: list[SnppClientProtocol] = []
        timed_out: list[bool] = []
        d = Deferred.fromCoroutine(self._page(message, protocols))

        def expire() -> None:
            timed_out.append(True)
            for protocol in protocols:
                protocol.transport.abortConnection()  # type: ignore[union-attr]
            if not protocols:
                d.cancel()

        timer = self.clock.callLater(self.timeout, expire)

        def settle(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        def failed(failure: Failure) -> Failure:
            if failure.check(PagerError):
                return failure
            if timed_out:
                what = f"timeout: no answer within {self.timeout:g} s"
            elif isinstance(failure.value, SnppFailure):
                what = f"dropped: {failure.value.step}"
            else:
                what = f"connect: cannot connect ({failure.type.__name__})"
            return Failure(PagerError(self.name, what, retryable=True))

        d.addBoth(settle)
        d.addErrback(failed)
        return d

    async def _page(self, message: PageMessage, protocols: list[SnppClientProtocol]) -> Submitted:
        endpoint: Any = HostnameEndpoint(self.reactor, self.host, self.port)
        if self.tls is not None:
            endpoint = wrapClientTLS(self.tls, endpoint, clock=self.reactor)
        protocol = SnppClientProtocol()
        await connectProtocol(endpoint, protocol)
        protocols.append(protocol)
        try:
            self._check(await protocol.greeted, "greeting", 220)
            if self.login is not None:
                logi = f"LOGI {_clean(self.login)}"
                if self.password is not None:
                    logi += f" {_clean(self.password)}"
                self._check(await protocol.command(logi), "LOGI")
            self._check(await protocol.command(f"PAGE {_clean(message.address)}"), "PAGE")
            text = message.text if message.link is None else f"{message.text}\n{message.link}"
            if "\n" in text:
                self._check(await protocol.command("DATA"), "DATA", 354)
                self._check(await protocol.send_data(text), "DATA text")
            else:
                self._check(await protocol.command(f"MESS {_clean(text)}"), "MESS")
            self._check(await protocol.command("SEND"), "SEND")
        except BaseException:
            protocol.transport.loseConnection()  # type: ignore[union-attr]
            raise
        # The page is sent: say goodbye without waiting on the answer, which changes nothing.
        protocol.sendLine(b"QUIT")
        protocol.transport.loseConnection()  # type: ignore[union-attr]
        return Submitted(self.name, None)

    def _check(self, code: int, step: str, wanted: int | None = None) -> None:
        if wanted is not None and code == wanted:
            return
        if wanted is None and 200 <= code < 300:
            return
        if 800 <= code < 1000:
            return  # a level-3 terminal's "two-way transaction succeeded (and queued)"
        retryable = code not in PERMANENT_CODES
        raise PagerError(self.name, f"SNPP {code} after {step}", retryable=retryable)
