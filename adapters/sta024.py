"""NENA-STA-024 EIDO conveyance over WebSocket: we are the *subscriber*.

Two ways to get a connection, one protocol on it:

* ``subscribe``: we connect out to the notifier's ``ws://``/``wss://`` URL (reconnecting with
  exponential backoff on the feed's clock, optional ``Authorization: Bearer`` header, TLS from
  :mod:`corespond.adapters.tls`);
* ``listen``: the notifier connects to our listener (TLS and client certificates from the
  listener's settings; a bearer token, when configured, is demanded in the opening handshake).

Once the WebSocket is open we send ``{"subscribe": {requestId, requestType: "EIDO",
requestSubType, requestAccepts: "application/emergency.eido+json", ...}}`` and expect a
``subscribeResponse`` with statusCode 200 (otherwise: logged, connection closed, retried later
with growing delays). Each ``{"event": {subscriptionId, transactionId, notification: [EIDO,
...]}}`` is ingested one EIDO at a time and acknowledged with ``eventResponse`` only once every
EIDO in it is committed: 200 when all were stored, 400 (with the rejection reasons, which never
quote content) when any was rejected, 481 for an unknown subscription, 503 when storing failed
(the notifier resends; the store is idempotent). The raw bytes kept for each EIDO are the EIDO
object re-serialized compactly (``json.dumps(obj, separators=(",", ":"))``, key order kept), not
the notifier's original text, since a notification carries several EIDOs in one frame.

A message that is not JSON has no error shape in the schema for a subscriber: it is logged and
dropped, and the connection stays up. ``terminate`` is answered with ``terminateResponse`` and a
new subscription is asked for on the same connection after the first reconnect delay. A
subscription granted with ``expires`` is renewed at 80% of its lifetime. Stopping answers what
is in flight, sends ``unsubscribe``, waits briefly for the answer, then closes.

autobahn's own timers run on txaio's global reactor, so they are all switched off here; the
opening and closing handshake timeouts and the keep-alive pings run on the injected clock.
"""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import structlog
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from autobahn.websocket.util import parse_url
from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from corespond.adapters.tcp_feed import peer_name
from corespond.adapters.tls import client_tls_options
from corespond.daemon.clock import Clock
from corespond.daemon.ingest import Accepted, IngestFn, Origin
from corespond.daemon.log import error_text

if TYPE_CHECKING:
    from corespond.daemon.config import ListenConfig, WebSocketTransport

log = structlog.get_logger(__name__)

EIDO_MEDIA_TYPE = "application/emergency.eido+json"
SUB_TYPES = ("new", "single", "resource")
MODES = ("subscribe", "listen")
PUSH_MESSAGES = frozenset(
    {
        "requestForService",
        "requestAwareness",
        "requestAwarenes",
        "resourceMessage",
        "cancelRequest",
        "cancelREequest",
        "resourceDiscovery",
    }
)  # fmt: skip  (the schema misspells two of them; accept both spellings)
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 100
STATUS_TEXT_MAX = 500

ListenFn = Callable[[Any, "ListenConfig", IProtocolFactory], IListeningPort]


@dataclass(frozen=True, slots=True)
class Subscription:
    """What we ask the notifier for. ``expires``, ``min_rate``, ``max_rate`` in seconds."""

    sub_type: str = "new"
    incident_id: str | None = None
    unit_id: str | None = None
    expires: int | None = None
    min_rate: int | None = None
    max_rate: int | None = None

    def __post_init__(self) -> None:
        if self.sub_type not in SUB_TYPES:
            raise ValueError(f"requestSubType must be one of {', '.join(SUB_TYPES)}")
        if self.sub_type == "single" and not self.incident_id:
            raise ValueError("requestSubType single needs incident_id")

    def request(self, request_id: str, subscription_id: str | None = None) -> dict[str, Any]:
        """The ``subscribe`` message: a new subscription, or a renewal of ``subscription_id``."""
        body: dict[str, Any] = {"requestId": request_id}
        if subscription_id is not None:
            body["subscriptionId"] = subscription_id
        else:
            body["requestType"] = "EIDO"
            body["requestSubType"] = self.sub_type
            body["requestAccepts"] = EIDO_MEDIA_TYPE
            if self.incident_id is not None:
                body["incidentId"] = self.incident_id
            if self.unit_id is not None:
                body["unitId"] = self.unit_id
        for key, value in (("expires", self.expires), ("minRate", self.min_rate),
                           ("maxRate", self.max_rate)):  # fmt: skip
            if value is not None:
                body[key] = int(value)
        return {"subscribe": body}


@dataclass(frozen=True, slots=True)
class Timing:
    """Protocol timeouts, in seconds (``ping_interval`` None: no keep-alive pings)."""

    handshake: float = 30.0
    subscribe: float = 30.0
    unsubscribe: float = 5.0
    close: float = 5.0
    ping_interval: float | None = 30.0


def eido_bytes(eido: dict[str, Any]) -> bytes:
    """The bytes stored for one EIDO of a notification (compact, key order kept)."""
    try:
        return json.dumps(eido, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (legal as \\uD800 escapes in JSON) cannot be UTF-8: keep them escaped.
        return json.dumps(eido, separators=(",", ":")).encode("ascii")


def _short(value: object, limit: int = 100) -> str:
    return str(value)[:limit]


def _status_of(body: dict[str, Any]) -> int | None:
    code = body.get("statusCode")
    if isinstance(code, bool) or not isinstance(code, int | str):
        return None
    try:
        return int(code)
    except ValueError:
        return None


class SubscriberSession:
    """The subscriber's side of one STA-024 WebSocket; mixed into autobahn's protocols."""

    factory: Any
    transport: Any

    @property
    def feed(self) -> Sta024Feed:
        feed: Sta024Feed = self.factory.feed
        return feed

    def _session_init(self) -> None:
        self.peer_label = "unknown"
        self.subscription_id: str | None = None
        self.known_ids: set[str] = set()
        self.subscribed_once = False
        self.sta_open = False
        self.sta_closed = False
        self.sta_closing = False
        self.in_flight = 0
        self.paused = False
        self._pending: tuple[str, str] | None = None  # (requestId, "subscribe"|"renew"|...)
        self._timers: dict[str, Any] = {}  # name -> IDelayedCall
        self._last_heard = 0.0
        self._idle_waiters: list[Deferred[None]] = []
        self._unsubscribed: Deferred[None] | None = None
        self._lost_waiters: list[Deferred[None]] = []

    # --- timers on the injected clock ----------------------------------------------------------

    def _later(self, name: str, delay: float, fn: Callable[[], None]) -> None:
        self._cancel(name)

        def fire() -> None:
            self._timers.pop(name, None)
            fn()

        self._timers[name] = self.feed.clock.call_later(delay, fire)

    def _cancel(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    # --- connection life ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._session_init()
        self.peer_label = peer_name(self.transport.getPeer())
        self.feed.sessions.add(self)
        self._later("handshake", self.feed.timing.handshake, self._handshake_timeout)
        super().connectionMade()  # type: ignore[misc]

    def onOpen(self) -> None:
        self._cancel("handshake")
        self.sta_open = True
        self._last_heard = self.feed.clock.seconds()
        log.info("feed.sta024.connection.opened", feed=self.feed.name, peer=self.peer_label,
                 mode=self.feed.mode)  # fmt: skip
        if self.feed.stopping:
            self._close(1000, "stopping")
            return
        self._schedule_ping()
        self._subscribe()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.sta_closed:
            return
        self.sta_closed = True
        self.sta_open = False
        for name in list(self._timers):
            self._cancel(name)
        self.feed.sessions.discard(self)
        if not self.subscribed_once:
            self.feed.note_failure()
        log.info("feed.sta024.connection.lost", feed=self.feed.name, peer=self.peer_label,
                 clean=wasClean, code=code, subscription_id=self.subscription_id,
                 in_flight=self.in_flight)  # fmt: skip
        if self._unsubscribed is not None and not self._unsubscribed.called:
            self._unsubscribed.callback(None)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)
        self._maybe_idle()

    def _handshake_timeout(self) -> None:
        log.warning("feed.sta024.handshake.timeout", feed=self.feed.name, peer=self.peer_label)
        self._abort()

    def _abort(self) -> None:
        if not self.sta_closed and self.transport is not None:
            self.transport.abortConnection()

    def _close(self, code: int, reason: str) -> None:
        """WebSocket close handshake, cut short by our own timer if the peer never answers."""
        if self.sta_closed or self.sta_closing:
            return
        self.sta_closing = True
        self._cancel("ping")
        self.sendClose(code, reason)  # type: ignore[attr-defined]
        self._later("close", self.feed.timing.close, self._abort)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> Any:
        # The peer started the close: autobahn answers, and we give the peer (as WebSocket
        # server) our own deadline to drop the TCP connection.
        result = super().onCloseFrame(code, reasonRaw)  # type: ignore[misc]
        if not self.sta_closed and "close" not in self._timers:
            self._later("close", self.feed.timing.close, self._abort)
        return result

    def when_lost(self) -> Deferred[None]:
        if self.sta_closed:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    # --- keep-alive ----------------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        interval = self.feed.timing.ping_interval
        if interval is not None:
            self._later("ping", interval, self._ping)

    def _ping(self) -> None:
        interval = self.feed.timing.ping_interval
        assert interval is not None
        if self.feed.clock.seconds() - self._last_heard > 2 * interval:
            log.warning("feed.sta024.connection.silent", feed=self.feed.name,
                        peer=self.peer_label, seconds=2 * interval)  # fmt: skip
            self._abort()
            return
        self.sendPing()  # type: ignore[attr-defined]
        self._schedule_ping()

    def onPong(self, payload: bytes) -> None:
        self._last_heard = self.feed.clock.seconds()

    # --- sending -------------------------------------------------------------------------------

    def _send_json(self, message: dict[str, Any]) -> None:
        if self.sta_open and not self.sta_closed:
            self.sendMessage(json.dumps(message, separators=(",", ":")).encode(), False)  # type: ignore[attr-defined]

    def _subscribe(self, renew: bool = False) -> None:
        if self.sta_closed or self.sta_closing or self.feed.stopping:
            return
        request_id = str(uuid.uuid4())
        self._pending = (request_id, "renew" if renew else "subscribe")
        sub_id = self.subscription_id if renew else None
        self._send_json(self.feed.subscription.request(request_id, sub_id))
        log.info("feed.sta024.subscribe.sent", feed=self.feed.name, peer=self.peer_label,
                 request_id=request_id, renew=renew)  # fmt: skip
        self._later("subscribe", self.feed.timing.subscribe, self._subscribe_timeout)

    def _subscribe_timeout(self) -> None:
        log.warning("feed.sta024.subscribe.timeout", feed=self.feed.name, peer=self.peer_label)
        self._pending = None
        self._close(1000, "no subscribeResponse")

    # --- receiving -----------------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._last_heard = self.feed.clock.seconds()
        try:
            message = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as err:
            where = f"at character {err.pos}" if isinstance(err, json.JSONDecodeError) else ""
            log.warning("feed.sta024.message.malformed", feed=self.feed.name,
                        peer=self.peer_label, reason=f"not JSON {where}".strip(),
                        bytes=len(payload))  # fmt: skip
            return
        if not isinstance(message, dict) or len(message) != 1:
            reason = "not an object with a single member"
            log.warning("feed.sta024.message.malformed", feed=self.feed.name,
                        peer=self.peer_label, reason=reason)  # fmt: skip
            return
        ((kind, body),) = message.items()
        if not isinstance(body, dict):
            log.warning("feed.sta024.message.malformed", feed=self.feed.name,
                        peer=self.peer_label, kind=_short(kind, 40),
                        reason="message body is not an object")  # fmt: skip
            return
        handler = {
            "subscribeResponse": self._on_subscribe_response,
            "unsubscribeResponse": self._on_unsubscribe_response,
            "event": self._on_event,
            "terminate": self._on_terminate,
            "response": self._on_response,
        }.get(kind)
        if handler is not None:
            handler(body)
        elif kind in PUSH_MESSAGES:
            self._not_implemented(kind, body)
        else:
            log.warning("feed.sta024.message.unknown", feed=self.feed.name, peer=self.peer_label,
                        kind=_short(kind, 40))  # fmt: skip

    def _on_subscribe_response(self, body: dict[str, Any]) -> None:
        pending = self._pending
        if pending is None or body.get("requestId") != pending[0]:
            log.warning("feed.sta024.subscribe.unexpected", feed=self.feed.name,
                        peer=self.peer_label)  # fmt: skip
            return
        self._pending = None
        self._cancel("subscribe")
        status = _status_of(body)
        sub_id = body.get("subscriptionId")
        if status != 200 or not isinstance(sub_id, str) or not sub_id:
            log.warning("feed.sta024.subscribe.refused", feed=self.feed.name,
                        peer=self.peer_label, status=status,
                        status_text=_short(body.get("statusText", ""), 200),
                        renew=pending[1] == "renew")  # fmt: skip
            self._close(1000, "subscription refused")  # onClose counts the failure
            return
        self.subscription_id = sub_id
        self.known_ids.add(sub_id)
        self.subscribed_once = True
        self.feed.note_success()
        expires = body.get("expires")
        log.info("feed.sta024.subscribed", feed=self.feed.name, peer=self.peer_label,
                 subscription_id=_short(sub_id), expires=expires,
                 renew=pending[1] == "renew")  # fmt: skip
        if isinstance(expires, int | float) and not isinstance(expires, bool) and expires > 0:
            self._later("renew", max(1.0, 0.8 * float(expires)), lambda: self._subscribe(True))

    def _on_unsubscribe_response(self, body: dict[str, Any]) -> None:
        if self._pending is None or self._pending[1] != "unsubscribe":
            return
        if body.get("requestId") != self._pending[0]:
            return
        self._pending = None
        log.info("feed.sta024.unsubscribed", feed=self.feed.name, peer=self.peer_label,
                 status=_status_of(body))  # fmt: skip
        if self._unsubscribed is not None and not self._unsubscribed.called:
            self._unsubscribed.callback(None)

    def _on_response(self, body: dict[str, Any]) -> None:
        # The notifier's "501 Not implemented" to one of our requests.
        if self._pending is not None and body.get("requestId") == self._pending[0]:
            if self._pending[1] == "unsubscribe":
                self._on_unsubscribe_response(body)
            else:
                self._on_subscribe_response(body)

    def _on_terminate(self, body: dict[str, Any]) -> None:
        request_id = body.get("requestId")
        sub_id = body.get("subscriptionId")
        if not isinstance(request_id, str):
            log.warning("feed.sta024.terminate.malformed", feed=self.feed.name,
                        peer=self.peer_label)  # fmt: skip
            return
        known = isinstance(sub_id, str) and sub_id in self.known_ids
        self._send_json({"terminateResponse": {
            "requestId": request_id,
            "subscriptionId": sub_id if isinstance(sub_id, str) else "",
            "statusCode": 200 if known else 481,
            "statusText": "OK" if known else "No such subscription",
        }})  # fmt: skip
        log.info("feed.sta024.terminated", feed=self.feed.name, peer=self.peer_label,
                 subscription_id=_short(sub_id), known=known)  # fmt: skip
        if known and sub_id == self.subscription_id:
            self.subscription_id = None
            self._cancel("renew")
            self._later("resubscribe", self.feed.initial_delay, self._subscribe)

    def _not_implemented(self, kind: str, body: dict[str, Any]) -> None:
        request_id = body.get("requestId")
        log.info("feed.sta024.push.ignored", feed=self.feed.name, peer=self.peer_label, kind=kind)
        if isinstance(request_id, str):
            self._send_json({"response": {"requestId": request_id, "responseCode": 501,
                                     "responseText": "Not implemented"}})  # fmt: skip

    # --- events ------------------------------------------------------------------------------

    def _event_response(self, transaction_id: str, status: int, text: str) -> None:
        if self.sta_closed:
            # The notifier resends unacknowledged events; the store makes that harmless.
            log.info("feed.sta024.answer.dropped", feed=self.feed.name, peer=self.peer_label,
                     transaction_id=_short(transaction_id), status=status)  # fmt: skip
            return
        self._send_json({"eventResponse": {"transactionId": transaction_id, "statusCode": status,
                                      "statusText": text[:STATUS_TEXT_MAX]}})  # fmt: skip

    def _on_event(self, body: dict[str, Any]) -> None:
        tid = body.get("transactionId")
        if not isinstance(tid, str) or not tid:
            log.warning("feed.sta024.event.malformed", feed=self.feed.name, peer=self.peer_label,
                        reason="no transactionId: cannot be answered")  # fmt: skip
            return
        problem = self._event_problem(body)
        if problem is not None:
            status, text = problem
            log.warning("feed.sta024.event.rejected", feed=self.feed.name, peer=self.peer_label,
                        transaction_id=_short(tid), status=status, reason=text)  # fmt: skip
            self._event_response(tid, status, text)
            return
        eidos: list[dict[str, Any]] = body.get("notification") or []
        if not eidos:
            self._event_response(tid, 200, "OK (empty notification)")
            return
        self.in_flight += 1
        self.feed.in_flight += 1
        origin = Origin(self.feed.name, peer=self.peer_label, name=_short(tid))
        ingests = [maybeDeferred(self.feed.ingest, eido_bytes(e), origin) for e in eidos]
        done = DeferredList(ingests, consumeErrors=True)
        done.addCallback(self._event_done, tid)
        done.addErrback(self._bug)
        done.addBoth(self._event_settled)
        self._apply_backpressure()

    def _event_problem(self, body: dict[str, Any]) -> tuple[int, str] | None:
        sub_id = body.get("subscriptionId")
        if not isinstance(sub_id, str):
            return 400, "event.subscriptionId is missing or not a string"
        if sub_id not in self.known_ids:
            return 481, "No such subscription"
        eidos = body.get("notification", [])
        if not isinstance(eidos, list):
            return 400, "event.notification is not an array"
        for i, eido in enumerate(eidos):
            if not isinstance(eido, dict):
                return 400, f"event.notification[{i}] is not an object"
        return None

    def _event_done(self, results: Sequence[tuple[bool, Any]], tid: str) -> None:
        failures = [r for ok, r in results if not ok]
        if failures:
            log.error("feed.sta024.ingest.failed", feed=self.feed.name, peer=self.peer_label,
                      transaction_id=_short(tid),
                      error=error_text(failures[0]))  # fmt: skip
            self._event_response(tid, 503, "Could not store the notification; resend")
            return
        problems = []
        accepted = rejected = 0
        for i, (_ok, outcomes) in enumerate(results):
            for outcome in outcomes:
                if isinstance(outcome, Accepted):
                    accepted += 1
                else:
                    rejected += 1
                    problems.append(f"notification[{i}]: {outcome}")
        log.info("feed.sta024.event.answered", feed=self.feed.name, peer=self.peer_label,
                 transaction_id=_short(tid), accepted=accepted, rejected=rejected)  # fmt: skip
        if problems:
            self._event_response(tid, 400, "; ".join(problems))
        else:
            self._event_response(tid, 200, "OK")

    def _bug(self, failure: Failure) -> None:
        log.error("feed.sta024.protocol.failed", feed=self.feed.name, peer=self.peer_label,
                  error=error_text(failure))  # fmt: skip
        self._abort()

    def _event_settled(self, _: object) -> None:
        self.in_flight -= 1
        self.feed.in_flight -= 1
        self._apply_backpressure()
        self._maybe_idle()
        self.feed.maybe_drained()

    def _apply_backpressure(self) -> None:
        limit = self.feed.max_in_flight
        if self.sta_closed or self.transport is None:
            return
        if not self.paused and self.in_flight >= limit:
            self.paused = True
            self.transport.pauseProducing()
            log.info("feed.sta024.paused", feed=self.feed.name, peer=self.peer_label,
                     in_flight=self.in_flight)  # fmt: skip
        elif self.paused and self.in_flight <= limit // 2:
            self.paused = False
            self.transport.resumeProducing()

    def _maybe_idle(self) -> None:
        if self.in_flight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once every event received so far is answered."""
        if self.in_flight == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    # --- stopping ----------------------------------------------------------------------------

    def shutdown(self) -> Deferred[None]:
        """Answer what is in flight, unsubscribe (waiting briefly for the answer), close."""
        d = self.when_idle()
        d.addCallback(lambda _: self._unsubscribe())
        d.addCallback(lambda _: self._close(1000, "unsubscribed"))
        d.addCallback(lambda _: self.when_lost())
        return d

    def _unsubscribe(self) -> Deferred[None]:
        for name in ("renew", "resubscribe", "subscribe"):
            self._cancel(name)
        if self.sta_closed or self.subscription_id is None:
            return succeed(None)
        request_id = str(uuid.uuid4())
        self._pending = (request_id, "unsubscribe")
        self._unsubscribed = Deferred()
        self._send_json({"unsubscribe": {"requestId": request_id,
                                    "subscriptionId": self.subscription_id}})  # fmt: skip
        waited = self._unsubscribed

        def give_up() -> None:
            if not waited.called:
                log.info("feed.sta024.unsubscribe.timeout", feed=self.feed.name,
                         peer=self.peer_label)  # fmt: skip
                waited.callback(None)

        self._later("unsubscribe", self.feed.timing.unsubscribe, give_up)
        return waited


class SubscriberClientProtocol(SubscriberSession, WebSocketClientProtocol):  # type: ignore[misc]
    """Subscribe mode: we opened the connection."""


class SubscriberServerProtocol(SubscriberSession, WebSocketServerProtocol):  # type: ignore[misc]
    """Listen mode: the notifier connected to us."""

    def onConnect(self, request: ConnectionRequest) -> None:
        token = self.feed.token
        if token is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode(), token.encode()
        ):
            log.warning("feed.sta024.auth.refused", feed=self.feed.name, peer=self.peer_label,
                        presented=bool(header))  # fmt: skip
            raise ConnectionDeny(401, "a valid bearer token is required")
        return None


@implementer(IStreamClientEndpoint)
class TlsClientEndpoint:
    """``wrapClientTLS`` with the TLS layer's flush timer on our reactor, not the global one."""

    def __init__(
        self,
        creator: IOpenSSLClientConnectionCreator,
        wrapped: IStreamClientEndpoint,
        clock: IReactorTime,
    ) -> None:
        self.creator = creator
        self.wrapped = wrapped
        self.clock = clock

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        tls = TLSMemoryBIOFactory(self.creator, True, factory, clock=self.clock)
        d: Deferred[Any] = self.wrapped.connect(tls)
        return d.addCallback(lambda proto: proto.wrappedProtocol)


def _protocol_options(factory: Any, max_event_bytes: int) -> None:
    # Every autobahn timer would run on txaio's global reactor: ours replace them.
    factory.setProtocolOptions(
        openHandshakeTimeout=0,
        closeHandshakeTimeout=0,
        autoPingInterval=0,
        maxFramePayloadSize=max_event_bytes,
        maxMessagePayloadSize=max_event_bytes,
    )
    if isinstance(factory, WebSocketClientFactory):
        factory.setProtocolOptions(serverConnectionDropTimeout=0)


class Sta024Feed:
    """One STA-024 subscriber feed: a reconnecting client, or a listener for notifiers."""

    def __init__(
        self,
        reactor: Any,
        clock: Clock,
        ingest: IngestFn,
        *,
        feed: str,
        mode: str,
        subscription: Subscription,
        url: str | None = None,
        client_tls: IOpenSSLClientConnectionCreator | None = None,
        listen_on: ListenConfig | None = None,
        listen: ListenFn | None = None,
        token: str | None = None,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
        timing: Timing = Timing(),
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if mode == "subscribe" and url is None:
            raise ValueError("mode subscribe needs the notifier's url")
        if mode == "listen" and (listen_on is None or listen is None):
            raise ValueError("mode listen needs listen_on and listen")
        if initial_delay <= 0 or max_delay < initial_delay:
            raise ValueError("need 0 < initial_delay <= max_delay")
        self.reactor = reactor
        self.clock = clock
        self.ingest = ingest
        self.name = feed
        self.mode = mode
        self.subscription = subscription
        self.url = url
        self.client_tls = client_tls
        self.listen_on = listen_on
        self._listen = listen
        self.token = token
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.timing = timing
        self.max_event_bytes = max_event_bytes
        self.max_in_flight = max_in_flight
        self._endpoint = endpoint
        self.sessions: set[SubscriberSession] = set()
        self.in_flight = 0
        self.stopping = False
        self.failures = 0
        self._service: ClientService | None = None
        self._port: IListeningPort | None = None
        self._drain_waiters: list[Deferred[None]] = []

    @classmethod
    def from_config(
        cls,
        reactor: Any,
        clock: Clock,
        ingest: IngestFn,
        *,
        feed: str,
        transport: WebSocketTransport,
        listen: ListenFn | None = None,
        **kwargs: Any,
    ) -> Sta024Feed:
        """Build from the config layer's ``WebSocketTransport`` (TLS files are read now)."""
        sub = transport.subscription
        subscription = Subscription(
            sub_type=sub.sub_type,
            incident_id=sub.incident_id,
            expires=sub.expires_seconds,
            min_rate=None if sub.min_rate is None else int(sub.min_rate),
            max_rate=None if sub.max_rate is None else int(sub.max_rate),
        )
        client_tls = None
        if transport.mode == "subscribe" and transport.url is not None:
            secure, host, *_ = parse_url(transport.url)
            if secure:
                tls = transport.tls
                client_tls = client_tls_options(
                    host,
                    ca_file=tls.ca_file if tls else None,
                    cert_file=tls.cert_file if tls else None,
                    key_file=tls.key_file if tls else None,
                )
        return cls(
            reactor,
            clock,
            ingest,
            feed=feed,
            mode=transport.mode,
            subscription=subscription,
            url=transport.url,
            client_tls=client_tls,
            listen_on=transport.listen,
            listen=listen,
            token=transport.token,
            initial_delay=transport.reconnect.initial_delay,
            max_delay=transport.reconnect.max_delay,
            **kwargs,
        )

    # --- backoff -------------------------------------------------------------------------------

    def retry_delay(self, attempt: int) -> float:
        """Seconds before reconnect ``attempt``; grows with subscriptions refused in a row too
        (a notifier that accepts connections but refuses to subscribe is not hammered)."""
        n = max(attempt, 1) - 1 + self.failures
        return min(self.initial_delay * 2.0 ** min(n, 30), self.max_delay)

    def note_failure(self) -> None:
        self.failures += 1

    def note_success(self) -> None:
        self.failures = 0

    # --- life ----------------------------------------------------------------------------------

    def client_factory(self) -> WebSocketClientFactory:
        assert self.url is not None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        factory = WebSocketClientFactory(self.url, headers=headers, reactor=self.reactor)
        factory.protocol = SubscriberClientProtocol
        factory.feed = self  # type: ignore[attr-defined]
        factory.noisy = False
        _protocol_options(factory, self.max_event_bytes)
        return factory

    def server_factory(self) -> WebSocketServerFactory:
        factory = WebSocketServerFactory(reactor=self.reactor)
        factory.protocol = SubscriberServerProtocol
        factory.feed = self  # type: ignore[attr-defined]
        factory.noisy = False
        _protocol_options(factory, self.max_event_bytes)
        return factory

    def client_endpoint(self) -> IStreamClientEndpoint:
        if self._endpoint is not None:
            return self._endpoint
        assert self.url is not None
        secure, host, port, *_ = parse_url(self.url)
        endpoint: Any = HostnameEndpoint(self.reactor, host, port, timeout=30)
        if secure:
            creator = self.client_tls or client_tls_options(host)
            endpoint = TlsClientEndpoint(creator, endpoint, self.reactor)
        return cast(IStreamClientEndpoint, endpoint)

    def start(self) -> None:
        self.stopping = False
        if self.mode == "subscribe":
            factory: Any = self.client_factory()
            self._service = ClientService(
                self.client_endpoint(), factory, retryPolicy=self.retry_delay, clock=self.reactor
            )
            self._service.startService()
            log.info("feed.sta024.started", feed=self.name, mode=self.mode,
                     url=_redacted_url(self.url))  # fmt: skip
        else:
            assert self._listen is not None and self.listen_on is not None
            server: Any = self.server_factory()
            self._port = self._listen(self.reactor, self.listen_on, server)
            log.info("feed.sta024.listening", feed=self.name, port=self.port)

    @property
    def port(self) -> int | None:
        port: Any = self._port
        return port.getHost().port if port else None

    def stop(self) -> Deferred[None]:
        """Stop taking connections, answer what is in flight, unsubscribe, close; fires when
        every connection is closed."""
        self.stopping = True
        listening: Any = self._port
        first: Deferred[Any] = (
            maybeDeferred(listening.stopListening) if listening else succeed(None)
        )

        def sessions_down(_: object) -> Deferred[Any]:
            return DeferredList([s.shutdown() for s in list(self.sessions)], consumeErrors=True)

        def service_down(_: object) -> Deferred[Any] | None:
            if self._service is not None:
                return self._service.stopService()
            return None

        d = first.addCallback(sessions_down).addCallback(service_down)
        d.addCallback(lambda _: log.info("feed.sta024.stopped", feed=self.name))
        return d.addCallback(lambda _: None)

    def drain(self) -> Deferred[None]:
        """Fires once every event received so far is answered (the feed keeps running)."""
        if self.in_flight == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def maybe_drained(self) -> None:
        if self.in_flight == 0:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def __repr__(self) -> str:
        return f"<Sta024Feed feed={self.name!r} mode={self.mode!r}>"


def _redacted_url(url: str | None) -> str | None:
    """The URL without user info or query (either could hold a credential)."""
    if url is None:
        return None
    secure, host, port, _resource, path, _params = parse_url(url)
    return f"{'wss' if secure else 'ws'}://{host}:{port}{path}"


__all__ = [
    "EIDO_MEDIA_TYPE",
    "Sta024Feed",
    "SubscriberClientProtocol",
    "SubscriberServerProtocol",
    "SubscriberSession",
    "Subscription",
    "Timing",
    "TlsClientEndpoint",
    "eido_bytes",
]
