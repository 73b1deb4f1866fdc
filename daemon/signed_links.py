"""Signed, expiring links: one page, one clinician, until a time; nothing to look up.

A link token names a page reference, a clinician id and an expiry (seconds since the epoch),
and carries an HMAC-SHA256 tag over them made with the site's link key::

    v1.<base64url(JSON ["C1445-2", "clin-7", 1790000000])>.<base64url(tag, 16 bytes)>

The tag is checked (constant time) before anything in the token is parsed, so a forged token
costs one HMAC and says nothing. The tag is truncated to 128 bits to keep links short enough
for an SMS (a forger still needs 2**128 guesses per page). Keys rotate without breaking links
already sent: a token made with the previous key is accepted until it expires.

The page reference and clinician id are identifiers, not protected information; a token holds
nothing else. The same key also derives the ack page's per-token form nonce (CSRF), so a form
can be checked without server state.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass, field

from corespond.daemon.errors import SafeMessage

VERSION = "v1"
TAG_BYTES = 16
MIN_KEY_BYTES = 32
# Longer than any token we make (two ids of MAX_ID_CHARS, each character at worst a six-byte
# JSON escape, in base64): anything longer is refused before any decoding work.
MAX_TOKEN_CHARS = 2400
MAX_ID_CHARS = 128
_LINK_CONTEXT = b"corespond ack link v1\x00"
_NONCE_CONTEXT = b"corespond ack form nonce v1\x00"
# What a link opens is part of what its tag signs: a token made for one purpose (the ack
# page) never opens another (the encounter form), though both share the key and the format.
ACK_PURPOSE = "ack"
ENCOUNTER_PURPOSE = "encounter"


class LinkRefused(SafeMessage, Exception):
    """A token that does not open anything. ``code``: ``malformed``, ``bad-signature``,
    ``expired``. The message never quotes the token."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True, slots=True)
class LinkClaims:
    """What a valid token grants: answering ``page_ref`` as ``clinician_id`` until ``expires``."""

    page_ref: str
    clinician_id: str
    expires: int


@dataclass(frozen=True, slots=True)
class LinkKeys:
    """The current signing key and, during a rotation, the previous one (verify only)."""

    current: bytes = field(repr=False)
    previous: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name, key in (("current", self.current), ("previous", self.previous)):
            if key is not None and len(key) < MIN_KEY_BYTES:
                raise ValueError(f"the {name} link key must be at least {MIN_KEY_BYTES} bytes")

    @classmethod
    def from_text(cls, current: str, previous: str | None = None) -> LinkKeys:
        """Keys as read from their files (``openssl rand -base64 48`` output, say)."""
        return cls(current.encode(), previous.encode() if previous is not None else None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or not text.isascii() or not all(c.isalnum() or c in "-_" for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _contexts(purpose: str) -> tuple[bytes, bytes]:
    """The HMAC contexts (link tag, form nonce) of links made for ``purpose``."""
    if purpose == ACK_PURPOSE:  # the contexts of every ack link already sent
        return _LINK_CONTEXT, _NONCE_CONTEXT
    return (
        f"corespond {purpose} link v1\x00".encode(),
        f"corespond {purpose} form nonce v1\x00".encode(),
    )


class LinkSigner:
    """Makes and checks link tokens. ``lifetime``: seconds a new link stays valid;
    ``purpose``: what the links open (``ack``, ``encounter``), signed into every tag."""

    def __init__(self, keys: LinkKeys, lifetime: int, purpose: str = ACK_PURPOSE) -> None:
        if lifetime < 1:
            raise ValueError("a link lifetime must be at least one second")
        self.keys = keys
        self.lifetime = lifetime
        self.purpose = purpose
        self._link_context, self._nonce_context = _contexts(purpose)

    def _tag(self, key: bytes, signed: bytes) -> bytes:
        return hmac.new(key, self._link_context + signed, hashlib.sha256).digest()[:TAG_BYTES]

    def rotate(self, keys: LinkKeys, lifetime: int) -> None:
        """New keys (a reload): links signed with a key still in ``keys`` keep verifying, those
        of a key no longer there stop at once; new links use ``keys.current``."""
        if lifetime < 1:
            raise ValueError("a link lifetime must be at least one second")
        self.keys = keys
        self.lifetime = lifetime

    def sign(self, page_ref: str, clinician_id: str, now: float) -> str:
        for name, value in (("page_ref", page_ref), ("clinician_id", clinician_id)):
            if not value or len(value) > MAX_ID_CHARS:
                raise ValueError(f"{name} must be 1 to {MAX_ID_CHARS} characters")
        expires = int(now) + self.lifetime
        payload = json.dumps(
            [page_ref, clinician_id, expires], separators=(",", ":"), ensure_ascii=False
        )
        signed = f"{VERSION}.{_b64(payload.encode())}"
        return f"{signed}.{_b64(self._tag(self.keys.current, signed.encode()))}"

    def verify(self, token: str, now: float) -> LinkClaims:
        """The claims of a genuine, unexpired token; :class:`LinkRefused` otherwise."""
        if len(token) > MAX_TOKEN_CHARS or not token.isascii() or token.count(".") != 2:
            raise LinkRefused("malformed", "not a link token")
        version, body, tag_text = token.split(".")
        if version != VERSION:
            raise LinkRefused("malformed", "not a link token of a known version")
        try:
            tag = _unb64(tag_text)
        except (ValueError, binascii.Error):
            raise LinkRefused("malformed", "the signature is not base64url") from None
        # Only the canonical spelling: a last character differing in its unused bits decodes
        # to the same tag, and a link must not have two spellings.
        if _b64(tag) != tag_text:
            raise LinkRefused("malformed", "the signature is not canonical base64url")
        signed = f"{version}.{body}".encode("ascii")
        # Both keys are always tried, so the time taken says nothing about which one matched.
        good = False
        for key in (self.keys.current, self.keys.previous):
            if key is not None:
                good |= hmac.compare_digest(self._tag(key, signed), tag)
        if not good:
            raise LinkRefused("bad-signature", "the link's signature does not match")
        # From here on the payload is ours: parsing it cannot be steered by an attacker.
        page_ref, clinician_id, expires = json.loads(_unb64(body))
        if now >= expires:
            raise LinkRefused("expired", "the link has expired")
        return LinkClaims(page_ref, clinician_id, expires)

    def form_nonce(self, token: str) -> str:
        """The nonce a form served for ``token`` carries back: bound to that token and key."""
        mac = hmac.new(self.keys.current, self._nonce_context + token.encode(), hashlib.sha256)
        return _b64(mac.digest()[:TAG_BYTES])

    def nonce_matches(self, token: str, nonce: str) -> bool:
        """Constant time; a nonce made before a key rotation still matches."""
        presented = nonce.encode("ascii", "replace")
        good = False
        for key in (self.keys.current, self.keys.previous):
            if key is not None:
                mac = hmac.new(key, self._nonce_context + token.encode(), hashlib.sha256)
                good |= hmac.compare_digest(_b64(mac.digest()[:TAG_BYTES]).encode(), presented)
        return good


__all__ = [
    "ACK_PURPOSE", "ENCOUNTER_PURPOSE", "LinkClaims", "LinkKeys", "LinkRefused", "LinkSigner",
]  # fmt: skip
