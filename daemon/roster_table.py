"""The roster as arrays for the dispatcher: what a page step reads per clinician, kept between
steps instead of rebuilt from 500 objects on every page.

A :class:`RosterTable` is built once per roster (``Roster.table``): ids, their sorted ranks,
program codes, and who is on call in programs without a schedule (always). Per step only what
changes is filled in: availability, the positions (kept by the paging service as
:class:`Positions`, refreshed from the store and patched by each fix it records), busy and
recent pages, and the incident's own pages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from corespond.daemon.dispatcher import (
    Bools,
    Candidates,
    Fix,
    Floats,
    Ints,
    availability_code,
    micros,
    rank_of,
)
from corespond.daemon.responders import Availability

_AVAILABILITY = {state.value: availability_code(state) for state in Availability}


@dataclass(frozen=True, slots=True, eq=False)
class Positions:
    """Every clinician's latest fix as arrays in a table's order (NaN / 0: none)."""

    has_fix: Bools
    lat: Floats
    lon: Floats
    fixed_at: Ints

    def with_fix(self, i: int, fix: Fix) -> Positions:
        """A copy with clinician ``i`` at ``fix`` (steps may hold this one)."""
        has_fix, lat, lon, at = (
            a.copy() for a in (self.has_fix, self.lat, self.lon, self.fixed_at)
        )
        has_fix[i], lat[i], lon[i], at[i] = True, fix.lat, fix.lon, micros(fix.fixed_at)
        return Positions(has_fix, lat, lon, at)


class RosterTable:
    """The fixed part of :class:`~corespond.daemon.dispatcher.Candidates` for one roster."""

    def __init__(self, roster: object) -> None:
        from corespond.daemon.roster import Roster

        assert isinstance(roster, Roster)
        self.roster = roster
        ids = list(roster.clinicians)
        self.ids = np.array(ids, dtype=object)
        self.index = {cid: i for i, cid in enumerate(ids)}
        self.id_rank = rank_of(ids)
        self.programs = tuple(roster.programs)
        codes = {name: i for i, name in enumerate(self.programs)}
        # A clinician of a program the roster does not list (never after validation) is in
        # no zone: a code past the end.
        self.program = np.array(
            [codes.get(c.program, len(codes)) for c in roster.clinicians.values()], dtype=np.int64
        )
        self._scheduled = [(codes[p.id], p) for p in roster.programs.values() if p.scheduled]
        scheduled = [code for code, _ in self._scheduled]
        known = self.program < len(codes)
        self._always_on_call = known & ~np.isin(self.program, scheduled)

    def __len__(self) -> int:
        return len(self.ids)

    def on_call(self, at: datetime) -> Bools:
        """Who is on call at ``at`` (as ``Roster.on_call``): every member of a program without
        a schedule; the scheduled programs' own members their schedules name."""
        mask = self._always_on_call.copy()
        for code, program in self._scheduled:
            for cid in program.on_call(at):
                i = self.index.get(cid)
                if i is not None and self.program[i] == code:
                    mask[i] = True
        return mask

    def positions(self, fixes: Mapping[str, Fix]) -> Positions:
        n = len(self.ids)
        has_fix = np.zeros(n, dtype=bool)
        lat, lon = np.full(n, math.nan), np.full(n, math.nan)
        at = np.zeros(n, dtype=np.int64)
        for cid, fix in fixes.items():
            i = self.index.get(cid)
            if i is not None:
                has_fix[i], lat[i], lon[i], at[i] = True, fix.lat, fix.lon, micros(fix.fixed_at)
        return Positions(has_fix, lat, lon, at)

    def positions_since(
        self, before: Positions, old: Mapping[str, Fix], new: Mapping[str, Fix]
    ) -> Positions:
        """:meth:`positions` of ``new``, from ``before`` (this table's positions of ``old``):
        only the clinicians whose Fix is not the same object as in ``old`` are written (a read
        of the store gives an unchanged row's Fix again), into copies (steps may hold
        ``before``); ``before`` itself when none changed. Made anew when ``new`` lacks a
        clinician ``old`` had."""
        index = self.index
        if any(cid not in new for cid in old):
            return self.positions(new)
        changed = [
            (i, fix)
            for cid, fix in new.items()
            if old.get(cid) is not fix and (i := index.get(cid)) is not None
        ]
        if not changed:
            return before
        has_fix, lat, lon, at = (
            a.copy() for a in (before.has_fix, before.lat, before.lon, before.fixed_at)
        )
        for i, fix in changed:
            has_fix[i], lat[i], lon[i], at[i] = True, fix.lat, fix.lon, micros(fix.fixed_at)
        return Positions(has_fix, lat, lon, at)

    def counts(self, pairs: Iterable[tuple[str, int]], to: Ints | None = None) -> Ints:
        """(clinician, count) pairs as an array in this table's order, added to ``to``
        (taken and returned) or to zeros; clinicians not in the table left out."""
        counts = np.zeros(len(self.ids), dtype=np.int64) if to is None else to
        index = self.index
        for cid, count in pairs:
            i = index.get(cid)
            if i is not None:
                counts[i] += count
        return counts

    def candidates(
        self,
        *,
        availability: Iterable[tuple[str, str]],
        on_call: Bools,
        positions: Positions,
        busy: Iterable[str],
        incident_pages: Iterable[tuple[str, str]],
        recent: Iterable[tuple[str, int]],
        recent_before: Ints | None = None,
    ) -> Candidates:
        """Every clinician's state: ``availability`` (clinician, state) of those who set one
        (the others are available), ``busy`` ids, ``incident_pages`` (clinician, page state)
        of this incident, ``recent`` (clinician, pages in the recent window) added to
        ``recent_before`` (in this table's order, taken; none: zeros)."""
        n, index = len(self.ids), self.index
        states = np.zeros(n, dtype=np.int8)  # 0: available
        for cid, state in availability:
            i = index.get(cid)
            if i is not None:
                states[i] = _AVAILABILITY[state]
        busy_mask = np.zeros(n, dtype=bool)
        busy_mask[[index[cid] for cid in busy if cid in index]] = True
        paged, declined = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        for cid, state in incident_pages:
            i = index.get(cid)
            if i is not None:
                paged[i] = True
                declined[i] |= state == "declined"
        counts = self.counts(recent, recent_before)
        return Candidates(
            ids=self.ids, index=index, id_rank=self.id_rank, programs=self.programs,
            program=self.program, availability=states, on_call=on_call,
            has_fix=positions.has_fix, lat=positions.lat, lon=positions.lon,
            fixed_at=positions.fixed_at, busy=busy_mask, paged=paged, declined=declined,
            recent=counts,
        )  # fmt: skip
