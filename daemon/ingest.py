"""What a transport hands to the core, and what it gets back to answer its peer with.

A transport (HTTP, WebSocket, TCP, spool directory) calls an :data:`IngestFn` with the bytes of
one payload and where they came from. The Deferred fires only after everything in the payload
is durably committed (or durably quarantined), with one outcome per message in the payload
(a payload holds one message, except newline-delimited JSON, which may hold several). The
transport turns the outcomes into its protocol's acknowledgement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from corespond.daemon.slotted import fast_init


@fast_init
@dataclass(frozen=True, slots=True)
class Origin:
    """Where a payload came from: the feed's name and, for logs, the peer or the file name."""

    feed: str
    peer: str | None = None
    name: str | None = None


class SnapshotState(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"


@fast_init
@dataclass(frozen=True, slots=True)
class Accepted:
    incident_id: str
    snapshot_id: int
    snapshot: SnapshotState

    ok = True


@fast_init
@dataclass(frozen=True, slots=True)
class Rejected:
    code: str
    reason: str
    where: str | None = None
    reject_id: int | None = None

    ok = False

    def as_json(self) -> dict[str, str]:
        out = {"error": self.code, "reason": self.reason}
        if self.where:
            out["where"] = self.where
        return out

    def __str__(self) -> str:
        at = f" (at {self.where})" if self.where else ""
        return f"{self.code}: {self.reason}{at}"


Outcome = Accepted | Rejected
IngestFn = Callable[[bytes, Origin], "Deferred[Sequence[Outcome]]"]
# Several payloads of one peer at once (the frames of one read), with one Deferred: each
# payload's outcomes, or the Failure that kept it from being stored. A transport that may
# answer in groups offers it (the pipeline's ingest functions have it as ``many``).
IngestManyFn = Callable[[Sequence[bytes], Origin], "Deferred[list[Sequence[Outcome] | Failure]]"]
