"""What the core knows of a clinician in the field, and what the web side may ask of it.

The paging core (roster, on-call schedules, locations, dispatcher, escalation) implements the
two desks below; the web side (the clinician's ack page, the location and availability API) and
the location adapters (NMEA over TCP, EIDO unit locations) only call them. Every Deferred fires
after the change is committed, so the caller answers its peer only then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final, Protocol

from twisted.internet.defer import Deferred

from corespond.daemon.errors import SafeMessage
from corespond.daemon.pager import PageAnswer


class Availability(StrEnum):
    AVAILABLE = "available"
    EN_ROUTE = "en_route"
    ON_SCENE = "on_scene"
    OFF_DUTY = "off_duty"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class LocationFix:
    """One position report; ``source`` names the feed: ``nmea:<feed>``, ``http``, ``eido:<f>``."""

    clinician_id: str
    latitude: float
    longitude: float
    fixed_at: datetime  # when the device took the fix, not when it arrived
    source: str
    accuracy_m: float | None = None


@dataclass(frozen=True, slots=True)
class PageView:
    """The minimum a clinician sees on the ack page: no names, narratives or diagnoses."""

    page_ref: str
    clinician_id: str
    incident_ref: str  # the CAD incident number
    call_type: str  # the general type, e.g. "Welfare check"
    general_location: str  # block-level or cross streets, never a full address
    paged_at: datetime
    state: str  # open, accepted, declined, en_route, on_scene, expired, cancelled
    answers: tuple[PageAnswer, ...]  # what may still be answered


class DeskRefusal(SafeMessage, Exception):
    """An answer or update the core will not take (page closed, unknown clinician, ...).

    ``code`` is a stable token (``unknown-page``, ``page-closed``, ``unknown-clinician``,
    ``not-your-page``); the message is safe to show and log.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class PageDesk(Protocol):
    def view(self, page_ref: str) -> Deferred[PageView | None]: ...

    def answer(
        self, page_ref: str, clinician_id: str, answer: PageAnswer, via: str
    ) -> Deferred[PageView]:
        """Record a human answer (``via``: ``ack-page``, ``api``, a gateway name); fails with
        :class:`DeskRefusal` when the page cannot take it."""
        ...


class ClinicianDesk(Protocol):
    def record_fix(self, fix: LocationFix) -> Deferred[None]: ...

    def set_availability(
        self, clinician_id: str, state: Availability, via: str
    ) -> Deferred[None]: ...


# What a CAD unit status word means for the clinician who rides as the unit (compared without
# case; ``paging.unit_status.map`` overrides or adds words). ``assigned``: the dispatcher put the
# unit on a call, which answers that call's page (accept) but changes no availability;
# ``ignore``: a word known to mean nothing here. A word in neither is ignored and counted.
ASSIGNED: Final = "assigned"
IGNORE: Final = "ignore"
UNIT_STATUS_TARGETS: Final = (*(a.value for a in Availability), ASSIGNED, IGNORE)
DEFAULT_UNIT_STATUSES: Final[Mapping[str, str]] = {
    "Available": Availability.AVAILABLE.value,
    "InService": Availability.AVAILABLE.value,
    "Cleared": Availability.AVAILABLE.value,
    "OutOfService": Availability.UNAVAILABLE.value,
    "Dispatched": ASSIGNED,
    "Assigned": ASSIGNED,
    "EnRoute": Availability.EN_ROUTE.value,
    "OnScene": Availability.ON_SCENE.value,
}


@dataclass(frozen=True, slots=True)
class UnitStatusChange:
    """A CAD unit status, as it applies to the clinician who rides as the unit.

    ``state``: the availability it sets (None: none); ``answer``: the answer it gives to this
    clinician's page for ``incident_pk`` (None: it answers no page); ``at``: when the CAD set it,
    which orders it against every other availability change.
    """

    clinician_id: str
    state: Availability | None
    answer: PageAnswer | None
    at: datetime
    incident_pk: int | None
    via: str  # ``cad:<feed>``


@dataclass(frozen=True, slots=True)
class UnitStatusOutcome:
    applied: bool  # the availability changed
    older: bool  # a newer change stands: the availability was left alone
    answered: str | None  # the page it answered (its reference), if any
    # It carried an answer for a call, and the clinician had no page for that call that could
    # take one (none yet: the CAD assigned the unit before the page).
    no_page: bool = False


class CadUnitDesk(ClinicianDesk, Protocol):
    def unit_status(self, change: UnitStatusChange) -> Deferred[UnitStatusOutcome]:
        """Apply a CAD unit status through the same availability and answer path as a reply;
        one older than the clinician's current availability changes nothing there."""
        ...
