"""The peers of ``make demo``: stand-ins for the outside world the paging and referral parts talk
to, each over its real wire format on loopback, all on the injected reactor.

- :class:`DemoCarrier`: a WCTP 1.3 carrier (HTTP POST). It confirms each
  ``wctp-SubmitRequest``, pushes a ``wctp-StatusInfo`` DELIVERED, and for a seeded share of
  the multiple-choice pages pushes a ``wctp-MessageReply`` (Accept / Decline / En route) to the
  daemon's gateway callback after a short delay; the other pages get no answer, so their chains
  escalate.
- :class:`DemoSmsGateway`: the Twilio Messages API shape. It answers each send with a message
  SID, posts signed (``X-Twilio-Signature``) status callbacks (sent, delivered) and, for a
  seeded share of pages, an inbound reply ("1 C1445-2") to the gateway's callback URL.
- :class:`DemoAvl`: an AVL gateway posting a location fix for every roster clinician who rides
  as no CAD unit to the web API (``/api/v1/location``, a system token), at start and then well
  within the fix age (the CAD feed places the others:
  :class:`~corespond.daemon.demo.CadUnitUpdates`).
- :class:`DemoProvider`: a treatment provider's engine on MLLP. It answers each referral AA
  (a seeded share AE) and, for a share of the accepted ones, sends an RRI^I12 back to the
  daemon's referral listener a little later.
- :class:`DemoEncounterForms`: the phone of a demo clinician who took a call. For a seeded
  share of them it opens the page's ack link, follows "Complete the encounter", GETs the form
  and POSTs it with a disposition, as a phone would (``referrals.auto`` may then refer).
- :class:`DemoReferrals`: the clinicians' side of referrals. Every few seconds it looks for
  accepted calls without a referral and creates one, with a synthetic person and summary, for
  a seeded share of them through :meth:`ReferralService.create` (off the reactor).

Everything they say is invented. Nothing here runs unless the config has ``demo.peers``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin

import structlog
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from corespond.adapters import mllp
from corespond.adapters.framing import FramingError
from corespond.adapters.hl7_referral import Hl7Reply, Person, build_ack, parse_reply
from corespond.adapters.http_client import HttpFailure, make_agent, request
from corespond.adapters.sms_gateway import API_VERSION, twilio_signature
from corespond.adapters.wctp import (
    build_confirmation,
    build_message_reply,
    build_status_info,
    failure_code,
    parse_submit_request,
)
from corespond.daemon.clock import Clock
from corespond.daemon.config import Config, DemoPeersConfig, GatewayConfig
from corespond.daemon.demo import CENTER, FIRST, LAST, STREETS
from corespond.daemon.errors import RejectedMessage, SafeMessage
from corespond.daemon.log import error_text
from corespond.daemon.replies import read_reply
from corespond.daemon.web.forms import origin_of

log = structlog.get_logger(__name__)

# (reply word as a WCTP choice, as an SMS reply, weight) of the demo clinicians who answer.
ANSWERS = (("Accept", "1", 0.55), ("Decline", "2", 0.3), ("En route", "3", 0.15))
TIMEOUT = 10.0
MAX_FORM_BYTES = 64 * 1024
SERVICE_TYPE = "crisis-follow-up"
SUMMARIES = (
    "Calm after de-escalation; agrees to a follow-up visit this week.",
    "Requests outpatient counseling; safety plan reviewed with the person.",
    "Would like a call from the mobile crisis team tomorrow morning.",
)


class DemoPeersError(SafeMessage, Exception):
    """The demo peers cannot run with this configuration; the text says what is missing."""


def _pick_answer(rng: random.Random) -> tuple[str, str]:
    word, digit, _ = rng.choices(ANSWERS, weights=[w for _, _, w in ANSWERS])[0]
    return word, digit


def _body(request: Request) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    return content.read(MAX_FORM_BYTES + 1)


class _Later:
    """Delayed calls that a stop cancels."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[IDelayedCall] = []

    def __call__(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.calls = [c for c in self.calls if c.active()]
        self.calls.append(self.clock.call_later(delay, fn, *args))

    def cancel(self) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()
        self.calls = []


class _Poster:
    """HTTP POSTs back to the daemon (callbacks, the API); failures are logged, not retried
    (the daemon's replies are a human's: the demo clinician just does not answer again)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.agent, self.pool = make_agent(reactor, connect_timeout=TIMEOUT)
        self.answers: list[int] = []
        self.stopping = False

    def post(self, url: str, body: bytes, headers: dict[bytes, bytes], what: str) -> Deferred[Any]:
        d = request(self.agent, self.reactor, b"POST", url, headers=headers, body=body,
                    timeout=TIMEOUT)  # fmt: skip

        def answered(answer: Any) -> None:
            self.answers.append(answer.code)
            if answer.code != 200:
                log.warning("demo.peer.refused", kind=what, status=answer.code)

        def failed(failure: Any) -> None:
            failure.trap(HttpFailure)
            if self.stopping:  # the demo is stopping: what was in flight is dropped
                log.debug("demo.peer.dropped", kind=what, error=error_text(failure))
                return
            log.warning("demo.peer.unreachable", kind=what, error=error_text(failure))

        return d.addCallbacks(answered, failed)

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


@dataclass
class _Side:
    """What an HTTP peer needs: the clock, the way back to the daemon, its own dice."""

    clock: Clock
    poster: _Poster
    later: _Later
    rng: random.Random
    settings: DemoPeersConfig
    forms: DemoEncounterForms | None = None

    def answer(self) -> tuple[str, str, float] | None:
        """(WCTP choice, SMS digit, delay) when the demo clinician answers; None: silence."""
        if self.rng.random() >= self.settings.answer_share:
            return None
        word, digit = _pick_answer(self.rng)
        return word, digit, self.settings.reply_delay_seconds * self.rng.uniform(0.5, 1.5)


# --- WCTP carrier ------------------------------------------------------------------------------


class DemoCarrier(Resource):
    """POST /wctp: a WCTP 1.3 carrier that answers some pages and lets the rest time out."""

    isLeaf = True

    def __init__(
        self, side: _Side, *, callback_url: str | None, callback_token: str | None
    ) -> None:
        super().__init__()
        self.side = side
        self.callback_url, self.callback_token = callback_url, callback_token
        self.received: list[str] = []  # messageIDs, in order

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"demo WCTP carrier: POST wctp-SubmitRequest here\n"

    def render_POST(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/xml; charset=utf-8")
        try:
            submit = parse_submit_request(_body(request))
        except RejectedMessage as err:
            log.warning("demo.wctp.refused", code=err.code, where=err.where)
            return build_confirmation(failure_code(err), err.reason, success=False)
        self.received.append(submit.message_id)
        page_ref = read_reply(submit.text).page_ref
        if self.callback_url is not None:
            later = self.side.later
            later(1.0, self._push, build_status_info(submit.message_id, "DELIVERED"),
                  "wctp-status")  # fmt: skip
            answer = self.side.answer() if submit.choices else None
            if answer is not None:
                word, _, delay = answer
                reply = build_message_reply(submit.message_id, word, replier=submit.recipient)
                log.info("demo.wctp.will_answer", page_ref=page_ref, answer=word,
                         seconds=round(delay, 1))  # fmt: skip
                later(delay, self._push, reply, "wctp-reply")
                if word != "Decline" and self.side.forms is not None:
                    self.side.forms.took(submit.text, page_ref, delay)
            elif submit.choices:
                log.info("demo.wctp.will_not_answer", page_ref=page_ref)
        return build_confirmation(200, "Message accepted for delivery", success=True)

    def _push(self, body: bytes, what: str) -> None:
        assert self.callback_url is not None
        headers = {b"content-type": b"text/xml; charset=utf-8"}
        if self.callback_token:
            headers[b"authorization"] = b"Bearer " + self.callback_token.encode()
        self.side.poster.post(self.callback_url, body, headers, what)


# --- SMS gateway (Twilio Messages API shape) ---------------------------------------------------


def parse_send_form(body: bytes) -> dict[str, str]:
    """A Messages API send (``To``, ``Body``, ``StatusCallback``...): one value per name;
    raises :class:`RejectedMessage`."""
    if len(body) > MAX_FORM_BYTES:
        raise RejectedMessage("oversize", f"the form is limited to {MAX_FORM_BYTES} bytes")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict",
                          max_num_fields=64)  # fmt: skip
    except (UnicodeDecodeError, ValueError):
        raise RejectedMessage("malformed", "not a UTF-8 url-encoded form") from None
    form = dict(pairs)
    for name in ("To", "Body"):
        if not form.get(name):
            raise RejectedMessage("missing-field", f"{name} is required", name)
    return form


class DemoSmsGateway(Resource):
    """POST /2010-04-01/Accounts/<sid>/Messages.json, and signed callbacks back."""

    isLeaf = True

    def __init__(self, side: _Side, gateway: GatewayConfig) -> None:
        super().__init__()
        self.side, self.gateway = side, gateway
        self.path = f"/{API_VERSION}/Accounts/{gateway.account_sid}/Messages.json".encode()
        user = gateway.auth_user or gateway.account_sid
        token = base64.b64encode(f"{user}:{gateway.secret}".encode()).decode("ascii")
        self.authorization = f"Basic {token}".encode()
        self.sent: list[str] = []  # message SIDs, in order

    def render_POST(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path != self.path:
            request.setResponseCode(404)
            return json.dumps({"code": 20404, "message": "not found"}).encode()
        if request.getHeader(b"authorization") != self.authorization:
            request.setResponseCode(401)
            return json.dumps({"code": 20003, "message": "authenticate"}).encode()
        try:
            form = parse_send_form(_body(request))
        except RejectedMessage as err:
            request.setResponseCode(400)
            log.warning("demo.sms.refused", code=err.code, where=err.where)
            return json.dumps({"code": 21602, "message": err.reason}).encode()
        rng, later = self.side.rng, self.side.later
        sid = "SM" + uuid.UUID(int=rng.getrandbits(128)).hex
        self.sent.append(sid)
        status_url = form.get("StatusCallback")
        if status_url:
            for delay, status in ((0.5, "sent"), (1.5, "delivered")):
                later(delay, self._callback, status_url,
                      {"MessageSid": sid, "MessageStatus": status}, "sms-status")  # fmt: skip
        page_ref = read_reply(form["Body"]).page_ref
        inbound_url = self.gateway.callback_url
        answer = self.side.answer() if page_ref and inbound_url else None
        if answer is not None and inbound_url:
            word, digit, delay = answer
            log.info("demo.sms.will_answer", page_ref=page_ref, answer=word,
                     seconds=round(delay, 1))  # fmt: skip
            reply = {
                "MessageSid": "SM" + uuid.UUID(int=rng.getrandbits(128)).hex,
                "SmsStatus": "received",
                "From": form["To"],
                "To": form.get("From", ""),
                "Body": f"{digit} {page_ref}",
            }
            later(delay, self._callback, inbound_url, reply, "sms-reply")
            if word != "Decline" and self.side.forms is not None:
                self.side.forms.took(form["Body"], page_ref, delay)
        elif page_ref:
            log.info("demo.sms.will_not_answer", page_ref=page_ref)
        request.setResponseCode(201)
        return json.dumps({"sid": sid, "status": "queued", "to": form["To"]}).encode()

    def _callback(self, url: str, params: dict[str, str], what: str) -> None:
        signature = twilio_signature(url, {k: [v] for k, v in params.items()},
                                     self.gateway.secret or "")  # fmt: skip
        headers = {b"content-type": b"application/x-www-form-urlencoded",
                   b"x-twilio-signature": signature.encode()}  # fmt: skip
        self.side.poster.post(url, urlencode(params).encode(), headers, what)


# --- AVL ---------------------------------------------------------------------------------------


class DemoAvl:
    """Posts a fix for every roster clinician, inside their program's zone, to the web API."""

    def __init__(
        self,
        clock: Clock,
        poster: _Poster,
        rng: random.Random,
        roster: Any,
        *,
        url: str,
        token: str,
        interval: float,
    ) -> None:
        self.clock, self.poster, self.rng, self.roster = clock, poster, rng, roster
        self.url, self.token, self.interval = url, token, interval
        self._loop: Any = None
        self.rounds = 0

    def start(self) -> None:
        self._loop = self.clock.looping_call(self.interval, self.report, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _point(self, program: Any) -> tuple[float, float]:
        for _ in range(200):
            lat = CENTER[0] + self.rng.uniform(-0.06, 0.06)
            lon = CENTER[1] + self.rng.uniform(-0.06, 0.06)
            if program is None or program.covers(lat, lon):
                return round(lat, 5), round(lon, 5)
        return CENTER

    def report(self) -> None:
        self.rounds += 1
        programs = dict(self.roster.programs)
        now = self.clock.now().isoformat()
        headers = {b"content-type": b"application/json",
                   b"authorization": b"Bearer " + self.token.encode()}  # fmt: skip
        for clinician in self.roster.clinicians.values():
            if clinician.units:
                continue  # a CAD unit: the CAD feed reports where it is
            lat, lon = self._point(programs.get(clinician.program))
            body = {"clinician_id": clinician.id, "lat": lat, "lon": lon, "fixed_at": now,
                    "accuracy_m": 25}  # fmt: skip
            self.poster.post(self.url, json.dumps(body).encode(), headers, "avl-fix")
        log.info("demo.avl.reported",
                 count=sum(1 for c in self.roster.clinicians.values() if not c.units))


# --- the encounter form, as the clinician's phone fills it in ----------------------------------


class HtmlForm(HTMLParser):
    """The first ``<form>`` of a page as a browser would submit it (inputs with their values,
    checked boxes, each select's selected option, textareas), and the page's links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.fields: list[tuple[str, str]] = []
        self.links: list[str] = []
        self._select: str | None = None
        self._first_option: str | None = None
        self._selected = False
        self._textarea: str | None = None
        self._text: list[str] = []
        self._forms = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "form":
            self._forms += 1
        if self._forms != 1 or (not (name := a.get("name")) and tag != "option"):
            return
        if tag == "input":
            kind = a.get("type", "text").lower()
            if kind in ("checkbox", "radio") and "checked" not in a:
                return
            if kind not in ("submit", "button"):
                self.fields.append((name or "", a.get("value", "on" if kind == "checkbox" else "")))
        elif tag == "select":
            self._select, self._first_option, self._selected = name, None, False
        elif tag == "option" and self._select is not None:
            value = a.get("value", "")
            if self._first_option is None:
                self._first_option = value
            if "selected" in a and not self._selected:
                self._selected = True
                self.fields.append((self._select, value))
        elif tag == "textarea":
            self._textarea, self._text = name, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "select" and self._select is not None:
            if not self._selected and self._first_option is not None:
                self.fields.append((self._select, self._first_option))
            self._select = None
        elif tag == "textarea" and self._textarea is not None:
            self.fields.append((self._textarea, "".join(self._text)))
            self._textarea = None
        elif tag == "form":
            self._forms += 1  # past the first form

    def handle_data(self, data: str) -> None:
        if self._textarea is not None:
            self._text.append(data)


def read_html_form(html: bytes) -> HtmlForm:
    parser = HtmlForm()
    parser.feed(html.decode("utf-8", "replace"))
    parser.close()
    return parser


ACK_LINK = re.compile(r"https?://[^\s]+/ack/[^\s]+")
# The dispositions the demo clinicians record, with weights; resolved_with_referral is the one
# demo.yaml's referrals.auto turns into a referral.
FORM_DISPOSITIONS = (("resolved_with_referral", 0.5), ("resolved_on_scene", 0.35),
                     ("refused", 0.15))  # fmt: skip


class DemoEncounterForms:
    """A demo clinician who took a call completes its encounter on the phone: opens the page's
    ack link, follows "Complete the encounter", GETs the form and POSTs it back with the
    fields a clinician fills in (a disposition among them), over HTTP like the phone."""

    def __init__(self, reactor: Any, clock: Clock, later: _Later, rng: random.Random,
                 settings: DemoPeersConfig, *, origin: str) -> None:  # fmt: skip
        self.reactor, self.clock, self.later, self.rng = reactor, clock, later, rng
        self.settings, self.origin = settings, origin
        self.agent, self.pool = make_agent(reactor, connect_timeout=TIMEOUT)
        self.completed: list[str] = []  # page references
        self.failed = 0
        self.stopping = False

    def took(self, page_text: str, page_ref: str | None, delay: float) -> None:
        """The demo clinician answers ``page_text`` taking the call, ``delay`` seconds from now:
        for a seeded share, the form is completed a little after."""
        found = ACK_LINK.search(page_text)
        if found is None or self.rng.random() >= self.settings.form_share:
            return
        wait = delay + self.settings.reply_delay_seconds * self.rng.uniform(1.5, 2.5)
        self.later(wait, self.complete, found.group(0), page_ref)

    def complete(self, ack_url: str, page_ref: str | None) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._complete(ack_url, page_ref))

        def failed(failure: Any) -> None:
            self.failed += 1
            (log.debug if self.stopping else log.warning)(
                "demo.form.failed", page_ref=page_ref, error=error_text(failure)
            )

        return d.addErrback(failed)

    async def _get(self, url: str) -> bytes:
        answer = await request(self.agent, self.reactor, b"GET", url, timeout=TIMEOUT)
        if answer.code != 200:
            raise DemoPeersError(f"GET gave HTTP {answer.code}")
        return answer.body

    async def _complete(self, ack_url: str, page_ref: str | None) -> None:
        ack = read_html_form(await self._get(ack_url))
        link = next((u for u in ack.links if "/encounter/" in u and "/referral" not in u), None)
        if link is None:
            log.info("demo.form.not_offered", page_ref=page_ref)  # the page was not taken
            return
        url = urljoin(ack_url, link)
        form = read_html_form(await self._get(url))
        fields = [(k, v) for k, v in form.fields if k not in FILLED]
        disposition = self.rng.choices([d for d, _ in FORM_DISPOSITIONS],
                                       weights=[w for _, w in FORM_DISPOSITIONS])[0]  # fmt: skip
        fields += [("bh_nexus_confirmed", "yes"), ("disposition", disposition),
                   ("presenting_issues", self.rng.choice(("psychosis", "suicidal", "substance"))),
                   ("actions", "assessment"), ("would_have_been_ed", "no"),
                   ("use_of_force", "no"), ("action", "complete")]  # fmt: skip
        headers = {b"content-type": b"application/x-www-form-urlencoded",
                   b"origin": self.origin.encode()}  # fmt: skip
        answer = await request(self.agent, self.reactor, b"POST", url, headers=headers,
                               body=urlencode(fields).encode(), timeout=TIMEOUT)  # fmt: skip
        if answer.code != 200 or b"Saved and completed." not in answer.body:
            raise DemoPeersError(f"the form was not completed (HTTP {answer.code})")
        self.completed.append(page_ref or "")
        log.info("demo.form.completed", page_ref=page_ref)  # what was recorded stays unsaid

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


# What the demo clinician sets on the form (the rest is posted back as shown).
FILLED = frozenset({"bh_nexus_confirmed", "disposition", "presenting_issues", "actions",
                    "would_have_been_ed", "use_of_force", "action"})  # fmt: skip


# --- the provider's engine (MLLP) --------------------------------------------------------------


def build_rri(
    acked: Hl7Reply, status: str, control_id: str, now: datetime, appointment: datetime | None
) -> bytes:
    """An RRI^I12 answering the referral ``acked`` (RF1-1 ``status``: A, R or P)."""
    ts = now.strftime("%Y%m%d%H%M%S")
    when = appointment.strftime("%Y%m%d%H%M") if appointment is not None else ""
    return "\r".join([
        f"MSH|^~\\&|BHRECV|CSU|CORESPOND|COUNTY-BH|{ts}||RRI^I12^RRI_I12|{control_id}|P|2.5.1",
        f"MSA|AA|{acked.control_id}",
        f"RF1|{status}|||||{acked.originating_referral_id or ''}^CORESPOND|{when}",
    ]).encode() + b"\r"  # fmt: skip


@dataclass
class _Answered:
    code: str
    reply: bytes


class DemoProvider:
    """An MLLP receiver answering AA (a share AE), and RRI^I12 replies for some referrals."""

    def __init__(
        self,
        reactor: Any,
        clock: Clock,
        later: _Later,
        rng: random.Random,
        settings: DemoPeersConfig,
        *,
        listener: Callable[[], tuple[str, int] | None],
    ) -> None:
        self.reactor, self.clock, self.later, self.rng = reactor, clock, later, rng
        self.settings = settings
        self.listener = listener  # where the daemon takes RRI^I12 replies, once it listens
        self.answered: dict[str, _Answered] = {}  # by MSH-10: a resend gets the same answer
        self.rri_sent: list[str] = []
        self.port: Any = None

    def start(self) -> None:
        self.port = mllp.listen(self.reactor, self.settings.mllp_port,
                                mllp.MLLPServerFactory(self.handle))  # fmt: skip

    def handle(self, frame: bytes | FramingError, peer: str | None) -> bytes | None:
        if isinstance(frame, FramingError):
            return None
        try:
            message = parse_reply(frame)
        except RejectedMessage as err:
            log.warning("demo.provider.unreadable", code=err.code)
            return build_ack(None, "AR", self._control_id(), self.clock.now(),
                             text="not HL7 this engine reads", sending_application="BHRECV",
                             sending_facility="CSU")  # fmt: skip
        key = message.control_id or ""
        if key in self.answered:
            return self.answered[key].reply  # the same bytes again: the same answer
        code = "AE" if self.rng.random() < self.settings.ae_share else "AA"
        text = "demo provider: no capacity for this service today" if code == "AE" else None
        ack = build_ack(message, code, self._control_id(), self.clock.now(), text=text,
                        sending_application="BHRECV", sending_facility="CSU")  # fmt: skip
        self.answered[key] = _Answered(code, ack)
        log.info("demo.provider.answered", control_id=message.control_id, code=code)
        if code == "AA" and self.rng.random() < self.settings.rri_share:
            status = self.rng.choices("APR", weights=(0.6, 0.25, 0.15))[0]
            delay = self.settings.reply_delay_seconds * self.rng.uniform(1.0, 2.0)
            self.later(delay, self._send_rri, message, status)
        return ack

    def _control_id(self) -> str:
        return "DP" + uuid.UUID(int=self.rng.getrandbits(128)).hex[:18].upper()

    def _send_rri(self, acked: Hl7Reply, status: str) -> None:
        where = self.listener()
        if where is None:
            return
        now = self.clock.now()
        appointment = (now + timedelta(days=1)).replace(hour=10, minute=0, second=0)
        control_id = self._control_id()
        rri = build_rri(acked, status, control_id, now, appointment if status == "A" else None)

        async def send() -> None:
            proto = await mllp.connect(self.reactor, where[0], where[1], timeout=TIMEOUT)
            try:
                answer = await proto.send(rri, control_id, TIMEOUT)
            finally:
                proto.close()
            self.rri_sent.append(control_id)
            log.info("demo.provider.rri.sent", control_id=acked.control_id, state=status,
                     code=answer.ack_code)  # fmt: skip

        Deferred.fromCoroutine(send()).addErrback(
            lambda f: log.warning("demo.provider.rri.failed", error=error_text(f))
        )

    def stop(self) -> Deferred[None] | None:
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


# --- referrals of accepted calls ---------------------------------------------------------------


def _chosen(seed: int, incident_number: str, share: float) -> bool:
    """Whether the demo refers this call: the same answer on every look and every run."""
    digest = hashlib.sha256(f"{seed}:{incident_number}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def synthetic_person(rng: random.Random) -> Person:
    return Person(
        family=rng.choice(LAST),
        given=rng.choice(FIRST),
        birth_date=f"19{rng.randint(50, 99)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
        sex=rng.choice("FMU"),
        phone=f"+1-303-555-01{rng.randint(10, 99)}",
        street=f"{rng.randint(100, 9999)} {rng.choice(STREETS)}",
        city="Demoville",
        state="CO",
    )


class DemoReferrals:
    """Refers a seeded share of accepted calls to the demo provider, once each."""

    def __init__(
        self,
        clock: Clock,
        engine: Any,
        in_thread: Callable[..., Deferred[Any]],
        service: Any,
        rng: random.Random,
        settings: DemoPeersConfig,
        *,
        provider: str,
        since: datetime,
        interval: float = 5.0,
    ) -> None:
        self.clock, self.engine, self.in_thread = clock, engine, in_thread
        self.service, self.rng, self.settings = service, rng, settings
        self.provider, self.since, self.interval = provider, since, interval
        self._seen: set[str] = set()
        self._loop: Any = None
        self.created: list[str] = []

    def start(self) -> None:
        self._loop = self.clock.looping_call(self.interval, self.look, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def look(self) -> Deferred[None]:
        from corespond.daemon.store.activity import accepted_without_referral

        def read() -> list[Any]:
            with self.engine.connect() as conn:
                return accepted_without_referral(conn, self.since)

        d = self.in_thread(read)
        d.addCallback(self._refer)
        d.addErrback(lambda f: log.error("demo.referrals.failed", error=error_text(f)))
        return d

    def _refer(self, calls: Iterable[Any]) -> None:
        from corespond.daemon.referrals import ReferralRequest

        for call in calls:
            if call.incident_number in self._seen:
                continue
            self._seen.add(call.incident_number)
            if not _chosen(self.settings.seed, call.incident_number, self.settings.referral_share):
                continue
            req = ReferralRequest(
                incident_ref=call.incident_number,
                provider=self.provider,
                service_type=SERVICE_TYPE,
                referring_clinician=call.clinician_id,
                urgency="asap",
                person=synthetic_person(self.rng),
                summary=self.rng.choice(SUMMARIES),
                program=call.program,
                region=call.zone,
            )
            d = self.service.create(req)
            d.addCallback(lambda created: self.created.append(created.ref))
            d.addErrback(lambda f: log.error("demo.referrals.failed", error=error_text(f)))


# --- all of them -------------------------------------------------------------------------------


class _QuietSite(Site):
    """No access log: the demo's log shows what the peers did, in their own events."""

    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        pass


class DemoPeers:
    """Builds, starts and stops the peers ``demo.peers`` asks for, from the daemon's config."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        clock: Clock,
        *,
        engine: Any,
        in_thread: Callable[..., Deferred[Any]],
        referrals: Any,
        referral_listener: Callable[[], tuple[str, int] | None],
    ) -> None:
        assert config.demo is not None and config.demo.peers is not None
        self.settings = settings = config.demo.peers
        self.reactor, self.clock = reactor, clock
        self.poster = _Poster(reactor)
        self.later = _Later(clock)
        seed = settings.seed
        public = config.web.public_url if config.web is not None else None
        wctp = next((g for g in config.gateways if g.type == "wctp"), None)
        sms = next((g for g in config.gateways if g.type == "sms"), None)
        self.forms = (DemoEncounterForms(reactor, clock, self.later, random.Random(seed + 5),
                                         settings, origin=origin_of(public))
                      if public is not None and settings.form_share > 0 else None)  # fmt: skip
        self.carrier = DemoCarrier(
            _Side(clock, self.poster, self.later, random.Random(seed), settings, self.forms),
            callback_url=f"{public}/gateways/{wctp.name}" if wctp and public else None,
            callback_token=wctp.callback_token if wctp else None,
        )  # fmt: skip
        self.sms = (DemoSmsGateway(_Side(clock, self.poster, self.later,
                                         random.Random(seed + 1), settings, self.forms), sms)
                    if sms is not None and sms.account_sid and sms.secret else None)  # fmt: skip
        self.provider = DemoProvider(reactor, clock, self.later, random.Random(seed + 2),
                                     settings, listener=referral_listener)  # fmt: skip
        self.avl: DemoAvl | None = None
        if settings.avl_system is not None:
            system = next((s for s in (config.web.systems if config.web else ())
                           if s.name == settings.avl_system), None)  # fmt: skip
            if system is None or config.paging is None or public is None:
                raise DemoPeersError(
                    f"demo.peers.avl_system {settings.avl_system!r} needs paging and a web "
                    "section with a system of that name"
                )
            interval = max(30.0, min(300.0, config.paging.max_fix_age_seconds / 3))
            self.avl = DemoAvl(clock, self.poster, random.Random(seed + 3),
                               config.paging.roster, url=f"{public}/api/v1/location",
                               token=system.token, interval=interval)  # fmt: skip
        self.referrals: DemoReferrals | None = None
        if settings.referral_provider is not None:
            if referrals is None or config.referrals is None or (
                config.referrals.provider(settings.referral_provider) is None
            ):
                raise DemoPeersError(
                    f"demo.peers.referral_provider {settings.referral_provider!r} names no "
                    "provider of the referrals section"
                )
            self.referrals = DemoReferrals(
                clock, engine, in_thread, referrals, random.Random(seed + 4), settings,
                provider=settings.referral_provider, since=clock.now() - timedelta(minutes=1),
            )  # fmt: skip
        self._ports: list[Any] = []

    def start(self) -> None:
        for port, resource in ((self.settings.wctp_port, self.carrier),
                               (self.settings.sms_port, self.sms)):  # fmt: skip
            if resource is None:
                continue
            root = Resource()
            if isinstance(resource, DemoCarrier):
                root.putChild(b"wctp", resource)
            else:
                root.putChild(API_VERSION.encode(), resource)
            self._ports.append(
                self.reactor.listenTCP(port, _QuietSite(root), interface="127.0.0.1")
            )
        self.provider.start()
        if self.avl is not None:
            self.avl.start()
        if self.referrals is not None:
            self.referrals.start()
        log.info(
            "demo.peers.started",
            port=self.settings.wctp_port,
            count=len(self._ports) + 1,
        )

    async def stop(self) -> None:
        self.poster.stopping = True
        if self.forms is not None:
            self.forms.stopping = True
        if self.avl is not None:
            self.avl.stop()
        if self.referrals is not None:
            self.referrals.stop()
        self.later.cancel()
        for port in self._ports:
            await port.stopListening()
        self._ports = []
        stopping = self.provider.stop()
        if stopping is not None:
            await stopping
        await self.poster.close()
        if self.forms is not None:
            await self.forms.close()
