"""WCTP 1.3 (Wireless Communications Transfer Protocol): two-way pages over HTTP(S) POST.

Outbound, :class:`WctpPager` sends one ``wctp-SubmitRequest`` per page (enterprise mode:
``wctp-Originator@senderID`` and ``@securityCode``), with our attempt id as ``messageID`` so
that replies and receipts carry it back as ``responseToMessageID``, and the offered answers as a
``wctp-MCR`` multiple-choice payload (Accept / Decline / En route). The carrier's synchronous
``wctp-Confirmation`` says *accepted* (``wctp-Success``, 2xx) or not (``wctp-Failure``): codes
3xx (protocol) and 4xx (content: unknown recipient, bad credentials) are permanent for this
page, except 304 ("poll first"); 5xx (message processing) and 6xx (system) are worth a retry.

Inbound, :class:`WctpCallbackResource` is what the carrier POSTs ``wctp-MessageReply`` and
``wctp-StatusInfo`` to, showing our callback token (WCTP signs nothing). It answers
``wctp-Confirmation/wctp-Success`` only after :class:`PagerEvents` has committed the event; a
parse error gets a ``wctp-Failure`` with the precise code (301 cannot parse, 302 validation,
300 operation not supported) and text naming what and where, never the content.
:class:`WctpPoller` pulls the same operations with ``wctp-PollForMessages`` for carriers that
do not push, on the injected clock, acknowledging each batch
(``wctp-MessageReceived@sequenceNo``) in the next poll only once it is committed.

XML goes through :func:`corespond.adapters.xml_safety.parse_untrusted_xml`. The one exception
to its "no DTD" rule: WCTP documents conventionally start with an *external* document type
declaration (``<!DOCTYPE wctp-Operation SYSTEM "http://dtd.wctp.org/wctp-dtd-v1r3.dtd">``);
that exact shape, without an internal subset, is removed before parsing (nothing is fetched).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from lxml import etree
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from corespond.adapters.gateway_events import (
    Quarantine,
    answer_after_commit,
    deliver,
    quarantine_copy,
)
from corespond.adapters.http_client import HttpFailure, request
from corespond.adapters.tcp_feed import peer_name
from corespond.adapters.xml_safety import local_name, parse_untrusted_xml
from corespond.daemon.clock import Clock
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.pager import (
    DeliveryReceipt,
    DeliveryState,
    PageMessage,
    PagerError,
    PagerEvents,
    Reply,
    Submitted,
)
from corespond.daemon.replies import ANSWER_LABELS, read_reply

log = structlog.get_logger(__name__)

WCTP_VERSION = "wctp-dtd-v1r3"
DTD_URL = "http://dtd.wctp.org/wctp-dtd-v1r3.dtd"
CONTENT_TYPE = b"text/xml; charset=utf-8"
MAX_WCTP_BYTES = 256 * 1024
_EXTERNAL_DOCTYPE = re.compile(
    rb"""<!DOCTYPE\s+wctp-Operation\s+(?:SYSTEM|PUBLIC\s+(?:"[^"<>\[]*"|'[^'<>\[]*'))\s*"""
    rb"""(?:"[^"<>\[]*"|'[^'<>\[]*')\s*>"""
)
_NOTIFICATION_STATES = {
    "QUEUED": DeliveryState.QUEUED,
    "DELIVERED": DeliveryState.DELIVERED,
    "READ": DeliveryState.READ,
}
_CODE = re.compile(r"^[0-9]{3}$")
_ID_LIMIT = 128  # ids we keep from a carrier: bounded, printable, never text


# --- result codes ------------------------------------------------------------------------------


def retryable_code(code: int) -> bool:
    """Whether a ``wctp-Failure@errorCode`` is worth trying again later on this gateway."""
    return code == 304 or 500 <= code <= 699


# --- building ----------------------------------------------------------------------------------


def _operation() -> etree._Element:
    return etree.Element("wctp-Operation", wctpVersion=WCTP_VERSION)


def _serialize(root: etree._Element) -> bytes:
    body: bytes = etree.tostring(root, encoding="utf-8", xml_declaration=False)
    return (
        b'<?xml version="1.0" encoding="utf-8"?>\n'
        + f'<!DOCTYPE wctp-Operation SYSTEM "{DTD_URL}">\n'.encode()
        + body
    )


def wctp_timestamp(at: datetime) -> str:
    """WCTP's ``YYYY-MM-DDThh:mm:ss`` (UTC, no zone suffix, as the 1.x examples write it)."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def build_submit_request(
    message: PageMessage,
    *,
    sender_id: str,
    security_code: str | None,
    now: datetime,
    send_responses_to: str | None = None,
    two_way: bool = True,
) -> bytes:
    """A ``wctp-SubmitRequest`` for ``message`` (multiple choice when ``two_way``)."""
    op = _operation()
    submit = etree.SubElement(op, "wctp-SubmitRequest")
    header = etree.SubElement(submit, "wctp-SubmitHeader", submitTimestamp=wctp_timestamp(now))
    originator = etree.SubElement(header, "wctp-Originator", senderID=sender_id)
    if security_code is not None:
        originator.set("securityCode", security_code)
    control = etree.SubElement(
        header,
        "wctp-MessageControl",
        messageID=message.attempt_id,
        allowResponse="true" if two_way else "false",
        notifyWhenDelivered="true",
        notifyWhenRead="true",
        deliveryPriority="HIGH",
    )
    if send_responses_to is not None:
        control.set("sendResponsesToID", send_responses_to)
    etree.SubElement(header, "wctp-Recipient", recipientID=message.address)
    payload = etree.SubElement(submit, "wctp-Payload")
    text = message.text if message.link is None else f"{message.text} {message.link}"
    if two_way and message.answers:
        mcr = etree.SubElement(payload, "wctp-MCR")
        etree.SubElement(mcr, "wctp-MessageText").text = text
        for answer in message.answers:
            etree.SubElement(mcr, "wctp-Choice").text = ANSWER_LABELS[answer]
    else:
        etree.SubElement(payload, "wctp-Alphanumeric").text = text
    return _serialize(op)


def build_confirmation(code: int, text: str, *, success: bool) -> bytes:
    """``wctp-Confirmation`` with ``wctp-Success`` or ``wctp-Failure``."""
    op = _operation()
    confirmation = etree.SubElement(op, "wctp-Confirmation")
    if success:
        etree.SubElement(confirmation, "wctp-Success", successCode=str(code), successText=text)
    else:
        etree.SubElement(confirmation, "wctp-Failure", errorCode=str(code), errorText=text)
    return _serialize(op)


def build_poll(
    poller_id: str,
    security_code: str | None,
    received: Sequence[tuple[str, int]] = (),
    max_batch: int = 20,
) -> bytes:
    """``wctp-PollForMessages``, acknowledging the ``(sequenceNo, code)`` of the last batch:
    200 stored, 604 not stored (resend), 301/302 unreadable (resending will not help)."""
    op = _operation()
    poll = etree.SubElement(op, "wctp-PollForMessages", pollerID=poller_id,
                            maxMessagesInBatch=str(max_batch))  # fmt: skip
    if security_code is not None:
        poll.set("securityCode", security_code)
    for sequence_no, code in received:
        ack = etree.SubElement(poll, "wctp-MessageReceived", sequenceNo=sequence_no)
        if code == 200:
            etree.SubElement(ack, "wctp-Success", successCode="200", successText="Received")
        else:
            text = "Not stored; resend" if code == 604 else "Cannot read this message"
            etree.SubElement(ack, "wctp-Failure", errorCode=str(code), errorText=text)
    return _serialize(op)


def build_message_reply(
    response_to: str, text: str, *, replier: str | None = None, multiple_choice: bool = True
) -> bytes:
    """A carrier's ``wctp-MessageReply`` to our message ``response_to`` (what a device user
    answered): the carrier's side, for stand-in carriers (the demo, tests)."""
    op = _operation()
    reply = etree.SubElement(op, "wctp-MessageReply",
                             MCRMessageReply="true" if multiple_choice else "false")  # fmt: skip
    header = etree.SubElement(reply, "wctp-ResponseHeader", responseToMessageID=response_to)
    if replier is not None:
        etree.SubElement(header, "wctp-Originator", senderID=replier)
    payload = etree.SubElement(reply, "wctp-Payload")
    etree.SubElement(payload, "wctp-Alphanumeric").text = text
    return _serialize(op)


def build_status_info(response_to: str, kind: str) -> bytes:
    """A carrier's ``wctp-StatusInfo`` notification (QUEUED, DELIVERED or READ)."""
    op = _operation()
    status = etree.SubElement(op, "wctp-StatusInfo")
    etree.SubElement(status, "wctp-ResponseHeader", responseToMessageID=response_to)
    etree.SubElement(status, "wctp-Notification", type=kind)
    return _serialize(op)


# --- parsing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Confirmation:
    success: bool
    code: int


@dataclass(frozen=True, slots=True)
class InboundReply:
    """A ``wctp-MessageReply`` (what the device user sent back to one of our messages), or a
    ``wctp-SubmitRequest`` from the carrier (an uncorrelated message from the device, as
    WCTP-to-SMS gateways send replies they could not match; ``response_to`` is then None)."""

    response_to: str | None
    sender: str | None
    text: str
    multiple_choice: bool


@dataclass(frozen=True, slots=True)
class InboundStatus:
    """A ``wctp-StatusInfo``: a delivery notification or failure for one of our messages."""

    response_to: str
    state: DeliveryState
    error_code: str | None


Inbound = InboundReply | InboundStatus


@dataclass(frozen=True, slots=True)
class PollBatch:
    messages: tuple[tuple[str, Inbound | RejectedMessage], ...]  # (sequenceNo, operation)
    min_next_poll: float | None
    failure_code: int | None = None


def parse_wctp(body: bytes) -> etree._Element:
    """The single operation inside ``wctp-Operation``; raises :class:`RejectedMessage`."""
    if not isinstance(body, bytes):
        raise RejectedMessage("malformed-xml", "a WCTP message must be bytes")
    if len(body) > MAX_WCTP_BYTES:
        raise RejectedMessage("oversize", f"a WCTP message is limited to {MAX_WCTP_BYTES} bytes")
    body = _EXTERNAL_DOCTYPE.sub(b"", body, count=1)
    root = parse_untrusted_xml(body)
    if not isinstance(root.tag, str) or local_name(root) != "wctp-Operation":
        raise RejectedMessage("invalid-field", "the root element must be wctp-Operation", "/")
    children = [c for c in root if isinstance(c.tag, str)]
    if len(children) != 1:
        raise RejectedMessage(
            "invalid-field", "wctp-Operation must hold exactly one operation", "/wctp-Operation"
        )
    return children[0]


def _where(*names: str) -> str:
    return "/wctp-Operation/" + "/".join(names)


def _child(parent: etree._Element, name: str, where: str) -> etree._Element:
    for child in parent:
        if isinstance(child.tag, str) and local_name(child) == name:
            return child
    raise RejectedMessage("missing-field", f"{name} is required", where)


def _optional_child(parent: etree._Element, name: str) -> etree._Element | None:
    for child in parent:
        if isinstance(child.tag, str) and local_name(child) == name:
            return child
    return None


def _identifier(element: etree._Element, attribute: str, where: str) -> str:
    value = element.get(attribute)
    if value is None or not value.strip():
        raise RejectedMessage("missing-field", f"attribute {attribute} is required", where)
    value = value.strip()
    if len(value) > _ID_LIMIT or not value.isprintable():
        raise RejectedMessage(
            "invalid-field", f"attribute {attribute} must be a printable id of at most "
            f"{_ID_LIMIT} characters", where,
        )  # fmt: skip
    return value


def _code(element: etree._Element, attribute: str, where: str) -> int:
    value = (element.get(attribute) or "").strip()
    if not _CODE.match(value):
        raise RejectedMessage("invalid-field", f"attribute {attribute} must be a 3-digit code",
                              where)  # fmt: skip
    return int(value)


def parse_confirmation(body: bytes) -> Confirmation:
    """The carrier's synchronous answer to a submit."""
    op = parse_wctp(body)
    name = local_name(op)
    if name == "wctp-Confirmation":
        outcome = next((c for c in op if isinstance(c.tag, str)), None)
        if outcome is None:
            raise RejectedMessage("missing-field", "wctp-Success or wctp-Failure is required",
                                  _where(name))  # fmt: skip
        kind = local_name(outcome)
        if kind == "wctp-Success":
            return Confirmation(True, _code(outcome, "successCode", _where(name, kind)))
        if kind == "wctp-Failure":
            return Confirmation(False, _code(outcome, "errorCode", _where(name, kind)))
        raise RejectedMessage("invalid-field", "expected wctp-Success or wctp-Failure",
                              _where(name))  # fmt: skip
    raise RejectedMessage("unsupported", "expected wctp-Confirmation", "/wctp-Operation")


def parse_inbound(op: etree._Element) -> Inbound:
    """A ``wctp-MessageReply``, ``wctp-StatusInfo`` or ``wctp-SubmitRequest`` element (pushed
    or polled)."""
    name = local_name(op)
    if name not in ("wctp-MessageReply", "wctp-StatusInfo", "wctp-SubmitRequest"):
        raise RejectedMessage(
            "unsupported",
            "only wctp-MessageReply, wctp-StatusInfo and wctp-SubmitRequest are accepted here",
            "/wctp-Operation",
        )
    if name == "wctp-SubmitRequest":
        header = _child(op, "wctp-SubmitHeader", _where(name))
        where = _where(name, "wctp-SubmitHeader")
        originator = _child(header, "wctp-Originator", where)
        sender = _identifier(originator, "senderID", f"{where}/wctp-Originator")
        return InboundReply(None, sender, _payload_text(op, name), False)
    header = _child(op, "wctp-ResponseHeader", _where(name))
    where = _where(name, "wctp-ResponseHeader")
    response_to = _identifier(header, "responseToMessageID", where)
    if name == "wctp-StatusInfo":
        notification = _optional_child(op, "wctp-Notification")
        if notification is not None:
            kind = (notification.get("type") or "").strip().upper()
            if kind not in _NOTIFICATION_STATES:
                raise RejectedMessage("invalid-field", "type must be QUEUED, DELIVERED or READ",
                                      _where(name, "wctp-Notification"))  # fmt: skip
            return InboundStatus(response_to, _NOTIFICATION_STATES[kind], None)
        failure = _optional_child(op, "wctp-Failure")
        if failure is None:
            raise RejectedMessage("missing-field", "wctp-Notification or wctp-Failure is "
                                                   "required", _where(name))  # fmt: skip
        code = _code(failure, "errorCode", _where(name, "wctp-Failure"))
        return InboundStatus(response_to, DeliveryState.FAILED, str(code))
    replier = _optional_child(header, "wctp-Originator")
    replied_by = (
        _identifier(replier, "senderID", f"{where}/wctp-Originator")
        if replier is not None
        else None
    )
    multiple_choice = (op.get("MCRMessageReply") or "false").strip() == "true"
    return InboundReply(response_to, replied_by, _payload_text(op, name), multiple_choice)


def _payload_text(op: etree._Element, name: str) -> str:
    payload = _child(op, "wctp-Payload", _where(name))
    content = next((c for c in payload if isinstance(c.tag, str)), None)
    if content is None or local_name(content) not in ("wctp-Alphanumeric", "wctp-MCR"):
        raise RejectedMessage(
            "invalid-field", "the payload must be wctp-Alphanumeric or wctp-MCR",
            _where(name, "wctp-Payload"),
        )  # fmt: skip
    if local_name(content) == "wctp-MCR":
        mcr_where = _where(name, "wctp-Payload", "wctp-MCR")
        return (_child(content, "wctp-MessageText", mcr_where).text or "").strip()
    return (content.text or "").strip()


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """A ``wctp-SubmitRequest`` as a carrier reads it (stand-in carriers: the demo, tests)."""

    message_id: str
    sender_id: str
    recipient: str
    text: str
    choices: tuple[str, ...]
    send_responses_to: str | None


def parse_submit_request(body: bytes) -> SubmitRequest:
    """The submit in ``body``; raises :class:`RejectedMessage` naming what and where."""
    op = parse_wctp(body)
    name = local_name(op)
    if name != "wctp-SubmitRequest":
        raise RejectedMessage("unsupported", "expected wctp-SubmitRequest", "/wctp-Operation")
    header = _child(op, "wctp-SubmitHeader", _where(name))
    where = _where(name, "wctp-SubmitHeader")
    originator = _child(header, "wctp-Originator", where)
    sender = _identifier(originator, "senderID", f"{where}/wctp-Originator")
    control = _child(header, "wctp-MessageControl", where)
    message_id = _identifier(control, "messageID", f"{where}/wctp-MessageControl")
    responses_to = control.get("sendResponsesToID")
    recipient = _identifier(_child(header, "wctp-Recipient", where), "recipientID",
                            f"{where}/wctp-Recipient")  # fmt: skip
    mcr = _optional_child(_child(op, "wctp-Payload", _where(name)), "wctp-MCR")
    choices = tuple(
        (c.text or "").strip()
        for c in (mcr if mcr is not None else ())
        if isinstance(c.tag, str) and local_name(c) == "wctp-Choice"
    )
    return SubmitRequest(message_id, sender, recipient, _payload_text(op, name), choices,
                         responses_to.strip() if responses_to else None)  # fmt: skip


def parse_poll_response(body: bytes) -> PollBatch:
    """A ``wctp-PollResponse``: each message parsed alone, so one bad one is refused alone."""
    op = parse_wctp(body)
    if local_name(op) != "wctp-PollResponse":
        raise RejectedMessage("unsupported", "expected wctp-PollResponse", "/wctp-Operation")
    interval = op.get("minNextPollInterval")
    min_next: float | None = None
    if interval is not None:
        try:
            # The DTD leaves the unit open; read as minutes (unverified), clamped to an hour.
            min_next = min(max(float(interval), 0.0), 60.0) * 60.0
        except ValueError:
            raise RejectedMessage("invalid-field", "minNextPollInterval must be a number",
                                  _where("wctp-PollResponse")) from None  # fmt: skip
    failure = _optional_child(op, "wctp-Failure")
    if failure is not None:
        code = _code(failure, "errorCode", _where("wctp-PollResponse", "wctp-Failure"))
        return PollBatch((), min_next, code)
    messages: list[tuple[str, Inbound | RejectedMessage]] = []
    for n, message in enumerate(c for c in op if isinstance(c.tag, str)):
        if local_name(message) == "wctp-NoMessages":
            continue
        where = _where("wctp-PollResponse", f"wctp-Message[{n + 1}]")
        if local_name(message) != "wctp-Message":
            raise RejectedMessage("invalid-field", "expected wctp-Message", where)
        sequence_no = _identifier(message, "sequenceNo", where)
        inner = [c for c in message if isinstance(c.tag, str)]
        try:
            if len(inner) != 1:
                raise RejectedMessage("invalid-field", "wctp-Message holds one operation", where)
            messages.append((sequence_no, parse_inbound(inner[0])))
        except RejectedMessage as err:
            messages.append((sequence_no, err))
    return PollBatch(tuple(messages), min_next)


def failure_code(err: RejectedMessage) -> int:
    """The WCTP result code for a message we cannot take."""
    if err.code in ("malformed-xml", "bad-encoding", "oversize"):
        return 301
    if err.code == "unsupported":
        return 300
    return 302


# --- turning inbound operations into core events ------------------------------------------------


def event_for(inbound: Inbound, gateway: str, now: datetime) -> Reply | DeliveryReceipt:
    if isinstance(inbound, InboundStatus):
        return DeliveryReceipt(gateway, inbound.response_to, inbound.state, now,
                               inbound.error_code)  # fmt: skip
    read = read_reply(inbound.text)
    return Reply(
        gateway=gateway,
        received_at=now,
        answer=read.answer,
        page_ref=read.page_ref,
        gateway_id=inbound.response_to,
        sender=inbound.sender,
        text=inbound.text,
    )


# --- the pager ---------------------------------------------------------------------------------


class WctpPager:
    """One configured WCTP carrier endpoint. ``submit`` is one attempt, bounded by ``timeout``."""

    two_way = True

    def __init__(
        self,
        name: str,
        *,
        agent: Agent,
        clock: Clock,
        reactor: IReactorTime,
        url: str,
        sender_id: str,
        security_code: str | None = None,
        send_responses_to: str | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.agent, self.clock, self.reactor = agent, clock, reactor
        self.url, self.sender_id, self.security_code = url, sender_id, security_code
        self.send_responses_to, self.timeout = send_responses_to, timeout

    def submit(self, message: PageMessage) -> Deferred[Submitted]:
        return Deferred.fromCoroutine(self._submit(message))

    async def _submit(self, message: PageMessage) -> Submitted:
        body = build_submit_request(
            message,
            sender_id=self.sender_id,
            security_code=self.security_code,
            now=self.clock.now(),
            send_responses_to=self.send_responses_to,
        )
        try:
            answer = await request(
                self.agent, self.reactor, b"POST", self.url, body=body, timeout=self.timeout,
                headers={b"content-type": CONTENT_TYPE}, cap=MAX_WCTP_BYTES,
            )  # fmt: skip
        except HttpFailure as err:
            raise PagerError(self.name, str(err), retryable=True) from None
        if answer.code >= 500 or answer.code in (408, 429):
            raise PagerError(self.name, f"HTTP {answer.code}", retryable=True)
        if answer.code != 200:
            raise PagerError(self.name, f"HTTP {answer.code}", retryable=False)
        try:
            confirmation = parse_confirmation(answer.body)
        except RejectedMessage as err:
            # The carrier may or may not have taken it; we cannot tell, so the page is retried
            # with the same messageID (a carrier that deduplicates on it drops the repeat).
            raise PagerError(
                self.name, f"unreadable confirmation ({err})", retryable=True
            ) from None
        if confirmation.success and 200 <= confirmation.code < 300:
            log.info("page.wctp.accepted", transport=self.name, request_id=message.attempt_id,
                     code=confirmation.code)  # fmt: skip
            return Submitted(self.name, message.attempt_id)
        code = confirmation.code
        raise PagerError(self.name, f"WCTP {code}", retryable=retryable_code(code))


# --- inbound: pushed by the carrier --------------------------------------------------------------


class WctpCallbackResource(Resource):
    """Where the carrier POSTs ``wctp-MessageReply`` and ``wctp-StatusInfo``.

    WCTP signs nothing, and a forged reply could accept a page for someone else, so every
    request must show our callback ``token``: as ``Authorization: Bearer <token>`` or as the
    ``token`` query parameter of the URL we give the carrier (``sendResponsesToID`` or the
    carrier's account setting). Anything else gets HTTP 403 with ``wctp-Failure`` 402.
    """

    isLeaf = True

    def __init__(
        self,
        gateway: str,
        events: PagerEvents,
        clock: Clock,
        *,
        token: str,
        quarantine: Quarantine | None = None,
    ) -> None:
        super().__init__()
        if not token:
            raise ValueError("a WCTP callback needs a token")
        self.gateway, self.events, self.clock = gateway, events, clock
        self._token = token.encode("utf-8")
        self.quarantine = quarantine

    def _authorized(self, request: Request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, credentials = header.partition(b" ")
        presented = credentials.strip() if scheme.lower() == b"bearer" else b""
        if not presented:
            args: dict[bytes, list[bytes]] = request.args or {}
            presented = (args.get(b"token") or [b""])[0]
        return hmac.compare_digest(presented, self._token)

    def render_POST(self, request: Request) -> bytes | int:
        request.setHeader(b"content-type", CONTENT_TYPE)
        if not self._authorized(request):
            request.setResponseCode(403)
            log.warning("page.wctp.inbound.forged", transport=self.gateway, status=403)
            return build_confirmation(402, "Invalid or missing callback token", success=False)
        content = request.content
        body = content.read(MAX_WCTP_BYTES + 1) if content is not None else b""
        try:
            inbound = parse_inbound(parse_wctp(body))
        except RejectedMessage as err:
            code = failure_code(err)
            log.warning("page.wctp.inbound.rejected", transport=self.gateway, code=err.code,
                        reason=err.reason, where=err.where, status=code)  # fmt: skip
            quarantine_copy(self.quarantine, feed=self.gateway, format="wctp", raw=body, err=err,
                            received_at=self.clock.now(),
                            origin=peer_name(request.getClientAddress()))  # fmt: skip
            return build_confirmation(code, str(err), success=False)
        event = event_for(inbound, self.gateway, self.clock.now())

        def answer(ok: bool) -> None:
            if ok:
                request.write(build_confirmation(200, "Message received", success=True))
            else:
                request.write(build_confirmation(604, "Not stored; resend later", success=False))

        answer_after_commit(request, deliver(self.events, event), answer, gateway=self.gateway)
        return NOT_DONE_YET

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST")
        return b""


# --- inbound: pulled from the carrier -------------------------------------------------------------


class WctpPoller:
    """``wctp-PollForMessages`` every ``interval`` seconds (or the carrier's minimum, if longer).

    A batch is acknowledged in the *next* poll, each message with Success once its event is
    committed, Failure 604 if the commit failed (the carrier resends it) or Failure 301/302 if
    it could not be read (quarantined; resending would not help), so nothing is lost between
    two polls. ``minNextPollInterval`` is read as minutes (an assumption: the DTD leaves
    the unit unstated).
    """

    def __init__(
        self,
        gateway: str,
        *,
        agent: Agent,
        clock: Clock,
        reactor: IReactorTime,
        url: str,
        poller_id: str,
        security_code: str | None,
        events: PagerEvents,
        interval: float = 30.0,
        timeout: float = 15.0,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.quarantine = quarantine
        self.gateway, self.agent, self.clock, self.reactor = gateway, agent, clock, reactor
        self.url, self.poller_id, self.security_code = url, poller_id, security_code
        self.events, self.interval, self.timeout = events, interval, timeout
        self._received: list[tuple[str, int]] = []
        self._call: Any = None
        self._running = False
        self._current: Deferred[float] | None = None

    def start(self) -> None:
        self._running = True
        self._schedule(0)

    def stop(self) -> Deferred[None]:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        current = self._current
        if current is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        current.addBoth(lambda _: done.callback(None))
        return done

    def _schedule(self, delay: float) -> None:
        if self._running:
            self._call = self.clock.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._current = self.poll_once()
        self._current.addBoth(self._after)

    def _after(self, result: float | Failure) -> None:
        self._current = None
        if isinstance(result, Failure):
            safe = isinstance(result.value, HttpFailure | PagerError)
            log.warning("page.wctp.poll.failed", transport=self.gateway,
                        exception=result.type.__name__,
                        error=str(result.value) if safe else None)  # fmt: skip
            self._schedule(self.interval)
        else:
            self._schedule(result)

    async def _poll(self) -> float:
        acks, self._received = self._received, []
        body = build_poll(self.poller_id, self.security_code, acks)
        try:
            answer = await request(
                self.agent, self.reactor, b"POST", self.url, body=body, timeout=self.timeout,
                headers={b"content-type": CONTENT_TYPE}, cap=MAX_WCTP_BYTES,
            )  # fmt: skip
        except HttpFailure:
            self._received = acks + self._received  # say it again next time
            raise
        if answer.code != 200:
            self._received = acks + self._received
            raise PagerError(self.gateway, f"poll HTTP {answer.code}", retryable=True)
        try:
            batch = parse_poll_response(answer.body)
        except RejectedMessage as err:
            # Our acks may have been taken or not; resending a Success is harmless.
            self._received = acks + self._received
            raise PagerError(self.gateway, f"unreadable poll response ({err})",
                             retryable=True) from None  # fmt: skip
        if batch.failure_code is not None:
            self._received = acks + self._received
            raise PagerError(self.gateway, f"poll WCTP {batch.failure_code}", retryable=True)
        now = self.clock.now()
        pending: list[Deferred[Any]] = []
        for sequence_no, inbound in batch.messages:
            if isinstance(inbound, RejectedMessage):
                log.warning("page.wctp.inbound.rejected", transport=self.gateway, code=inbound.code,
                            reason=inbound.reason, where=inbound.where)  # fmt: skip
                # The batch as received: the bad message's own bytes are not kept apart.
                quarantine_copy(self.quarantine, feed=self.gateway, format="wctp",
                                raw=answer.body, err=inbound, received_at=now,
                                origin=f"poll sequenceNo {sequence_no}"[:80])  # fmt: skip
                self._received.append((sequence_no, failure_code(inbound)))
                continue
            d = deliver(self.events, event_for(inbound, self.gateway, now))
            d.addCallbacks(
                lambda _, s=sequence_no: self._received.append((s, 200)),
                lambda f, s=sequence_no: self._received.append((s, 604)),
            )
            pending.append(d)
        if pending:
            await DeferredList(pending, consumeErrors=True)
        return max(self.interval, batch.min_next_poll or 0.0)

    def poll_once(self) -> Deferred[float]:
        """One poll; fires with the delay until the next one."""
        return Deferred.fromCoroutine(self._poll())
