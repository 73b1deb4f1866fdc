"""What every pager gateway's inbound side does alike: hand an event to the core, and answer
the carrier only once the core says it is committed."""

from __future__ import annotations

from collections.abc import Callable

import structlog
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.server import Request

from corespond.daemon.pager import DeliveryReceipt, PagerEvents, Reply

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
