"""The daemon's HTTP listener: one twisted.web Site, resources mounted by path.

:class:`WebSite` serves the clinician's ack page (``/ack/<token>``) and the API
(``/api/v1/...``); more resources (gateway callbacks, the dashboard) are mounted on it with
:meth:`WebSite.mount`. Every response carries the security headers below; bodies are kept in
memory up to ``max_body_bytes`` and never spill to a temporary file (they may hold protected
information); there is no access log, no traceback page and no ``Server`` banner.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import structlog
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from corespond.adapters.http_feed import CappedBody, _FeedRequest
from corespond.daemon.log import error_text

log = structlog.get_logger(__name__)
T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 65_536
DEFAULT_IDLE_TIMEOUT = 60.0
RETRY_AFTER_SECONDS = 30

# What every response says, whatever produced it. Pages that need more (the ack page's style)
# replace the Content-Security-Policy with their own, as strict.
BASE_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-store"),
    (b"pragma", b"no-cache"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"x-robots-tag", b"noindex, nofollow"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"content-security-policy", BASE_CSP.encode()),
)
HSTS = b"max-age=31536000"


def json_response(request: Request, status: int, body: Mapping[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def json_error(
    request: Request, status: int, code: str, reason: str, where: str | None = None
) -> bytes:
    body = {"error": code, "reason": reason}
    if where is not None:
        body["where"] = where
    return json_response(request, status, body)


def plain_response(request: Request, status: int, text: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return text.encode() + b"\n"


def body_of(request: Request) -> tuple[bytes | None, int]:
    """The request body, or None when it overflowed the site's cap; and its size."""
    content = request.content
    if content is None:
        return b"", 0
    if isinstance(content, CappedBody):
        if content.overflowed:
            return None, content.received
        content.seek(0)
        return content.read(), content.received
    content.seek(0)
    data = content.read()
    return data, len(data)


def answer_when(
    request: Request,
    d: Deferred[T],
    done: Callable[[T], bytes],
    failed: Callable[[Failure], bytes],
) -> int:
    """Answer ``request`` once ``d`` fires (the desk committed), with ``done(result)`` or
    ``failed(failure)``; nothing is written to a client that has gone meanwhile."""
    gone = False

    def left(_: Failure) -> None:
        nonlocal gone
        gone = True

    def write(body: bytes) -> None:
        if gone:
            log.info(
                "web.answer.dropped", path=request.path.split(b"/")[1].decode("ascii", "replace")
            )
            return
        request.write(body)
        request.finish()

    def bug(failure: Failure) -> None:
        log.error("web.request.failed", error=error_text(failure))
        if not gone:
            request.loseConnection()

    request.notifyFinish().addErrback(left)
    d.addCallbacks(done, failed).addCallback(write).addErrback(bug)
    return NOT_DONE_YET


class NotFound(Resource):
    """404 for anything not mounted: JSON under ``/api``, plain text elsewhere. Says nothing
    about what exists."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        if request.path == b"/api" or request.path.startswith(b"/api/"):
            return json_error(request, 404, "not-found", "nothing at this path")
        return plain_response(request, 404, "Not found.")


class Directory(Resource):
    """A path segment that only routes to its children; itself and unknown children are 404."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return NotFound()

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


class WebRequest(_FeedRequest):
    """Sets the security headers on every response (and, like the feed listener's requests,
    sends no ``Server`` banner and answers 400 to control characters in Content-Type)."""

    def process(self) -> None:
        for name, value in SECURITY_HEADERS:
            self.setHeader(name, value)
        if self.isSecure():
            self.setHeader(b"strict-transport-security", HSTS)
        super().process()


class WebSite(Site):
    """The listener's HTTP factory. ``mount("/gateways/twilio", resource)`` adds a resource."""

    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        reactor: IReactorTime | None = None,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")
        kwargs: dict[str, Any] = {"timeout": idle_timeout}
        if reactor is not None:
            kwargs["reactor"] = reactor
        super().__init__(Directory(), requestFactory=WebRequest, **kwargs)
        self.max_body_bytes = max_body_bytes

    def mount(self, path: str, resource: IResource) -> None:
        """Serve ``resource`` at ``path`` (``/a/b``) and below; refuses to shadow a mount."""
        segments = [s.encode() for s in path.strip("/").split("/")]
        if not path.startswith("/") or not all(segments):
            raise ValueError(f"mount path {path!r} must look like /name or /name/name")
        node: Resource = self.resource
        for segment in segments[:-1]:
            child = node.children.get(segment)
            if child is None:
                child = Directory()
                node.putChild(segment, child)
            elif not isinstance(child, Directory):
                raise ValueError(f"{path!r} would be under a resource already mounted")
            node = child
        if segments[-1] in node.children:
            raise ValueError(f"something is already mounted at {path!r}")
        node.putChild(segments[-1], resource)

    def getContentFile(self, length: int | None) -> CappedBody:
        return CappedBody(self.max_body_bytes, declared=length)

    def log(self, request: http.Request) -> None:
        pass  # web.* events say what matters, without the URL (it holds link tokens)


__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "SECURITY_HEADERS",
    "Directory",
    "NotFound",
    "WebRequest",
    "WebSite",
    "body_of",
    "json_error",
    "json_response",
    "plain_response",
]
