"""The one error a parser may raise: a precise, PHI-free rejection of one message."""

from __future__ import annotations


class SafeMessage:
    """Marks an exception whose message never quotes input, so logs may carry it."""


class RejectedMessage(SafeMessage, Exception):
    """A message that cannot be parsed or validated.

    ``code`` is a short stable token (``malformed-json``, ``wrong-namespace``, ``bad-pidf-lo``,
    ``oversize``, ``bad-encoding``, ``missing-field``, ``invalid-field``, ``unsupported``) that
    metrics and senders can switch on. ``reason`` says exactly what is wrong and where, and never
    quotes the message's content: it reaches logs, metrics and the sender.
    ``where`` is a JSON pointer or an XPath-like location inside the message, when known.
    """

    def __init__(self, code: str, reason: str, where: str | None = None) -> None:
        self.code = code
        self.reason = reason
        self.where = where
        super().__init__(str(self))

    def __str__(self) -> str:
        at = f" (at {self.where})" if self.where else ""
        return f"{self.code}: {self.reason}{at}"

    def as_json(self) -> dict[str, str]:
        out = {"error": self.code, "reason": self.reason}
        if self.where:
            out["where"] = self.where
        return out
