"""POST /api/v1/referrals: precise refusals, answered only after the referral is stored."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from twisted.internet.defer import Deferred, fail

from corespond.adapters.hl7_referral import Person
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.referrals import CreatedReferral, ReferralError, ReferralRequest
from corespond.daemon.web.referral_api import parse_referral
from tests.daemon.web.rig import SYSTEM_TOKEN, Response, WebRig, web_rig

SUMMARY = "ZQXSUMMARY hears voices, agrees to follow-up"
FAMILY = "ZQXFAMILY"


def body(**kw: Any) -> bytes:
    value: dict[str, Any] = {
        "incident_ref": "24-001234",
        "provider": "csu",
        "service_type": "crisis-stabilization",
        "referring_clinician": "clin-7",
    }
    value.update(kw)
    return json.dumps({k: v for k, v in value.items() if v is not ...}).encode()


class Creator:
    """Records requests; answers with a Deferred the test fires (after 'the commit')."""

    def __init__(self) -> None:
        self.requests: list[ReferralRequest] = []
        self.pending: list[Deferred[CreatedReferral]] = []

    def __call__(self, request: ReferralRequest) -> Deferred[CreatedReferral]:
        self.requests.append(request)
        d: Deferred[CreatedReferral] = Deferred()
        self.pending.append(d)
        return d


def post(
    r: WebRig, data: bytes, token: str | None = SYSTEM_TOKEN, key: str | None = None
) -> Any:
    headers = [("Content-Type", "application/json")]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    if key is not None:
        headers.append(("Idempotency-Key", key))
    from tests.daemon.web.rig import raw

    return r.send(raw("POST", "/api/v1/referrals", data, headers))


def answer(transport: Any) -> Response:
    from tests.daemon.web.rig import parse

    return parse(transport.value())


def test_a_referral_is_answered_201_only_after_it_is_stored() -> None:
    creator = Creator()
    r = web_rig(referrals=creator)
    with capture_logs() as logs:
        transport = post(
            r, body(summary=SUMMARY, person={"family": FAMILY, "birth_date": "19800101"})
        )
        assert transport.value() == b""  # nothing before the commit
        [request] = creator.requests
        assert request.person == Person(family=FAMILY, birth_date="19800101")
        assert request.summary == SUMMARY and request.urgency == "routine"
        creator.pending[0].callback(CreatedReferral(1, "R00001", "queued", None, "CR1"))
    got = answer(transport)
    assert got.status == 201
    assert got.json() == {"ref": "R00001", "state": "queued", "hold_reason": None}
    assert SUMMARY not in repr(logs) and FAMILY not in repr(logs)


def test_a_referral_held_for_consent_says_so() -> None:
    creator = Creator()
    r = web_rig(referrals=creator)
    transport = post(r, body(part2=True))
    assert creator.requests[0].part2 is True
    creator.pending[0].callback(
        CreatedReferral(2, "R00002", "held", "no recorded consent covers csu", None)
    )
    got = answer(transport)
    assert got.status == 201 and got.json()["state"] == "held"


def test_refusals_are_422_and_failures_503() -> None:
    r = web_rig(referrals=lambda _req: fail(ReferralError("unknown provider nowhere")))
    got = answer(post(r, body(provider="nowhere")))
    assert got.status == 422 and got.json()["error"] == "referral-refused"
    r = web_rig(referrals=lambda _req: fail(RuntimeError(f"db down {SUMMARY}")))
    with capture_logs() as logs:
        got = answer(post(r, body()))
    assert got.status == 503 and got.headers[b"retry-after"]
    assert SUMMARY not in got.text and SUMMARY not in repr(logs)


def test_system_tokens_only_and_no_endpoint_without_referrals() -> None:
    r = web_rig(referrals=Creator())
    assert answer(post(r, body(), token=None)).status == 401
    assert answer(post(r, body(), token=r.link())).status == 401  # a page link is no credential
    assert answer(post(web_rig(), body())).status == 404


@pytest.mark.parametrize(
    ("data", "code", "where"),
    [
        (body(provider=...), "missing-field", "/provider"),
        (body(urgency="whenever"), "invalid-field", "/urgency"),
        (body(part2="yes"), "invalid-field", "/part2"),
        (body(person={"nickname": "x"}), "invalid-field", "/person/nickname"),
        (body(person={"family": 3}), "invalid-field", "/person/family"),
        (body(summary="bell\x07"), "invalid-field", "/summary"),
        (body(colour="red"), "invalid-field", "/colour"),
        (b"[]", "invalid-field", None),
        (b"{", "malformed-json", None),
    ],
)
def test_bad_bodies_name_the_field(data: bytes, code: str, where: str | None) -> None:
    creator = Creator()
    got = answer(post(web_rig(referrals=creator), data))
    assert got.status == 400 and got.json()["error"] == code
    assert got.json().get("where") == where
    assert creator.requests == []


def test_a_summary_over_the_limit_is_refused() -> None:
    with pytest.raises(RejectedMessage) as caught:
        parse_referral(body(summary="x" * 4001))
    assert caught.value.where == "/summary"
    assert parse_referral(body(summary="x" * 4000)).summary == "x" * 4000


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["incident_ref", "provider", "service_type", "referring_clinician",
                         "urgency", "person", "summary", "part2", "family", "x"]),
        inner, max_size=6),
    max_leaves=12,
).map(lambda v: json.dumps(v).encode()))  # fmt: skip
def test_the_parser_refuses_precisely_or_accepts(data: bytes) -> None:
    try:
        request = parse_referral(data)
    except RejectedMessage as err:
        assert err.code in {"bad-encoding", "malformed-json", "invalid-field", "missing-field"}
    else:
        assert request.incident_ref and request.provider


def test_an_idempotency_key_is_scoped_to_the_system_and_a_replay_says_so() -> None:
    creator = Creator()
    r = web_rig(referrals=creator)
    first = post(r, body(), key="8e03978e-40d5-43e8-bc93-6894a57f9324")
    again = post(r, body(), key='"8e03978e-40d5-43e8-bc93-6894a57f9324"')  # sf-string form
    plain = post(r, body())
    keys = [q.idempotency_key for q in creator.requests]
    assert keys == ["api:avl:8e03978e-40d5-43e8-bc93-6894a57f9324"] * 2 + [None]
    creator.pending[0].callback(CreatedReferral(1, "R00001", "queued", None, "CR1"))
    creator.pending[1].callback(CreatedReferral(1, "R00001", "queued", None, "CR1", True))
    creator.pending[2].callback(CreatedReferral(2, "R00002", "queued", None, "CR2"))
    got, replayed = answer(first), answer(again)
    assert got.status == replayed.status == 201 and got.json() == replayed.json()
    assert b"idempotent-replayed" not in got.headers
    assert replayed.headers[b"idempotent-replayed"] == b"true"
    assert b"idempotent-replayed" not in answer(plain).headers


@pytest.mark.parametrize("key", ["", "has space", "x" * 101, "caf\u00e9", '"unterminated'])
def test_a_bad_idempotency_key_is_refused_before_anything_is_made(key: str) -> None:
    creator = Creator()
    got = answer(post(web_rig(referrals=creator), body(), key=key))
    assert got.status == 400 and "Idempotency-Key" in got.json()["reason"]
    assert creator.requests == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_idempotency_key_headers_never_crash(header: bytes) -> None:
    from corespond.daemon.web.referral_api import idempotency_key

    try:
        key = idempotency_key(header, "avl")
    except RejectedMessage as err:
        assert err.code == "invalid-field"
    else:
        assert key.startswith("api:avl:") and len(key) <= 8 + 100 and key.isascii()
