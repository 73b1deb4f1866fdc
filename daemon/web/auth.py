"""Who is calling: a system with its own bearer token, or a phone holding a signed link.

Every presented token is compared with every configured one (SHA-256 digests, compared in
constant time, no early exit), so neither the answer's timing nor its content tells which
system's token came close.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.web.server import Request

from corespond.daemon.signed_links import LinkClaims, LinkRefused, LinkSigner


@dataclass(frozen=True, slots=True)
class SystemCaller:
    name: str  # the key of the token under web.systems


@dataclass(frozen=True, slots=True)
class LinkCaller:
    claims: LinkClaims


Caller = SystemCaller | LinkCaller


class SystemTokens:
    """The bearer tokens of the systems allowed on the API, by system name."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._digests = self._digests_of(tokens)

    def replace(self, tokens: Mapping[str, str]) -> None:
        """From now on only ``tokens`` open the API (a reload): a removed token fails at its
        next request. One attribute store, so no request sees a mix."""
        self._digests = self._digests_of(tokens)

    @staticmethod
    def _digests_of(tokens: Mapping[str, str]) -> list[tuple[str, bytes]]:
        if any(not t for t in tokens.values()):
            raise ValueError("a system token must not be empty")
        return [(name, _digest(t.encode())) for name, t in tokens.items()]

    def match(self, presented: bytes) -> str | None:
        digest = _digest(presented)
        found = None
        for name, expected in self._digests:
            if hmac.compare_digest(digest, expected):
                found = name
        return found


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def bearer(request: Request) -> bytes | None:
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    scheme, _, credentials = header.partition(b" ")
    if scheme.lower() != b"bearer" or not credentials.strip():
        return None
    return credentials.strip()


def identify(
    request: Request,
    systems: SystemTokens,
    signer: LinkSigner | None,
    now: float,
) -> Caller | None:
    """The caller this request authenticates as; ``signer`` None: system tokens only."""
    token = bearer(request)
    if token is None:
        return None
    name = systems.match(token)
    if name is not None:
        return SystemCaller(name)
    if signer is None:
        return None
    try:
        return LinkCaller(signer.verify(token.decode("ascii"), now))
    except (LinkRefused, UnicodeDecodeError):
        return None


def challenge(request: Request) -> None:
    """The WWW-Authenticate header of a 401 (RFC 6750)."""
    value = b'Bearer realm="corespond"'
    if request.getHeader(b"authorization") is not None:
        value += b', error="invalid_token"'
    request.setHeader(b"www-authenticate", value)


__all__ = [
    "Caller",
    "LinkCaller",
    "SystemCaller",
    "SystemTokens",
    "bearer",
    "challenge",
    "identify",
]
