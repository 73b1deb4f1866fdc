"""The clinician's ack page: the link in a page opens it, four buttons answer it.

``GET /ack/<token>`` shows the :class:`~corespond.daemon.responders.PageView` of the page the
signed link names (reference, call type, general location, incident number, when paged, state)
and nothing else, with a button for each answer the page still takes. ``POST /ack/<token>``
records the tapped answer through ``PageDesk.answer`` and shows the new state; it is answered
only after the desk has committed. A link that is forged, expired or for another clinician
gets a plain message and no data.

The page is server-rendered HTML with one inline style sheet (allowed by its hash in the
Content-Security-Policy) and no script, readable on a phone in the dark: large type, white on
near-black, full-width buttons 4.5 rem high. The form is protected against cross-site posting
twice: it carries a nonce derived from the link token with the link key, and a request whose
``Origin`` (or ``Sec-Fetch-Site``) says it came from elsewhere is refused.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Protocol
from zoneinfo import ZoneInfo

import structlog
from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from corespond.adapters.tcp_feed import peer_name
from corespond.daemon.clock import Clock
from corespond.daemon.encounter_desk import TAKEN_STATES
from corespond.daemon.log import error_text
from corespond.daemon.pager import PageAnswer
from corespond.daemon.responders import DeskRefusal, PageDesk, PageView
from corespond.daemon.signed_links import LinkClaims, LinkSigner
from corespond.daemon.web.forms import (
    REFUSAL_TEXTS,
    PageStyle,
    html_page,
    message_html,
    origin_of,
    read_form,
    verify_link,
)
from corespond.daemon.web.site import RETRY_AFTER_SECONDS, answer_when

log = structlog.get_logger(__name__)

ANSWER_LABELS = {
    PageAnswer.ACCEPT: "Accept",
    PageAnswer.DECLINE: "Decline",
    PageAnswer.EN_ROUTE: "En route",
    PageAnswer.ON_SCENE: "On scene",
}
STATE_LABELS = {
    "open": "Waiting for your answer",
    "accepted": "Accepted",
    "declined": "Declined",
    "en_route": "En route",
    "on_scene": "On scene",
    "expired": "Expired: no answer is taken any more",
    "cancelled": "Cancelled: you are not needed",
}
RECORDED_LABELS = {
    PageAnswer.ACCEPT: "You accepted this page.",
    PageAnswer.DECLINE: "You declined this page.",
    PageAnswer.EN_ROUTE: "You are en route.",
    PageAnswer.ON_SCENE: "You are on scene.",
}
ANSWER_REFUSALS = {
    403: "This answer did not come from your page. Open the link again.",
    415: "That was not an answer from the page.",
    400: "That was not an answer from the page.",
}

STYLE = """
:root{color-scheme:dark}
*{box-sizing:border-box}
body{margin:0;background:#0b0b0b;color:#f5f5f5;font:1.25rem/1.45 system-ui,sans-serif}
main{max-width:32rem;margin:0 auto;padding:1rem 1rem 2rem}
.ref{margin:0;color:#d4d4d4;font-size:1.1rem;letter-spacing:.04em}
h1{margin:.2rem 0 1rem;font-size:2rem;line-height:1.2}
dl{margin:0 0 1.25rem;display:grid;grid-template-columns:auto 1fr;gap:.35rem 1rem}
dt{color:#d4d4d4}
dd{margin:0;font-weight:600}
.note{margin:0 0 1rem;padding:.75rem 1rem;border:2px solid #f5f5f5;border-radius:.5rem;
font-weight:600}
form{display:grid;gap:.9rem}
button{min-height:4.5rem;width:100%;border:3px solid #f5f5f5;border-radius:.75rem;
color:#fff;font:700 1.5rem system-ui,sans-serif;cursor:pointer}
button:focus-visible{outline:4px solid #fde047;outline-offset:3px}
.accept{background:#166534}
.decline{background:#7f1d1d}
.en_route{background:#1e3a8a}
.on_scene{background:#713f12}
nav{display:grid;gap:.9rem;margin-top:1.25rem}
nav a{display:block;padding:1.1rem 1rem;border:3px solid #93c5fd;border-radius:.75rem;
color:#bfdbfe;font-weight:700;text-align:center;text-decoration:none}
nav a:focus-visible{outline:4px solid #fde047;outline-offset:3px}
"""
ACK_STYLE = PageStyle(STYLE)
PAGE_CSP = ACK_STYLE.csp


class FormLinks(Protocol):
    """Makes the links from a taken page to its encounter and referral forms."""

    def encounter_url(self, page_ref: str, clinician_id: str) -> str: ...

    def referral_url(self, page_ref: str, clinician_id: str) -> str | None: ...


class AckLinks:
    """Makes the signed link a page carries: ``<public_url>/ack/<token>``."""

    def __init__(self, signer: LinkSigner, public_url: str, clock: Clock) -> None:
        self.signer = signer
        self.public_url = public_url.rstrip("/")
        self.clock = clock

    def url(self, page_ref: str, clinician_id: str) -> str:
        token = self.signer.sign(page_ref, clinician_id, self.clock.seconds())
        return f"{self.public_url}/ack/{token}"


def _html(request: Request, status: int, title: str, main: str) -> bytes:
    return html_page(request, status, title, main, ACK_STYLE)


def message_page(request: Request, status: int, text: str) -> bytes:
    """A page that says one thing and shows no data."""
    return _html(request, status, "corespond", message_html(text))


def _when(at: datetime, zone: ZoneInfo) -> str:
    local = (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).astimezone(zone)
    return local.strftime("%H:%M %Z, %d %b")


def view_page(
    request: Request,
    view: PageView,
    *,
    nonce: str,
    zone: ZoneInfo,
    note: str | None = None,
    status: int = 200,
    encounter_url: str | None = None,
    referral_url: str | None = None,
) -> bytes:
    """The page of ``view``: only its fields, a button per answer it still takes, and once
    the page is taken the links to the encounter form and the referral form."""
    rows = (
        ("Location", view.general_location),
        ("Incident", view.incident_ref),
        ("Paged", _when(view.paged_at, zone)),
        ("Status", STATE_LABELS.get(view.state, view.state)),
    )
    parts = [
        f"<p class=ref>Page {escape(view.page_ref)}</p>",
        f"<h1>{escape(view.call_type)}</h1>",
    ]
    if note is not None:
        parts.append(f"<p class=note role=status>{escape(note)}</p>")
    parts.append(
        "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows) + "</dl>"
    )
    offered = [a for a in ANSWER_LABELS if a in view.answers]
    if offered:
        buttons = "".join(
            f'<button type=submit name=answer value="{a.value}" class="{a.value}">'
            f"{ANSWER_LABELS[a]}</button>"
            for a in offered
        )
        parts.append(
            f'<form method=post><input type=hidden name=nonce value="{escape(nonce)}">'
            f"{buttons}</form>"
        )
    links = [
        (url, text)
        for url, text in ((encounter_url, "Complete the encounter"),
                          (referral_url, "Refer to a provider"))
        if url is not None
    ]  # fmt: skip
    if view.state in TAKEN_STATES and links:
        parts.append(
            "<nav>" + "".join(f'<a href="{escape(u)}">{escape(t)}</a>' for u, t in links)
            + "</nav>"
        )
    return _html(request, status, f"Page {view.page_ref}", "".join(parts))


class AckPages(Resource):
    """``/ack``: each child is a link token."""

    def __init__(
        self,
        desk: PageDesk,
        *,
        signer: LinkSigner,
        clock: Clock,
        public_url: str,
        zone: ZoneInfo,
        forms: FormLinks | None = None,
    ) -> None:
        super().__init__()
        self.desk = desk
        self.forms = forms
        self.signer = signer
        self.clock = clock
        self.origin = origin_of(public_url)
        self.zone = zone

    def getChild(self, path: bytes, request: Request) -> IResource:
        return AckLink(self, path.decode("ascii", "replace"))

    def render(self, request: Request) -> bytes:
        return message_page(request, 404, "This link is not valid.")


class AckLink(Resource):
    """One link: its page on GET, an answer on POST."""

    isLeaf = True

    def __init__(self, pages: AckPages, token: str) -> None:
        super().__init__()
        self.pages = pages
        self.token = token

    def _claims(self, request: Request) -> LinkClaims | bytes:
        """The link's claims, or the page that refuses it."""
        pages = self.pages
        claims = verify_link(request, pages.signer, self.token, pages.clock.seconds(),
                             "web.ack.refused")  # fmt: skip
        if isinstance(claims, tuple):
            return message_page(request, *claims)
        return claims

    def render_GET(self, request: Request) -> bytes | int:
        claims = self._claims(request)
        if isinstance(claims, bytes):
            return claims
        d = maybeDeferred(self.pages.desk.view, claims.page_ref)
        return answer_when(
            request,
            d,
            lambda view: self._show(request, claims, view),
            lambda f: self._unavailable(request, f),
        )

    def _show(self, request: Request, claims: LinkClaims, view: PageView | None) -> bytes:
        if view is None or view.clinician_id != claims.clinician_id:
            log.info("web.ack.refused", page_ref=claims.page_ref, code="no-page")
            return message_page(request, 404, "This page is no longer available.")
        log.info("web.ack.viewed", page_ref=view.page_ref, clinician_id=view.clinician_id,
                 state=view.state)  # fmt: skip
        encounter_url, referral_url = self._form_links(view)
        return view_page(request, view, nonce=self.pages.signer.form_nonce(self.token),
                         zone=self.pages.zone, encounter_url=encounter_url,
                         referral_url=referral_url)  # fmt: skip

    def _form_links(self, view: PageView) -> tuple[str | None, str | None]:
        """(encounter form URL, referral form URL) a taken page links to."""
        forms = self.pages.forms
        if forms is None or view.state not in TAKEN_STATES:
            return None, None
        return (
            forms.encounter_url(view.page_ref, view.clinician_id),
            forms.referral_url(view.page_ref, view.clinician_id),
        )

    def _unavailable(self, request: Request, failure: Failure) -> bytes:
        log.error("web.ack.desk.failed", error=error_text(failure))
        request.setHeader(b"retry-after", str(RETRY_AFTER_SECONDS).encode())
        return message_page(request, 503, "The page cannot be shown right now. Try again.")

    def render_POST(self, request: Request) -> bytes | int:
        claims = self._claims(request)
        if isinstance(claims, bytes):
            return claims
        peer = peer_name(request.getClientAddress())
        answer = self._form_answer(request)
        if not isinstance(answer, PageAnswer):
            status, code = answer
            log.info("web.ack.refused", peer=peer, page_ref=claims.page_ref, code=code,
                     status=status)  # fmt: skip
            return message_page(request, status, ANSWER_REFUSALS.get(status,
                                                                     REFUSAL_TEXTS[status]))
        d = maybeDeferred(self.pages.desk.answer, claims.page_ref, claims.clinician_id, answer,
                          "ack-page")  # fmt: skip
        return answer_when(
            request,
            d,
            lambda view: self._answered(request, claims, answer, view),
            lambda f: self._not_taken(request, claims, f),
        )

    def _form_answer(self, request: Request) -> PageAnswer | tuple[int, str]:
        """The answer this POST carries, or why it is not let through (status, code)."""
        form = read_form(request, origin=self.pages.origin, signer=self.pages.signer,
                         token=self.token, max_fields=8)  # fmt: skip
        if isinstance(form, tuple):
            return form
        answers = form.get("answer", [])
        if len(answers) != 1 or answers[0] not in {a.value for a in PageAnswer}:
            return 400, "unknown-answer"
        return PageAnswer(answers[0])

    def _answered(
        self, request: Request, claims: LinkClaims, answer: PageAnswer, view: PageView
    ) -> bytes:
        log.info("web.ack.answered", page_ref=claims.page_ref, clinician_id=claims.clinician_id,
                 answer=answer.value, state=view.state)  # fmt: skip
        encounter_url, referral_url = self._form_links(view)
        return view_page(request, view, nonce=self.pages.signer.form_nonce(self.token),
                         zone=self.pages.zone, note=RECORDED_LABELS[answer],
                         encounter_url=encounter_url, referral_url=referral_url)  # fmt: skip

    def _not_taken(self, request: Request, claims: LinkClaims, failure: Failure) -> bytes:
        if not failure.check(DeskRefusal):
            return self._unavailable(request, failure)
        err = failure.value
        assert isinstance(err, DeskRefusal)
        status = 404 if err.code in ("unknown-page", "not-your-page") else 409
        log.info("web.ack.refused", page_ref=claims.page_ref, code=err.code, status=status)
        if status == 404:
            return message_page(request, 404, "This page is no longer available.")
        if err.code == "page-closed":
            return message_page(request, 409, "This page is closed; your answer was not needed.")
        return message_page(request, 409, "Your answer could not be recorded.")


__all__ = ["AckLinks", "AckPages", "FormLinks", "origin_of", "view_page"]
