"""The API for systems and phones: location fixes and availability, JSON in and out.

=======================================  ======================================================
``POST /api/v1/location``                 ``{"clinician_id", "lat", "lon", "fixed_at",
                                          "accuracy_m"?}`` -> ``ClinicianDesk.record_fix``
``POST /api/v1/clinicians/<id>/availability``  ``{"state": "available" | ...}``
                                          -> ``ClinicianDesk.set_availability``
``POST /api/v1/referrals``                 a referral (see :mod:`.referral_api`), when the
                                          daemon sends referrals; system tokens only
``POST /api/v1/encounters/<id>``          ``{"changes": {...}, "complete": bool}``: a
                                          clinician's documentation of an encounter
                                          (``corespond.daemon.encounters.update_encounter``);
                                          400 lists every problem with its field path
=======================================  ======================================================

Callers authenticate with ``Authorization: Bearer <token>``: a system token from
``web.systems``, or, for ``/location`` only, the signed link token of the clinician's page
(a phone that opened its page may report where it is, for that clinician only).

Every answer is JSON and comes only after the desk's Deferred fires (after the commit):
200 done; 400 ``{"error", "reason", "where"}`` with ``where`` the JSON pointer of the field;
401 no or bad token; 403 a link token used for another clinician; 404 no such endpoint or
clinician; 405 not a POST; 409 the desk refused; 413 body over ``web.max_body_bytes``;
415 not ``application/json``; 503 the desk failed (``Retry-After``): send it again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from corespond.adapters.tcp_feed import peer_name
from corespond.daemon.clock import Clock
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.log import error_text
from corespond.daemon.responders import Availability, ClinicianDesk, DeskRefusal, LocationFix
from corespond.daemon.signed_links import MAX_ID_CHARS, LinkSigner
from corespond.daemon.web.auth import LinkCaller, SystemCaller, SystemTokens, challenge, identify
from corespond.daemon.web.site import (
    RETRY_AFTER_SECONDS,
    answer_when,
    body_of,
    json_error,
    json_response,
)

log = structlog.get_logger(__name__)

# Creates a referral (``ReferralService.create_from_request``); fires after the commit.
ReferralCreator = Callable[[Any], Deferred[Any]]
# Updates an encounter: (id, changes, complete) -> {"id", "status"}; fires after the commit.
EncounterUpdater = Callable[[int, dict[str, Any], bool], Deferred[dict[str, Any]]]

# A device clock a little ahead of ours is normal; a fix from the future beyond that is not.
FUTURE_TOLERANCE = timedelta(minutes=5)
LOCATION_FIELDS = ("clinician_id", "lat", "lon", "fixed_at", "accuracy_m")


# --- parsing -----------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def json_object(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body``, or :class:`RejectedMessage` saying why not."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RejectedMessage("bad-encoding", f"the body is not UTF-8 (byte {err.start})") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise RejectedMessage(
            "malformed-json", f"not JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except (ValueError, RecursionError):
        raise RejectedMessage("malformed-json", "not JSON this API accepts") from None
    if not isinstance(value, dict):
        raise RejectedMessage("invalid-field", "the body must be a JSON object", "")
    return value


def _unknown_fields(value: dict[str, Any], known: tuple[str, ...]) -> None:
    for key in value:
        if key not in known:
            raise RejectedMessage(
                "invalid-field",
                f"unknown field; this endpoint takes {', '.join(known)}",
                _pointer(key),
            )


def _pointer(key: str) -> str:
    return "/" + key.replace("~", "~0").replace("/", "~1")


def _required(value: dict[str, Any], key: str) -> Any:
    if key not in value or value[key] is None:
        raise RejectedMessage("missing-field", f"{key} is required", _pointer(key))
    return value[key]


def identifier(raw: Any, where: str | None, name: str) -> str:
    if not isinstance(raw, str):
        raise RejectedMessage("invalid-field", f"{name} must be a string", where)
    if not 1 <= len(raw) <= MAX_ID_CHARS:
        raise RejectedMessage(
            "invalid-field", f"{name} must be 1 to {MAX_ID_CHARS} characters", where
        )
    if not raw.isprintable():
        raise RejectedMessage("invalid-field", f"{name} holds control characters", where)
    return raw


def _number(raw: Any, where: str, name: str, low: float, high: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise RejectedMessage("invalid-field", f"{name} must be a number", where)
    number = float(raw)
    if not math.isfinite(number) or not low <= number <= high:
        raise RejectedMessage(
            "invalid-field", f"{name} must be between {low:g} and {high:g}", where
        )
    return number


def _timestamp(raw: Any, where: str, now: datetime) -> datetime:
    if not isinstance(raw, str) or len(raw) > 64:
        raise RejectedMessage("invalid-field", "fixed_at must be an RFC 3339 date-time", where)
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise RejectedMessage(
            "invalid-field", "fixed_at must be an RFC 3339 date-time", where
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise RejectedMessage("invalid-field", "fixed_at needs a UTC offset (Z or +hh:mm)", where)
    if value > now + FUTURE_TOLERANCE:
        raise RejectedMessage("invalid-field", "fixed_at is in the future", where)
    return value


def parse_location(body: bytes, now: datetime) -> LocationFix:
    """A location report as :class:`LocationFix`, or :class:`RejectedMessage` naming the
    field (``where`` is its JSON pointer)."""
    value = json_object(body)
    _unknown_fields(value, LOCATION_FIELDS)
    clinician_id = identifier(_required(value, "clinician_id"), "/clinician_id", "clinician_id")
    lat = _number(_required(value, "lat"), "/lat", "lat", -90, 90)
    lon = _number(_required(value, "lon"), "/lon", "lon", -180, 180)
    fixed_at = _timestamp(_required(value, "fixed_at"), "/fixed_at", now)
    accuracy = value.get("accuracy_m")
    accuracy_m = (
        None if accuracy is None else _number(accuracy, "/accuracy_m", "accuracy_m", 0, 1e7)
    )
    return LocationFix(clinician_id, lat, lon, fixed_at, "http", accuracy_m)


def parse_availability(body: bytes) -> Availability:
    value = json_object(body)
    _unknown_fields(value, ("state",))
    raw = _required(value, "state")
    try:
        return Availability(raw)
    except ValueError:
        choices = ", ".join(a.value for a in Availability)
        raise RejectedMessage(
            "invalid-field", f"state must be one of: {choices}", "/state"
        ) from None


def refusal_text(err: DeskRefusal) -> str:
    """The desk's message without the ``code: `` prefix its ``str`` carries."""
    return str(err).removeprefix(f"{err.code}: ")


# --- the resource ------------------------------------------------------------------------------


class ApiV1(Resource):
    """``/api/v1``: routes by the rest of the path; everything answers JSON."""

    isLeaf = True

    def __init__(
        self,
        desk: ClinicianDesk,
        *,
        systems: SystemTokens,
        signer: LinkSigner,
        clock: Clock,
        referrals: ReferralCreator | None = None,
        encounters: EncounterUpdater | None = None,
    ) -> None:
        super().__init__()
        self.desk = desk
        self.referrals = referrals
        self.encounters = encounters
        self.systems = systems
        self.signer = signer
        self.clock = clock

    def render(self, request: Request) -> bytes | int:
        path = [p for p in request.postpath or () if p]
        if path == [b"location"]:
            handler = self._location
        elif len(path) == 3 and path[0] == b"clinicians" and path[2] == b"availability":
            handler = self._availability
        elif path == [b"referrals"] and self.referrals is not None:
            handler = self._referral
        elif len(path) == 2 and path[0] == b"encounters" and self.encounters is not None:
            handler = self._encounter
        else:
            return json_error(request, 404, "not-found", "nothing at this path")
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return json_error(request, 405, "method-not-allowed", "this endpoint takes POST only")
        peer = peer_name(request.getClientAddress())
        link_ok = handler == self._location
        caller = identify(request, self.systems, self.signer if link_ok else None,
                          self.clock.seconds())  # fmt: skip
        if caller is None:
            challenge(request)
            log.info("web.api.refused", peer=peer, status=401)
            return json_error(request, 401, "unauthorized",
                              "a valid Authorization: Bearer token is required")  # fmt: skip
        if getattr(request, "malformed_header", False):
            return json_error(request, 400, "invalid-field", "a header holds control characters")
        body, size = body_of(request)
        if body is None:
            log.warning("web.api.oversize", peer=peer, bytes=size)
            return json_error(request, 413, "oversize", f"body of {size} bytes is over the limit")
        media = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if media != b"application/json":
            return json_error(request, 415, "unsupported", "Content-Type must be application/json")
        try:
            return handler(request, caller, body, path, peer)
        except RejectedMessage as err:
            log.info("web.api.rejected", peer=peer, code=err.code, where=err.where)
            request.setResponseCode(400)
            return json_response(request, 400, err.as_json())

    def _location(
        self, request: Request, caller: Any, body: bytes, path: list[bytes], peer: str
    ) -> bytes | int:
        fix = parse_location(body, self.clock.now())
        if isinstance(caller, LinkCaller) and caller.claims.clinician_id != fix.clinician_id:
            log.info("web.api.refused", peer=peer, status=403, clinician_id=fix.clinician_id)
            return json_error(request, 403, "forbidden",
                              "this link may report only its own clinician's location",
                              "/clinician_id")  # fmt: skip
        who = caller.name if isinstance(caller, SystemCaller) else "link"
        d = maybeDeferred(self.desk.record_fix, fix)
        return answer_when(
            request,
            d,
            lambda _: self._location_recorded(request, fix, who),
            lambda f: self._failed(request, f, fix.clinician_id, peer),
        )

    def _availability(
        self, request: Request, caller: Any, body: bytes, path: list[bytes], peer: str
    ) -> bytes | int:
        # Twisted has already percent-decoded the path's segments.
        try:
            raw_id = path[1].decode("utf-8")
        except UnicodeDecodeError:
            raise RejectedMessage(
                "invalid-field", "the clinician id in the path is not UTF-8"
            ) from None
        clinician_id = identifier(raw_id, None, "the clinician id in the path")
        state = parse_availability(body)
        assert isinstance(caller, SystemCaller)
        d = maybeDeferred(self.desk.set_availability, clinician_id, state, "api")
        return answer_when(
            request,
            d,
            lambda _: self._availability_recorded(request, clinician_id, state, caller.name),
            lambda f: self._failed(request, f, clinician_id, peer),
        )

    def _referral(
        self, request: Request, caller: Any, body: bytes, path: list[bytes], peer: str
    ) -> bytes | int:
        from dataclasses import replace

        from corespond.daemon.web.referral_api import idempotency_key, parse_referral

        assert isinstance(caller, SystemCaller) and self.referrals is not None
        wanted = parse_referral(body)
        key = request.getHeader(b"idempotency-key")
        if key is not None:
            wanted = replace(wanted, idempotency_key=idempotency_key(key, caller.name))
        d = maybeDeferred(self.referrals, wanted)
        return answer_when(
            request,
            d,
            lambda created: self._referral_created(request, created, caller.name),
            lambda f: self._referral_failed(request, f, peer),
        )

    def _encounter(
        self, request: Request, caller: Any, body: bytes, path: list[bytes], peer: str
    ) -> bytes | int:
        assert isinstance(caller, SystemCaller) and self.encounters is not None
        if not path[1].isdigit() or len(path[1]) > 18:
            raise RejectedMessage("invalid-field", "the encounter id in the path is a number")
        encounter_id = int(path[1])
        value = json_object(body)
        _unknown_fields(value, ("changes", "complete"))
        changes = value.get("changes", {})
        if not isinstance(changes, dict):
            raise RejectedMessage("invalid-field", "changes must be an object", "/changes")
        complete = value.get("complete", False)
        if not isinstance(complete, bool):
            raise RejectedMessage("invalid-field", "complete must be true or false", "/complete")
        d = maybeDeferred(self.encounters, encounter_id, changes, complete)
        return answer_when(
            request,
            d,
            lambda row: self._encounter_updated(request, row, caller.name),
            lambda f: self._encounter_failed(request, f, encounter_id, peer),
        )

    def _encounter_updated(self, request: Request, row: dict[str, Any], system: str) -> bytes:
        log.info("web.api.encounter.updated", encounter_id=row["id"], status=row["status"],
                 system=system)  # fmt: skip
        return json_response(request, 200, {"id": row["id"], "status": row["status"]})

    def _encounter_failed(
        self, request: Request, failure: Failure, encounter_id: int, peer: str
    ) -> bytes:
        from corespond.daemon.encounters import EncounterInvalid, EncounterNotFound

        if failure.check(EncounterInvalid):
            err = failure.value
            assert isinstance(err, EncounterInvalid)
            log.info("web.api.rejected", peer=peer, code="invalid-encounter",
                     encounter_id=encounter_id, count=len(err.problems))  # fmt: skip
            return json_response(request, 400, err.as_json())
        if failure.check(EncounterNotFound):
            return json_error(request, 404, "unknown-encounter", f"no encounter {encounter_id}")
        log.error("web.api.encounter.failed", peer=peer, encounter_id=encounter_id,
                  error=error_text(failure))  # fmt: skip
        request.setHeader(b"retry-after", str(RETRY_AFTER_SECONDS).encode())
        return json_error(request, 503, "unavailable", "the encounter could not be stored; retry")

    def _referral_created(self, request: Request, created: Any, system: str) -> bytes:
        log.info("web.api.referral.created", referral_id=created.ref, state=created.state,
                 system=system)  # fmt: skip
        if getattr(created, "replayed", False):
            request.setHeader(b"idempotent-replayed", b"true")
        return json_response(
            request,
            201,
            {"ref": created.ref, "state": created.state, "hold_reason": created.hold_reason},
        )

    def _referral_failed(self, request: Request, failure: Failure, peer: str) -> bytes:
        from corespond.daemon.referrals import ReferralError

        if failure.check(ReferralError):
            log.info("web.api.refused", peer=peer, status=422, code="referral-refused")
            return json_error(request, 422, "referral-refused", str(failure.value))
        log.error("web.api.referral.failed", peer=peer, error=error_text(failure))
        request.setHeader(b"retry-after", str(RETRY_AFTER_SECONDS).encode())
        return json_error(request, 503, "unavailable", "the referral could not be stored; retry")

    def _location_recorded(self, request: Request, fix: LocationFix, system: str) -> bytes:
        log.debug("web.api.location.recorded", clinician_id=fix.clinician_id, system=system)
        return json_response(request, 200, {"recorded": "location"})

    def _availability_recorded(
        self, request: Request, clinician_id: str, state: Availability, system: str
    ) -> bytes:
        log.info("web.api.availability.recorded", clinician_id=clinician_id, state=state.value,
                 system=system)  # fmt: skip
        return json_response(request, 200, {"clinician_id": clinician_id, "state": state.value})

    def _failed(self, request: Request, failure: Failure, clinician_id: str, peer: str) -> bytes:
        refusal = failure.check(DeskRefusal)
        if refusal is not None:
            err = failure.value
            assert isinstance(err, DeskRefusal)
            status = 404 if err.code == "unknown-clinician" else 409
            log.info("web.api.refused", peer=peer, status=status, code=err.code,
                     clinician_id=clinician_id)  # fmt: skip
            return json_error(request, status, err.code, refusal_text(err))
        log.error("web.api.desk.failed", peer=peer, clinician_id=clinician_id,
                  error=error_text(failure))  # fmt: skip
        request.setHeader(b"retry-after", str(RETRY_AFTER_SECONDS).encode())
        return json_error(request, 503, "unavailable", "the update could not be stored; retry")


__all__ = ["ApiV1", "json_object", "parse_availability", "parse_location"]
