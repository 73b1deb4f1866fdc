"""What the dispatcher's tests build and check with: a clinician's state as a row
(:class:`CandidateState`), the arrays of a list of them, the sort key of the ranking written
out plainly (:func:`tie_key`), and the reasons of a stored choice (:func:`rejections_of`).
The daemon itself works on the arrays only (:class:`~corespond.daemon.dispatcher.Candidates`,
built by :class:`~corespond.daemon.roster_table.RosterTable`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import numpy as np

from corespond.daemon import dispatcher
from corespond.daemon.dispatcher import (
    Candidates,
    Considered,
    DispatchResult,
    Fix,
    availability_code,
    micros,
    rank_of,
)
from corespond.daemon.responders import Availability


class CandidateState(NamedTuple):
    """What the store knows of one clinician when a page step runs (the row view of
    :class:`Candidates`, for callers and tests that have a few)."""

    clinician_id: str
    program: str
    availability: Availability
    on_call: bool
    fix: Fix | None
    busy: bool  # en route to or on scene of another incident, or accepted another open page
    paged: bool  # already paged for this incident
    declined: bool  # declined a page for this incident
    recent_pages: int


def candidates_of(states: Sequence[CandidateState]) -> Candidates:
    """The arrays of a list of states (a clinician listed twice is a bug: ValueError)."""
    ids = [s.clinician_id for s in states]
    index = {cid: i for i, cid in enumerate(ids)}
    if len(index) != len(ids):
        twice = next(cid for cid in ids if ids.count(cid) > 1)
        raise ValueError(f"clinician {twice!r} is listed twice")
    programs = tuple(sorted({s.program for s in states}))
    fixes = [s.fix for s in states]
    return Candidates(
        ids=np.array(ids, dtype=object),
        index=index,
        id_rank=rank_of(ids),
        programs=programs,
        program=np.array([programs.index(s.program) for s in states], dtype=np.int64),
        availability=np.array([availability_code(s.availability) for s in states], dtype=np.int8),
        on_call=np.array([s.on_call for s in states], dtype=bool),
        has_fix=np.array([f is not None for f in fixes], dtype=bool),
        lat=np.array([f.lat if f else math.nan for f in fixes], dtype=np.float64),
        lon=np.array([f.lon if f else math.nan for f in fixes], dtype=np.float64),
        fixed_at=np.array([micros(f.fixed_at) if f else 0 for f in fixes], dtype=np.int64),
        busy=np.array([s.busy for s in states], dtype=bool),
        paged=np.array([s.paged for s in states], dtype=bool),
        declined=np.array([s.declined for s in states], dtype=bool),
        recent=np.array([s.recent_pages for s in states], dtype=np.int64),
    )


def choose(
    point: tuple[float, float],
    covering: Iterable[str],
    states: Sequence[CandidateState],
    now: datetime,
    max_fix_age: timedelta,
    etas: Mapping[str, float | None] | None = None,
) -> DispatchResult:
    """:func:`corespond.daemon.dispatcher.choose` over a list of states."""
    return dispatcher.choose(point, covering, candidates_of(states), now, max_fix_age, etas)


def rejections_of(dispatch: Mapping[str, Any]) -> dict[str, str]:
    """Clinician id -> reason passed over, from a stored choice (this shape or the one before
    it, a list of every clinician considered)."""
    rejected = dispatch.get("rejected") or {}
    if isinstance(rejected, list):
        return {r["clinician_id"]: r["rejected"] for r in rejected}
    return {cid: reason for reason, ids in rejected.items() for cid in ids}


def tie_key(c: Considered) -> tuple[bool, int, int, str]:
    """The sort key of an eligible clinician: ETA (whole minutes) first when known, then
    distance (in 100 m). :func:`choose` sorts by the same figures with numpy's rint, which
    rounds half to even as ``round`` does."""
    if c.eta_seconds is not None:
        return (False, round(c.eta_seconds / 60), c.recent_pages, c.clinician_id)
    assert c.distance_km is not None
    return (True, round(c.distance_km * 10), c.recent_pages, c.clinician_id)
