"""The location and availability API: authentication, precise errors, answers after commit."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from corespond.daemon.errors import RejectedMessage
from corespond.daemon.responders import Availability, LocationFix
from corespond.daemon.web.api import parse_availability, parse_location
from tests.daemon.web.rig import NOW, PEER, SYSTEM_TOKEN, Response, WebRig, parse, raw, web_rig

FIXED_AT = "2026-11-18T09:00:00Z"
WHEN = datetime.fromtimestamp(NOW, UTC)


def fix_body(**kw: Any) -> bytes:
    body: dict[str, Any] = {
        "clinician_id": "clin-7",
        "lat": 39.7392,
        "lon": -104.9903,
        "fixed_at": FIXED_AT,
        "accuracy_m": 12.5,
    }
    body.update(kw)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def post(
    r: WebRig,
    path: str,
    body: bytes,
    token: str | None = SYSTEM_TOKEN,
    content_type: str = "application/json",
) -> Response:
    headers = [("Content-Type", content_type)]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    return r.request("POST", path, body, headers)


def rig() -> WebRig:
    return web_rig(clinicians={"clin-7": Availability.AVAILABLE, "clin/8": Availability.OFF_DUTY})


# --- location ----------------------------------------------------------------------------------


def test_a_fix_is_recorded_and_answered_only_after_the_desk_commits() -> None:
    r = rig()
    r.desks.hold = True
    headers = [("Content-Type", "application/json"), ("Authorization", f"Bearer {SYSTEM_TOKEN}")]
    transport = r.send(raw("POST", "/api/v1/location", fix_body(), headers))
    assert transport.value() == b""  # nothing before the commit
    r.desks.release()
    got = parse(transport.value())
    assert got.status == 200 and got.json() == {"recorded": "location"}
    assert r.desks.fixes == [
        LocationFix("clin-7", 39.7392, -104.9903, datetime(2026, 11, 18, 9, tzinfo=UTC),
                    "http", 12.5)
    ]  # fmt: skip


def test_a_phone_may_report_its_own_location_with_its_link_token() -> None:
    r = rig()
    got = post(r, "/api/v1/location", fix_body(accuracy_m=None), token=r.link())
    assert got.status == 200
    assert r.desks.fixes[0].accuracy_m is None
    other = post(r, "/api/v1/location", fix_body(clinician_id="clin/8"), token=r.link())
    assert other.status == 403 and other.json()["where"] == "/clinician_id"
    assert len(r.desks.fixes) == 1


def test_an_expired_link_token_is_not_a_credential() -> None:
    r = rig()
    token = r.link()
    r.reactor.advance(3600)
    got = post(r, "/api/v1/location", fix_body(), token=token)
    assert got.status == 401
    assert got.headers[b"www-authenticate"] == b'Bearer realm="corespond", error="invalid_token"'


@pytest.mark.parametrize("token", [None, "wrong", SYSTEM_TOKEN + "x", SYSTEM_TOKEN[:-1]])
def test_no_or_wrong_token_is_401(token: str | None) -> None:
    r = rig()
    got = post(r, "/api/v1/location", fix_body(), token=token)
    assert got.status == 401 and got.json()["error"] == "unauthorized"
    assert got.headers[b"www-authenticate"].startswith(b'Bearer realm="corespond"')
    assert r.desks.fixes == []


def test_a_link_token_does_not_open_the_availability_endpoint() -> None:
    r = rig()
    got = post(r, "/api/v1/clinicians/clin-7/availability", b'{"state":"off_duty"}', r.link())
    assert got.status == 401 and r.desks.availability_changes == []


@pytest.mark.parametrize(
    ("body", "code", "where"),
    [
        (fix_body(lat=91), "invalid-field", "/lat"),
        (fix_body(lon=-180.5), "invalid-field", "/lon"),
        (fix_body(lat="39.7"), "invalid-field", "/lat"),
        (fix_body(lat=True), "invalid-field", "/lat"),
        (fix_body(lat=...), "missing-field", "/lat"),
        (fix_body(clinician_id=""), "invalid-field", "/clinician_id"),
        (fix_body(clinician_id=7), "invalid-field", "/clinician_id"),
        (fix_body(fixed_at="yesterday"), "invalid-field", "/fixed_at"),
        (fix_body(fixed_at="2026-11-18T09:00:00"), "invalid-field", "/fixed_at"),
        (fix_body(fixed_at="2026-11-18T10:00:00Z"), "invalid-field", "/fixed_at"),
        (fix_body(accuracy_m=-1), "invalid-field", "/accuracy_m"),
        (fix_body(speed=3), "invalid-field", "/speed"),
        (fix_body(**{"a/b": 1}), "invalid-field", "/a~1b"),
        (b"[1, 2]", "invalid-field", None),
        (b'{"lat": NaN}', "malformed-json", None),
        (b'{"clinician_id": "clin-7", ', "malformed-json", None),
        (b"\xff\xfe{}", "bad-encoding", None),
    ],
)
def test_bad_bodies_get_400_naming_the_field(body: bytes, code: str, where: str | None) -> None:
    r = rig()
    got = post(r, "/api/v1/location", body)
    assert got.status == 400, got.body
    assert got.json()["error"] == code
    assert got.json().get("where") == where
    assert r.desks.fixes == []


def test_an_unknown_clinician_is_404_and_a_desk_failure_503() -> None:
    r = rig()
    got = post(r, "/api/v1/location", fix_body(clinician_id="nobody"))
    assert got.status == 404 and got.json() == {
        "error": "unknown-clinician",
        "reason": "no such clinician",
    }
    r.desks.broken = True
    with capture_logs() as logs:
        got = post(r, "/api/v1/location", fix_body())
    assert got.status == 503 and got.headers[b"retry-after"] == b"30"
    assert "Jane" not in repr(logs) and "555" not in repr(logs) and "Jane" not in got.text


def test_oversize_wrong_type_wrong_method_and_unknown_paths() -> None:
    r = rig()
    big = post(r, "/api/v1/location", fix_body(clinician_id="x" * 4000))
    assert big.status == 413 and big.json()["error"] == "oversize"
    assert post(r, "/api/v1/location", fix_body(), content_type="text/plain").status == 415
    got = r.request(
        "GET", "/api/v1/location", headers=[("Authorization", f"Bearer {SYSTEM_TOKEN}")]
    )
    assert got.status == 405 and got.headers[b"allow"] == b"POST"
    for path in ("/api/v1/nothing", "/api/v1/clinicians/clin-7", "/api/v2/location", "/api"):
        missing = post(r, path, fix_body())
        assert missing.status == 404 and missing.json()["error"] == "not-found", path
    assert r.desks.fixes == []


# --- availability ------------------------------------------------------------------------------


def test_availability_is_set_by_a_system() -> None:
    r = rig()
    got = post(r, "/api/v1/clinicians/clin%2F8/availability", b'{"state": "available"}')
    assert got.status == 200 and got.json() == {"clinician_id": "clin/8", "state": "available"}
    assert r.desks.availability_changes == [("clin/8", Availability.AVAILABLE, "api")]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/api/v1/clinicians/clin-7/availability", b'{"state": "asleep"}', 400, "invalid-field"),
        ("/api/v1/clinicians/clin-7/availability", b"{}", 400, "missing-field"),
        ("/api/v1/clinicians/clin-7/availability", b'{"state": "available", "x": 1}', 400,
         "invalid-field"),
        ("/api/v1/clinicians/%FF/availability", b'{"state": "available"}', 400, "invalid-field"),
        ("/api/v1/clinicians/nobody/availability", b'{"state": "available"}', 404,
         "unknown-clinician"),
    ],
)  # fmt: skip
def test_availability_errors(path: str, body: bytes, status: int, code: str) -> None:
    r = rig()
    got = post(r, path, body)
    assert got.status == status and got.json()["error"] == code
    assert r.desks.availability_changes == []


def test_json_answers_carry_the_security_headers() -> None:
    got = post(rig(), "/api/v1/location", fix_body())
    assert got.headers[b"content-type"] == b"application/json"
    assert got.headers[b"cache-control"] == b"no-store"
    assert got.headers[b"x-content-type-options"] == b"nosniff"
    assert b"frame-ancestors 'none'" in got.headers[b"content-security-policy"]
    assert b"server" not in got.headers


# --- the parsers, fuzzed -----------------------------------------------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=6),
    max_leaves=12,
)  # fmt: skip
location_like = st.fixed_dictionaries(
    {},
    optional={
        "clinician_id": st.text(max_size=140) | json_values,
        "lat": st.floats() | st.integers() | json_values,
        "lon": st.floats() | st.integers() | json_values,
        "fixed_at": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
        | st.text(max_size=40),
        "accuracy_m": st.floats() | st.none() | json_values,
    },
)


@settings(max_examples=300)
@given(st.binary(max_size=300) | location_like.map(lambda d: json.dumps(d).encode()))
def test_parse_location_returns_a_fix_or_a_precise_rejection(body: bytes) -> None:
    try:
        fix = parse_location(body, WHEN)
    except RejectedMessage as err:
        assert err.code in ("bad-encoding", "malformed-json", "invalid-field", "missing-field")
        assert err.where is None or err.where == "" or err.where.startswith("/")
        return
    assert -90 <= fix.latitude <= 90 and -180 <= fix.longitude <= 180
    assert fix.fixed_at.tzinfo is not None and fix.fixed_at <= WHEN + timedelta(minutes=5)
    assert fix.source == "http"


@given(st.binary(max_size=100) | json_values.map(lambda v: json.dumps({"state": v}).encode()))
def test_parse_availability_returns_a_state_or_a_precise_rejection(body: bytes) -> None:
    try:
        assert parse_availability(body) in set(Availability)
    except RejectedMessage as err:
        assert err.code in ("bad-encoding", "malformed-json", "invalid-field", "missing-field")


def test_deeply_nested_json_is_refused_not_crashed() -> None:
    with pytest.raises(RejectedMessage) as caught:
        parse_location(b"[" * 100_000 + b"]" * 100_000, WHEN)
    assert caught.value.code == "malformed-json"


def test_a_client_that_leaves_before_the_commit_gets_nothing_and_breaks_nothing() -> None:
    r = rig()
    r.desks.hold = True
    proto = r.site.buildProtocol(PEER)
    assert proto is not None
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    headers = [("Content-Type", "application/json"), ("Authorization", f"Bearer {SYSTEM_TOKEN}")]
    proto.dataReceived(raw("POST", "/api/v1/clinicians/clin-7/availability",
                           b'{"state": "on_scene"}', headers))  # fmt: skip
    proto.connectionLost(Failure(ConnectionLost()))
    with capture_logs() as logs:
        r.desks.release()
    assert transport.value() == b""
    assert r.desks.availability_changes == [("clin-7", Availability.ON_SCENE, "api")]
    assert [e["event"] for e in logs] == ["web.api.availability.recorded", "web.answer.dropped"]
