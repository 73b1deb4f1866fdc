"""MLLP (VT message FS CR) over TCP or TLS: a sending client and a receiving server.

Client (:class:`MLLPClientProtocol`): one connection per destination and one message in flight.
The ACK must name the message sent (MSA-2 equal to the MSH-10 sent); any other frame (a late
ACK for an earlier message, a second ACK, something that is not HL7) is logged by control id
and ignored, so it can never complete the wrong message. When no matching ACK comes within the
timeout the connection is aborted (a late ACK then has nowhere to land) and the send fails with
:class:`AckTimeout`; the caller resends the same bytes later, on a new connection.

Server (:class:`MLLPServerProtocol`): frames are handed to a handler one at a time, in order;
the handler's reply (committed before it is returned) is framed and written back. Frames over
the size cap and broken frames go to the same handler as a
:class:`~corespond.adapters.framing.FramingError`, so that it can answer AR with the reason.

Framing and its size cap come from :mod:`corespond.adapters.framing` (``vt-fs-cr``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from corespond.adapters.framing import Frame, FramingError, make_deframer
from corespond.adapters.hl7_referral import Hl7Reply, log_token, parse_plain_ack, parse_reply
from corespond.daemon.errors import RejectedMessage, SafeMessage

log = structlog.get_logger("corespond.mllp")

DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
MAX_QUEUED = 64  # frames received and not yet handled, per connection, before reading pauses


class MllpSendError(SafeMessage, Exception):
    """A send that did not end in an ACK; ``code`` is a short token for the outbox row."""

    code = "send-failed"


class AckTimeout(MllpSendError):
    code = "ack-timeout"


class ConnectionDropped(MllpSendError):
    code = "connection-dropped"


def frame(message: bytes) -> bytes:
    return b"\x0b" + message + b"\x1c\r"


class MLLPClientProtocol(Protocol):
    """Sends one message at a time and waits for the ACK that names it."""

    def __init__(self, clock: Any, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._clock = clock
        self._deframer = make_deframer("vt-fs-cr", max_message_bytes)
        self._waiting: Deferred[Hl7Reply] | None = None
        self._control_id: str | None = None
        self._timer: IDelayedCall | None = None
        self.connected_ = False
        self.ignored = 0  # frames that completed nothing (counted for tests and metrics)
        # ``timed(fn, data)`` runs each read (its deframing, the ACK's parse and everything
        # its Deferred's callbacks do): the referral trace (daemon/referral_trace.py) sets it.
        self.timed: Callable[[Callable[[bytes], None], bytes], None] | None = None

    @property
    def busy(self) -> bool:
        return self._waiting is not None

    def connectionMade(self) -> None:
        self.connected_ = True
        # One small write per message, then a wait for its ACK: never hold it back (Nagle).
        # asyncio, which python-hl7 runs on, sets this on every TCP connection too.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def send(self, message: bytes, control_id: str, timeout: float) -> Deferred[Hl7Reply]:
        """Fires with the ACK whose MSA-2 is ``control_id``; fails with an MllpSendError."""
        if self._waiting is not None:
            raise RuntimeError("one message in flight per connection")
        if not self.connected_:
            raise ConnectionDropped("the connection is closed")
        self._waiting = Deferred()
        self._control_id = control_id
        # One timer per connection, moved for each message: an ACK leaves it running (a
        # firing with nothing in flight does nothing), rather than a cancel and a new
        # delayed call per message.
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self._clock.callLater(timeout, self._timed_out)
        assert self.transport is not None
        self.transport.write(frame(message))
        return self._waiting

    def close(self) -> None:
        self._stop_timer()
        if self.transport is not None and self.connected_:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.timed is not None:
            self.timed(self._received, data)
        else:
            self._received(data)

    def _received(self, data: bytes) -> None:
        for item in self._deframer.feed(data):
            self._frame_received(item)

    def _frame_received(self, item: Frame) -> None:
        if isinstance(item, FramingError):
            self.ignored += 1
            log.warning("hl7.ack.unframed", code=item.code, reason=item.reason)
            return
        try:
            # A plain MSH|MSA ACK by a byte scan; anything else through the full parser.
            reply = parse_plain_ack(item) or parse_reply(item)
        except RejectedMessage as err:
            self.ignored += 1
            log.warning("hl7.ack.unparsed", code=err.code, reason=err.reason, where=err.where)
            return
        if self._waiting is None or reply.acked_control_id != self._control_id:
            # A late or repeated ACK (or a stranger's): never let it complete another message.
            self.ignored += 1
            log.warning(
                "hl7.ack.ignored",
                control_id=log_token(reply.acked_control_id),
                expected=self._control_id,
                code=reply.ack_code,
            )
            return
        self._finish(reply)

    def _finish(self, result: Hl7Reply | Failure) -> None:
        waiting, self._waiting, self._control_id = self._waiting, None, None
        if isinstance(result, Failure):
            self._stop_timer()
        if waiting is not None:
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._waiting is None:
            return  # the timer of a message that was answered: nothing in flight
        self._finish(Failure(AckTimeout("no ACK naming the message within the timeout")))
        # Closed, so that a late ACK cannot be read as the answer to the next message.
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionDropped())) -> None:  # noqa: B008
        self.connected_ = False
        self._stop_timer()
        if self._waiting is not None:
            self._finish(
                Failure(ConnectionDropped("the peer closed the connection before the ACK"))
            )


def connect(
    reactor: Any,
    host: str,
    port: int,
    *,
    tls: IOpenSSLClientConnectionCreator | None = None,
    timeout: float = 10.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    clock: Any = None,
) -> Deferred[MLLPClientProtocol]:
    """A connected client protocol (TLS handshake done by Twisted on first write).

    ``clock`` (an ``IReactorTime``, default ``reactor``) runs the ACK timeouts.
    """
    endpoint: Any
    if isIPAddress(host):
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
    proto = MLLPClientProtocol(clock or reactor, max_message_bytes)
    if tls is None:
        return connectProtocol(endpoint, proto)
    # Not wrapClientTLS: its TLS layer schedules writes on the global reactor, not ``reactor``.
    factory = TLSMemoryBIOFactory(tls, True, Factory.forProtocol(lambda: proto), clock=reactor)
    connected: Deferred[Any] = endpoint.connect(factory)
    return connected.addCallback(lambda _: proto)


def listen(
    reactor: Any,
    port: int,
    factory: Factory,
    *,
    interface: str = "127.0.0.1",
    tls: IOpenSSLContextFactory | None = None,
) -> Any:
    """Listen for MLLP on ``interface:port``, over TLS with ``tls`` (the listening port)."""
    if tls is None:
        return reactor.listenTCP(port, factory, interface=interface)
    wrapped = TLSMemoryBIOFactory(tls, False, factory, clock=reactor)
    return reactor.listenTCP(port, wrapped, interface=interface)


# --- server ------------------------------------------------------------------------------------

Handler = Callable[[bytes | FramingError, str | None], "Deferred[bytes | None] | bytes | None"]


class MLLPServerProtocol(Protocol):
    """Hands frames to ``handler(frame, peer)`` one at a time; writes each reply, in order."""

    def __init__(self, handler: Handler, max_message_bytes: int) -> None:
        self._handler = handler
        self._deframer = make_deframer("vt-fs-cr", max_message_bytes)
        self._queue: deque[Frame] = deque()
        self._busy = False
        self._gone = False
        self._paused = False
        self.peer: str | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        address = self.transport.getPeer()
        self.peer = f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"

    def dataReceived(self, data: bytes) -> None:
        self._queue.extend(self._deframer.feed(data))
        if len(self._queue) > MAX_QUEUED and self.transport is not None and not self._paused:
            # A fast sender waits for our commits instead of filling memory.
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._next()

    def connectionLost(self, reason: Failure = Failure(ConnectionDropped())) -> None:  # noqa: B008
        self._gone = True
        self._queue.extend(item for item in self._deframer.end() if isinstance(item, bytes))
        self._next()  # what was received completely is still stored (no reply can go back)

    def _next(self) -> None:
        if self._busy or not self._queue:
            return
        self._busy = True
        item = self._queue.popleft()
        d = maybeDeferred(self._handler, item, self.peer)
        d.addCallbacks(self._reply, self._failed)

    def _reply(self, reply: bytes | None) -> None:
        self._busy = False
        if self._paused and len(self._queue) <= MAX_QUEUED // 2 and not self._gone:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
        if reply is not None and not self._gone and self.transport is not None:
            self.transport.write(frame(reply))
        self._next()

    def _failed(self, failure: Failure) -> None:
        # Nothing is acknowledged that was not stored: the peer will resend. Closing tells it.
        self._busy = False
        log.error("hl7.inbound.failed", error=type(failure.value).__name__, peer=self.peer)
        self._queue.clear()
        if self.transport is not None and not self._gone:
            self.transport.loseConnection()


class MLLPServerFactory(Factory):
    def __init__(self, handler: Handler, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.handler = handler
        self.max_message_bytes = max_message_bytes

    def buildProtocol(self, addr: Any) -> MLLPServerProtocol:
        return MLLPServerProtocol(self.handler, self.max_message_bytes)


__all__ = [
    "AckTimeout",
    "ConnectionDropped",
    "MLLPClientProtocol",
    "MLLPServerFactory",
    "MLLPServerProtocol",
    "MllpSendError",
    "connect",
    "frame",
    "listen",
]
