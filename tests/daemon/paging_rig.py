"""The real daemon (feeds, rules, store, paging, gateways, web) with stand-in carriers, for the
end-to-end paging tests: config files written here, everything on real loopback sockets.

:class:`ShiftedReactor` is a private select reactor (never the global one) whose clock is the
wall clock plus an offset the test moves: timers of the daemon (escalation waits) fire when the
test advances it, while sockets and thread pools work as in production. The test turns the
reactor itself until what it waits for has happened; every wait has a wall-clock deadline and
blocks on I/O only.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

from sqlalchemy import Engine, create_engine, text
from twisted.internet.base import BlockingResolver
from twisted.internet.defer import Deferred
from twisted.internet.selectreactor import SelectReactor
from twisted.python.failure import Failure
from twisted.web.server import Site

from corespond.adapters.http_client import HttpAnswer, make_agent, request
from corespond.adapters.sms_gateway import twilio_signature
from corespond.daemon.snapshot import GeoPoint, Location, Note, Snapshot
from tests.adapters.loopback import Loopback

T = TypeVar("T")
DEADLINE = 60.0
FIXTURES = Path(__file__).parent.parent / "fixtures" / "paging"
FEED_TOKEN = "e2e-feed-token-0123456789"
SYSTEM_TOKEN = "e2e-avl-token-0123456789"
LINK_KEY = "synthetic-e2e-link-key-0123456789-abcdefghij"
WCTP_CALLBACK_TOKEN = "e2e-wctp-callback-token"
SMS_SID = "AC" + "1" * 32
SMS_TOKEN = "e2e-sms-auth-token"
SMS_CALLBACK_URL = "https://corespond.example.test/gateways/sms-main"

MARKERS = ("ZQXNARRATIVE", "ZQXPERSON")
INCIDENT_1 = GeoPoint(30.25, -97.75)  # c-1 is 1 km away, c-2 6 km, c-3 14 km
INCIDENT_2 = GeoPoint(30.35, -97.65)  # c-3 is 1 km away, c-2 7 km, c-1 14 km
FIXES = {"c-1": (30.26, -97.75), "c-2": (30.30, -97.70), "c-3": (30.36, -97.65)}

# Synthetic clinicians, all on call (the program has no schedule), in the metro zone's area.
ROSTER = """\
timezone: America/Chicago
clinicians:
  - id: c-1
    name: Synthetic Clinician One
    program: metro
    endpoints: [{gateway: wctp-main, address: "5550101"}]
  - id: c-2
    name: Synthetic Clinician Two
    program: metro
    endpoints: [{gateway: sms-main, address: "+15550000102"}]
  - id: c-3
    name: Synthetic Clinician Three
    program: metro
    endpoints: [{gateway: wctp-main, address: "5550103"}]
programs:
  - id: metro
    zones: [{file: metro.geojson}]
    dispatch: [{gateway: sms-main, address: "+15550000999"}]
    escalation:
      - {action: page, wait_minutes: 5}
      - {action: page, wait_minutes: 5}
      - {action: dispatch}
"""


class ShiftedReactor(SelectReactor):
    """A select reactor whose time is the wall clock plus ``offset`` seconds."""

    def __init__(self) -> None:
        self.offset = 0.0
        super().__init__()
        # The default resolver needs the reactor's thread pool (a running reactor's); every
        # address here is 127.0.0.1.
        self.installResolver(BlockingResolver())

    def seconds(self) -> float:
        return time.time() + self.offset


def write_daemon_config(
    tmp: Path,
    *,
    store_url: str,
    wctp_url: str,
    sms_url: str,
    web_port: int,
    feed_port: int = 0,
    extra: str = "",
) -> Path:
    """The daemon's files: feeds, rules default, store, paging roster, gateways and web."""
    shutil.copyfile(FIXTURES / "metro.geojson", tmp / "metro.geojson")
    (tmp / "roster.yaml").write_text(ROSTER)
    secrets = {
        "feed.token": FEED_TOKEN,
        "avl.token": SYSTEM_TOKEN,
        "link.key": LINK_KEY,
        "wctp.callback": WCTP_CALLBACK_TOKEN,
        "sms.token": SMS_TOKEN,
    }
    for name, value in secrets.items():
        (tmp / name).write_text(value + "\n")
    config = tmp / "corespond.yaml"
    config.write_text(
        f"""
state_dir: {tmp / "state"}
logging: {{level: info, format: json}}
store: {{url: "{store_url}"}}
feeds:
  cad-json:
    format: jsonl
    transport:
      type: http
      listen: {{host: 127.0.0.1, port: {feed_port}}}
      path: /feeds/cad
      token_file: {tmp / "feed.token"}
paging:
  roster: {tmp / "roster.yaml"}
  lease_seconds: 10
gateways:
  wctp-main:
    type: wctp
    url: {wctp_url}
    sender_id: corespond
    callback_token_file: {tmp / "wctp.callback"}
    timeout_seconds: 10
    retries: 0
  sms-main:
    type: sms
    url: {sms_url}
    account_sid: {SMS_SID}
    auth_token_file: {tmp / "sms.token"}
    from: "+15550000001"
    callback_url: {SMS_CALLBACK_URL}
    timeout_seconds: 10
    retries: 0
web:
  listen: {{host: 127.0.0.1, port: {web_port}}}
  public_url: http://127.0.0.1:{web_port}
  link_key_file: {tmp / "link.key"}
  systems:
    avl: {{token_file: {tmp / "avl.token"}}}
{extra}"""
    )
    return config


def cad_snapshot(n: int, point: GeoPoint) -> Snapshot:
    return Snapshot(
        incident_id=f"urn:emergency:uid:incidentid:e2e{n}:psap.test.invalid",
        updated_at=datetime.now(UTC),
        call_type="EMOTIONALLY DISTURBED PERSON",
        call_type_code="EDP",
        apco_type="EDP",
        agency="police.test.invalid",
        notes=(Note(f"{MARKERS[0]} RP states {MARKERS[1]} hearing voices", datetime.now(UTC)),),
        location=Location(point),
    )


def sms_callback(form: dict[str, str]) -> tuple[bytes, dict[bytes, bytes]]:
    """An inbound-message callback as the gateway posts it: the form and its signature."""
    params = {k: [v] for k, v in form.items()}
    signature = twilio_signature(SMS_CALLBACK_URL, params, SMS_TOKEN)
    headers = {
        b"content-type": b"application/x-www-form-urlencoded",
        b"x-twilio-signature": signature.encode(),
    }
    return urlencode(form).encode(), headers


def location_body(clinician_id: str, lat: float, lon: float, at: float) -> bytes:
    fixed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    return json.dumps(
        {"clinician_id": clinician_id, "lat": lat, "lon": lon, "fixed_at": fixed}
    ).encode()


class Turner(Loopback):
    """Turns a private :class:`ShiftedReactor` until something holds, within a wall-clock
    deadline; serves stand-in carriers and makes HTTP requests on it."""

    reactor: ShiftedReactor

    def __init__(self) -> None:
        super().__init__(ShiftedReactor())
        self.agent, pool = make_agent(self.reactor)
        self.cleanups.append(pool.closeCachedConnections)

    def serve(self, resource: Any) -> int:
        return self.listen(Site(resource, reactor=self.reactor))

    def until(self, d: Deferred[T]) -> T:
        results: list[Any] = []
        d.addBoth(results.append)
        self.until_true(lambda: bool(results))
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[no-any-return]

    def until_true(self, predicate: Callable[[], bool]) -> None:
        end = time.monotonic() + DEADLINE
        while not predicate():
            if time.monotonic() > end:
                raise AssertionError("the condition did not hold within the deadline")
            self.reactor.iterate(0.01)

    def advance(self, seconds: float) -> None:
        """Move the reactor's time on, then run what became due."""
        self.reactor.offset += seconds
        self.reactor.iterate(0)

    def http(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: dict[bytes, bytes] | None = None,
    ) -> HttpAnswer:
        d = request(self.agent, self.reactor, method.encode(), url, headers=headers, body=body,
                    timeout=30)  # fmt: skip
        return self.until(d)


def rows(url: str, sql: str) -> list[Any]:
    engine: Engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)).all())
    finally:
        engine.dispose()
