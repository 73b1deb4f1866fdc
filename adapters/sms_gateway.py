"""An SMS gateway in the shape of Twilio's Messages API: send, delivery callbacks, replies.

Outbound, :class:`SmsPager` POSTs a form (``To``, ``From`` or ``MessagingServiceSid``,
``Body``, ``StatusCallback``) to ``{base}/2010-04-01/Accounts/{AccountSid}/Messages.json``
with HTTP basic auth (the account SID, or an API key SID, and its secret read from a file).
The answer's ``sid`` is the gateway id that status callbacks carry back as ``MessageSid``.
A 429 or a 5xx is retryable; another 4xx (an invalid number, an unverified sender) is not.
SMS has no multiple choice, so the body ends with the core's prompt ("Reply 1=Accept ...").

Inbound, :class:`SmsCallbackResource` takes both the delivery-status callbacks (``MessageSid``,
``MessageStatus``, ``ErrorCode``) and incoming messages (``From``, ``Body``). Every request
must carry a valid ``X-Twilio-Signature``: base64 HMAC-SHA1, keyed with the auth token, over the
public URL the gateway was told to call followed by each POST parameter name and value in
name order; compared in constant time; anything else gets 403 and nothing is recorded. The
answer (200, an empty TwiML ``<Response/>``) is written only after :class:`PagerEvents` has
committed the event; a failed commit gets 503 so the gateway may try again. Unknown parameters
are accepted (Twilio adds them over time). A reply's answer and page reference are read by
:func:`corespond.daemon.replies.read_reply`; with no reference, the core matches it to the
sender's most recent open page.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import structlog
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
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
from corespond.daemon.replies import read_reply, reply_prompt

log = structlog.get_logger(__name__)

API_VERSION = "2010-04-01"
STATUS_STATES = {
    "accepted": DeliveryState.QUEUED,
    "scheduled": DeliveryState.QUEUED,
    "queued": DeliveryState.QUEUED,
    "sending": DeliveryState.SENT,
    "sent": DeliveryState.SENT,
    "delivered": DeliveryState.DELIVERED,
    "read": DeliveryState.READ,
    "undelivered": DeliveryState.FAILED,
    "failed": DeliveryState.FAILED,
    "canceled": DeliveryState.FAILED,
    "partially_delivered": DeliveryState.SENT,
}
INBOUND_STATES = ("received", "receiving")
MAX_FORM_BYTES = 64 * 1024
_SID = re.compile(r"^[A-Za-z0-9]{2,64}$")
_ERROR_CODE = re.compile(r"^[0-9]{1,8}$")
TWIML_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def twilio_signature(url: str, params: Mapping[str, Sequence[str]], auth_token: str) -> str:
    """The ``X-Twilio-Signature`` of a form POST to ``url`` with ``params``."""
    data = url
    for name in sorted(params):
        for value in params[name]:
            data += name + value
    digest = hmac.new(auth_token.encode(), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_valid(
    url: str, params: Mapping[str, Sequence[str]], auth_token: str, presented: str | None
) -> bool:
    if not presented:
        return False
    expected = twilio_signature(url, params, auth_token)
    return hmac.compare_digest(expected.encode(), presented.strip().encode("utf-8", "replace"))


class SmsPager:
    """One account on one Twilio-shaped gateway. ``submit`` is one attempt within ``timeout``."""

    two_way = True

    def __init__(
        self,
        name: str,
        *,
        agent: Agent,
        reactor: IReactorTime,
        base_url: str,
        account_sid: str,
        auth_user: str | None = None,
        auth_secret: str,
        sender: str | None = None,
        messaging_service_sid: str | None = None,
        status_callback: str | None = None,
        timeout: float = 15.0,
    ) -> None:
        if (sender is None) == (messaging_service_sid is None):
            raise ValueError("give exactly one of sender (From) and messaging_service_sid")
        self.name = name
        self.agent, self.reactor = agent, reactor
        self.url = (f"{base_url.rstrip('/')}/{API_VERSION}/Accounts/"
                    f"{quote(account_sid, safe='')}/Messages.json")  # fmt: skip
        user = auth_user or account_sid
        token = base64.b64encode(f"{user}:{auth_secret}".encode()).decode("ascii")
        self._authorization = f"Basic {token}".encode("ascii")
        self.sender, self.messaging_service_sid = sender, messaging_service_sid
        self.status_callback, self.timeout = status_callback, timeout

    def body_text(self, message: PageMessage) -> str:
        parts = [message.text]
        if message.link:
            parts.append(message.link)
        if message.answers:
            parts.append(f"{reply_prompt(message.answers)} ({message.page_ref})")
        return "\n".join(parts)

    def submit(self, message: PageMessage) -> Deferred[Submitted]:
        return Deferred.fromCoroutine(self._submit(message))

    async def _submit(self, message: PageMessage) -> Submitted:
        form: list[tuple[str, str]] = [("To", message.address), ("Body", self.body_text(message))]
        if self.sender is not None:
            form.append(("From", self.sender))
        if self.messaging_service_sid is not None:
            form.append(("MessagingServiceSid", self.messaging_service_sid))
        if self.status_callback is not None:
            form.append(("StatusCallback", self.status_callback))
        try:
            answer = await request(
                self.agent, self.reactor, b"POST", self.url, timeout=self.timeout,
                body=urlencode(form).encode("ascii"), cap=256 * 1024,
                headers={b"content-type": b"application/x-www-form-urlencoded",
                         b"authorization": self._authorization,
                         b"accept": b"application/json"},
            )  # fmt: skip
        except HttpFailure as err:
            raise PagerError(self.name, str(err), retryable=True) from None
        code = answer.code
        if code in (200, 201):
            sid = _message_sid(answer.body)
            if sid is None:
                # Taken (2xx) but unreadable: do not send again; receipts will not correlate.
                log.warning("page.sms.unreadable-answer", transport=self.name,
                            request_id=message.attempt_id)  # fmt: skip
            return Submitted(self.name, sid)
        detail = _error_code(answer.body)
        what = f"HTTP {code}" + (f" code {detail}" if detail else "")
        raise PagerError(self.name, what, retryable=code == 429 or code >= 500)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _message_sid(body: bytes) -> str | None:
    doc = _json_object(body)
    sid = doc.get("sid") if doc else None
    return sid if isinstance(sid, str) and _SID.match(sid) else None


def _error_code(body: bytes) -> str | None:
    doc = _json_object(body)
    code = doc.get("code") if doc else None
    return str(code) if isinstance(code, int) and not isinstance(code, bool) else None


# --- inbound -------------------------------------------------------------------------------------


def event_for_form(
    params: Mapping[str, Sequence[str]], gateway: str, clock: Clock
) -> Reply | DeliveryReceipt:
    """The event a callback form stands for; raises :class:`RejectedMessage`."""

    def one(name: str) -> str | None:
        values = params.get(name)
        return values[0] if values else None

    sid = one("MessageSid") or one("SmsSid")
    if sid is None:
        raise RejectedMessage("missing-field", "MessageSid is required", "MessageSid")
    if not _SID.match(sid):
        raise RejectedMessage("invalid-field", "MessageSid must be 2-64 letters and digits",
                              "MessageSid")  # fmt: skip
    status = (one("MessageStatus") or one("SmsStatus") or "").strip().lower()
    body = one("Body")
    if body is not None and (status in INBOUND_STATES or not status):
        sender = one("From")
        read = read_reply(body)
        # The inbound message's own sid, not the page's: SMS does not thread.
        return Reply(gateway=gateway, received_at=clock.now(), answer=read.answer,
                     page_ref=read.page_ref, gateway_id=None, sender=sender, text=body)  # fmt: skip
    if status not in STATUS_STATES:
        raise RejectedMessage("invalid-field", "MessageStatus is not a known message status",
                              "MessageStatus")  # fmt: skip
    error = one("ErrorCode")
    detail = error if error and _ERROR_CODE.match(error) else None
    return DeliveryReceipt(gateway, sid, STATUS_STATES[status], clock.now(), detail)


class SmsCallbackResource(Resource):
    """Status callbacks and incoming messages, signature checked against ``public_url``."""

    isLeaf = True

    def __init__(
        self,
        gateway: str,
        events: PagerEvents,
        clock: Clock,
        *,
        auth_token: str,
        public_url: str,
        quarantine: Quarantine | None = None,
    ) -> None:
        super().__init__()
        self.gateway, self.events, self.clock = gateway, events, clock
        self.auth_token, self.public_url = auth_token, public_url
        self.quarantine = quarantine

    def render_POST(self, request: Request) -> bytes | int:
        params = _form(request)
        if params is None:
            request.setResponseCode(400)
            log.info("page.sms.callback.refused", transport=self.gateway, status=400)
            return b"form body must be UTF-8 application/x-www-form-urlencoded\n"
        header = request.getHeader(b"x-twilio-signature")
        presented = header.decode("latin-1") if header is not None else None
        if not signature_valid(self.public_url, params, self.auth_token, presented):
            request.setResponseCode(403)
            log.warning("page.sms.callback.forged", transport=self.gateway, status=403,
                        presented=presented is not None)  # fmt: skip
            return b"invalid signature\n"
        try:
            event = event_for_form(params, self.gateway, self.clock)
        except RejectedMessage as err:
            request.setResponseCode(400)
            log.warning("page.sms.callback.rejected", transport=self.gateway, code=err.code,
                        reason=err.reason, where=err.where, status=400)  # fmt: skip
            content = request.content
            raw = content.getvalue() if isinstance(content, io.BytesIO) else b""
            quarantine_copy(self.quarantine, feed=self.gateway, format="sms-callback", raw=raw,
                            err=err, received_at=self.clock.now(),
                            origin=peer_name(request.getClientAddress()))  # fmt: skip
            return f"{err}\n".encode()
        def answer(ok: bool) -> None:
            request.setResponseCode(200 if ok else 503)
            request.setHeader(b"content-type", b"text/xml")
            request.write(TWIML_EMPTY if ok else b"")

        answer_after_commit(request, deliver(self.events, event), answer, gateway=self.gateway)
        return NOT_DONE_YET


def _form(request: Request) -> dict[str, list[str]] | None:
    """The POST parameters only (the query string is part of the signed URL, not of these)."""
    content = request.content
    if content is None:
        return {}
    content.seek(0)
    raw = content.read(MAX_FORM_BYTES + 1)
    if len(raw) > MAX_FORM_BYTES:
        return None
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    out: dict[str, list[str]] = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return out
