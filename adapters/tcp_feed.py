"""TCP listeners for CADs that push incident messages over a socket.

One :class:`TcpFeedFactory` per feed. Each connection splits its byte stream with a deframer
from :mod:`corespond.adapters.framing` and hands every complete frame to the feed's
:data:`~corespond.daemon.ingest.IngestFn`. Many frames from one connection may be in flight at
once (the store group-commits them), but answers go back in the order the frames arrived.

Acknowledgements (``ack="ack-nak"``): ACK (0x06) once the frame's outcomes are all Accepted,
which the store reports only after the commit; NAK (0x15) when any is Rejected or the frame
itself was broken (oversize, interrupted, truncated). On the wire, per framing:

=============  ===================  ===================
framing        ACK                  NAK
=============  ===================  ===================
newline        ``06 0A``            ``15 0A``
stx-etx        ``06`` (bare)        ``15`` (bare)
vt-fs-cr       ``0B 06 1C 0D``      ``0B 15 1C 0D``
connection     ``06`` (bare)        ``15`` (bare)
=============  ===================  ===================

An empty ``stx-etx``/``vt-fs-cr`` frame is a keep-alive: it is answered with ACK and not
ingested. With ``connection`` framing the sender half-closes (``shutdown(SHUT_WR)``) once the
message is sent; the one answer is written and then the connection is closed. Over TLS, Twisted
has no half-close: a clean TLS close still ingests the message but no answer can be sent.

An ingest that fails (an internal error, not a rejection) is never acknowledged: the connection
is closed at that message, after answering the ones before it, so that the sender resends
(the store is idempotent).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from corespond.adapters.framing import FRAMINGS, FramingError, make_deframer
from corespond.daemon.clock import Clock
from corespond.daemon.ingest import Accepted, IngestFn, IngestManyFn, Origin, Outcome
from corespond.daemon.log import error_text

log = structlog.get_logger(__name__)

ACK = b"\x06"
NAK = b"\x15"
ACK_MODES = ("none", "ack-nak")
DEFAULT_MAX_IN_FLIGHT = 1000


def reply_bytes(framing: str, ok: bool) -> bytes:
    """The ACK or NAK as sent on a connection with ``framing`` (see the module's table)."""
    byte = ACK if ok else NAK
    if framing == "newline":
        return byte + b"\n"
    if framing == "vt-fs-cr":
        return b"\x0b" + byte + b"\x1c\x0d"
    return byte


def peer_name(address: IAddress) -> str:
    """``host:port`` (``[v6]:port``) for logs and :class:`Origin`."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if ":" in str(host):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class _Pending:
    """One frame waiting for its answer; ``ready`` once its outcome is known.

    No __init__ (and no slots): a frame's entry is made with the class's values, which the
    attributes set later shadow; a dataclass's __init__ was a Python call per frame."""

    ready = False
    ok = False
    failed = False


@implementer(IHalfCloseableProtocol)
class TcpFeedProtocol(Protocol, TimeoutMixin):
    def __init__(self, factory: TcpFeedFactory) -> None:
        self.factory = factory
        self.deframer = make_deframer(factory.framing, factory.max_message_bytes)
        self.peer = "unknown"
        self._origin = Origin(factory.feed, peer=self.peer)  # the same for every frame
        self._queue: deque[_Pending] = deque()
        self._connected = False
        self._read_closed = False
        self._closing = False  # take no more frames; close once everything is answered
        self._silent = False  # an ingest failed: write nothing more
        self._lose_called = False
        self._paused = False
        self.messages = self.accepted = self.rejected = self.framing_errors = 0
        self.dropped_bytes = 0

    # Idle timeout through the feed's clock, never the global reactor.
    def callLater(self, period: float, func: Callable[[], None]) -> IDelayedCall:
        return self.factory.clock.call_later(period, func)

    @property
    def _transport(self) -> Any:
        # ITCPTransport plus IProducer; zope interfaces do not type-check as attributes.
        return self.transport

    @property
    def in_flight(self) -> int:
        """Frames received and not yet answered."""
        return len(self._queue)

    def connectionMade(self) -> None:
        self._connected = True
        self.peer = peer_name(self._transport.getPeer())
        self._origin = Origin(self.factory.feed, peer=self.peer)
        self.factory.connections.add(self)
        # An answer is one small segment that the sender waits for: with Nagle's algorithm it
        # would wait for the sender's delayed ACK of the previous answer (up to 40 ms).
        no_delay = getattr(self._transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        log.info("feed.tcp.connection.made", feed=self.factory.feed, peer=self.peer)
        self.setTimeout(self.factory.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            self.dropped_bytes += len(data)
            return
        self.resetTimeout()
        self._take(self.deframer.feed(data))

    def readConnectionLost(self) -> None:
        """The sender half-closed (or closed): the last frame is complete; answer, then close."""
        self._read_closed = True
        self.setTimeout(None)
        if not self._closing:
            self._take(self.deframer.end())
        self._closing = True
        self._flush()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self._connected = False
        clean = reason.check(ConnectionDone) is not None
        # A clean close not seen by readConnectionLost (TLS close_notify): still take the last
        # frame, even though it cannot be answered. An unclean close may have cut it short.
        if clean and not self._read_closed and not self._closing:
            self._take(self.deframer.end())
        self._closing = True
        self.factory.connections.discard(self)
        log.info(
            "feed.tcp.connection.lost",
            feed=self.factory.feed,
            peer=self.peer,
            clean=clean,
            messages=self.messages,
            accepted=self.accepted,
            rejected=self.rejected,
            framing_errors=self.framing_errors,
            discarded_bytes=self.deframer.discarded,
            dropped_bytes=self.dropped_bytes,
            in_flight=self.in_flight,
        )
        self._flush()

    def timeoutConnection(self) -> None:
        if self._queue:
            # We owe the peer answers: it is not idle, the store is slow. Arm the timer again.
            self.setTimeout(self.factory.idle_timeout)
            return
        log.info("feed.tcp.connection.idle", feed=self.factory.feed, peer=self.peer,
                 seconds=self.factory.idle_timeout)  # fmt: skip
        self._closing = True
        self._close()

    def stop_reading(self) -> None:
        """Take no more frames: answer those in flight, then close (partial frames are lost,
        the sender resends them)."""
        self._closing = True
        self.setTimeout(None)
        if self._connected and not self._read_closed:
            self._transport.pauseProducing()
        self._flush()

    def _take(self, frames: Sequence[bytes | FramingError]) -> None:
        factory = self.factory
        group = factory.ingest_many is not None and len(frames) > 1
        entries: list[_Pending] = []
        payloads: list[bytes] = []
        for item in frames:
            if self._closing:
                break
            entry = _Pending()
            self._queue.append(entry)
            factory.unanswered += 1
            if isinstance(item, FramingError):
                self.framing_errors += 1
                log.warning("feed.tcp.frame.rejected", feed=factory.feed, peer=self.peer,
                            code=item.code, reason=item.reason)  # fmt: skip
                entry.ready, entry.ok = True, False
            elif not item:
                entry.ready, entry.ok = True, True  # keep-alive
            elif group:
                self.messages += 1
                entries.append(entry)
                payloads.append(item)
            else:
                self.messages += 1
                d = maybeDeferred(factory.ingest, item, self._origin)
                d.addCallbacks(self._answered, self._ingest_failed,
                               callbackArgs=(entry,), errbackArgs=(entry,))  # fmt: skip
                d.addErrback(self._bug)
            if factory.framing == "connection":
                self._closing = True  # one message per connection: its answer is the last word
        if payloads:
            # The frames of one read go in together: one Deferred for all (see IngestManyFn).
            assert factory.ingest_many is not None
            many = maybeDeferred(factory.ingest_many, payloads, self._origin)
            many.addCallbacks(self._answered_many, self._ingest_many_failed,
                              callbackArgs=(entries,), errbackArgs=(entries,))  # fmt: skip
            many.addErrback(self._bug)
        self._flush()
        if (
            not self._paused
            and not self._closing
            and self._connected
            and len(self._queue) > factory.max_in_flight
        ):
            self._paused = True
            self._transport.pauseProducing()
            log.info("feed.tcp.paused", feed=factory.feed, peer=self.peer, in_flight=self.in_flight)

    def _answered(self, outcomes: Sequence[Outcome], entry: _Pending) -> None:
        self._settle(outcomes, entry)
        self._flush()

    def _settle(self, outcomes: Sequence[Outcome], entry: _Pending) -> None:
        if len(outcomes) == 1:  # most frames hold one message (no generator for it)
            entry.ok = isinstance(outcomes[0], Accepted)
        else:
            entry.ok = bool(outcomes) and all(isinstance(o, Accepted) for o in outcomes)
        if entry.ok:
            self.accepted += 1
        else:
            self.rejected += 1
        entry.ready = True

    def _answered_many(
        self, answers: Sequence[Sequence[Outcome] | Failure], entries: list[_Pending]
    ) -> None:
        for answer, entry in zip(answers, entries, strict=True):
            if isinstance(answer, Failure):
                self._fail(answer, entry)
            else:
                self._settle(answer, entry)
        self._flush()

    def _ingest_many_failed(self, failure: Failure, entries: list[_Pending]) -> None:
        for entry in entries:
            self._fail(failure, entry)
        self._flush()

    def _ingest_failed(self, failure: Failure, entry: _Pending) -> None:
        self._fail(failure, entry)
        self._flush()

    def _fail(self, failure: Failure, entry: _Pending) -> None:
        log.error("feed.tcp.ingest.failed", feed=self.factory.feed, peer=self.peer,
                  error=error_text(failure))  # fmt: skip
        entry.ready = entry.failed = True
        # Nothing after this message may be answered (acks are positional): stop taking frames.
        self._closing = True

    def _bug(self, failure: Failure) -> None:
        log.error("feed.tcp.protocol.failed", feed=self.factory.feed, peer=self.peer,
                  error=error_text(failure))  # fmt: skip
        self._silent = self._closing = True
        self._close()

    def _flush(self) -> None:
        queue = self._queue
        factory = self.factory
        replies: list[bytes] = []  # the answers ready now, in one write
        answered = 0
        while queue and queue[0].ready:
            entry = queue.popleft()
            answered += 1
            if entry.failed and not self._silent:
                self._write(replies)
                self._silent = True
                self._close()
            elif not self._silent and self._connected and factory.ack == "ack-nak":
                replies.append(factory.replies[entry.ok])
        self._write(replies)
        if answered:
            factory.answered(answered)
        if self._closing and not self._queue:
            self._close()
        elif (
            self._paused
            and not self._closing
            and self._connected
            and len(self._queue) <= self.factory.max_in_flight // 2
        ):
            self._paused = False
            self._transport.resumeProducing()
            log.info("feed.tcp.resumed", feed=self.factory.feed, peer=self.peer,
                     in_flight=self.in_flight)  # fmt: skip

    def _write(self, replies: list[bytes]) -> None:
        if replies:
            self._transport.write(replies[0] if len(replies) == 1 else b"".join(replies))
            replies.clear()

    def _close(self) -> None:
        if self._connected and not self._lose_called:
            self._lose_called = True
            self._transport.loseConnection()


class TcpFeedFactory(Factory):
    """Builds a :class:`TcpFeedProtocol` per connection of one TCP feed.

    ``framing`` is one of :data:`corespond.adapters.framing.FRAMINGS`; ``ack`` is ``none`` or
    ``ack-nak``; ``idle_timeout`` (seconds, ``None`` for never) closes a connection that sent
    nothing for that long and is owed no answer; over ``max_in_flight`` unanswered frames a
    connection stops being read until half of them are answered. When ``ingest`` also has a
    ``many`` (an :data:`~corespond.daemon.ingest.IngestManyFn`, as the pipeline's have), the
    frames of one read go to it together.
    """

    def __init__(
        self,
        ingest: IngestFn,
        *,
        feed: str,
        framing: str,
        ack: str,
        max_message_bytes: int,
        clock: Clock,
        idle_timeout: float | None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if framing not in FRAMINGS:
            raise ValueError(f"unknown framing {framing!r}; expected one of {', '.join(FRAMINGS)}")
        if ack not in ACK_MODES:
            raise ValueError(f"unknown ack {ack!r}; expected one of {', '.join(ACK_MODES)}")
        if max_message_bytes < 1 or max_in_flight < 1:
            raise ValueError("max_message_bytes and max_in_flight must be at least 1")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive or None")
        self.ingest = ingest
        self.ingest_many: IngestManyFn | None = getattr(ingest, "many", None)
        self.feed = feed
        self.framing = framing
        self.ack = ack
        self.max_message_bytes = max_message_bytes
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_in_flight = max_in_flight
        self.replies = {ok: reply_bytes(framing, ok) for ok in (True, False)}
        self.connections: set[TcpFeedProtocol] = set()
        self.unanswered = 0
        self._draining = False
        self._drain_waiters: list[Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> TcpFeedProtocol | None:
        if self._draining:
            return None  # Twisted closes the connection at once
        return TcpFeedProtocol(self)

    def answered(self, count: int) -> None:
        """``count`` frames were answered (or will never be)."""
        self.unanswered -= count
        if self.unanswered == 0:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def drain(self) -> Deferred[None]:
        """Stop taking frames on every connection, answer those in flight, close the
        connections; fires once every frame received is answered. (``stopListening`` on the
        port is the caller's.)"""
        self._draining = True
        for proto in list(self.connections):
            proto.stop_reading()
        if self.unanswered == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def __repr__(self) -> str:
        return f"<TcpFeedFactory feed={self.feed!r} framing={self.framing!r} ack={self.ack!r}>"


__all__ = ["TcpFeedFactory", "TcpFeedProtocol", "peer_name", "reply_bytes"]
