"""The outcome report: every metric of a co-responder program, computed in SQL.

:func:`outcome_report` runs a handful of aggregate queries (SQLAlchemy Core, the same SQL
meaning on SQLite and PostgreSQL) over the encounters of a period and returns a
:class:`Report`: each metric with its definition, per group (month, program, agency, zone,
race/ethnicity group, gender or age band), small cells suppressed. No row of the result
names a person or an incident.

Definitions (printed beside every figure, see :data:`METRICS`):

- *BH encounters*: encounters in the period whose clinician confirmed a behavioral-health nexus;
  *documented*: those of them with a primary disposition recorded. Disposition rates are over
  documented BH encounters, so that encounters still open do not count as "no arrest".
- Times are whole seconds (each time truncated to the second, then subtracted); medians and
  90th percentiles are nearest-rank over the exact per-second distribution that SQL returns.
- Person metrics count pseudonymous persons (encounters not linked to a person are left out
  and counted separately).
- Referral linkage reads a ``referral_outcomes`` relation: one row per referral with the columns
  ``encounter_id``, ``referred_at``, ``provider``, ``outcome`` (pending, accepted, declined,
  enrolled, no_show, cancelled) and ``appointment_at``. By default it is the union of the
  referrals recorded on encounters (``encounter_referrals``) and the HL7 referrals sent to
  providers (``referrals``, matched to the encounter by CAD incident number), whose RRI^I12
  answers map as: accepted with an appointment date = enrolled (linked to care at that date),
  accepted without one = accepted, rejected = declined, pending = pending; a cancelled HL7
  referral does not count.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    Integer,
    Select,
    String,
    and_,
    case,
    func,
    literal,
    not_,
    or_,
    select,
    true,
    union_all,
)

from corespond.daemon.config import FrequentUtilizerConfig
from corespond.daemon.store.sql_time import epoch_month, epoch_seconds, utc_month
from corespond.daemon.store.tables import (
    ROLLUP_COUNTS,
    encounter_referrals,
    encounters,
    incidents,
    report_person_facts,
    report_rollup_counts,
    report_rollup_durations,
    report_rollup_state,
)
from corespond.daemon.store.tables import referrals as hl7_referrals

GROUPINGS = ("month", "program", "agency", "zone", "race", "gender", "age")
ALL = "all"
NOT_RECORDED = "(not recorded)"
DAY = 86_400
LINKAGE_DAYS = (30, 90)
REPEAT_DAYS = (30, 90, 365)
ED_DISPOSITIONS = ("ems_transport",)  # an EMS transport goes to an emergency department
ENFORCEMENT = ("arrest", "citation", "jail_booking")
ARRESTED = ("arrest", "jail_booking")
DESTINATIONS = ("crisis_center", "ed", "detox", "shelter", "home_family", "other")


# --- the request and the result ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportRequest:
    start: date  # first day, UTC
    end: date  # last day (inclusive), UTC
    program: str | None = None
    by: str | None = None
    suppress_below: int = 11
    frequent_utilizer: FrequentUtilizerConfig = field(default_factory=FrequentUtilizerConfig)
    zone_population: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError("the period ends before it starts")
        if self.by is not None and self.by not in GROUPINGS:
            raise ValueError(f"--by must be one of {', '.join(GROUPINGS)}")

    @property
    def since(self) -> datetime:
        return datetime.combine(self.start, time(), UTC)

    @property
    def until(self) -> datetime:  # exclusive
        return datetime.combine(self.end + timedelta(days=1), time(), UTC)


@dataclass(frozen=True, slots=True)
class Value:
    """One cell: a count, a rate (numerator/denominator) or a time in seconds."""

    value: float | int | None
    numerator: int | None = None
    denominator: int | None = None
    suppressed: bool = False

    def shown(self, kind: str) -> str:
        if self.suppressed:
            return "suppressed"
        if self.value is None:
            return "-"
        if kind == "rate":
            return f"{100 * self.value:.1f}% ({self.numerator}/{self.denominator})"
        if kind == "seconds":
            return duration_text(int(self.value))
        if kind == "hours":
            return f"{self.value:.1f} h"
        if kind == "per1000":
            return f"{self.value:.2f}"
        if kind == "per_person":
            return f"{self.value:.2f} per person ({self.numerator}/{self.denominator})"
        return str(self.value)

    def as_json(self) -> dict[str, Any]:
        if self.suppressed:
            return {"suppressed": True}
        out: dict[str, Any] = {"value": self.value}
        if self.numerator is not None:
            out["numerator"] = self.numerator
            out["denominator"] = self.denominator
        return out


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    definition: str
    kind: str  # count, rate, seconds, hours, per1000, per_person
    values: dict[str, Value]


@dataclass(frozen=True, slots=True)
class Report:
    request: ReportRequest
    groups: list[str]
    metrics: list[Metric]
    areas: list[Metric]  # keyed by zone, not by group
    notes: list[str]

    def metric(self, key: str) -> Metric:
        return next(m for m in self.metrics if m.key == key)


def duration_text(seconds: int) -> str:
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# --- the queries --------------------------------------------------------------------------------


def group_column(by: str | None) -> ColumnElement[Any]:
    e = encounters.c
    columns: dict[str, ColumnElement[Any]] = {
        # The month of the whole second (the same month): an integer the report's covering
        # indexes hold, where the time text is not.
        "month": epoch_month(e.call_received_epoch),
        "program": e.program,
        "agency": e.agency,
        "zone": e.zone,
        "race": e.race_group,
        "gender": e.gender,
        "age": e.age_band,
    }
    if by is None:
        return literal(ALL, String())
    return columns[by]


def _in_period(req: ReportRequest, *, by_value_index: bool = False) -> ColumnElement[bool]:
    """In the period and program. ``by_value_index``: the query groups by a column with a
    covering index (tables.REPORT_INDEXED); the period is then written so that no index can
    search it (``epoch + 0``, the same meaning), else SQLite's planner, given the statistics
    of the several low-cardinality report indexes, may skip-scan another one and fetch every
    row from the table instead of reading the covering index in the column's order."""
    e = encounters.c
    cond = _received_between(req.since, req.until, searchable=not by_value_index)
    if req.program is not None:
        cond = and_(cond, e.program == req.program)
    return cond


def _received_between(
    since: datetime, until: datetime, *, searchable: bool = True
) -> ColumnElement[bool]:
    """Received in [since, until), both whole seconds. On the derived integer, not the indexed
    time: a report reads most of the table, and SQLite would otherwise walk the time index and
    fetch every row by id (several times slower than scanning the table)."""
    epoch: ColumnElement[int] = encounters.c.call_received_epoch
    if not searchable:
        epoch = epoch + literal(0, Integer())
    return and_(epoch >= int(since.timestamp()), epoch < int(until.timestamp()))


def _count(cond: ColumnElement[bool]) -> Any:
    """How many rows meet ``cond``: ``count(*) FILTER (WHERE ...)``, which SQLite (3.30 and
    later) evaluates about a third faster than ``sum(CASE WHEN ... THEN 1 ELSE 0 END)``; 0
    rather than NULL over no rows, which the callers read as 0 either way."""
    return func.count().filter(cond)


def _is(column: Any) -> ColumnElement[bool]:
    return column.is_(True)


def default_referral_outcomes(of: ColumnElement[bool] | None = None) -> FromClause:
    """The referral_outcomes relation: referrals recorded on encounters, and HL7 referrals
    with their RRI^I12 outcomes (see the module's notes for the mapping). ``of``: only the
    referrals of the encounters that meet it (the rollups recompute a few at a time)."""
    r = encounter_referrals.c
    recorded = select(
        r.encounter_id.label("encounter_id"),
        r.referred_at.label("referred_at"),
        r.provider.label("provider"),
        r.outcome.label("outcome"),
        r.appointment_at.label("appointment_at"),
    )
    if of is not None:
        recorded = recorded.select_from(
            encounter_referrals.join(encounters, encounters.c.id == r.encounter_id)
        ).where(of)
    h, e = hl7_referrals.c, encounters.c
    outcome = case(
        (and_(h.outcome == "accepted", h.appointment_at.is_not(None)), literal("enrolled")),
        (h.outcome == "accepted", literal("accepted")),
        (h.outcome == "rejected", literal("declined")),
        else_=literal("pending"),
    )
    sent = (
        select(e.id, h.created_at, h.provider, outcome, h.appointment_at)
        .select_from(hl7_referrals.join(encounters, e.cad_incident_no == h.incident_ref))
        .where(h.state != "cancelled")
    )
    if of is not None:
        sent = sent.where(of)
    return union_all(recorded, sent).subquery("referral_outcomes")


def referred_condition() -> ColumnElement[bool]:
    """An encounter has a referral in the default referral_outcomes relation (the rollups'
    ``referred`` count: the same encounters :func:`referrals_per_encounter` finds)."""
    e, r, h = encounters.c, encounter_referrals.c, hl7_referrals.c
    return or_(
        select(r.id).where(r.encounter_id == e.id).exists(),
        select(h.id).where(h.incident_ref == e.cad_incident_no, h.state != "cancelled").exists(),
    )


def referrals_per_encounter(
    referral_outcomes: FromClause, of: ColumnElement[bool] | None = None
) -> FromClause:
    """Per encounter (``of``: of those that meet it): referred at all, enrolled within 30 and
    90 days of the call."""
    r = referral_outcomes.c
    e = encounters.c
    enrolled = r.outcome == "enrolled"
    gap = epoch_seconds(r.appointment_at) - e.call_received_epoch
    query = (
        select(
            r.encounter_id.label("encounter_id"),
            literal(1, Integer()).label("referred"),
            func.max(case((enrolled, 1), else_=0)).label("enrolled"),
            # When the person enrolled (linked to care): the earliest enrolled appointment.
            func.min(
                case(
                    (and_(enrolled, r.appointment_at.is_not(None)), epoch_seconds(r.appointment_at))
                )
            ).label("enrolled_at"),
            *(
                func.max(
                    case(
                        (and_(enrolled, r.appointment_at.is_not(None), gap <= days * DAY), 1),
                        else_=0,
                    )
                ).label(f"linked_{days}")
                for days in LINKAGE_DAYS
            ),
        )
        .select_from(referral_outcomes.join(encounters, e.id == r.encounter_id))
        .group_by(r.encounter_id)
    )
    if of is not None:
        query = query.where(of)
    return query.subquery("per_encounter_referrals")


def encounter_count_columns() -> dict[str, Any]:
    """Every per-encounter count of the report (but ``referred``), as aggregate SQL over
    ``encounters``: what :func:`encounter_counts` selects and the rollups keep."""
    e = encounters.c
    bh = _is(e.bh_nexus_confirmed)
    documented = and_(bh, e.disposition.is_not(None))
    d = e.disposition
    ed_transport = or_(
        d.in_(ED_DISPOSITIONS),
        and_(d.in_(("voluntary_transport", "involuntary_hold")), e.destination_type == "ed"),
    )
    cf_arrest = and_(documented, _is(e.would_have_been_arrest))
    counts: dict[str, Any] = {
        "encounters": func.count(),
        "bh": _count(bh),
        "documented": _count(documented),
        "arrested": _count(and_(documented, d.in_(ARRESTED))),
        "enforcement": _count(and_(documented, d.in_(ENFORCEMENT))),
        "no_action": _count(and_(documented, d == "resolved_on_scene")),
        "with_referral": _count(and_(documented, d == "resolved_with_referral")),
        "voluntary": _count(and_(documented, d == "voluntary_transport")),
        "involuntary": _count(and_(documented, d == "involuntary_hold")),
        "ems": _count(and_(documented, d == "ems_transport")),
        "ed_diverted": _count(and_(documented, _is(e.would_have_been_ed), not_(ed_transport))),
        "cf_arrest": _count(cf_arrest),
        "jail_diverted": _count(and_(cf_arrest, d.not_in(ARRESTED))),
        "active": _count(and_(bh, e.on_scene_at.is_not(None))),
        "served": _count(and_(bh, e.on_scene_at.is_not(None), _is(e.service_on_scene))),
        "use_of_force": _count(and_(documented, _is(e.use_of_force))),
        "injury_subject": _count(and_(documented, _is(e.injury_subject))),
        "injury_officer": _count(and_(documented, _is(e.injury_officer))),
        "unlinked": _count(and_(bh, e.person_id.is_(None))),
    }
    for dest in DESTINATIONS:
        counts[f"voluntary_{dest}"] = _count(
            and_(documented, d == "voluntary_transport", e.destination_type == dest)
        )
    return counts


def encounter_counts(
    conn: Connection,
    req: ReportRequest,
    referrals: FromClause,
    *,
    stored_referrals: bool = False,
) -> dict[str, dict[str, int]]:
    """Per group, every per-encounter count: from the rollups for the whole months of the
    period (when built), from the encounters for the rest. ``stored_referrals``: ``referrals``
    is the default relation, whose ``referred`` count the rollups keep too."""
    e = encounters.c
    g = group_column(req.by).label("g")
    counts = encounter_count_columns()
    months, rest = _rollup_split(conn, req)
    out: dict[str, dict[str, int]] = {}
    referred_parts = [req]
    if months is not None:
        rolled = _rollup_counts(conn, req, months)
        if stored_referrals:
            referred_parts = rest
        else:
            for values in rolled.values():
                values.pop("referred")
        _add_counts(out, rolled)
    for part in rest:
        query = _grouped(
            select(g, *(v.label(k) for k, v in counts.items())).where(_in_period(part)), part, g
        )
        _add_counts(
            out,
            {
                _label(row.g): {k: int(row._mapping[k] or 0) for k in counts}
                for row in conn.execute(query)
            },
        )
    out = {label: values for label, values in out.items() if values.get("encounters")}
    # Encounters referred, counted from the (far fewer) referrals rather than joined to all.
    for part in referred_parts:
        referred = _grouped(
            select(g, func.count().label("n"))
            .select_from(referrals.join(encounters, e.id == referrals.c.encounter_id))
            .where(_in_period(part), _is(e.bh_nexus_confirmed)),
            part,
            g,
        )
        for row in conn.execute(referred):
            if row.n:
                values = out.setdefault(_label(row.g), {k: 0 for k in counts})
                values["referred"] = values.get("referred", 0) + int(row.n)
    for values in out.values():
        values.setdefault("referred", 0)
    return out


def _add_counts(into: dict[str, dict[str, int]], more: Mapping[str, Mapping[str, int]]) -> None:
    for label, values in more.items():
        have = into.setdefault(label, {})
        for k, n in values.items():
            have[k] = have.get(k, 0) + n


# --- the rollups (corespond.daemon.rollups keeps them) -------------------------------------------


def rollup_threshold(conn: Connection) -> int | None:
    """The frequent-utilizer threshold the rollups were built for; None: no rollups."""
    value = conn.execute(
        select(report_rollup_state.c.value).where(report_rollup_state.c.name == "fu_threshold")
    ).scalar()
    return None if value is None else int(value)


def _rollup_split(
    conn: Connection, req: ReportRequest
) -> tuple[tuple[str, str] | None, list[ReportRequest]]:
    """The whole UTC months of the period (first and last ``YYYY-MM``) that the rollups
    answer, and the days around them as periods of their own, read from the encounters. The
    period is cut by UTC day, as before: a month is whole when all its days are in it."""
    if rollup_threshold(conn) is None:
        return None, [req]
    first = req.start if req.start.day == 1 else _next_month(req.start)
    after = _next_month(req.end)  # first day of the month after the end's month
    last = after - timedelta(days=1)
    if last != req.end:
        last = req.end.replace(day=1) - timedelta(days=1)  # end of the month before
    if first > last:
        return None, [req]
    rest = []
    if req.start < first:
        rest.append(replace(req, start=req.start, end=first - timedelta(days=1)))
    if last < req.end:
        rest.append(replace(req, start=last + timedelta(days=1), end=req.end))
    return (first.strftime("%Y-%m"), last.strftime("%Y-%m")), rest


def _next_month(day: date) -> date:
    return (day.replace(day=28) + timedelta(days=4)).replace(day=1)


def _rollup_group(req: ReportRequest, table: Any) -> list[Any]:
    r = table.c
    if req.by == "month":
        return [r.month]
    if req.by == "program":
        return [r.program]
    if req.by is None:
        return []
    return [r.recorded, r.value]


def _rollup_label(req: ReportRequest, row: Any) -> str:
    if req.by is None:
        return ALL
    if req.by in ("month", "program"):
        return str(row[0])
    return str(row[1]) if row[0] else NOT_RECORDED


def _rollup_where(req: ReportRequest, table: Any, months: tuple[str, str]) -> Any:
    from corespond.daemon.rollups import DIMENSION_OF_GROUPING

    r = table.c
    dim = DIMENSION_OF_GROUPING[req.by]
    cond = and_(r.dim == dim, r.month >= months[0], r.month <= months[1])
    if dim == "all":  # its one cell, said outright: the key's next column is then in order
        cond = and_(cond, r.recorded == true(), r.value == "")
    if req.program is not None:
        cond = and_(cond, r.program == req.program)
    return cond


def _rollup_counts(
    conn: Connection, req: ReportRequest, months: tuple[str, str]
) -> dict[str, dict[str, int]]:
    r = report_rollup_counts.c
    by = _rollup_group(req, report_rollup_counts)
    query = select(*by, *(func.sum(r[k]).label(k) for k in ROLLUP_COUNTS)).where(
        _rollup_where(req, report_rollup_counts, months)
    )
    if by:
        query = query.group_by(*by)
    return {
        _rollup_label(req, row): {k: int(row._mapping[k] or 0) for k in ROLLUP_COUNTS}
        for row in conn.execute(query)
    }


def _grouped(query: Select[Any], req: ReportRequest, g: Any) -> Select[Any]:
    """``query`` grouped by the report's grouping; without one, a plain aggregate (a GROUP BY
    a constant would make SQLite sort every row for nothing)."""
    return query if req.by is None else query.group_by(g)


DURATIONS = {
    # key: the derived column (see encounters.derived_columns)
    "response": "response_seconds",
    "page_ack": "page_ack_seconds",
    "on_scene": "on_scene_seconds",
    "officer_returned": "officer_returned_seconds",
}


def duration_histograms(
    conn: Connection, req: ReportRequest
) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """Per duration and group: (seconds, how many) sorted by seconds; from the rollups for
    the whole months of the period (when built), from the encounters for the rest."""
    months, rest = _rollup_split(conn, req)
    merged: dict[str, dict[str, dict[int, int]]] = {key: {} for key in DURATIONS}
    if months is not None:
        r = report_rollup_durations.c
        by = _rollup_group(req, report_rollup_durations)
        for key in DURATIONS:
            # Grouped by the seconds first: by month, the rows are then read in key order
            # (measure, dim, recorded, value, seconds, month), not sorted.
            query = (
                select(*by, r.seconds, func.sum(r.n).label("n"))
                .where(_rollup_where(req, report_rollup_durations, months), r.measure == key)
                .group_by(r.seconds, *by)
            )
            for row in conn.execute(query):
                if row.n:
                    hist = merged[key].setdefault(_rollup_label(req, row), {})
                    hist[int(row.seconds)] = hist.get(int(row.seconds), 0) + int(row.n)
    for part in rest:
        for key, groups in _live_histograms(conn, part).items():
            for label, values in groups.items():
                hist = merged[key].setdefault(label, {})
                for seconds, n in values:
                    hist[seconds] = hist.get(seconds, 0) + n
    return {
        key: {label: sorted(hist.items()) for label, hist in groups.items() if hist}
        for key, groups in merged.items()
    }


def _live_histograms(
    conn: Connection, req: ReportRequest
) -> dict[str, dict[str, list[tuple[int, int]]]]:
    e = encounters.c
    g = group_column(req.by).label("g")
    out: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for key, name in DURATIONS.items():
        seconds = e[name]
        cond = and_(
            _in_period(req, by_value_index=True), _is(e.bh_nexus_confirmed), seconds.is_not(None)
        )
        if key == "officer_returned":  # only where the clinician stayed on after the officer
            cond = and_(cond, seconds > 0)
        # Without a grouping, by the seconds alone: SQLite reads them in the order of their
        # covering index (tables.REPORT_INDEXED) instead of sorting every row.
        query = select(g, seconds.label("s"), func.count().label("n")).where(cond)
        query = query.group_by(seconds) if req.by is None else query.group_by(g, seconds)
        hist: dict[str, list[tuple[int, int]]] = {}
        for row in conn.execute(query):
            hist.setdefault(_label(row.g), []).append((int(row.s), int(row.n)))
        out[key] = hist
    return out


def nearest_rank(histogram: Sequence[tuple[int, int]], percent: int) -> int | None:
    """The nearest-rank percentile of a sorted (value, count) histogram."""
    total = sum(n for _, n in histogram)
    if total == 0:
        return None
    rank = max(1, math.ceil(total * percent / 100))
    seen = 0
    for value, n in histogram:
        seen += n
        if seen >= rank:
            return value
    raise AssertionError("unreachable")


def _person_counts(
    conn: Connection, req: ReportRequest, referrals: FromClause, *, stored_referrals: bool = False
) -> dict[str, dict[str, int]]:
    """Per group: persons served, repeat encounters, frequent utilizers, referral linkage,
    enrollment by contact band and frequent utilizers' encounters before and after
    enrollment. Each person's place in their timeline (the seconds to their next BH
    encounter, and since the ``threshold - 1``-th before) comes from the person facts the
    rollups keep, when they were built for this threshold; else from a window pass over the
    encounters (the same figures, slower)."""
    e = encounters.c
    fu = req.frequent_utilizer
    referral_columns = (
        func.coalesce(referrals.c.referred, 0).label("referred"),
        func.coalesce(referrals.c.enrolled, 0).label("enrolled"),
        referrals.c.enrolled_at.label("enrolled_at"),
        *(func.coalesce(referrals.c[f"linked_{d}"], 0).label(f"linked_{d}") for d in LINKAGE_DAYS),
    )
    if rollup_threshold(conn) == fu.threshold:
        f = report_person_facts.c
        group = {
            None: literal(ALL, String()),
            "month": f.month,
            "program": f.program,
            "agency": f.agency,
            "zone": f.zone,
            "race": f.race_group,
            "gender": f.gender,
            "age": f.age_band,
        }[req.by]
        in_period = and_(
            f.call_received_epoch >= int(req.since.timestamp()),
            f.call_received_epoch < int(req.until.timestamp()),
        )
        if req.program is not None:
            in_period = and_(in_period, f.program == req.program)
        facts: FromClause = report_person_facts
        if stored_referrals:  # the facts hold each encounter's referrals: no join
            referral_columns = (
                f.referred, f.enrolled, f.enrolled_at, *(f[f"linked_{d}"] for d in LINKAGE_DAYS)
            )  # fmt: skip
        else:
            facts = facts.outerjoin(referrals, referrals.c.encounter_id == f.encounter_id)
        timeline = (
            select(
                f.person_id.label("person_id"),
                group.label("g"),
                true().label("in_period"),
                (f.gap if req.program is None else f.gap_program).label("gap"),
                (f.span if req.program is None else f.span_program).label("span"),
                *referral_columns,
            )
            .select_from(facts)
            .where(in_period)
            .subquery("timeline")
        )
        events = select(f.person_id.label("person_id"), f.call_received_epoch.label("epoch")).where(
            true() if req.program is None else f.program == req.program
        )
    else:
        lookback = req.since - timedelta(days=fu.window_days)
        lookahead = req.until + timedelta(days=max(REPEAT_DAYS))
        linked = and_(_is(e.bh_nexus_confirmed), e.person_id.is_not(None))
        if req.program is not None:
            linked = and_(linked, e.program == req.program)
        order = (e.call_received_epoch, e.id)
        timeline = (
            select(
                e.person_id.label("person_id"),
                group_column(req.by).label("g"),
                _received_between(req.since, req.until).label("in_period"),
                (
                    func.lead(e.call_received_epoch).over(partition_by=e.person_id, order_by=order)
                    - e.call_received_epoch
                ).label("gap"),
                (
                    e.call_received_epoch
                    - func.lag(e.call_received_epoch, fu.threshold - 1).over(
                        partition_by=e.person_id, order_by=order
                    )
                ).label("span"),
                *referral_columns,
            )
            .select_from(encounters.outerjoin(referrals, referrals.c.encounter_id == e.id))
            .where(linked, _received_between(lookback, lookahead))
            .subquery("timeline")
        )
        events = select(e.person_id.label("person_id"), e.call_received_epoch.label("epoch")).where(
            linked
        )
    t = timeline.c
    per_person = (
        select(
            t.g,
            t.person_id,
            func.count().label("contacts"),
            func.min(t.gap).label("gap"),
            func.max(case((t.span <= fu.window_days * DAY, 1), else_=0)).label("frequent"),
            func.max(t.referred).label("referred"),
            func.max(t.enrolled).label("enrolled"),
            func.min(t.enrolled_at).label("enrolled_at"),
            *(func.max(t[f"linked_{d}"]).label(f"linked_{d}") for d in LINKAGE_DAYS),
        )
        .where(t.in_period == true())
        .group_by(t.g, t.person_id)
        .cte("per_person")
    )
    p = per_person.c
    counts: dict[str, Any] = {
        "persons": func.count(),
        "referred": func.sum(p.referred),
        "enrolled": func.sum(p.enrolled),
        "frequent": func.sum(p.frequent),
        "frequent_encounters": func.sum(case((p.frequent == 1, p.contacts), else_=0)),
        "person_encounters": func.sum(p.contacts),
    }
    for d in LINKAGE_DAYS:
        counts[f"linked_{d}"] = func.sum(p[f"linked_{d}"])
    for d in REPEAT_DAYS:
        counts[f"repeat_{d}"] = _count(p.gap <= d * DAY)
    bands = {"1": p.contacts == 1, "2": p.contacts == 2, "3+": p.contacts >= 3}
    for band, band_cond in bands.items():
        counts[f"band_{band}"] = _count(band_cond)
        counts[f"band_{band}_enrolled"] = _count(and_(band_cond, p.enrolled == 1))
    main = select(p.g, *(v.label(k) for k, v in counts.items())).group_by(p.g).subquery("main")
    # Frequent utilizers who enrolled: their BH encounters (all of them, any group) in the
    # window before the enrollment and in the window from it on.
    ev = events.subquery("events")
    window = fu.window_days * DAY
    at = p.enrolled_at
    fu_counts = {
        "fu_enrolled": func.count(func.distinct(p.person_id)),
        "fu_before": _count(and_(ev.c.epoch >= at - window, ev.c.epoch < at)),
        "fu_after": _count(and_(ev.c.epoch >= at, ev.c.epoch < at + window)),
    }
    enrolled_fu = (
        select(p.g, *(v.label(k) for k, v in fu_counts.items()))
        .select_from(per_person.join(ev, ev.c.person_id == p.person_id))
        .where(p.frequent == 1, at.is_not(None))
        .group_by(p.g)
        .subquery("enrolled_fu")
    )
    m, x = main.c, enrolled_fu.c
    query = select(
        m.g, *(m[k] for k in counts), *(func.coalesce(x[k], 0).label(k) for k in fu_counts)
    ).select_from(main.outerjoin(enrolled_fu, m.g.is_not_distinct_from(x.g)))
    names = [*counts, *fu_counts]
    return {
        _label(row.g): {k: int(row._mapping[k] or 0) for k in names} for row in conn.execute(query)
    }


def _cad_calls(conn: Connection, req: ReportRequest) -> dict[str, int] | None:
    """All CAD incidents of the period, for the groupings incidents have."""
    if req.by not in (None, "month", "agency", "zone"):
        return None
    i = incidents.c
    received = func.coalesce(i.opened_at, i.first_received_at)
    g = {
        None: literal(ALL, String()),
        "month": utc_month(received),
        "agency": i.agency,
        "zone": i.zone,
    }[req.by].label("g")
    query = (
        select(g, func.count().label("n"))
        .where(and_(received >= req.since, received < req.until))
        .group_by(g)
    )
    return {_label(row.g): int(row.n) for row in conn.execute(query)}


def _zone_counts(conn: Connection, req: ReportRequest) -> dict[str, int]:
    months, rest = _rollup_split(conn, req)
    out: dict[str, int] = {}
    if months is not None:
        r = report_rollup_counts.c
        by_zone = replace(req, by="zone")
        query = (
            select(r.recorded, r.value, func.sum(r.bh).label("n"))
            .where(_rollup_where(by_zone, report_rollup_counts, months))
            .group_by(r.recorded, r.value)
        )
        for row in conn.execute(query):
            label = _rollup_label(by_zone, row)
            out[label] = out.get(label, 0) + int(row.n or 0)
    e = encounters.c
    for part in rest:
        query = (
            select(e.zone, func.count().label("n"))
            .where(_in_period(part, by_value_index=True), _is(e.bh_nexus_confirmed))
            .group_by(e.zone)
        )
        for row in conn.execute(query):
            label = _label(row.zone)
            out[label] = out.get(label, 0) + int(row.n)
    return {label: n for label, n in out.items() if n}


def _label(value: Any) -> str:
    return NOT_RECORDED if value is None else str(value)


# --- assembling the metrics ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Def:
    key: str
    label: str
    definition: str
    kind: str
    compute: Callable[[dict[str, int], dict[str, int]], tuple[int | None, int | None]]


def _rate(
    num: str, den: str, source: str = "e"
) -> Callable[[dict[str, int], dict[str, int]], tuple[int | None, int | None]]:
    def compute(enc: dict[str, int], per: dict[str, int]) -> tuple[int | None, int | None]:
        values = enc if source == "e" else per
        return values.get(num, 0), values.get(den, 0)

    return compute


def _metric_defs(fu: FrequentUtilizerConfig) -> list[_Def]:
    defs = [
        _Def(
            "arrest_avoidance",
            "Arrest-avoidance rate",
            "1 - (arrest or jail booking) / documented BH encounters",
            "rate",
            lambda e, p: (e.get("documented", 0) - e.get("arrested", 0), e.get("documented", 0)),
        ),
        _Def(
            "enforcement",
            "Enforcement rate",
            "(arrest + citation + jail booking) / documented BH encounters",
            "rate",
            _rate("enforcement", "documented"),
        ),
        _Def(
            "no_action",
            "No-action rate",
            "resolved on scene, no further action / documented BH encounters",
            "rate",
            _rate("no_action", "documented"),
        ),
        _Def(
            "resolved_with_referral",
            "Resolved with referral",
            "resolved on scene with referral / documented BH encounters",
            "rate",
            _rate("with_referral", "documented"),
        ),
        _Def(
            "voluntary_transport",
            "Voluntary transport rate",
            "voluntary transport / documented BH encounters",
            "rate",
            _rate("voluntary", "documented"),
        ),
    ]
    for dest in DESTINATIONS:
        defs.append(
            _Def(
                f"voluntary_transport_{dest}",
                f"  ... to {dest.replace('_', ' ')}",
                f"voluntary transport with destination {dest} / documented BH encounters",
                "rate",
                _rate(f"voluntary_{dest}", "documented"),
            )
        )
    defs += [
        _Def(
            "involuntary_hold",
            "Involuntary hold rate",
            "involuntary hold / documented BH encounters (use --by month for the trend)",
            "rate",
            _rate("involuntary", "documented"),
        ),
        _Def(
            "ems_transport",
            "EMS transport rate",
            "EMS (medical) transport / documented BH encounters",
            "rate",
            _rate("ems", "documented"),
        ),
        _Def(
            "ed_diversion",
            "ED diversion rate",
            "flagged 'would have been an ED visit' and not transported to an ED (EMS transport, "
            "or a transport or hold with destination ED) / documented BH encounters",
            "rate",
            _rate("ed_diverted", "documented"),
        ),
        _Def(
            "jail_diversion",
            "Jail diversion rate",
            "flagged 'would have been an arrest' and neither arrested nor booked / "
            "encounters flagged 'would have been an arrest'",
            "rate",
            _rate("jail_diverted", "cf_arrest"),
        ),
        _Def(
            "service_on_scene",
            "Service-on-scene rate",
            "BH encounters with at least one action / BH encounters with an on-scene time",
            "rate",
            _rate("served", "active"),
        ),
        _Def(
            "referral",
            "Referral rate",
            "BH encounters with at least one referral / BH encounters",
            "rate",
            _rate("referred", "bh"),
        ),
    ]
    for d in LINKAGE_DAYS:
        defs.append(
            _Def(
                f"linkage_{d}",
                f"Linkage rate ({d} days)",
                f"persons with a referral outcome 'enrolled' whose appointment is within {d} "
                "days of the call / persons referred",
                "rate",
                _rate(f"linked_{d}", "referred", "p"),
            )
        )
    for band in ("1", "2", "3+"):
        defs.append(
            _Def(
                f"enrollment_band_{band}",
                f"Enrollment, {band} contact(s)",
                f"persons with {band} BH encounter(s) in the period who enrolled / those persons",
                "rate",
                _rate(f"band_{band}_enrolled", f"band_{band}", "p"),
            )
        )
    for d in REPEAT_DAYS:
        defs.append(
            _Def(
                f"repeat_{d}",
                f"Repeat-encounter rate ({d} days)",
                f"persons served with another BH encounter within {d} days after one in the "
                "period / persons served",
                "rate",
                _rate(f"repeat_{d}", "persons", "p"),
            )
        )
    defs += [
        _Def(
            "frequent_utilizers",
            "Frequent utilizers",
            f"persons served who are frequent utilizers: {fu.describe()}",
            "count",
            lambda e, p: (p.get("frequent", 0), None),
        ),
        _Def(
            "frequent_utilizer_share",
            "Frequent utilizers' encounter share",
            "BH encounters of frequent utilizers / BH encounters linked to a person",
            "rate",
            _rate("frequent_encounters", "person_encounters", "p"),
        ),
        _Def(
            "frequent_utilizers_enrolled",
            "Frequent utilizers enrolled",
            "frequent utilizers enrolled in services: a referral from one of their BH encounters "
            "in the period has the outcome 'enrolled' with an appointment date; the earliest such "
            "date is their enrollment",
            "count",
            lambda e, p: (p.get("fu_enrolled", 0), None),
        ),
        _Def(
            "frequent_utilizer_rate_before",
            "Frequent utilizers' encounter rate before enrollment",
            f"BH encounters of the frequent utilizers enrolled in the {fu.window_days} days "
            "before their enrollment / those persons (encounters per person)",
            "per_person",
            _rate("fu_before", "fu_enrolled", "p"),
        ),
        _Def(
            "frequent_utilizer_rate_after",
            "Frequent utilizers' encounter rate after enrollment",
            f"BH encounters of the frequent utilizers enrolled in the {fu.window_days} days "
            "from their enrollment on / those persons (encounters per person; a recent "
            "enrollment has not had the whole window yet)",
            "per_person",
            _rate("fu_after", "fu_enrolled", "p"),
        ),
        _Def(
            "use_of_force",
            "Use-of-force rate",
            "use of force / documented BH encounters",
            "rate",
            _rate("use_of_force", "documented"),
        ),
        _Def(
            "injury_subject",
            "Injury rate (person served)",
            "injury to the person served / documented BH encounters",
            "rate",
            _rate("injury_subject", "documented"),
        ),
        _Def(
            "injury_officer",
            "Injury rate (officer)",
            "injury to an officer / documented BH encounters",
            "rate",
            _rate("injury_officer", "documented"),
        ),
    ]
    return defs


def outcome_report(
    conn: Connection,
    req: ReportRequest,
    referral_outcomes: FromClause | None = None,
) -> Report:
    """The outcome report for ``req``; run it in one read transaction."""
    return assemble_report(req, report_aggregates(conn, req, referral_outcomes))


@dataclass(frozen=True, slots=True)
class Aggregates:
    """What the SQL returns: counts per group, per-second duration histograms, zone counts."""

    encounters: dict[str, dict[str, int]]
    persons: dict[str, dict[str, int]]
    durations: dict[str, dict[str, list[tuple[int, int]]]]
    cad_calls: dict[str, int] | None
    zones: dict[str, int]
    notes: tuple[str, ...] = ()  # how they were computed, when it is worth saying


def report_aggregates(
    conn: Connection, req: ReportRequest, referral_outcomes: FromClause | None = None
) -> Aggregates:
    referrals = referrals_per_encounter(
        referral_outcomes if referral_outcomes is not None else default_referral_outcomes()
    )
    with _sqlite_read_tuning(conn):  # first: SQLite sets temp_store outside a transaction
        built = rollup_threshold(conn)
        notes: tuple[str, ...] = ()
        if built is None:
            notes = ("Computed from the encounters: the report rollups are not built "
                     "(corespond report rebuild-rollups).",)  # fmt: skip
        elif built != req.frequent_utilizer.threshold:
            notes = (
                "The report rollups hold person facts for a frequent-utilizer threshold of "
                f"{built}, "
                f"not {req.frequent_utilizer.threshold}: the person figures were computed by the "
                "slower exact pass over the encounters (corespond report rebuild-rollups).",
            )
        stored = referral_outcomes is None  # the rollups keep the default relation's flags
        return Aggregates(
            encounters=encounter_counts(conn, req, referrals, stored_referrals=stored),
            persons=_person_counts(conn, req, referrals, stored_referrals=stored),
            durations=duration_histograms(conn, req),
            cad_calls=_cad_calls(conn, req),
            zones=_zone_counts(conn, req),
            notes=notes,
        )


# A report reads most of the encounters table and sorts up to a million rows; SQLite's
# defaults (a 2 MiB page cache, sorts spilled to temporary files, read() per page) make it pay
# for that several times over. Set on the report's connection only, and put back afterwards:
# the connection returns to a pool the daemon's writers share.
SQLITE_READ_PRAGMAS = {
    "cache_size": -256 * 1024,  # KiB: 256 MiB of page cache
    "mmap_size": 1 << 30,  # read the file through a 1 GiB memory map
    "temp_store": 2,  # MEMORY: sorters and transient indexes stay in memory
}


@contextlib.contextmanager
def _sqlite_read_tuning(conn: Connection) -> Iterator[None]:
    if conn.dialect.name != "sqlite":
        yield
        return
    before = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in SQLITE_READ_PRAGMAS}
    for name, value in SQLITE_READ_PRAGMAS.items():
        conn.exec_driver_sql(f"PRAGMA {name}={int(value)}")
    try:
        yield
    finally:
        for name, old in before.items():
            conn.exec_driver_sql(f"PRAGMA {name}={int(old or 0)}")


def assemble_report(req: ReportRequest, agg: Aggregates) -> Report:
    """The metrics, definitions and suppression over the aggregates."""
    enc, per, hist, cad = agg.encounters, agg.persons, agg.durations, agg.cad_calls
    groups = sorted(set(enc) | set(per), key=lambda g: (g == NOT_RECORDED, g))
    if not groups:
        groups = [ALL] if req.by is None else []
    low = req.suppress_below

    def small(n: int | None) -> bool:
        return n is not None and 0 < n < low

    metrics: list[Metric] = []

    def add(key: str, label: str, definition: str, kind: str, values: dict[str, Value]) -> None:
        metrics.append(Metric(key, label, definition, kind, values))

    def counts(name: str, source: Mapping[str, Mapping[str, int]]) -> dict[str, Value]:
        out = {}
        for g in groups:
            n = source.get(g, {}).get(name, 0)
            out[g] = Value(n, suppressed=small(n))
        return out

    add(
        "encounters",
        "Encounters",
        "encounters in the period (any nexus)",
        "count",
        counts("encounters", enc),
    )
    add(
        "bh_encounters",
        "BH call volume",
        "encounters with a behavioral-health nexus confirmed by the clinician",
        "count",
        counts("bh", enc),
    )
    add(
        "documented",
        "Documented BH encounters",
        "BH encounters with a primary disposition recorded (denominator of disposition rates)",
        "count",
        counts("documented", enc),
    )
    if cad is not None:
        share = {}
        for g in groups:
            num, den = enc.get(g, {}).get("bh", 0), cad.get(g, 0)
            share[g] = _rate_value(num, den, small)
        add(
            "bh_share_of_cad",
            "BH share of CAD calls",
            "BH encounters / all CAD incidents received in the period (all programs)",
            "rate",
            share,
        )
    add(
        "unlinked",
        "BH encounters without a person",
        "BH encounters not linked to a pseudonymous person (left out of person metrics)",
        "count",
        counts("unlinked", enc),
    )
    add(
        "persons",
        "Persons served",
        "distinct pseudonymous persons with a BH encounter",
        "count",
        counts("persons", per),
    )
    for d in _metric_defs(req.frequent_utilizer):
        values = {}
        for g in groups:
            part, whole = d.compute(enc.get(g, {}), per.get(g, {}))
            if d.kind == "count":
                values[g] = Value(part, suppressed=small(part))
            elif d.kind == "per_person":
                num, den = part or 0, whole or 0
                values[g] = Value(
                    num / den if den else None, num, den, suppressed=small(num) or small(den)
                )
            else:
                values[g] = _rate_value(part or 0, whole or 0, small)
        add(d.key, d.label, d.definition, d.kind, values)
    timing = [
        (
            "response",
            50,
            "Response time (median)",
            "median of on scene - clinician paged, BH encounters with both times",
        ),
        (
            "response",
            90,
            "Response time (90th percentile)",
            "90th percentile of on scene - clinician paged",
        ),
        (
            "page_ack",
            50,
            "Page acknowledgement time (median)",
            "median of page acknowledged - clinician paged",
        ),
        ("on_scene", 50, "Time on scene (median)", "median of cleared - on scene"),
        (
            "officer_returned",
            50,
            "Officer time returned (median)",
            "median of clinician cleared - officer cleared, where the officer left first",
        ),
    ]
    for key, percent, label, definition in timing:
        values = {}
        for g in groups:
            h = hist[key].get(g, [])
            n = sum(c for _, c in h)
            values[g] = Value(nearest_rank(h, percent), numerator=None, suppressed=small(n))
        add(f"{key}_p{percent}", label, definition, "seconds", values)
    returned = {}
    for g in groups:
        h = hist["officer_returned"].get(g, [])
        n = sum(c for _, c in h)
        total = sum(s * c for s, c in h)
        returned[g] = Value(round(total / 3600, 1) if n else None, suppressed=small(n))
    add(
        "officer_hours_returned",
        "Officer hours returned",
        "sum of clinician cleared - officer cleared, where the officer left first",
        "hours",
        returned,
    )
    return Report(req, groups, metrics, _areas(agg.zones, req, small), [*_notes(req), *agg.notes])


def _rate_value(num: int, den: int, small: Callable[[int | None], bool]) -> Value:
    if den == 0:
        return Value(None, num, den)
    return Value(num / den, num, den, suppressed=small(num) or small(den) or small(den - num))


def _areas(
    zones: dict[str, int], req: ReportRequest, small: Callable[[int | None], bool]
) -> list[Metric]:
    """Areas of greatest need: BH encounters by zone, per 1,000 residents where known."""
    ranked = sorted(zones.items(), key=lambda kv: (-kv[1], kv[0]))
    metric_rows = []
    count_values = {z: Value(n, suppressed=small(n)) for z, n in ranked}
    metric_rows.append(
        Metric(
            "zone_encounters",
            "BH encounters by zone (areas of greatest need)",
            "BH encounters per zone in the period, most first",
            "count",
            count_values,
        )
    )
    if req.zone_population:
        per = {}
        for z, n in ranked:
            population = req.zone_population.get(z)
            if population:
                per[z] = Value(1000 * n / population, n, population, suppressed=small(n))
        metric_rows.append(
            Metric(
                "zone_per_1000",
                "BH encounters per 1,000 residents by zone",
                "BH encounters / zone population (outcomes.zone_population) x 1,000",
                "per1000",
                per,
            )
        )
    return metric_rows


def _notes(req: ReportRequest) -> list[str]:
    return [
        f"Frequent utilizer: {req.frequent_utilizer.describe()}.",
        f"Cells counting 1 to {req.suppress_below - 1} are suppressed, and so are rates "
        f"whose numerator, denominator or remainder count 1 to {req.suppress_below - 1}.",
        "Times are whole seconds; medians and percentiles are nearest-rank.",
        "Repeat encounters look up to 365 days past the period: a recent period undercounts.",
        "Referral linkage reads referral_outcomes (encounter_id, referred_at, provider, outcome, "
        "appointment_at): referrals recorded on encounters.",
        "No personal identifiers; zones and groups only.",
    ]


def report_rows(report: Report) -> Iterable[dict[str, Any]]:
    """The report in long form (one row per metric and group), for CSV."""
    for metric in [*report.metrics, *report.areas]:
        for group, value in metric.values.items():
            yield {
                "metric": metric.key,
                "label": metric.label.strip(" ."),
                "group": group,
                "value": "" if value.suppressed or value.value is None else value.value,
                "numerator": "" if value.suppressed or value.numerator is None else value.numerator,
                "denominator": ""
                if value.suppressed or value.denominator is None
                else value.denominator,
                "suppressed": value.suppressed,
                "definition": metric.definition,
            }


def report_json(report: Report) -> dict[str, Any]:
    req = report.request
    return {
        "period": {"from": req.start.isoformat(), "to": req.end.isoformat()},
        "program": req.program,
        "by": req.by,
        "suppress_below": req.suppress_below,
        "frequent_utilizer": {
            "threshold": req.frequent_utilizer.threshold,
            "window_days": req.frequent_utilizer.window_days,
            "definition": req.frequent_utilizer.describe(),
        },
        "groups": report.groups,
        "metrics": [
            {
                "key": m.key,
                "label": m.label.strip(" ."),
                "definition": m.definition,
                "kind": m.kind,
                "values": {g: v.as_json() for g, v in m.values.items()},
            }
            for m in report.metrics
        ],
        "areas": [
            {
                "key": m.key,
                "label": m.label,
                "definition": m.definition,
                "kind": m.kind,
                "values": {z: v.as_json() for z, v in m.values.items()},
            }
            for m in report.areas
        ],
        "notes": report.notes,
    }


__all__ = [
    "GROUPINGS",
    "Metric",
    "Report",
    "ReportRequest",
    "Value",
    "outcome_report",
    "report_json",
    "report_rows",
]
