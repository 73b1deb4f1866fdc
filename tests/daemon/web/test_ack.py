"""The ack page over HTTP: what it shows, what it takes, and what it refuses."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from corespond.daemon.clock import Clock
from corespond.daemon.pager import PageAnswer
from corespond.daemon.signed_links import LinkKeys, LinkSigner
from corespond.daemon.web.ack import PAGE_CSP, STYLE, AckLinks
from tests.daemon.web.desks import page_view
from tests.daemon.web.rig import LINK_KEY, NOW, PUBLIC_URL, Response, WebRig, parse, raw, web_rig

PHI = ("Jane Roe", "555-0142", "1412 Main St", "schizophrenia")
ORIGIN = ("Origin", PUBLIC_URL)
FORM = ("Content-Type", "application/x-www-form-urlencoded")


def rig() -> WebRig:
    r = web_rig()
    r.desks.pages["C1445-2"] = page_view()
    r.desks.pages["C1500-1"] = page_view("C1500-1", clinician_id="clin-8")
    return r


def nonce_of(page: Response) -> str:
    found = re.search(r'name=nonce value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def tap(
    r: WebRig, token: str, answer: str, nonce: str | None = None, headers: tuple = (ORIGIN, FORM)
) -> Response:
    nonce = nonce if nonce is not None else r.signer.form_nonce(token)
    body = urlencode({"nonce": nonce, "answer": answer}).encode()
    return r.request("POST", f"/ack/{token}", body, headers)


def test_the_page_shows_the_view_fields_and_the_answers_it_takes() -> None:
    r = rig()
    got = r.request("GET", f"/ack/{r.link()}")
    assert got.status == 200
    assert got.headers[b"content-type"] == b"text/html; charset=utf-8"
    text = got.text
    for shown in ("C1445-2", "Welfare check", "1400 block of Main St", "24-001234",
                  "03:12 MST, 27 Nov", "Waiting for your answer"):  # fmt: skip
        assert shown in text, shown
    assert re.findall(r'<button type=submit name=answer value="(\w+)"', text) == [
        "accept", "decline", "en_route",
    ]  # fmt: skip
    assert "<script" not in text and "clin-7" not in text
    assert nonce_of(got) == r.signer.form_nonce(r.link())


def test_security_headers() -> None:
    r = rig()
    got = r.request("GET", f"/ack/{r.link()}")
    h = got.headers
    assert h[b"content-security-policy"] == PAGE_CSP.encode()
    assert b"frame-ancestors 'none'" in h[b"content-security-policy"]
    assert b"script-src" not in h[b"content-security-policy"]  # default-src 'none' covers it
    assert h[b"cache-control"] == b"no-store"
    assert h[b"referrer-policy"] == b"no-referrer"
    assert h[b"x-frame-options"] == b"DENY"
    assert h[b"x-content-type-options"] == b"nosniff"
    assert b"server" not in h
    assert STYLE in got.text  # the one inline style, allowed by its hash


def test_tapping_accept_records_it_after_the_commit_and_shows_the_new_state() -> None:
    r = rig()
    token = r.link()
    r.desks.hold = True
    body = urlencode({"nonce": r.signer.form_nonce(token), "answer": "accept"}).encode()
    transport = r.send(raw("POST", f"/ack/{token}", body, (ORIGIN, FORM)))
    assert transport.value() == b""
    r.desks.release()
    got = parse(transport.value())
    assert got.status == 200
    assert r.desks.answers == [("C1445-2", "clin-7", PageAnswer.ACCEPT, "ack-page")]
    assert "You accepted this page." in got.text and "<dd>Accepted</dd>" in got.text
    assert re.findall(r'value="(\w+)" class', got.text) == ["en_route", "on_scene"]


def test_chrome_style_null_origin_passes_with_same_origin_fetch_metadata() -> None:
    r = rig()
    headers = (("Origin", "null"), ("Sec-Fetch-Site", "same-origin"), FORM)
    assert tap(r, r.link(), "decline", headers=headers).status == 200
    assert r.desks.answers[0][2] is PageAnswer.DECLINE


@pytest.mark.parametrize(
    "headers",
    [
        (("Origin", "https://evil.example"), FORM),
        (("Origin", "https://corespond.example.test.evil.example"), FORM),
        (("Origin", "http://corespond.example.test"), FORM),
        (("Origin", "null"), ("Sec-Fetch-Site", "cross-site"), FORM),
        (("Sec-Fetch-Site", "same-site"), FORM),
    ],
)
def test_cross_site_posts_are_refused(headers: tuple) -> None:
    r = rig()
    got = tap(r, r.link(), "accept", headers=headers)
    assert got.status == 403 and r.desks.answers == []
    assert "Welfare" not in got.text


def test_a_wrong_or_missing_nonce_is_refused() -> None:
    r = rig()
    token = r.link()
    other = r.signer.form_nonce(r.link("C1500-1", "clin-8"))
    for nonce in (other, "", "x" * 22):
        assert tap(r, token, "accept", nonce=nonce).status == 403
    only_answer = r.request("POST", f"/ack/{token}", b"answer=accept", (ORIGIN, FORM))
    assert only_answer.status == 403
    assert r.desks.answers == []


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"answer=sleep&nonce=N", "application/x-www-form-urlencoded", 400),
        (b"answer=accept&answer=decline&nonce=N", "application/x-www-form-urlencoded", 400),
        (b"answer=accept&nonce=N", "application/json", 415),
        (b"\xff\xfe", "application/x-www-form-urlencoded", 400),
        (b"a" * 3000, "application/x-www-form-urlencoded", 413),
    ],
)
def test_malformed_forms(body: bytes, content_type: str, status: int) -> None:
    r = rig()
    token = r.link()
    body = body.replace(b"N", r.signer.form_nonce(token).encode())
    got = r.request("POST", f"/ack/{token}", body, (ORIGIN, ("Content-Type", content_type)))
    assert got.status == status and r.desks.answers == []


def test_forged_expired_and_foreign_links_show_a_plain_message_and_no_data() -> None:
    r = rig()
    token = r.link()
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    foreign = LinkSigner(LinkKeys.from_text("f" * 40), 3600).sign("C1445-2", "clin-7", NOW)
    other_clinician = r.link("C1445-2", "clin-8")
    unknown_page = r.link("C9999-1", "clin-7")
    cases = [(forged, 404), (foreign, 404), (other_clinician, 404), (unknown_page, 404),
             ("garbage", 404), (token + "/more", 404)]  # fmt: skip
    for link, status in [*cases, ("expire", 0), (token, 410)]:
        if link == "expire":
            r.reactor.advance(3600)
            continue
        for got in (
            r.request("GET", f"/ack/{link}"),
            tap(r, link, "accept", nonce=r.signer.form_nonce(link)),
        ):
            assert got.status == status, link
            assert "Welfare" not in got.text and "1400 block" not in got.text
            assert "<form" not in got.text
    assert r.desks.answers == []
    assert r.request("GET", "/ack").status == 404
    assert r.request("GET", "/ack/").status == 404


def test_an_answer_the_page_no_longer_takes_is_a_plain_409() -> None:
    r = rig()
    r.desks.pages["C1445-2"] = page_view(state="declined", answers=())
    page = r.request("GET", f"/ack/{r.link()}")
    assert "<form" not in page.text and "Declined" in page.text
    got = tap(r, r.link(), "accept")
    assert got.status == 409 and "closed" in got.text


def test_a_desk_failure_is_a_503_that_says_nothing() -> None:
    r = rig()
    r.desks.broken = True
    with capture_logs() as logs:
        got = r.request("GET", f"/ack/{r.link()}")
        posted = tap(r, r.link(), "accept")
    for response in (got, posted):
        assert response.status == 503 and response.headers[b"retry-after"] == b"30"
        assert not any(p in response.text for p in ("Jane", "555"))
    assert not any(p in repr(logs) for p in ("Jane", "555"))


def test_logs_carry_identifiers_only_never_the_token_or_view_text() -> None:
    r = rig()
    token = r.link()
    with capture_logs() as logs:
        r.request("GET", f"/ack/{token}")
        tap(r, token, "accept")
        r.request("GET", f"/ack/{token}x")
    text = repr(logs)
    assert token not in text and "Welfare" not in text and "1400 block" not in text
    events = [e["event"] for e in logs]
    assert events == ["web.ack.viewed", "web.ack.answered", "web.ack.refused"]
    assert logs[1]["answer"] == "accept" and logs[1]["page_ref"] == "C1445-2"


def test_html_in_view_fields_is_escaped() -> None:
    r = rig()
    r.desks.pages["C1445-2"] = page_view(call_type='<img src=x onerror="alert(1)">')
    got = r.request("GET", f"/ack/{r.link()}")
    assert "<img" not in got.text and "&lt;img src=x" in got.text


def test_ack_links_point_at_the_public_url() -> None:
    r = rig()
    links = AckLinks(r.signer, PUBLIC_URL + "/", Clock(r.reactor))
    url = links.url("C1445-2", "clin-7")
    assert url.startswith(f"{PUBLIC_URL}/ack/v1.")
    token = url.rsplit("/", 1)[1]
    assert r.signer.verify(token, NOW).clinician_id == "clin-7"
    assert LINK_KEY not in url


# --- fuzzed: whatever arrives, a deliberate answer, never a crash -------------------------------


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(max_size=300)
    | st.dictionaries(
        st.sampled_from(["nonce", "answer", "x", ""]), st.text(max_size=30), max_size=4
    ).map(lambda d: urlencode(d).encode()),
    use_nonce=st.booleans(),
)
def test_any_form_body_gets_a_deliberate_answer(body: bytes, use_nonce: bool) -> None:
    r = rig()
    token = r.link()
    if use_nonce:
        body += b"&nonce=" + r.signer.form_nonce(token).encode()
    got = r.request("POST", f"/ack/{token}", body, (ORIGIN, FORM))
    assert got.status in (200, 400, 403, 409, 413), got.status
    if got.status != 200:
        assert "<form" not in got.text and r.desks.answers == []


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(codec="ascii", exclude_characters="/?#% \r\n\t"), max_size=200))
def test_any_token_in_the_path_gets_a_plain_refusal(token: str) -> None:
    r = rig()
    got = r.request("GET", f"/ack/{token}")
    assert got.status in (404, 410, 400)
    assert "Welfare" not in got.text
