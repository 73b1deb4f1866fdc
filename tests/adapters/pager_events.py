"""A small recording PagerEvents for gateway tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed

from corespond.daemon.pager import DeliveryReceipt, Reply
from corespond.daemon.store.writer import RejectRecord


@dataclass
class RecordingEvents:
    """A PagerEvents that records and commits at once (or fails, when told to)."""

    replies: list[Reply] = field(default_factory=list)
    receipts: list[DeliveryReceipt] = field(default_factory=list)
    fail_next: int = 0
    hold: list[Deferred[None]] | None = None

    def _done(self) -> Deferred[None]:
        if self.fail_next:
            self.fail_next -= 1
            return fail(RuntimeError("commit failed"))
        if self.hold is not None:
            d: Deferred[None] = Deferred()
            self.hold.append(d)
            return d
        return succeed(None)

    def reply(self, reply: Reply) -> Deferred[None]:
        self.replies.append(reply)
        return self._done()

    def receipt(self, receipt: DeliveryReceipt) -> Deferred[None]:
        self.receipts.append(receipt)
        return self._done()


@dataclass
class RecordingQuarantine:
    """Stands where IncidentStore.store_reject goes; numbers the records it keeps."""

    records: list[RejectRecord] = field(default_factory=list)

    def __call__(self, record: RejectRecord) -> Deferred[int]:
        self.records.append(record)
        return succeed(len(self.records))
