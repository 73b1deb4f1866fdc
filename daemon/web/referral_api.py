"""``POST /api/v1/referrals``: a system (an EHR front end, a clinician's app) refers a person.

The body names the incident, the provider, the service type and the referring clinician, and
may carry the person's demographics and the clinician's short summary; without ``person`` the
daemon takes the person recorded on the incident's current snapshot. The referral is built
(hl7apy, in a thread) and queued in the outbox before the answer: ``201 {"ref", "state",
"hold_reason"}``. A 42 CFR Part 2 referral without a covering consent is created *held*, and
the answer says so. Nothing in the answer or the log quotes the person or the summary.

An ``Idempotency-Key`` header (a token, or a quoted string as the IETF draft writes it) makes
a retry safe: the same key from the same system answers with the first referral (the same
body, and ``Idempotent-Replayed: true``); the same key with a different body is refused (422).
"""

from __future__ import annotations

import re
from typing import Any

from corespond.adapters.hl7_referral import URGENCIES, Person
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.referrals import ReferralRequest
from corespond.daemon.web.api import _pointer, _required, _unknown_fields, identifier, json_object

REFERRAL_FIELDS = (
    "incident_ref", "provider", "service_type", "referring_clinician", "urgency", "person",
    "summary", "part2", "consent_ref", "program", "region",
)  # fmt: skip
PERSON_FIELDS = (
    "family", "given", "birth_date", "sex", "phone", "street", "city", "state", "postal_code",
)  # fmt: skip
MAX_SUMMARY_CHARS = 4000
MAX_IDEMPOTENCY_KEY_CHARS = 100
_IDEMPOTENCY_KEY = re.compile(rf"[\x21\x23-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_CHARS}}}")
MAX_PERSON_FIELD_CHARS = 200


def _text(raw: Any, where: str, name: str, limit: int) -> str:
    if not isinstance(raw, str):
        raise RejectedMessage("invalid-field", f"{name} must be a string", where)
    if len(raw) > limit:
        raise RejectedMessage("invalid-field", f"{name} must be at most {limit} characters", where)
    if any(not (ch.isprintable() or ch in "\n\t") for ch in raw):
        raise RejectedMessage("invalid-field", f"{name} holds control characters", where)
    return raw


def _optional_id(value: dict[str, Any], key: str) -> str | None:
    raw = value.get(key)
    return None if raw is None else identifier(raw, _pointer(key), key)


def parse_person(raw: Any) -> Person:
    if not isinstance(raw, dict):
        raise RejectedMessage("invalid-field", "person must be an object", "/person")
    for key in raw:
        if key not in PERSON_FIELDS:
            raise RejectedMessage(
                "invalid-field",
                f"unknown field; person takes {', '.join(PERSON_FIELDS)}",
                "/person" + _pointer(key),
            )
    fields = {
        key: _text(raw[key], "/person" + _pointer(key), key, MAX_PERSON_FIELD_CHARS)
        for key in PERSON_FIELDS
        if raw.get(key) is not None
    }
    return Person(**fields)


def parse_referral(body: bytes) -> ReferralRequest:
    """A referral request, or :class:`RejectedMessage` naming the field by its JSON pointer."""
    value = json_object(body)
    _unknown_fields(value, REFERRAL_FIELDS)

    def required_id(key: str) -> str:
        return identifier(_required(value, key), _pointer(key), key)

    urgency = value.get("urgency", "routine")
    if not isinstance(urgency, str) or urgency not in URGENCIES:
        raise RejectedMessage(
            "invalid-field", f"urgency must be one of: {', '.join(URGENCIES)}", "/urgency"
        )
    part2 = value.get("part2", False)
    if not isinstance(part2, bool):
        raise RejectedMessage("invalid-field", "part2 must be true or false", "/part2")
    summary = value.get("summary")
    return ReferralRequest(
        incident_ref=required_id("incident_ref"),
        provider=required_id("provider"),
        service_type=required_id("service_type"),
        referring_clinician=required_id("referring_clinician"),
        urgency=urgency,
        person=parse_person(value["person"]) if value.get("person") is not None else Person(),
        summary=None if summary is None else _text(summary, "/summary", "summary",
                                                   MAX_SUMMARY_CHARS),
        part2=part2,
        consent_ref=_optional_id(value, "consent_ref"),
        program=_optional_id(value, "program"),
        region=_optional_id(value, "region"),
    )  # fmt: skip


def idempotency_key(header: bytes | str, system: str) -> str:
    """The stored key for an ``Idempotency-Key`` header sent by ``system`` (keys of two
    systems never meet), or :class:`RejectedMessage`."""
    raw = header.decode("ascii", "replace") if isinstance(header, bytes) else header
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    if not _IDEMPOTENCY_KEY.fullmatch(raw):
        raise RejectedMessage(
            "invalid-field",
            f"the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII "
            "characters",
        )
    return f"api:{system}:{raw}"


__all__ = ["idempotency_key", "parse_person", "parse_referral"]
