"""Signed ack-page links: genuine ones open, every altered, foreign or expired one is refused."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corespond.daemon.signed_links import (
    MAX_TOKEN_CHARS,
    LinkClaims,
    LinkKeys,
    LinkRefused,
    LinkSigner,
)

KEY = "k" * 40
OTHER = "o" * 40
NOW = 1_790_000_000.0
SIGNER = LinkSigner(LinkKeys.from_text(KEY), lifetime=3600)
TOKEN = SIGNER.sign("C1445-2", "clin-7", NOW)

ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=128)


def test_a_genuine_link_opens_until_it_expires() -> None:
    assert SIGNER.verify(TOKEN, NOW) == LinkClaims("C1445-2", "clin-7", int(NOW) + 3600)
    assert SIGNER.verify(TOKEN, NOW + 3599.9).page_ref == "C1445-2"
    with pytest.raises(LinkRefused) as caught:
        SIGNER.verify(TOKEN, NOW + 3600)
    assert caught.value.code == "expired"


def test_tokens_are_url_safe_and_short_enough_for_an_sms() -> None:
    assert all(c.isalnum() or c in "-_." for c in TOKEN)
    assert len(TOKEN) < 100


@given(page_ref=ids, clinician_id=ids, lifetime=st.integers(1, 10**7))
def test_any_ids_round_trip(page_ref: str, clinician_id: str, lifetime: int) -> None:
    signer = LinkSigner(LinkKeys.from_text(KEY), lifetime)
    token = signer.sign(page_ref, clinician_id, NOW)
    assert signer.verify(token, NOW) == LinkClaims(page_ref, clinician_id, int(NOW) + lifetime)


@given(position=st.integers(0, len(TOKEN) - 1), char=st.characters(codec="utf-8"))
def test_any_changed_character_is_refused(position: int, char: str) -> None:
    forged = TOKEN[:position] + char + TOKEN[position + 1 :]
    if forged == TOKEN:
        return
    with pytest.raises(LinkRefused) as caught:
        SIGNER.verify(forged, NOW)
    assert caught.value.code in ("malformed", "bad-signature")


@given(st.text(max_size=MAX_TOKEN_CHARS + 10))
def test_any_text_is_refused_without_an_exception_of_another_kind(text: str) -> None:
    with pytest.raises(LinkRefused):
        SIGNER.verify(text, NOW)


@given(cut=st.integers(0, len(TOKEN) - 1), extra=st.text(max_size=5))
def test_truncated_or_extended_tokens_are_refused(cut: int, extra: str) -> None:
    for forged in (TOKEN[:cut], TOKEN + extra if extra else TOKEN[:cut] + "A"):
        with pytest.raises(LinkRefused):
            SIGNER.verify(forged, NOW)


def test_a_payload_re_signed_with_another_key_is_refused() -> None:
    # The attacker changes the clinician and the expiry and signs with a key of their own.
    forger = LinkSigner(LinkKeys.from_text(OTHER), lifetime=10**6)
    forged = forger.sign("C1445-2", "clin-8", NOW)
    with pytest.raises(LinkRefused) as caught:
        SIGNER.verify(forged, NOW)
    assert caught.value.code == "bad-signature"


def test_a_tag_spelled_another_way_is_refused() -> None:
    # The tag's last base64 character carries two unused bits: 4 spellings, 1 accepted.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    head, last = TOKEN[:-1], TOKEN[-1]
    value = alphabet.index(last) & ~0b11
    for spare in range(4):
        spelled = head + alphabet[value | spare]
        if spelled == TOKEN:
            assert SIGNER.verify(spelled, NOW).page_ref == "C1445-2"
        else:
            with pytest.raises(LinkRefused):
                SIGNER.verify(spelled, NOW)


def test_a_changed_payload_with_the_old_signature_is_refused() -> None:
    version, _body, tag = TOKEN.split(".")
    payload = json.dumps(["C1445-2", "clin-7", int(NOW) + 10**6], separators=(",", ":"))
    body = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode()
    with pytest.raises(LinkRefused) as caught:
        SIGNER.verify(f"{version}.{body}.{tag}", NOW)
    assert caught.value.code == "bad-signature"


def test_rotation_keeps_links_of_the_previous_key_and_drops_older_ones() -> None:
    rotated = LinkSigner(LinkKeys.from_text(OTHER, previous=KEY), lifetime=3600)
    assert rotated.verify(TOKEN, NOW).clinician_id == "clin-7"
    fresh = rotated.sign("C1445-3", "clin-7", NOW)
    assert rotated.verify(fresh, NOW).page_ref == "C1445-3"
    with pytest.raises(LinkRefused):
        SIGNER.verify(fresh, NOW)  # the old key alone does not open new links
    again = LinkSigner(LinkKeys.from_text("n" * 40, previous=OTHER), lifetime=3600)
    with pytest.raises(LinkRefused):
        again.verify(TOKEN, NOW)  # two rotations later the first key is gone


def test_form_nonces_are_bound_to_the_token_and_survive_a_rotation() -> None:
    nonce = SIGNER.form_nonce(TOKEN)
    assert SIGNER.nonce_matches(TOKEN, nonce)
    assert not SIGNER.nonce_matches(SIGNER.sign("C1445-3", "clin-7", NOW), nonce)
    assert not SIGNER.nonce_matches(TOKEN, nonce[:-1] + ("A" if nonce[-1] != "A" else "B"))
    assert not SIGNER.nonce_matches(TOKEN, "")
    assert not SIGNER.nonce_matches(TOKEN, "é" * 22)
    rotated = LinkSigner(LinkKeys.from_text(OTHER, previous=KEY), lifetime=3600)
    assert rotated.nonce_matches(TOKEN, nonce)


def test_keys_shorter_than_32_bytes_are_refused() -> None:
    with pytest.raises(ValueError):
        LinkKeys.from_text("short")
    with pytest.raises(ValueError):
        LinkKeys.from_text(KEY, previous="short")


def test_refusals_never_quote_the_token() -> None:
    for text in (TOKEN + "x", "v1.secret-ish.value", TOKEN):
        try:
            SIGNER.verify(text, NOW + 10**6)
        except LinkRefused as err:
            assert text not in str(err) and "secret" not in str(err)


@given(elapsed=st.floats(min_value=-1e6, max_value=1e7, allow_nan=False))
def test_a_link_opens_exactly_until_its_expiry(elapsed: float) -> None:
    expires = int(NOW) + 3600
    if NOW + elapsed >= expires:
        with pytest.raises(LinkRefused) as caught:
            SIGNER.verify(TOKEN, NOW + elapsed)
        assert caught.value.code == "expired"
    else:
        assert SIGNER.verify(TOKEN, NOW + elapsed).expires == expires
