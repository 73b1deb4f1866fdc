"""The one interface every pager gateway speaks, and what gateways report back.

The escalation engine decides *who* is paged and *when*; it hands a :class:`PageMessage` to a
:class:`Pager`. A pager adapter (``corespond.adapters.wctp``, ``sms_gateway``, ``snpp``,
``smtp_pager``) turns it into its wire protocol and makes **one attempt**, bounded by its own
timeout. Retries with backoff and the in-flight cap are a property of each configured gateway,
applied by :class:`corespond.daemon.gateways.GatewayQueue` around the adapter, so every adapter
gets them alike.

What comes back from a carrier (a clinician's reply, a delivery receipt) arrives through a
:class:`PagerEvents`. Its Deferreds fire only after the event is committed, so an adapter that
answers its carrier (HTTP 200 to a callback, a WCTP confirmation) does so only after the commit:
nothing is acknowledged before it is durable.

Nothing here carries protected health information: the page text is built by the core from the
incident's general location and call type, never from names, narratives or diagnoses. A reply's
free text is the clinician's own words and is stored, never logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from twisted.internet.defer import Deferred

from corespond.daemon.errors import SafeMessage


class PageAnswer(StrEnum):
    """The human answers a page offers. Only these advance or stop an escalation."""

    ACCEPT = "accept"
    DECLINE = "decline"
    EN_ROUTE = "en_route"
    ON_SCENE = "on_scene"


# What a two-way page offers as multiple-choice responses, in this order.
OFFERED_ANSWERS: tuple[PageAnswer, ...] = (
    PageAnswer.ACCEPT,
    PageAnswer.DECLINE,
    PageAnswer.EN_ROUTE,
)


@dataclass(frozen=True, slots=True)
class PageMessage:
    """One page to one endpoint of one clinician (or a supervisor group member)."""

    page_ref: str  # the short reference a person reads and may type back, e.g. "C1445-2"
    attempt_id: str  # unique per attempt row; sent as the client message id where one is taken
    address: str  # pager id, phone number (E.164) or mail address, as the gateway expects
    text: str  # already free of protected information
    answers: tuple[PageAnswer, ...] = OFFERED_ANSWERS  # offered only by two-way gateways
    link: str | None = None  # the signed, expiring ack-page link


@dataclass(frozen=True, slots=True)
class Submitted:
    """The gateway took the page. ``gateway_id`` correlates later replies and receipts."""

    gateway: str
    gateway_id: str | None


class PagerError(SafeMessage, Exception):
    """A submission that did not succeed. The message names the gateway's code, never the text.

    ``retryable`` says whether the same page may be tried again on this gateway later (a
    timeout, a connection refused, a 5xx or a WCTP 5xx result); a permanent refusal (unknown
    recipient, a 4xx) moves the escalation to the clinician's next endpoint instead.
    """

    def __init__(self, gateway: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{gateway}: {message}")
        self.gateway = gateway
        self.retryable = retryable


class Pager(Protocol):
    """A configured gateway. ``two_way`` is False for SNPP and SMTP (no replies come back)."""

    name: str
    two_way: bool

    def submit(self, message: PageMessage) -> Deferred[Submitted]:
        """One attempt, bounded by the adapter's timeout; fails with :class:`PagerError`."""
        ...


class DeliveryState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Reply:
    """A message a clinician sent back. Matched to a page by reference, gateway id or sender."""

    gateway: str
    received_at: datetime
    answer: PageAnswer | None  # None when the text was not understood
    page_ref: str | None = None  # a reference found in the reply, if any
    gateway_id: str | None = None  # the carrier's id of the page this replies to, if given
    sender: str | None = None  # the endpoint address the reply came from
    text: str = ""  # the raw reply; stored in a protected column, never logged


@dataclass(frozen=True, slots=True)
class DeliveryReceipt:
    """A carrier's word on delivery. It never advances an escalation: only a human does."""

    gateway: str
    gateway_id: str
    state: DeliveryState
    received_at: datetime
    detail: str | None = None  # the carrier's error code, never message text


class PagerEvents(Protocol):
    """Where adapters deliver what comes back. Each Deferred fires after the commit."""

    def reply(self, reply: Reply) -> Deferred[None]: ...

    def receipt(self, receipt: DeliveryReceipt) -> Deferred[None]: ...
