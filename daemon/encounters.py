"""Encounters: one behavioral-health incident a clinician handled, and what came of it.

An encounter is created pre-filled from CAD and the daemon's records
(:func:`encounter_from_incident`, or :func:`create_encounter` for work without a CAD incident),
its timeline is filled by whoever knows each time (:func:`record_times`: CAD, paging, the
clinician), and the clinician completes it through a form or the API with
:func:`update_encounter`, which validates every field against the fixed vocabularies below and
the program's own fields (``outcomes.custom_fields``), and reports every problem at once with
its field path (:class:`EncounterInvalid`).

All functions are synchronous over a Connection, one transaction per call by the caller, plain
values out: run them in the store's thread pool (``IncidentStore.run_read`` or a writer).
Nothing here holds free text: every encounter column may feed an aggregate report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from corespond.daemon.config import CustomField, OutcomesConfig
from corespond.daemon.errors import SafeMessage
from corespond.daemon.people import IdentifierInvalid, identifiers_of, link_person
from corespond.daemon.rollups import (
    encounters_added,
    keeping_referral_flags,
    keeping_rollups,
    rebuild_rollups,
)
from corespond.daemon.store.sql_time import epoch_seconds, seconds_between
from corespond.daemon.store.tables import encounter_referrals, encounters, incidents

DISPOSITIONS = (
    "resolved_on_scene",
    "resolved_with_referral",
    "voluntary_transport",
    "involuntary_hold",
    "ems_transport",
    "arrest",
    "citation",
    "jail_booking",
    "refused",
    "unable_to_locate",
    "other",
)
# Dispositions that take a destination; voluntary transport must name one.
TRANSPORTS = ("voluntary_transport", "involuntary_hold", "ems_transport")
DESTINATION_TYPES = ("crisis_center", "ed", "detox", "shelter", "home_family", "other")
PRESENTING_ISSUES = (
    "suicidal",
    "psychosis",
    "substance",
    "welfare_check",
    "dementia",
    "developmental_disability",
    "homelessness",
    "family_conflict",
    "other",
)
ACTIONS = (
    "de_escalation",
    "assessment",
    "safety_plan",
    "naloxone",
    "resource_info",
    "peer_support",
    "follow_up",
)
# OMB SPD-15 (2024) combined race/ethnicity question, plus the two answers that are not one.
RACE_ETHNICITY = (
    "american_indian_alaska_native",
    "asian",
    "black_african_american",
    "hispanic_latino",
    "middle_eastern_north_african",
    "native_hawaiian_pacific_islander",
    "white",
    "unknown",
    "declined",
)
NOT_AN_ANSWER = ("unknown", "declined")
MULTIRACIAL = "multiracial"
GENDERS = ("woman", "man", "nonbinary", "another", "unknown", "declined")
AGE_BANDS = ("under_18", "18_24", "25_34", "35_44", "45_54", "55_64", "65_plus", "unknown")
VETERAN = ("yes", "no", "unknown", "declined")
HOUSING = ("housed", "sheltered", "unsheltered", "unstably_housed", "unknown", "declined")
DEMOGRAPHICS_SOURCES = ("self_reported", "observed")
RESPONSE_MODES = ("in_person", "phone", "video")
TEAM_TYPES = ("ride_along", "embedded", "follow_up")
CALL_SOURCES = ("911", "ten_digit", "officer_initiated", "988_transfer")
REFERRAL_OUTCOMES = ("pending", "accepted", "declined", "enrolled", "no_show", "cancelled")
LANGUAGE_TAG = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$")  # BCP 47, roughly

TIMELINE = (
    "dispatched_at",
    "clinician_paged_at",
    "page_ack_at",
    "en_route_at",
    "on_scene_at",
    "cleared_at",
    "officer_cleared_at",
)
FLAGS = (
    "bh_nexus_confirmed",
    "would_have_been_arrest",
    "would_have_been_ed",
    "use_of_force",
    "injury_subject",
    "injury_officer",
    "weapon_present",
)
CHOICES: dict[str, tuple[str, ...]] = {
    "disposition": DISPOSITIONS,
    "destination_type": DESTINATION_TYPES,
    "demographics_source": DEMOGRAPHICS_SOURCES,
    "gender": GENDERS,
    "age_band": AGE_BANDS,
    "veteran": VETERAN,
    "housing": HOUSING,
    "response_mode": RESPONSE_MODES,
    "team_type": TEAM_TYPES,
    "call_source": CALL_SOURCES,
}
MULTI_CHOICES: dict[str, tuple[str, ...]] = {
    "presenting_issues": PRESENTING_ISSUES,
    "actions": ACTIONS,
    "race_ethnicity": RACE_ETHNICITY,
}
# What a form or the API may set. ``person`` carries identifiers for linking, never stored here.
FIELD_NAMES = frozenset(
    {*TIMELINE, *FLAGS, *CHOICES, *MULTI_CHOICES, "language", "custom", "person", "clinician"}
)
# Needed before an encounter counts as completed.
REQUIRED_TO_COMPLETE = ("bh_nexus_confirmed", "disposition")
MAX_CUSTOM_TEXT = 64


class EncounterInvalid(SafeMessage, ValueError):
    """An update that cannot be applied: every problem, each as (field path, reason).

    Reasons never quote the submitted value, so the message may be logged and shown.
    """

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{where}: {reason}" for where, reason in self.problems))

    def as_json(self) -> dict[str, Any]:
        return {
            "error": "invalid-encounter",
            "problems": [{"where": w, "reason": r} for w, r in self.problems],
        }


class EncounterNotFound(SafeMessage, LookupError):
    def __init__(self, encounter_id: int) -> None:
        super().__init__(f"no encounter {encounter_id}")


@dataclass(frozen=True, slots=True)
class Prefill:
    """What is known of an encounter before the clinician says anything."""

    program: str
    call_received_at: datetime
    incident_id: int | None = None
    cad_incident_no: str | None = None
    agency: str | None = None
    zone: str | None = None
    call_type: str | None = None
    call_source: str | None = None
    priority: str | None = None
    classifier_response: str | None = None
    classifier_category: str | None = None
    team_type: str | None = None
    clinician: str | None = None


def derived_columns() -> dict[str, Any]:
    """The derived columns as SQL over the timeline (an UPDATE's SET clause)."""
    e = encounters.c
    return {
        "call_received_epoch": epoch_seconds(e.call_received_at),
        "response_seconds": seconds_between(e.on_scene_at, e.clinician_paged_at),
        "page_ack_seconds": seconds_between(e.page_ack_at, e.clinician_paged_at),
        "on_scene_seconds": seconds_between(e.cleared_at, e.on_scene_at),
        "officer_returned_seconds": seconds_between(e.cleared_at, e.officer_cleared_at),
    }


def refresh_derived(conn: Connection, encounter_id: int | None = None) -> int:
    """Recompute the derived columns of one encounter (or of all, and then the report
    rollups); rows changed. Callers changing one encounter keep its rollups around this."""
    stmt = update(encounters).values(derived_columns())
    if encounter_id is not None:
        stmt = stmt.where(encounters.c.id == encounter_id)
    changed = int(conn.execute(stmt).rowcount)
    if encounter_id is None:
        rebuild_rollups(conn)
    return changed


def create_encounter(conn: Connection, prefill: Prefill, now: datetime) -> int:
    """A new open encounter; its id."""
    values = {
        **{f: getattr(prefill, f) for f in Prefill.__dataclass_fields__},
        "status": "open",
        "presenting_issues": [],
        "actions": [],
        "service_on_scene": False,
        "race_ethnicity": [],
        "custom": {},
        "call_received_epoch": math.floor(prefill.call_received_at.timestamp()),
        "created_at": now,
        "updated_at": now,
    }
    encounter_id = int(
        conn.execute(insert(encounters).values(values).returning(encounters.c.id)).scalar_one()
    )
    refresh_derived(conn, encounter_id)  # the same SQL as every later change
    encounters_added(conn, encounters.c.id == encounter_id)
    return encounter_id


def encounter_from_incident(
    conn: Connection,
    incident_id: int,
    program: str,
    now: datetime,
    clinician: str | None = None,
) -> int:
    """The encounter of a stored incident, created pre-filled from it if there is none yet
    (one per incident: calling again returns the same id)."""
    existing = conn.execute(
        select(encounters.c.id).where(encounters.c.incident_id == incident_id)
    ).scalar()
    if existing is not None:
        return int(existing)
    row = conn.execute(select(incidents).where(incidents.c.id == incident_id)).mappings().first()
    if row is None:
        raise LookupError(f"no incident {incident_id}")
    prefill = Prefill(
        program=program,
        call_received_at=row["opened_at"] or row["first_received_at"],
        incident_id=incident_id,
        cad_incident_no=row["incident_number"] or row["external_id"],
        agency=row["agency"],
        zone=row["zone"],
        call_type=row["call_type"],
        priority=row["priority"],
        classifier_response=row["response"],
        classifier_category=row["category"],
        clinician=clinician,
    )
    return create_encounter(conn, prefill, now)


def record_times(
    conn: Connection,
    encounter_id: int,
    times: Mapping[str, datetime],
    now: datetime,
    *,
    overwrite: bool = False,
) -> None:
    """Fill timeline columns (``clinician_paged_at``, ``page_ack_at``, ...) from the part of
    the daemon that knows them. Without ``overwrite`` a time already recorded stays (the
    first page, the first acknowledgement)."""
    unknown = set(times) - set(TIMELINE)
    if unknown:
        raise ValueError(f"not timeline columns: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {
        name: (value if overwrite else func.coalesce(encounters.c[name], value))
        for name, value in times.items()
    }
    with keeping_rollups(conn, encounters.c.id == encounter_id):
        done = conn.execute(
            update(encounters)
            .where(encounters.c.id == encounter_id)
            .values(updated_at=now, **values)
        )
        if done.rowcount != 1:
            raise EncounterNotFound(encounter_id)
        refresh_derived(conn, encounter_id)


def update_encounter(
    conn: Connection,
    encounter_id: int,
    changes: Mapping[str, Any],
    config: OutcomesConfig,
    now: datetime,
    *,
    complete: bool = False,
) -> dict[str, Any]:
    """Apply a clinician's changes (JSON-shaped: times as ISO 8601 text) after validating all
    of them; with ``complete`` also check that nothing required is missing and mark the
    encounter completed. Returns the encounter's columns after the change."""
    current = (
        conn.execute(select(encounters).where(encounters.c.id == encounter_id).with_for_update())
        .mappings()
        .first()
    )
    if current is None:
        raise EncounterNotFound(encounter_id)
    values, identifiers, problems = validate_changes(changes, config, dict(current))
    merged = {**current, **values}
    problems += _consistency(merged)
    if complete:
        problems += _completeness(merged, config)
    if problems:
        raise EncounterInvalid(problems)
    if identifiers:
        if config.person_key is None:
            raise EncounterInvalid(
                [("person", "person linking is off (outcomes.person_key_file is not set)")]
            )
        link = link_person(conn, config.person_key, identifiers, now)
        if link is not None:
            values["person_id"] = link.person_id
    if "actions" in values:
        values["service_on_scene"] = bool(values["actions"])
    if "race_ethnicity" in values:
        values["race_group"] = race_group(values["race_ethnicity"])
    values["updated_at"] = now
    if complete:
        values["status"] = "completed"
        values["completed_at"] = current["completed_at"] or now
    with keeping_rollups(conn, encounters.c.id == encounter_id):
        conn.execute(update(encounters).where(encounters.c.id == encounter_id).values(values))
        refresh_derived(conn, encounter_id)
    return dict(
        conn.execute(select(encounters).where(encounters.c.id == encounter_id)).mappings().one()
    )


def delete_encounter(conn: Connection, encounter_id: int) -> None:
    """Remove an encounter (entered twice, or not a program encounter) with its referrals."""
    with keeping_rollups(conn, encounters.c.id == encounter_id):
        conn.execute(
            delete(encounter_referrals).where(encounter_referrals.c.encounter_id == encounter_id)
        )
        done = conn.execute(delete(encounters).where(encounters.c.id == encounter_id))
        if done.rowcount != 1:
            raise EncounterNotFound(encounter_id)


def merge_persons(conn: Connection, kept: int, merged: int, now: datetime) -> int:
    """Move every encounter of person ``merged`` to person ``kept`` (two pseudonymous persons
    found to be one); encounters moved. The persons and their identifiers stay as they are."""
    where = encounters.c.person_id == merged
    with keeping_rollups(conn, where):
        return int(
            conn.execute(
                update(encounters).where(where).values(person_id=kept, updated_at=now)
            ).rowcount
        )


def add_referral(
    conn: Connection,
    encounter_id: int,
    provider: str,
    referred_at: datetime,
    outcome: str = "pending",
    appointment_at: datetime | None = None,
) -> int:
    """Record a referral made at an encounter (one the clinician made by hand; HL7 referrals
    are recorded by the referral service and mapped to the same shape at report time)."""
    if outcome not in REFERRAL_OUTCOMES:
        raise EncounterInvalid([("outcome", "is not a referral outcome")])
    if not provider or len(provider) > 64:
        raise EncounterInvalid([("provider", "must be a provider id of 1 to 64 characters")])
    with keeping_referral_flags(conn, encounter_id=encounter_id):
        return int(
            conn.execute(
                insert(encounter_referrals)
                .values(
                    encounter_id=encounter_id,
                    provider=provider,
                    referred_at=referred_at,
                    outcome=outcome,
                    appointment_at=appointment_at,
                )
                .returning(encounter_referrals.c.id)
            ).scalar_one()
        )


def race_group(selected: Sequence[str]) -> str | None:
    """The reporting group of a race/ethnicity selection: the one category chosen,
    ``multiracial`` for more than one, ``unknown``/``declined`` as given, None when unasked."""
    answers = [s for s in selected if s not in NOT_AN_ANSWER]
    if len(answers) > 1:
        return MULTIRACIAL
    if answers:
        return answers[0]
    return selected[0] if selected else None


# --- validation ---------------------------------------------------------------------------------


def validate_changes(
    changes: Mapping[str, Any], config: OutcomesConfig, current: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str], list[tuple[str, str]]]:
    """Column values, person identifiers and problems of a change set."""
    problems: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    identifiers: dict[str, str] = {}
    if not isinstance(changes, Mapping):
        return values, identifiers, [("", "must be an object")]
    for name, value in changes.items():
        where = str(name)
        if name not in FIELD_NAMES:
            problems.append((where, "is not an encounter field"))
        elif name in TIMELINE:
            parsed = _time(value, where, problems)
            if parsed is not _BAD:
                values[name] = parsed
        elif name in FLAGS:
            if value is None or isinstance(value, bool):
                values[name] = value
            else:
                problems.append((where, "must be true, false or null"))
        elif name in CHOICES:
            if value is None or (isinstance(value, str) and value in CHOICES[name]):
                values[name] = value
            else:
                problems.append((where, f"must be one of {', '.join(CHOICES[name])}"))
        elif name in MULTI_CHOICES:
            chosen = _multi(value, MULTI_CHOICES[name], where, problems)
            if chosen is not None:
                if name == "race_ethnicity" and _exclusive_broken(chosen):
                    problems.append((where, "unknown and declined cannot be combined"))
                values[name] = chosen
        elif name == "language":
            if value is None or (
                isinstance(value, str) and (value in NOT_AN_ANSWER or LANGUAGE_TAG.fullmatch(value))
            ):
                values[name] = value
            else:
                problems.append(
                    (where, "must be a language tag (en, es, zh-Hant), unknown or declined")
                )
        elif name == "clinician":
            if value is None or (isinstance(value, str) and 0 < len(value) <= 64):
                values[name] = value
            else:
                problems.append((where, "must be a responder id of 1 to 64 characters"))
        elif name == "custom":
            custom = _custom(value, config.custom_fields, problems)
            if custom is not None:
                values["custom"] = {**(current.get("custom") or {}), **custom}
        elif name == "person":
            if not isinstance(value, Mapping):
                problems.append((where, "must be an object"))
                continue
            try:
                identifiers = identifiers_of(value)
            except IdentifierInvalid as err:
                problems.append((err.where, err.reason))
    return values, identifiers, problems


_BAD = object()


def _time(value: Any, where: str, problems: list[tuple[str, str]]) -> Any:
    if value is None or isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            problems.append((where, "must be an ISO 8601 time with an offset"))
            return _BAD
    else:
        problems.append((where, "must be an ISO 8601 time with an offset"))
        return _BAD
    if parsed is not None and parsed.tzinfo is None:
        problems.append((where, "must carry a UTC offset"))
        return _BAD
    return parsed.astimezone(UTC) if parsed is not None else None


def _multi(
    value: Any, allowed: tuple[str, ...], where: str, problems: list[tuple[str, str]]
) -> list[str] | None:
    if not isinstance(value, list):
        problems.append((where, "must be a list"))
        return None
    out: list[str] = []
    ok = True
    for n, item in enumerate(value):
        if not isinstance(item, str) or item not in allowed:
            problems.append((f"{where}[{n}]", f"must be one of {', '.join(allowed)}"))
            ok = False
        elif item in out:
            problems.append((f"{where}[{n}]", "is given twice"))
            ok = False
        else:
            out.append(item)
    return out if ok else None


def _exclusive_broken(chosen: Sequence[str]) -> bool:
    return any(c in NOT_AN_ANSWER for c in chosen) and len(chosen) > 1


def _custom(
    value: Any, fields: Sequence[CustomField], problems: list[tuple[str, str]]
) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        problems.append(("custom", "must be an object"))
        return None
    by_name = {f.name: f for f in fields}
    out: dict[str, Any] = {}
    before = len(problems)
    for name, item in value.items():
        where = f"custom.{name}"
        spec = by_name.get(name)
        if spec is None:
            problems.append((where, "is not a configured field (outcomes.custom_fields)"))
            continue
        if item is None:
            out[name] = None
            continue
        checked = custom_value(spec, item)
        if isinstance(checked, _Problem):
            problems.append((where, checked.reason))
        else:
            out[name] = checked
    return out if len(problems) == before else None


@dataclass(frozen=True, slots=True)
class _Problem:
    reason: str


def custom_value(spec: CustomField, value: Any) -> Any:
    """``value`` as stored for the custom field ``spec``, or a :class:`_Problem`."""
    if spec.type == "boolean":
        return value if isinstance(value, bool) else _Problem("must be true or false")
    if spec.type in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return _Problem(f"must be {'an integer' if spec.type == 'integer' else 'a number'}")
        if spec.type == "integer" and not (isinstance(value, int) or float(value).is_integer()):
            return _Problem("must be an integer")
        if isinstance(value, float) and not math.isfinite(value):
            return _Problem("must be a finite number")
        if spec.minimum is not None and value < spec.minimum:
            return _Problem(f"must be at least {spec.minimum:g}")
        if spec.maximum is not None and value > spec.maximum:
            return _Problem(f"must be at most {spec.maximum:g}")
        return int(value) if spec.type == "integer" else value
    if spec.type == "choice":
        if isinstance(value, str) and value in spec.values:
            return value
        return _Problem(f"must be one of {', '.join(spec.values)}")
    if spec.type == "multichoice":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return _Problem("must be a list")
        if any(v not in spec.values for v in value) or len(set(value)) != len(value):
            return _Problem(f"must be distinct values from {', '.join(spec.values)}")
        return value
    if spec.type == "date":
        if isinstance(value, str) and len(value) == 10:
            try:
                return date.fromisoformat(value).isoformat()
            except ValueError:
                pass
        return _Problem("must be a date YYYY-MM-DD")
    raise AssertionError(spec.type)


def _consistency(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Cross-field rules that hold whether or not the encounter is being completed."""
    problems: list[tuple[str, str]] = []
    disposition = row.get("disposition")
    if row.get("destination_type") is not None and disposition not in TRANSPORTS:
        problems.append(("destination_type", "only a transport or hold has a destination"))
    received = row["call_received_at"]
    for name in TIMELINE:
        at = row.get(name)
        if at is not None and at < received:
            problems.append((name, "is before the call was received"))
    on_scene, cleared = row.get("on_scene_at"), row.get("cleared_at")
    if on_scene is not None and cleared is not None and cleared < on_scene:
        problems.append(("cleared_at", "is before on_scene_at"))
    paged, ack = row.get("clinician_paged_at"), row.get("page_ack_at")
    if paged is not None and ack is not None and ack < paged:
        problems.append(("page_ack_at", "is before clinician_paged_at"))
    return problems


def _completeness(row: Mapping[str, Any], config: OutcomesConfig) -> list[tuple[str, str]]:
    problems = [
        (name, "is required to complete") for name in REQUIRED_TO_COMPLETE if row.get(name) is None
    ]
    if row.get("disposition") == "voluntary_transport" and row.get("destination_type") is None:
        problems.append(("destination_type", "is required for a voluntary transport"))
    custom = row.get("custom") or {}
    for spec in config.custom_fields:
        if spec.required and custom.get(spec.name) is None:
            problems.append((f"custom.{spec.name}", "is required to complete"))
    return problems


# --- export ---------------------------------------------------------------------------------------

# Encounter columns in an export, in order: coded values only (no CAD number, no identifiers).
EXPORT_COLUMNS = (
    "id", "program", "team_type", "status", "agency", "zone", "call_type", "call_source",
    "priority", "classifier_response", "classifier_category", "bh_nexus_confirmed",
    "call_received_at", *TIMELINE, "response_mode", "response_seconds", "page_ack_seconds",
    "on_scene_seconds", "officer_returned_seconds", "presenting_issues", "actions",
    "disposition", "destination_type", *FLAGS[1:], "demographics_source", "race_ethnicity",
    "race_group", "gender", "age_band", "veteran", "housing", "language", "completed_at",
)  # fmt: skip


def export_encounters(
    conn: Connection,
    since: datetime,
    until: datetime,
    custom_fields: Sequence[CustomField],
    program: str | None = None,
) -> Iterator[dict[str, Any]]:
    """One flat row per encounter received in [since, until): the coded fields, the person's
    pseudonym, and one ``custom.NAME`` column per configured field (lists joined by ``;``)."""
    from corespond.daemon.store.tables import persons

    e = encounters.c
    query = (
        select(*(e[c] for c in EXPORT_COLUMNS), e.custom, persons.c.pseudonym.label("person"))
        .select_from(encounters.outerjoin(persons, persons.c.id == e.person_id))
        .where(e.call_received_at >= since, e.call_received_at < until)
        .order_by(e.call_received_at, e.id)
    )
    if program is not None:
        query = query.where(e.program == program)
    for row in conn.execute(query).mappings():
        out: dict[str, Any] = {"encounter": row["id"], "person": row["person"]}
        for name in EXPORT_COLUMNS[1:]:
            value = row[name]
            out[name] = ";".join(value) if isinstance(value, list) else value
        custom = row["custom"] or {}
        for spec in custom_fields:
            value = custom.get(spec.name)
            out[f"custom.{spec.name}"] = ";".join(value) if isinstance(value, list) else value
        yield out
