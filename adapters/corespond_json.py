"""corespond incident JSON, one incident snapshot per line (JSON lines / NDJSON).

Each line is one JSON object in the form :func:`~corespond.daemon.snapshot.snapshot_to_json`
writes (``id``, ``updated_at``, ``status``, ... ``notes``, ``persons``), UTF-8 encoded. Blank
lines are skipped, a line may end in CRLF, and a UTF-8 byte order mark at the start is ignored.
Each line is accepted or rejected on its own.

Stricter than Python's ``json`` module, on purpose: ``NaN`` and ``Infinity`` are not JSON, and a
key written twice in one object is refused rather than silently resolved to the last one.
"""

from __future__ import annotations

import codecs
import json
from typing import Any, NoReturn

from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import Snapshot, snapshot_from_json


class CorespondJsonFormat:
    """Newline-delimited corespond incident JSON."""

    name = "jsonl"

    def split(self, payload: bytes) -> list[bytes]:
        """Every non-blank line of ``payload``, without its line ending."""
        if payload.startswith(codecs.BOM_UTF8):
            payload = payload[len(codecs.BOM_UTF8) :]
        lines = (line.removesuffix(b"\r") for line in payload.split(b"\n"))
        return [line for line in lines if line.strip()]

    def parse(self, message: bytes) -> Snapshot:
        """One incident; raises :class:`RejectedMessage`."""
        if message.startswith(codecs.BOM_UTF8):
            message = message[len(codecs.BOM_UTF8) :]
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RejectedMessage(
                "bad-encoding", "the line is not valid UTF-8", f"byte {err.start + 1}"
            ) from None
        try:
            obj = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as err:
            # err.msg is json's fixed wording ("Expecting ',' delimiter"), never the content.
            raise RejectedMessage(
                "malformed-json", err.msg, f"line {err.lineno}, column {err.colno}"
            ) from None
        except _Refused as err:
            raise RejectedMessage("malformed-json", err.reason) from None
        except RecursionError:
            raise RejectedMessage("malformed-json", "the JSON is nested too deeply") from None
        except ValueError:
            # Python refuses integers over 4300 digits (a parsing DoS guard).
            raise RejectedMessage("malformed-json", "a number is too long") from None
        return snapshot_from_json(obj)


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _no_constant(name: str) -> NoReturn:
    raise _Refused("NaN and Infinity are not JSON numbers")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Refused("an object has the same key twice")
    return obj
