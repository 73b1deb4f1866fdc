"""Incremental deframers for the byte streams CADs push over TCP (no Twisted here).

A :class:`Deframer` is fed the bytes of one connection as they arrive and returns, in order, the
complete messages and the framing errors found so far. Four kinds, chosen by name:

``newline``
    Each message ends with LF; a CR before the LF is dropped (CRLF senders); empty lines are
    ignored. When the connection closes cleanly, a last line without its LF is still a message.
``stx-etx``
    ``STX (0x02) message ETX (0x03)``. Bytes between frames are discarded and counted in
    :attr:`Deframer.discarded`. No checksum/LRC byte after ETX is assumed: if a sender adds one,
    it lands between frames and is discarded (and counted) like any other stray byte. An STX
    inside a frame restarts the frame; the broken one is reported as ``interrupted``. An empty
    frame (``STX ETX``) is returned as ``b""``: transports treat it as a keep-alive.
``vt-fs-cr``
    MLLP-style ``VT (0x0B) message FS (0x1C) CR (0x0D)``. The CR after FS is expected and not
    counted; otherwise the same rules as ``stx-etx`` (VT inside a frame restarts it).
``connection``
    The whole connection is one message, ended by the sender closing (or half-closing).

Every kind enforces a maximum message size (the content, delimiters excluded). An over-long
frame yields one ``oversize`` error; its remaining bytes are skipped without being buffered,
up to the next frame boundary (``newline``: the next LF; ``stx-etx``/``vt-fs-cr``: the end
byte or the next start byte; ``connection``: the end of the connection). Memory per connection
stays below the limit plus one byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

STX = 0x02
ETX = 0x03
VT = 0x0B
FS = 0x1C
CR = 0x0D
LF = 0x0A

FRAMINGS = ("newline", "stx-etx", "vt-fs-cr", "connection")


@dataclass(frozen=True, slots=True)
class FramingError:
    """A frame that could not be delivered. ``reason`` never quotes the frame's content.

    ``code`` is ``oversize`` (longer than the limit), ``interrupted`` (a new start byte came
    before the end byte) or ``truncated`` (the connection closed inside a frame).
    """

    code: str
    reason: str


Frame = bytes | FramingError


class Deframer(Protocol):
    """Splits one connection's byte stream into messages; one instance per connection."""

    kind: str
    max_message_bytes: int
    discarded: int
    """Bytes found between frames and thrown away (never part of any message)."""

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress (at most ``max_message_bytes + 1``)."""
        ...

    def feed(self, data: bytes) -> list[Frame]:
        """The messages and errors completed by ``data``, in stream order."""
        ...

    def end(self) -> list[Frame]:
        """The connection closed cleanly: whatever the buffered bytes amount to."""
        ...

    def frame(self, message: bytes) -> bytes:
        """``message`` framed for this kind, to send to the peer."""
        ...


def _oversize(limit: int) -> FramingError:
    return FramingError("oversize", f"frame longer than the limit of {limit} bytes")


class NewlineDeframer:
    kind = "newline"

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.discarded = 0
        self._buf = bytearray()
        self._skipping = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        # One CR more than the limit may wait in the buffer until its LF shows it was a CRLF.
        room = self.max_message_bytes + 1
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            stop = len(data) if end < 0 else end
            if not self._skipping:
                if len(self._buf) + (stop - pos) > room:
                    self._buf.clear()
                    self._skipping = True
                    out.append(_oversize(self.max_message_bytes))
                else:
                    self._buf += data[pos:stop]
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                self._emit(out)
            pos = end + 1
        return out

    def _emit(self, out: list[Frame]) -> None:
        line = bytes(self._buf)
        self._buf.clear()
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return
        if len(line) > self.max_message_bytes:
            out.append(_oversize(self.max_message_bytes))
        else:
            out.append(line)

    def end(self) -> list[Frame]:
        out: list[Frame] = []
        if not self._skipping:
            self._emit(out)
        self._buf.clear()
        self._skipping = False
        return out

    def frame(self, message: bytes) -> bytes:
        if b"\n" in message:
            raise ValueError("a newline-framed message cannot hold LF")
        return message + b"\n"


class DelimitedDeframer:
    """``start message end`` framing: STX/ETX, and VT/FS (CR) when ``trailer`` is set.

    Each step finds the next delimiter with ``bytes.find`` (memchr): between frames the next
    start byte; inside one the end byte, then a start byte before it (an interrupted frame).
    A frame that begins and ends in one read is sliced from it once and never buffered:
    under load a read holds about a dozen whole frames.
    """

    def __init__(self, kind: str, start: int, stop: int, trailer: int | None,
                 max_message_bytes: int) -> None:  # fmt: skip
        self.kind = kind
        self.max_message_bytes = max_message_bytes
        self.discarded = 0
        self._start = start
        self._stop = stop
        self._trailer = trailer
        self._start_byte = bytes([start])
        self._stop_byte = bytes([stop])
        self._buf = bytearray()
        self._inside = False
        self._skipping = False  # inside an oversize frame: drop its bytes uncounted
        self._expect_trailer = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        buf = self._buf
        limit = self.max_message_bytes
        start, stop = self._start_byte, self._stop_byte
        pos = 0
        n = len(data)
        while pos < n:
            if self._expect_trailer:
                self._expect_trailer = False
                if data[pos] == self._trailer:
                    pos += 1
                    continue
            if not self._inside:
                # Everything before the next start byte is between frames (a stray end byte
                # too): discarded and counted.
                begin = data.find(start, pos)
                if begin < 0:
                    self.discarded += n - pos
                    break
                self.discarded += begin - pos
                self._inside = True
                pos = begin + 1
                continue
            end = data.find(stop, pos)
            piece_end = n if end < 0 else end
            restart = data.find(start, pos, piece_end)  # a new frame before this one ended
            if restart >= 0:
                piece_end = restart
            if not self._skipping:
                if len(buf) + (piece_end - pos) > limit:
                    buf.clear()
                    self._skipping = True
                    out.append(_oversize(limit))
                elif restart < 0 <= end and not buf:
                    out.append(data[pos:end])  # the whole frame in this read
                else:
                    buf += data[pos:piece_end]
                    if restart < 0 <= end:
                        out.append(bytes(buf))
            if restart >= 0:
                if not self._skipping:
                    out.append(FramingError(
                        "interrupted", "a new frame started before the previous one ended"
                    ))  # fmt: skip
                buf.clear()
                self._skipping = False
                pos = restart + 1
            elif end >= 0:
                buf.clear()
                self._inside = self._skipping = False
                self._expect_trailer = self._trailer is not None
                pos = end + 1
            else:
                break
        return out

    def end(self) -> list[Frame]:
        out: list[Frame] = []
        if self._inside and not self._skipping:
            out.append(FramingError("truncated", "the connection closed inside a frame"))
        self._buf.clear()
        self._inside = self._skipping = self._expect_trailer = False
        return out

    def frame(self, message: bytes) -> bytes:
        if self._start in message or self._stop in message:
            raise ValueError(f"a {self.kind} message cannot hold its frame delimiters")
        trailer = bytes([self._trailer]) if self._trailer is not None else b""
        return bytes([self._start]) + message + bytes([self._stop]) + trailer


class ConnectionDeframer:
    kind = "connection"

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.discarded = 0
        self._buf = bytearray()
        self._skipping = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._skipping:
            return []
        if len(self._buf) + len(data) > self.max_message_bytes:
            self._buf.clear()
            self._skipping = True
            return [_oversize(self.max_message_bytes)]
        self._buf += data
        return []

    def end(self) -> list[Frame]:
        message = bytes(self._buf)
        self._buf.clear()
        skipped, self._skipping = self._skipping, False
        # An empty connection (a port check) is no message at all.
        return [message] if message and not skipped else []

    def frame(self, message: bytes) -> bytes:
        return message


def make_deframer(kind: str, max_message_bytes: int) -> Deframer:
    """A fresh deframer of ``kind`` (one of :data:`FRAMINGS`)."""
    if max_message_bytes < 1:
        raise ValueError("max_message_bytes must be at least 1")
    if kind == "newline":
        return NewlineDeframer(max_message_bytes)
    if kind == "stx-etx":
        return DelimitedDeframer(kind, STX, ETX, None, max_message_bytes)
    if kind == "vt-fs-cr":
        return DelimitedDeframer(kind, VT, FS, CR, max_message_bytes)
    if kind == "connection":
        return ConnectionDeframer(max_message_bytes)
    raise ValueError(f"unknown framing {kind!r}; expected one of {', '.join(FRAMINGS)}")
