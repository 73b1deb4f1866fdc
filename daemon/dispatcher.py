"""Whom to page: the nearest available on-call clinician whose program covers the incident.

:func:`choose` is pure: the escalation engine gathers every clinician's state in one
transaction (availability, on call, latest fix, pages for this incident, recent pages) as
:class:`Candidates`, one array per field, asks the optional ETA source about the closest few,
and hands both here. The answer names the choice and the reason every other clinician was
passed over, so that "why this clinician" can always be answered; it is stored with the step
and the page (:meth:`DispatchResult.as_json`: the closest few with their figures, everyone else
by id, grouped by reason).

The scan is vectorised with numpy: a page step looks at the whole roster (500 clinicians in
the benchmark), and a loop of Python objects over it cost about 8 ms a page, on the one writer
thread that ingest shares.

Ranking: by drive time when the ETA source gave one, else by great-circle distance (those with
an ETA first: they are the closest few); equal figures (to the minute, or to 100 m) go to the
clinician paged least recently often, then to the lowest id, so the order never depends on
the order of the input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from corespond.daemon.responders import Availability

EARTH_RADIUS_KM = 6371.0088
# How far in the future a fix may claim to be (device clocks drift) and still count.
FIX_CLOCK_SKEW = timedelta(seconds=60)
# Clinicians a stored choice describes with their figures: the best eligible ones, and the
# closest of those passed over; everyone else is listed by id only.
DETAILED = 5

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Codes = npt.NDArray[np.int8]


class Rejection(StrEnum):
    """Why a clinician was passed over, in the order the reasons are checked."""

    OFF_DUTY = "off-duty"
    BUSY = "busy"
    NOT_ON_CALL = "not-on-call"
    OUT_OF_ZONE = "out-of-zone"
    DECLINED = "declined"
    ALREADY_PAGED = "already-paged"
    NO_LOCATION = "no-location"
    STALE_LOCATION = "stale-location"


# A reason as an array code: 0 is eligible, else the index in this tuple.
REASONS: tuple[Rejection | None, ...] = (None, *Rejection)
_REASON = {reason: code for code, reason in enumerate(REASONS) if reason is not None}
AVAILABILITIES: tuple[Availability, ...] = tuple(Availability)  # availability codes
_CODE = {state: code for code, state in enumerate(AVAILABILITIES)}
# By availability code: away (off duty, unavailable), out on a call (en route, on scene).
_AWAY = np.isin(np.arange(len(AVAILABILITIES)), [_CODE[Availability.OFF_DUTY],
                                                 _CODE[Availability.UNAVAILABLE]])  # fmt: skip
_OUT = np.isin(np.arange(len(AVAILABILITIES)), [_CODE[Availability.EN_ROUTE],
                                                _CODE[Availability.ON_SCENE]])  # fmt: skip
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def micros(at: datetime) -> int:
    """``at`` as integer microseconds since the epoch (exact, unlike a float timestamp)."""
    return (at - _EPOCH) // _MICROSECOND


def availability_code(state: Availability) -> int:
    return _CODE[state]


@dataclass(frozen=True, slots=True)
class Fix:
    lat: float
    lon: float
    fixed_at: datetime


@dataclass(frozen=True, slots=True, eq=False)
class Candidates:
    """Every clinician's state for a page step, one array per field, all in one order.

    ``index`` maps an id to its position and ``id_rank`` is each id's place in sorted order
    (the last tie-break); both, ``ids`` and ``program`` come from the roster and are built
    once per roster (:class:`~corespond.daemon.roster_table.RosterTable`).
    """

    ids: npt.NDArray[np.object_]
    index: Mapping[str, int]
    id_rank: Ints
    programs: tuple[str, ...]  # the program names ``program`` codes index
    program: Ints
    availability: Codes  # index in AVAILABILITIES
    on_call: Bools
    has_fix: Bools
    lat: Floats  # NaN without a fix
    lon: Floats
    fixed_at: Ints  # micros(); 0 without a fix
    busy: Bools
    paged: Bools
    declined: Bools
    recent: Ints

    def __len__(self) -> int:
        return len(self.ids)

    def point(self, clinician_id: str) -> tuple[float, float] | None:
        """A clinician's position (lat, lon), None without a fix."""
        i = self.index[clinician_id]
        return (float(self.lat[i]), float(self.lon[i])) if self.has_fix[i] else None


def rank_of(ids: Sequence[str]) -> Ints:
    """Each id's place in sorted order."""
    rank = np.empty(len(ids), dtype=np.int64)
    rank[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
    return rank


class Considered(NamedTuple):
    clinician_id: str
    rejected: Rejection | None  # None: eligible
    distance_km: float | None = None
    eta_seconds: float | None = None
    recent_pages: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "clinician_id": self.clinician_id,
            "rejected": self.rejected.value if self.rejected else None,
            "distance_km": None if self.distance_km is None else round(self.distance_km, 3),
            "eta_seconds": self.eta_seconds,
            "recent_pages": self.recent_pages,
        }


class DispatchResult:
    """The choice, the eligible best first and everyone passed over, kept as the arrays of
    :func:`choose`: the rows (:attr:`eligible`, :attr:`rejected`) are made only when read."""

    __slots__ = (
        "_candidates",
        "_distance",
        "_eligible",
        "_eta",
        "_ranked",
        "_reason",
        "_rejected",
        "chosen",
        "eta_used",
        "programs",
    )  # fmt: skip

    def __init__(
        self,
        candidates: Candidates,
        reason: Codes,
        distance: Floats,
        eta: Floats,
        ranked: Ints,
        programs: tuple[str, ...],
    ) -> None:
        self._candidates = candidates
        self._reason = reason
        self._distance = distance
        self._eta = eta
        self._ranked = ranked  # positions of the eligible, best first
        self.chosen: str | None = str(candidates.ids[ranked[0]]) if len(ranked) else None
        self.programs = programs  # the programs whose zones cover the incident
        self.eta_used = bool(len(ranked)) and bool(np.any(~np.isnan(eta[ranked])))
        self._eligible: tuple[Considered, ...] | None = None
        self._rejected: tuple[Considered, ...] | None = None

    def _row(self, i: int) -> Considered:
        distance, eta = float(self._distance[i]), float(self._eta[i])
        return Considered(
            str(self._candidates.ids[i]),
            REASONS[self._reason[i]],
            None if math.isnan(distance) else distance,
            None if math.isnan(eta) else eta,
            int(self._candidates.recent[i]),
        )

    def top(self, count: int) -> tuple[Considered, ...]:
        """The best ``count`` eligible, best first."""
        return tuple(self._row(i) for i in self._ranked[:count])

    @property
    def eligible(self) -> tuple[Considered, ...]:
        """Every eligible clinician, best first; the choice is the first."""
        if self._eligible is None:
            self._eligible = self.top(len(self._ranked))
        return self._eligible

    def _rejected_positions(self) -> Ints:
        """Positions of those passed over, by clinician id."""
        out = np.flatnonzero(self._reason)
        return out[np.argsort(self._candidates.id_rank[out], kind="stable")]

    @property
    def rejected(self) -> tuple[Considered, ...]:
        """Everyone passed over, with the reason, by clinician id."""
        if self._rejected is None:
            self._rejected = tuple(self._row(i) for i in self._rejected_positions())
        return self._rejected

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DispatchResult):
            return NotImplemented
        return (self.chosen, self.programs, self.eta_used, self.eligible, self.rejected) == (
            other.chosen, other.programs, other.eta_used, other.eligible, other.rejected
        )  # fmt: skip

    __hash__ = None  # type: ignore[assignment]

    def as_json(self) -> dict[str, Any]:
        """The stored record: the choice and why; the best :data:`DETAILED` eligible and the
        closest :data:`DETAILED` passed over with their figures; every other clinician
        considered by id (the eligible in rank order, the others by id under their reason)."""
        ids = self._candidates.ids
        rejected = self._rejected_positions()
        codes = self._reason[rejected]
        # By reason in the fixed order, by id within one (a stable sort keeps the id order).
        grouped = ids[rejected[np.argsort(codes, kind="stable")]].tolist()
        by_reason: dict[str, list[str]] = {}
        start = 0
        for code, count in enumerate(np.bincount(codes, minlength=len(REASONS)).tolist()):
            reason = REASONS[code]
            if count and reason is not None:
                by_reason[reason.value] = grouped[start : start + count]
                start += count
        located = rejected[~np.isnan(self._distance[rejected])]
        closest = located[np.argsort(self._distance[located], kind="stable")[:DETAILED]]
        return {
            "chosen": self.chosen,
            "why": self.why(by_reason),
            "programs": list(self.programs),
            "eta_used": self.eta_used,
            "considered": len(ids),
            "eligible": [_detail(self._row(i)) for i in self._ranked[:DETAILED]],
            "eligible_more": ids[self._ranked[DETAILED:]].tolist(),
            "rejected": by_reason,
            "closest_rejected": [_detail(self._row(i)) for i in closest],
        }

    def why(self, by_reason: Mapping[str, Sequence[str]]) -> str:
        """One sentence a person reads in ``corespond pages show``."""
        passed = ", ".join(f"{len(v)} {k}" for k, v in by_reason.items()) or "none"
        if self.chosen is None:
            return f"nobody eligible of {len(self._candidates)}; passed over: {passed}"
        best = self._row(int(self._ranked[0]))
        if best.eta_seconds is not None:
            figure = f"drive time {best.eta_seconds / 60:.1f} min"
        else:
            figure = f"{best.distance_km:.1f} km"
        return (
            f"{self.chosen}: best of {len(self._ranked)} eligible ({figure}, "
            f"{best.recent_pages} recent pages); passed over: {passed}"
        )


def _detail(c: Considered) -> dict[str, Any]:
    out = c.as_json()
    if c.rejected is None:
        del out["rejected"]
    return out


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance on the mean Earth sphere."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def choose(
    point: tuple[float, float],
    covering: Iterable[str],
    c: Candidates,
    now: datetime,
    max_fix_age: timedelta,
    etas: Mapping[str, float | None] | None = None,
) -> DispatchResult:
    """The clinician to page for an incident at ``point`` (lat, lon), and why.

    ``covering`` names the programs whose zones contain the point. ``etas`` (from the routing
    service, for some eligible clinicians; None = unreachable by road) reorders those it names;
    an unreachable clinician stays eligible but ranks after every one with a drive time.
    """
    covering_set = frozenset(covering)
    # The haversine of great_circle_km, for everyone at once (NaN without a fix).
    lat0, lon0 = point
    p1 = math.radians(lat0)
    p2 = np.radians(c.lat)
    half_dp, half_dl = (p2 - p1) / 2, np.radians(c.lon - lon0) / 2
    a = np.sin(half_dp) ** 2 + math.cos(p1) * np.cos(p2) * np.sin(half_dl) ** 2
    distance = 2 * EARTH_RADIUS_KM * np.arcsin(np.minimum(1.0, np.sqrt(a)))
    # By program code (a code past the programs' end: in no zone): covers the point.
    covers = np.zeros(max(len(c.programs), int(c.program.max(initial=-1)) + 1), dtype=bool)
    covers[[i for i, name in enumerate(c.programs) if name in covering_set]] = True
    unlocated = ~c.has_fix | ((c.lat == 0.0) & (c.lon == 0.0))  # (0, 0): a device without a fix
    # The first reason in the fixed order: each reason's code written over the later ones'.
    reason: Codes = np.zeros(len(c), dtype=np.int8)
    stale = (c.fixed_at < micros(now - max_fix_age)) | (c.fixed_at > micros(now + FIX_CLOCK_SKEW))
    reason[stale] = _REASON[Rejection.STALE_LOCATION]
    reason[unlocated] = _REASON[Rejection.NO_LOCATION]
    reason[c.paged] = _REASON[Rejection.ALREADY_PAGED]
    reason[c.declined] = _REASON[Rejection.DECLINED]
    reason[~covers[c.program]] = _REASON[Rejection.OUT_OF_ZONE]
    reason[~c.on_call] = _REASON[Rejection.NOT_ON_CALL]
    reason[c.busy | _OUT[c.availability]] = _REASON[Rejection.BUSY]
    reason[_AWAY[c.availability]] = _REASON[Rejection.OFF_DUTY]
    eta = np.full(len(c), math.nan)
    for cid, seconds in (etas or {}).items():
        i = c.index.get(cid)
        if seconds is not None and i is not None and reason[i] == 0:
            eta[i] = seconds
    eligible = np.flatnonzero(reason == 0)
    if etas:
        timed = ~np.isnan(eta[eligible])
        figure = np.where(timed, np.rint(eta[eligible] / 60), np.rint(distance[eligible] * 10))
        order = np.lexsort((c.id_rank[eligible], c.recent[eligible], figure, ~timed))
    else:
        order = _by_distance(np.rint(distance[eligible] * 10), c.recent[eligible],
                             c.id_rank[eligible], len(c))  # fmt: skip
    return DispatchResult(c, reason, distance, eta, eligible[order], tuple(sorted(covering_set)))


# Distances in 100 m, at most half the Earth's circumference: 18 bits.
_FIGURE_BITS = math.ceil(math.pi * EARTH_RADIUS_KM * 10).bit_length()


def _by_distance(figure: Floats, recent: Ints, id_rank: Ints, n: int) -> Ints:
    """Positions ordered by (figure, recent, id_rank), as ``np.lexsort`` orders them: one sort
    of one integer key holding all three (id ranks are unique: no ties left for the sort to
    keep), which costs a third of lexsort's four passes; lexsort itself when a figure is not
    a distance or the counts do not fit 62 bits."""
    if not len(figure):
        return np.empty(0, dtype=np.int64)
    rank_bits = max(n - 1, 0).bit_length()
    low, high = int(recent.min()), int(recent.max())
    recent_bits = high.bit_length()
    if (
        low < 0
        or not figure.max() < (1 << _FIGURE_BITS)  # (NaN fails this too)
        or _FIGURE_BITS + recent_bits + rank_bits > 62
    ):
        return np.lexsort((id_rank, recent, figure))
    key = figure.astype(np.int64) << (recent_bits + rank_bits)
    key |= recent << rank_bits
    key |= id_rank
    return np.argsort(key)
