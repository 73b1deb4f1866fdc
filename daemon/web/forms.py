"""What the clinician's pages share: the HTML shell, its style sheet, and reading a form post.

The ack page, the encounter form and the referral form are server-rendered HTML with one
inline style sheet (allowed by its hash in the Content-Security-Policy) and no script. Each
form post is checked the same way before any field is read: it came from our own origin
(``Origin``, or ``Sec-Fetch-Site`` when the origin is ``null``), fits the site's body cap, is
``application/x-www-form-urlencoded``, parses strictly, and carries the nonce derived from its
link token with the link key (CSRF without server state).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from urllib.parse import parse_qs, urlsplit

import structlog
from twisted.web.server import Request

from corespond.adapters.tcp_feed import peer_name
from corespond.daemon.signed_links import LinkClaims, LinkRefused, LinkSigner
from corespond.daemon.web.site import body_of

log = structlog.get_logger(__name__)

FORM_TYPE = b"application/x-www-form-urlencoded"
FALLBACK = "Answer by pager or call dispatch."

# Why a post was not let through, as the clinician reads it, by status.
REFUSAL_TEXTS = {
    403: "This form did not come from your page. Open the link again.",
    413: "That was too much to send.",
    415: "That was not sent from the page.",
    400: "That was not sent from the page.",
}


@dataclass(frozen=True, slots=True)
class PageStyle:
    """An inline style sheet and the Content-Security-Policy that allows exactly it."""

    css: str

    @property
    def csp(self) -> str:
        digest = base64.b64encode(hashlib.sha256(self.css.encode()).digest()).decode()
        return (
            f"default-src 'none'; style-src 'sha256-{digest}'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        )


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, as a browser writes it in ``Origin``."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def html_page(request: Request, status: int, title: str, main: str, style: PageStyle) -> bytes:
    """A whole page: ``main`` (already escaped HTML) in the shell, with ``style``'s CSP."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"content-security-policy", style.csp.encode())
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        '<meta name=robots content="noindex, nofollow">'
        f"<title>{escape(title)}</title><style>{style.css}</style></head>"
        f"<body><main>{main}</main></body></html>\n"
    ).encode()


def message_html(text: str) -> str:
    """The body of a page that says one thing and shows no data."""
    return f"<h1>{escape(text)}</h1><p>{FALLBACK}</p>"


def same_origin(request: Request, origin: str) -> bool:
    """Whether a post came from a page of ``origin`` (as far as the browser says)."""
    sent = request.getHeader(b"origin")
    # A page under Referrer-Policy: no-referrer posts with "Origin: null"; then the
    # browser's Sec-Fetch-Site says whether the form was ours.
    if sent is not None and sent != b"null":
        return sent.decode("latin-1").lower() == origin
    site = request.getHeader(b"sec-fetch-site")
    return site is None or site == b"same-origin"


def verify_link(
    request: Request, signer: LinkSigner, token: str, now: float, event: str
) -> LinkClaims | tuple[int, str]:
    """The claims of the link a page was opened with, or (status, text) to refuse it with.
    Nothing below the token's own path is served (``postpath`` must be empty)."""
    if any(request.postpath or ()):
        return 404, "This link is not valid."
    try:
        return signer.verify(token, now)
    except LinkRefused as err:
        log.info(event, peer=peer_name(request.getClientAddress()), code=err.code)
        if err.code == "expired":
            return 410, "This link has expired."
        return 404, "This link is not valid."


def read_form(
    request: Request, *, origin: str, signer: LinkSigner, token: str, max_fields: int
) -> dict[str, list[str]] | tuple[int, str]:
    """The fields of a form post made from the page of ``token``, or why it is not let
    through: (status, code). Blank fields are kept (as ``""``)."""
    if not same_origin(request, origin):
        return 403, "cross-origin"
    body, _size = body_of(request)
    if body is None:
        return 413, "oversize"
    media = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if media != FORM_TYPE or getattr(request, "malformed_header", False):
        return 415, "unsupported"
    try:
        form = parse_qs(
            body.decode("utf-8"),
            keep_blank_values=True,
            max_num_fields=max_fields,
            strict_parsing=bool(body),
        )
    except (UnicodeDecodeError, ValueError):
        return 400, "malformed-form"
    nonces = form.pop("nonce", [])
    if len(nonces) != 1 or not signer.nonce_matches(token, nonces[0]):
        return 403, "bad-nonce"
    return form


# --- fields: a label, the control, and its problems beside it ----------------------------------


def problems_by_field(problems: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Problems keyed by the form field they belong beside (``race_ethnicity[2]`` belongs
    beside ``race_ethnicity``); those of no field are under ``""``."""
    out: dict[str, list[str]] = {}
    for where, reason in problems:
        out.setdefault(where.split("[", 1)[0], []).append(reason)
    return out


def _id(name: str) -> str:
    return "f-" + name.replace(".", "-")


def problem_attrs(name: str, problems: Mapping[str, list[str]]) -> tuple[str, str]:
    """(the attributes an input takes, the problem text after it) for field ``name``."""
    reasons = problems.get(name)
    if not reasons:
        return "", ""
    pid = _id(name) + "-problem"
    text = "; ".join(reasons)
    return (
        f' aria-invalid=true aria-describedby="{pid}"',
        f'<p class=problem id="{pid}">{escape(text)}</p>',
    )


# A field marked required says when it is needed: True (to complete the encounter) or the
# words themselves ("required" on a form that is sent only whole).
Required = bool | str


def _required_mark(required: Required) -> str:
    if not required:
        return ""
    words = "required to complete" if required is True else required
    return f" <span class=req>({escape(str(words))})</span>"


def field_select(
    name: str,
    text: str,
    options: Sequence[tuple[str, str]],
    current: str,
    problems: Mapping[str, list[str]],
    required: Required = False,
) -> str:
    attrs, after = problem_attrs(name, problems)
    opts = "".join(
        f'<option value="{escape(v)}"{" selected" if v == current else ""}>{escape(t)}</option>'
        for v, t in options
    )
    return (
        f'<div class=field><label for="{_id(name)}">{escape(text)}{_required_mark(required)}'
        f'</label><select id="{_id(name)}" name="{escape(name)}"{attrs}>{opts}</select>'
        f"{after}</div>"
    )


def field_checks(
    name: str,
    text: str,
    options: Sequence[tuple[str, str]],
    chosen: Sequence[str],
    problems: Mapping[str, list[str]],
    required: Required = False,
) -> str:
    attrs, after = problem_attrs(name, problems)
    boxes = "".join(
        f'<label class=check><input type=checkbox name="{escape(name)}" value="{escape(v)}"'
        f'{" checked" if v in chosen else ""}{attrs}>{escape(t)}</label>'
        for v, t in options
    )
    return (
        f"<div class=field><fieldset><legend>{escape(text)}{_required_mark(required)}</legend>"
        f"{boxes}{after}</fieldset></div>"
    )


def field_input(
    name: str,
    text: str,
    kind: str,
    current: str,
    problems: Mapping[str, list[str]],
    required: Required = False,
    extra: str = "",
) -> str:
    attrs, after = problem_attrs(name, problems)
    return (
        f'<div class=field><label for="{_id(name)}">{escape(text)}{_required_mark(required)}'
        f'</label><input id="{_id(name)}" name="{escape(name)}" type={kind} '
        f'value="{escape(current)}"{extra}{attrs}>{after}</div>'
    )


__all__ = [
    "FALLBACK",
    "FORM_TYPE",
    "REFUSAL_TEXTS",
    "PageStyle",
    "field_checks",
    "field_input",
    "field_select",
    "html_page",
    "message_html",
    "origin_of",
    "problem_attrs",
    "problems_by_field",
    "read_form",
    "same_origin",
    "verify_link",
]
