"""What every inbound side of a gateway or location feed does alike: hand an event to the core
and answer the carrier only once it is committed; keep a quarantined copy of what it refused."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import structlog
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from twisted.web.server import Request

from corespond.daemon.errors import RejectedMessage
from corespond.daemon.pager import DeliveryReceipt, PagerEvents, Reply
from corespond.daemon.store.writer import RejectRecord

log = structlog.get_logger(__name__)


def deliver(events: PagerEvents, event: Reply | DeliveryReceipt) -> Deferred[None]:
    if isinstance(event, Reply):
        return events.reply(event)
    return events.receipt(event)


def answer_after_commit(
    request: Request,
    committed: Deferred[None],
    answer: Callable[[bool], None],
    *,
    gateway: str,
) -> None:
    """Call ``answer(True)`` once ``committed`` fires, ``answer(False)`` if it fails; nothing
    when the carrier has hung up meanwhile (it resends, and the core takes the repeat again)."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def settle(ok: bool) -> None:
        if not gone:
            answer(ok)
            request.finish()

    def failed(failure: Failure) -> None:
        log.error("page.inbound.commit.failed", transport=gateway,
                  exception=failure.type.__name__)  # fmt: skip
        settle(False)

    committed.addCallbacks(lambda _: settle(True), failed)


# Keeps a verbatim copy of a message we could not take, with the reason: the store's
# ``IncidentStore.store_reject`` (the ``rejected_messages`` table, raw bytes in a protected
# column), under ``feed`` = the gateway's or location feed's name.
Quarantine = Callable[[RejectRecord], Deferred[int]]


def quarantine_copy(
    quarantine: Quarantine | None,
    *,
    feed: str,
    format: str,
    raw: bytes,
    err: RejectedMessage,
    received_at: datetime,
    origin: str | None = None,
) -> None:
    """Hand a rejected message to ``quarantine`` (if any); a failure to store it is logged, never
    raised: the sender has its precise error either way."""
    if quarantine is None:
        return
    record = RejectRecord(feed=feed, format=format, received_at=received_at, raw=raw,
                          code=err.code, reason=err.reason, where=err.where,
                          origin_name=origin)  # fmt: skip
    d = maybeDeferred(quarantine, record)

    def stored(reject_id: int) -> None:
        log.info("page.inbound.quarantined", transport=feed, reject_id=reject_id, code=err.code)

    def failed(failure: Failure) -> None:
        log.error("page.inbound.quarantine.failed", transport=feed,
                  exception=failure.type.__name__)  # fmt: skip

    d.addCallbacks(stored, failed)
