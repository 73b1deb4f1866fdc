"""The interface every CAD message format fills."""

from __future__ import annotations

from typing import Protocol

from corespond.daemon.snapshot import Snapshot


class MessageFormat(Protocol):
    """Turns the bytes of one message into a :class:`Snapshot`.

    ``parse`` raises :class:`corespond.daemon.errors.RejectedMessage`, and nothing else, for
    any input it cannot take; the fuzz tests hold every format to that.
    """

    name: str

    def split(self, payload: bytes) -> list[bytes]:
        """The messages in one transport payload (most formats: the payload itself)."""
        ...

    def parse(self, message: bytes) -> Snapshot: ...
