"""The outcome report's aggregates computed in Python from loaded rows.

Not what the daemon uses (:mod:`corespond.daemon.outcomes` aggregates in SQL): this is the
plain, row-by-row statement of the same definitions, kept as the test oracle that the SQL must
agree with on every backend, and as the baseline ``bench/report.py`` measures SQL against.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, select

from corespond.daemon.outcomes import (
    ALL,
    ARRESTED,
    DAY,
    DESTINATIONS,
    DURATIONS,
    ED_DISPOSITIONS,
    ENFORCEMENT,
    LINKAGE_DAYS,
    NOT_RECORDED,
    REPEAT_DAYS,
    Aggregates,
    ReportRequest,
)
from corespond.daemon.store.tables import encounter_referrals, encounters, incidents
from corespond.daemon.store.tables import referrals as hl7_referrals

GROUP_COLUMNS = {
    "program": "program",
    "agency": "agency",
    "zone": "zone",
    "race": "race_group",
    "gender": "gender",
    "age": "age_band",
}


# The columns the report reads (not the whole row: a million of those is gigabytes).
READ = tuple(
    encounters.c[name]
    for name in (
        "id", "person_id", "program", "agency", "zone", "race_group", "gender", "age_band",
        "call_received_at", "call_received_epoch", "cad_incident_no", "bh_nexus_confirmed",
        "disposition",
        "destination_type", "would_have_been_ed", "would_have_been_arrest", "use_of_force",
        "injury_subject", "injury_officer", "on_scene_at", "service_on_scene",
        *DURATIONS.values(),
    )
)  # fmt: skip


def _epoch(at: datetime) -> int:
    return math.floor(at.timestamp())


def _label(value: Any) -> str:
    return NOT_RECORDED if value is None else str(value)


def _group_of(by: str | None) -> Callable[[dict[str, Any]], str]:
    if by is None:
        return lambda row: ALL
    if by == "month":
        return lambda row: row["call_received_at"].strftime("%Y-%m")
    column = GROUP_COLUMNS[by]
    return lambda row: _label(row[column])


def reference_aggregates(conn: Connection, req: ReportRequest) -> Aggregates:
    """Load the encounters the report reads and aggregate them here."""
    e = encounters.c
    fu = req.frequent_utilizer
    lookback = req.since - timedelta(days=fu.window_days)
    lookahead = req.until + timedelta(days=max(REPEAT_DAYS))
    cond = and_(e.call_received_at >= min(lookback, req.since), e.call_received_at < lookahead)
    if req.program is not None:
        cond = and_(cond, e.program == req.program)
    rows = [dict(r) for r in conn.execute(select(*READ).where(cond)).mappings()]
    referral_rows: list[Any] = list(
        conn.execute(
            select(
                encounter_referrals.c.encounter_id,
                encounter_referrals.c.outcome,
                encounter_referrals.c.appointment_at,
            )
        )
    )
    # HL7 referrals sent for an encounter's CAD incident, not cancelled; accepted with an
    # appointment date (RRI^I12) is enrolled.
    of_incident: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        if row["cad_incident_no"] is not None:
            of_incident[row["cad_incident_no"]].append(row["id"])
    h = hl7_referrals.c
    for incident_ref, outcome, appointment_at in conn.execute(
        select(h.incident_ref, h.outcome, h.appointment_at).where(h.state != "cancelled")
    ):
        enrolled = outcome == "accepted" and appointment_at is not None
        for encounter_id in of_incident.get(incident_ref, ()):
            referral_rows.append(
                (encounter_id, "enrolled" if enrolled else "other", appointment_at)
            )
    group = _group_of(req.by)
    received = {row["id"]: row["call_received_epoch"] for row in rows}
    referral: dict[int, dict[str, int]] = {}
    for encounter_id, outcome, appointment_at in referral_rows:
        if encounter_id not in received:
            continue
        flags = referral.setdefault(
            encounter_id, {"referred": 1, "enrolled": 0, **{f"linked_{d}": 0 for d in LINKAGE_DAYS}}
        )
        if outcome == "enrolled":
            flags["enrolled"] = 1
            if appointment_at is not None:
                at = _epoch(appointment_at)
                flags["enrolled_at"] = min(flags.get("enrolled_at", at), at)
                gap = at - received[encounter_id]
                for d in LINKAGE_DAYS:
                    if gap <= d * DAY:
                        flags[f"linked_{d}"] = 1

    def in_period(row: dict[str, Any]) -> bool:
        return bool(req.since <= row["call_received_at"] < req.until)

    enc: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    hist: dict[str, dict[str, dict[int, int]]] = {
        k: defaultdict(lambda: defaultdict(int)) for k in DURATIONS
    }
    zones: dict[str, int] = defaultdict(int)
    for row in rows:
        if not in_period(row):
            continue
        c = enc[group(row)]
        c["encounters"] += 1
        bh = row["bh_nexus_confirmed"] is True
        d = row["disposition"]
        documented = bh and d is not None
        c["bh"] += bh
        c["documented"] += documented
        c["unlinked"] += bh and row["person_id"] is None
        c["referred"] += bh and row["id"] in referral
        c["active"] += bh and row["on_scene_at"] is not None
        c["served"] += bh and row["on_scene_at"] is not None and row["service_on_scene"] is True
        if bh:
            zones[_label(row["zone"])] += 1
            for key, column in DURATIONS.items():
                value = row[column]
                if value is not None and (key != "officer_returned" or value > 0):
                    hist[key][group(row)][value] += 1
        if not documented:
            continue
        ed_transport = d in ED_DISPOSITIONS or (
            d in ("voluntary_transport", "involuntary_hold") and row["destination_type"] == "ed"
        )
        c["arrested"] += d in ARRESTED
        c["enforcement"] += d in ENFORCEMENT
        c["no_action"] += d == "resolved_on_scene"
        c["with_referral"] += d == "resolved_with_referral"
        c["voluntary"] += d == "voluntary_transport"
        c["involuntary"] += d == "involuntary_hold"
        c["ems"] += d == "ems_transport"
        c["ed_diverted"] += row["would_have_been_ed"] is True and not ed_transport
        cf_arrest = row["would_have_been_arrest"] is True
        c["cf_arrest"] += cf_arrest
        c["jail_diverted"] += cf_arrest and d not in ARRESTED
        c["use_of_force"] += row["use_of_force"] is True
        c["injury_subject"] += row["injury_subject"] is True
        c["injury_officer"] += row["injury_officer"] is True
        for dest in DESTINATIONS:
            c[f"voluntary_{dest}"] += d == "voluntary_transport" and row["destination_type"] == dest

    # Every BH encounter of a person (the program's, with --program), for frequent utilizers'
    # encounters before and after enrollment, which may lie anywhere in time.
    linked = and_(e.bh_nexus_confirmed.is_(True), e.person_id.is_not(None))
    if req.program is not None:
        linked = and_(linked, e.program == req.program)
    timelines: dict[int, list[int]] = defaultdict(list)
    for person_id, epoch in conn.execute(select(e.person_id, e.call_received_epoch).where(linked)):
        timelines[person_id].append(epoch)
    per = _persons(rows, req, group, in_period, referral, lookback, timelines)
    return Aggregates(
        encounters={g: dict(v) for g, v in enc.items()},
        persons=per,
        durations={k: {g: sorted(h.items()) for g, h in v.items()} for k, v in hist.items()},
        cad_calls=_cad(conn, req),
        zones=dict(zones),
    )


def _persons(
    rows: list[dict[str, Any]],
    req: ReportRequest,
    group: Callable[[dict[str, Any]], str],
    in_period: Callable[[dict[str, Any]], bool],
    referral: dict[int, dict[str, int]],
    lookback: datetime,
    timelines: dict[int, list[int]],
) -> dict[str, dict[str, int]]:
    fu = req.frequent_utilizer
    by_person: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if (
            row["bh_nexus_confirmed"] is True
            and row["person_id"] is not None
            and row["call_received_at"] >= lookback
        ):
            by_person[row["person_id"]].append(row)
    people: dict[tuple[str, int], dict[str, Any]] = {}
    for person, seen in by_person.items():
        seen.sort(key=lambda r: (r["call_received_epoch"], r["id"]))
        for n, row in enumerate(seen):
            if not in_period(row):
                continue
            key = (group(row), person)
            p = people.setdefault(
                key,
                {"contacts": 0, "gap": None, "frequent": 0, "referred": 0, "enrolled": 0,
                 **{f"linked_{d}": 0 for d in LINKAGE_DAYS}},
            )  # fmt: skip
            p["contacts"] += 1
            if n + 1 < len(seen):
                gap = seen[n + 1]["call_received_epoch"] - row["call_received_epoch"]
                p["gap"] = gap if p["gap"] is None else min(p["gap"], gap)
            back = n - (fu.threshold - 1)
            if back >= 0:
                span = row["call_received_epoch"] - seen[back]["call_received_epoch"]
                if span <= fu.window_days * DAY:
                    p["frequent"] = 1
            for flag, value in referral.get(row["id"], {}).items():
                if flag == "enrolled_at":
                    p[flag] = min(p.get(flag, value), value)
                else:
                    p[flag] = max(p[flag], value)
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    window = fu.window_days * DAY
    for (g, person), p in people.items():
        c = out[g]
        if p["frequent"] and "enrolled_at" in p:
            at = p["enrolled_at"]
            c["fu_enrolled"] += 1
            c["fu_before"] += sum(at - window <= t < at for t in timelines[person])
            c["fu_after"] += sum(at <= t < at + window for t in timelines[person])
        c["persons"] += 1
        c["referred"] += p["referred"]
        c["enrolled"] += p["enrolled"]
        c["frequent"] += p["frequent"]
        c["frequent_encounters"] += p["contacts"] if p["frequent"] else 0
        c["person_encounters"] += p["contacts"]
        for d in LINKAGE_DAYS:
            c[f"linked_{d}"] += p[f"linked_{d}"]
        for d in REPEAT_DAYS:
            c[f"repeat_{d}"] += p["gap"] is not None and p["gap"] <= d * DAY
        band = "1" if p["contacts"] == 1 else "2" if p["contacts"] == 2 else "3+"
        c[f"band_{band}"] += 1
        c[f"band_{band}_enrolled"] += p["enrolled"] == 1
    return {g: dict(v) for g, v in out.items()}


def _cad(conn: Connection, req: ReportRequest) -> dict[str, int] | None:
    if req.by not in (None, "month", "agency", "zone"):
        return None
    out: dict[str, int] = defaultdict(int)
    i = incidents.c
    for opened, first, agency, zone in conn.execute(
        select(i.opened_at, i.first_received_at, i.agency, i.zone)
    ):
        at = opened or first
        if not req.since <= at < req.until:
            continue
        label = {
            None: ALL,
            "month": at.strftime("%Y-%m"),
            "agency": _label(agency),
            "zone": _label(zone),
        }[req.by]
        out[label] += 1
    return dict(out)
