"""CAD feeds pushed by HTTP POST (NENA EIDO JSON and any other format a feed names).

One :class:`FeedResource` per feed; :func:`build_feed_site` puts several behind one listener,
each at its own path. A POST is answered only after the ingest Deferred fires, which the
pipeline does after the commit, so a 200 means "stored":

=======  =======================================================================================
status   meaning (the body is always JSON, and never quotes the request)
=======  =======================================================================================
200      ``{"results": [{"incident_id": "...", "snapshot": "new" | "duplicate"}, ...]}``
400      one message: ``{"error": code, "reason": ..., "where": ...}``; several (newline-delimited
         JSON) with any rejected: ``{"results": [...]}``, each a result or an error object
401      no or wrong ``Authorization: Bearer <token>`` (``WWW-Authenticate: Bearer``)
404      no feed at this path
405      not a POST (``Allow: POST``)
413      body larger than the feed's ``max_message_bytes``
415      ``Content-Type`` not one the feed accepts (only when the feed lists some)
503      storing failed or the daemon is stopping (``Retry-After``): send the same body again
=======  =======================================================================================

Rejected messages are quarantined by the pipeline; the store is idempotent, so resending after
a 503 or a lost connection never duplicates a snapshot. A body over the limit is refused at the
door with 413: Twisted reads it whole before the resource sees the request, so the site keeps at
most the largest feed limit in memory and drops the rest as it arrives (bodies never go to a
temporary file on disk, since they hold protected information).
"""

from __future__ import annotations

import hmac
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from corespond.adapters.tcp_feed import peer_name
from corespond.daemon.ingest import Accepted, IngestFn, Origin, Outcome, Rejected
from corespond.daemon.log import error_text

log = structlog.get_logger(__name__)

RETRY_AFTER_SECONDS = 30
DEFAULT_IDLE_TIMEOUT = 60.0


@dataclass(slots=True)
class _Exchange:
    """One request waiting for its ingest; ``gone`` once the client left or it was answered."""

    request: Request
    peer: str
    gone: bool = False


class CappedBody(io.BytesIO):
    """A request body that keeps at most ``cap`` bytes; past that it only counts.

    Twisted writes the body here as it arrives (``Site.getContentFile``), so an oversized
    upload costs bandwidth but never more than ``cap`` bytes of memory.
    """

    def __init__(self, cap: int, declared: int | None = None) -> None:
        super().__init__()
        self.cap = cap
        self.received = 0
        self.overflowed = declared is not None and declared > cap

    def write(self, data: Any) -> int:
        size = len(data)
        self.received += size
        if not self.overflowed and self.received > self.cap:
            self.overflowed = True
            self.seek(0)
            self.truncate()  # free what was kept: it will never be read
        if not self.overflowed:
            super().write(data)
        return size


def _json_body(request: Request, status: int, body: Mapping[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _error(request: Request, status: int, code: str, reason: str) -> bytes:
    return _json_body(request, status, {"error": code, "reason": reason})


def outcome_json(outcome: Outcome) -> dict[str, str]:
    """One outcome as it appears in a response body."""
    if isinstance(outcome, Accepted):
        return {"incident_id": outcome.incident_id, "snapshot": str(outcome.snapshot)}
    return outcome.as_json()


def response_for(outcomes: Sequence[Outcome]) -> tuple[int, dict[str, Any]]:
    """The status and body that answer a payload whose messages had ``outcomes``."""
    if len(outcomes) == 1 and isinstance(outcomes[0], Rejected):
        return 400, outcomes[0].as_json()
    status = 200 if all(isinstance(o, Accepted) for o in outcomes) else 400
    return status, {"results": [outcome_json(o) for o in outcomes]}


def _media_type(value: bytes | None) -> str:
    if not value:
        return ""
    return value.split(b";", 1)[0].strip().decode("latin-1").lower()


class FeedResource(Resource):
    """Takes the POSTs of one CAD feed and hands each body to ``ingest``.

    ``token``: the bearer token senders must present (``None``: no authentication; the config
    layer allows that only when asked explicitly). ``content_types``: the media types accepted
    (empty: any). ``retry_after``: seconds suggested to the sender after a 503.
    """

    isLeaf = True

    def __init__(
        self,
        ingest: IngestFn,
        *,
        feed: str,
        token: str | None,
        max_message_bytes: int,
        content_types: tuple[str, ...] = (),
        retry_after: int = RETRY_AFTER_SECONDS,
    ) -> None:
        super().__init__()
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be at least 1")
        if token is not None and not token:
            raise ValueError("token must not be empty (use None for no authentication)")
        self.ingest = ingest
        self.feed = feed
        self._token = token.encode() if token is not None else None
        self.max_message_bytes = max_message_bytes
        self.content_types = tuple(t.lower() for t in content_types)
        self.retry_after = retry_after
        self._in_flight: list[_Exchange] = []
        self._draining = False
        self._drain_waiters: list[Deferred[None]] = []

    @property
    def unanswered(self) -> int:
        """Requests handed to ingest and not yet answered (or abandoned by their client)."""
        return len(self._in_flight)

    def render(self, request: Request) -> bytes | int:
        peer = peer_name(request.getClientAddress())
        refusal = self._refusal(request)
        if refusal is not None:
            status, body = refusal
            log.info("feed.http.request.refused", feed=self.feed, peer=peer, status=status)
            return body
        content = request.content
        assert content is not None
        if isinstance(content, CappedBody):
            too_big = content.overflowed or content.received > self.max_message_bytes
            size = content.received
        else:
            size = content.seek(0, io.SEEK_END)
            too_big = size > self.max_message_bytes
        if too_big:
            log.warning("feed.http.request.oversize", feed=self.feed, peer=peer, bytes=size,
                        limit=self.max_message_bytes)  # fmt: skip
            return _error(request, 413, "oversize",
                          f"body of {size} bytes exceeds the feed's limit of "
                          f"{self.max_message_bytes} bytes")  # fmt: skip
        content.seek(0)
        body = content.read()
        if not body:
            log.info("feed.http.request.refused", feed=self.feed, peer=peer, status=400)
            return _error(request, 400, "missing-field", "the request body is empty")
        exchange = _Exchange(request, peer)
        self._in_flight.append(exchange)
        request.notifyFinish().addErrback(self._client_gone, exchange)
        d = maybeDeferred(self.ingest, body, Origin(self.feed, peer=peer))
        d.addCallbacks(self._answer, self._ingest_failed,
                       callbackArgs=(exchange,), errbackArgs=(exchange,))  # fmt: skip
        d.addErrback(self._bug, exchange)
        d.addBoth(lambda _: self._settled(exchange))
        return NOT_DONE_YET

    def _refusal(self, request: Request) -> tuple[int, bytes] | None:
        """The answer to a request that is not let through to ingest, if it is one."""
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return 405, _error(request, 405, "method-not-allowed", "this feed takes POST only")
        if getattr(request, "malformed_header", False):
            return 400, _error(request, 400, "invalid-field", "a header holds control characters")
        if self._token is not None and not self._authorized(request):
            presented = request.getHeader(b"authorization") is not None
            challenge = b'Bearer realm="corespond"'
            if presented:
                challenge += b', error="invalid_token"'
            request.setHeader(b"www-authenticate", challenge)
            return 401, _error(request, 401, "unauthorized",
                               "a valid Authorization: Bearer token is required")  # fmt: skip
        if self.content_types:
            media = _media_type(request.getHeader(b"content-type"))
            if media not in self.content_types:
                return 415, _error(request, 415, "unsupported",
                                   f"Content-Type must be one of "
                                   f"{', '.join(self.content_types)}")  # fmt: skip
        if self._draining:
            request.setHeader(b"retry-after", str(self.retry_after).encode())
            return 503, _error(request, 503, "unavailable", "the daemon is stopping; retry later")
        return None

    def _authorized(self, request: Request) -> bool:
        assert self._token is not None
        header = request.getHeader(b"authorization") or b""
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credentials.strip(), self._token)

    def _client_gone(self, failure: Failure, exchange: _Exchange) -> None:
        if not exchange.gone:
            exchange.gone = True
            log.info("feed.http.client.gone", feed=self.feed, peer=exchange.peer,
                     error=error_text(failure))  # fmt: skip

    def _answer(self, outcomes: Sequence[Outcome], exchange: _Exchange) -> None:
        status, body = response_for(outcomes)
        accepted = sum(1 for o in outcomes if isinstance(o, Accepted))
        # cad.snapshot.stored already says what a 200 did: one line per snapshot is enough.
        (log.debug if status == 200 else log.info)(
            "feed.http.request.answered", feed=self.feed, peer=exchange.peer, status=status,
            accepted=accepted, rejected=len(outcomes) - accepted,
        )  # fmt: skip
        self._finish(exchange, status, body)

    def _ingest_failed(self, failure: Failure, exchange: _Exchange) -> None:
        log.error("feed.http.ingest.failed", feed=self.feed, peer=exchange.peer,
                  error=error_text(failure))  # fmt: skip
        exchange.request.setHeader(b"retry-after", str(self.retry_after).encode())
        reason = "the message could not be stored; retry later"
        self._finish(exchange, 503, {"error": "unavailable", "reason": reason})

    def _bug(self, failure: Failure, exchange: _Exchange) -> None:
        log.error("feed.http.protocol.failed", feed=self.feed, peer=exchange.peer,
                  error=error_text(failure))  # fmt: skip
        if not exchange.gone:
            exchange.gone = True
            exchange.request.loseConnection()

    def _finish(self, exchange: _Exchange, status: int, body: Mapping[str, Any]) -> None:
        if exchange.gone:
            # The client left before the commit finished: the store has it, the sender will
            # resend and get "duplicate". Nothing can be written to a finished request.
            log.info("feed.http.answer.dropped", feed=self.feed, peer=exchange.peer, status=status)
            return
        exchange.gone = True
        request = exchange.request
        request.write(_json_body(request, status, body))
        request.finish()

    def _settled(self, exchange: _Exchange) -> None:
        self._in_flight.remove(exchange)
        if not self._in_flight:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def drain(self) -> Deferred[None]:
        """Refuse new requests with 503 and fire once every request in flight is answered.
        (Stopping the listener is the caller's.)"""
        self._draining = True
        if not self._in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def __repr__(self) -> str:
        return f"<FeedResource feed={self.feed!r}>"


class _Routes(Resource):
    """Dispatches by exact path (a trailing slash is forgiven); everything else is a JSON 404."""

    isLeaf = True

    def __init__(self, routes: Mapping[str, FeedResource]) -> None:
        super().__init__()
        self.routes = {_normal_path(p.encode()): r for p, r in routes.items()}

    def render(self, request: Request) -> bytes | int:
        route = self.routes.get(_normal_path(request.path))
        if route is None:
            return _error(request, 404, "not-found", "no feed at this path")
        return route.render(request)


def _normal_path(path: bytes) -> bytes:
    path = path.split(b"?", 1)[0]
    return path.rstrip(b"/") or b"/"


# Bytes that are never valid in a header value (RFC 9110 5.5), plus NEL, which Python's
# str.splitlines also treats as a line break.
_BAD_HEADER_BYTES = frozenset(range(0x20)) - {0x09} | {0x7F, 0x85}


class _FeedRequest(Request):
    malformed_header = False

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # Twisted parses Content-Type of every POST through the email package, which raises
        # (and drops the connection without an answer) on control characters such as VT.
        # We never use form arguments: neutralise the header and answer 400 instead.
        values = self.requestHeaders.getRawHeaders(b"content-type") or []
        if any(_BAD_HEADER_BYTES.intersection(v) for v in values):
            self.malformed_header = True
            self.requestHeaders.removeHeader(b"content-type")
        super().requestReceived(command, path, version)

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        # Twisted stamps "Server: TwistedWeb/<version>" on every response; we send no banner.
        if (name.encode() if isinstance(name, str) else name).lower() == b"server":
            return
        super().setHeader(name, value)


class FeedSite(Site):
    """The HTTP factory for :func:`build_feed_site`: capped in-memory bodies, no access log
    (``feed.http.request.*`` events say what matters), no tracebacks, no version banner."""

    displayTracebacks = False
    noisy = False

    def __init__(self, routes: Mapping[str, FeedResource], **kwargs: Any) -> None:
        # No form arguments: Twisted would parse every POST's Content-Type with the email
        # package, whose header registry makes a new class per header - two per snapshot of
        # cyclic garbage (~1,200 classes per 600 snapshots) for the collector to walk.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(_Routes(routes), requestFactory=_FeedRequest, **kwargs)
        self.feeds = list({id(r): r for r in routes.values()}.values())
        self.body_cap = max((r.max_message_bytes for r in routes.values()), default=0)

    def getContentFile(self, length: int | None) -> CappedBody:
        return CappedBody(self.body_cap, declared=length)

    def log(self, request: http.Request) -> None:
        pass

    def drain(self) -> Deferred[None]:
        """Drain every feed of this site (see :meth:`FeedResource.drain`)."""
        drained = DeferredList([r.drain() for r in self.feeds], consumeErrors=True)
        return drained.addCallback(lambda _: None)


def build_feed_site(
    routes: Mapping[str, FeedResource],
    *,
    reactor: IReactorTime | None = None,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
) -> FeedSite:
    """One HTTP site serving ``routes`` (path -> feed), e.g. ``{"/feeds/cad-a": resource}``.

    ``reactor`` drives the idle-connection timeout (``None``: Twisted's global reactor; the
    daemon passes its own). Listen on it with ``listenTCP``/``listenSSL``.
    """
    for path in routes:
        if not path.startswith("/"):
            raise ValueError(f"feed path {path!r} must start with /")
    kwargs: dict[str, Any] = {"timeout": idle_timeout}
    if reactor is not None:
        kwargs["reactor"] = reactor
    return FeedSite(routes, **kwargs)


__all__ = [
    "RETRY_AFTER_SECONDS",
    "CappedBody",
    "FeedResource",
    "FeedSite",
    "build_feed_site",
    "outcome_json",
    "response_for",
]
