"""Synthetic encounters: realistic distributions, a seeded RNG, no real people.

The proportions follow the published figures of co-responder programs (research note 3.1):
about 98% of calls end without arrest, roughly 40% are resolved on scene and a fifth to a third
end in a voluntary transport, involuntary holds are a few percent, most active calls receive a
service on scene, a minority of people account for many encounters. Persons are pseudonymous
rows with no identifiers at all. The same seed gives the same rows.

Used by the tests (small, exact), the demo (a few months) and ``bench/report.py`` (a million).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import JSON, Connection, Engine, Table, func, insert, select, text

from corespond.daemon.encounters import race_group
from corespond.daemon.rollups import encounters_added
from corespond.daemon.store.engine import json_text
from corespond.daemon.store.tables import (
    encounter_referrals,
    encounters,
    persons,
    sqlite_datetime_text,
)

DISPOSITION_WEIGHTS = {
    "resolved_on_scene": 40.0,
    "resolved_with_referral": 17.0,
    "voluntary_transport": 20.0,
    "involuntary_hold": 4.5,
    "ems_transport": 4.5,
    "arrest": 1.2,
    "citation": 1.0,
    "jail_booking": 0.6,
    "refused": 5.5,
    "unable_to_locate": 3.5,
    "other": 2.2,
}
DESTINATION_WEIGHTS = {
    "crisis_center": 35.0,
    "ed": 30.0,
    "detox": 10.0,
    "shelter": 10.0,
    "home_family": 10.0,
    "other": 5.0,
}
RACE_WEIGHTS = {
    "white": 48.0,
    "black_african_american": 20.0,
    "hispanic_latino": 17.0,
    "asian": 4.0,
    "american_indian_alaska_native": 2.0,
    "native_hawaiian_pacific_islander": 0.5,
    "middle_eastern_north_african": 0.5,
    "unknown": 6.0,
    "declined": 2.0,
}
GENDER_WEIGHTS = {"man": 52.0, "woman": 43.0, "nonbinary": 1.5, "another": 0.5, "unknown": 3.0}
AGE_WEIGHTS = {
    "under_18": 8.0,
    "18_24": 15.0,
    "25_34": 22.0,
    "35_44": 19.0,
    "45_54": 15.0,
    "55_64": 12.0,
    "65_plus": 7.0,
    "unknown": 2.0,
}
HOUSING_WEIGHTS = {
    "housed": 60.0,
    "unstably_housed": 12.0,
    "unsheltered": 14.0,
    "sheltered": 8.0,
    "unknown": 6.0,
}
LANGUAGE_WEIGHTS = {"en": 84.0, "es": 12.0, "vi": 1.5, "zh": 1.0, "unknown": 1.5}
ISSUE_WEIGHTS = {
    "suicidal": 28.0,
    "psychosis": 18.0,
    "substance": 20.0,
    "welfare_check": 25.0,
    "dementia": 4.0,
    "developmental_disability": 3.0,
    "homelessness": 12.0,
    "family_conflict": 10.0,
    "other": 5.0,
}
ACTION_WEIGHTS = {
    "de_escalation": 50.0,
    "assessment": 60.0,
    "safety_plan": 25.0,
    "naloxone": 2.0,
    "resource_info": 45.0,
    "peer_support": 8.0,
    "follow_up": 20.0,
}
REFERRAL_OUTCOME_WEIGHTS = {
    "enrolled": 35.0,
    "accepted": 20.0,
    "pending": 12.0,
    "declined": 15.0,
    "no_show": 15.0,
    "cancelled": 3.0,
}
ZONES = tuple(f"Z{n:02d}" for n in range(1, 13))
ZONE_WEIGHTS = {zone: 1.0 / (n + 2) for n, zone in enumerate(ZONES)}  # some zones far busier
MODE_WEIGHTS = {"in_person": 85.0, "phone": 10.0, "video": 5.0}
TEAM_WEIGHTS = {"ride_along": 70.0, "embedded": 25.0, "follow_up": 5.0}
SOURCE_WEIGHTS = {"911": 70.0, "ten_digit": 15.0, "officer_initiated": 10.0, "988_transfer": 5.0}
VETERAN_WEIGHTS = {"yes": 7.0, "no": 85.0, "unknown": 8.0}
CALL_TYPES = ("SUICIDAL", "MENTAL", "WELFARE", "OVERDOSE", "DISTURBANCE", "TRESPASS")
CHUNK = 5000


@dataclass(frozen=True, slots=True)
class SeedSummary:
    encounters: int
    persons: int
    referrals: int


_CUMULATIVE: dict[int, tuple[list[str], list[float], float]] = {}


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    """One key of ``weights`` (cumulative weights computed once per table: this is hot)."""
    table = _CUMULATIVE.get(id(weights))
    if table is None:
        keys, cumulative = list(weights), list(itertools.accumulate(weights.values()))
        table = _CUMULATIVE[id(weights)] = (keys, cumulative, cumulative[-1])
    keys, cumulative, total = table
    return keys[bisect.bisect(cumulative, rng.random() * total)]


def _some(rng: random.Random, weights: dict[str, float], most: int) -> list[str]:
    n = 1 + min(most - 1, int(rng.expovariate(1.5)))
    chosen: list[str] = []
    for _ in range(n):
        item = _pick(rng, weights)
        if item not in chosen:
            chosen.append(item)
    return chosen


def _minutes(rng: random.Random, median: float, spread: float = 0.5) -> timedelta:
    return timedelta(seconds=int(60 * median * rng.lognormvariate(0, spread)))


class _Generator:
    def __init__(
        self,
        seed: int,
        count: int,
        start: date,
        end: date,
        programs: Sequence[str],
        agencies: Sequence[str],
        first_encounter_id: int,
        first_person_id: int,
    ) -> None:
        self.rng = random.Random(seed)
        self.count = count
        self.since = datetime.combine(start, time(), UTC)
        self.seconds = int(
            (datetime.combine(end + timedelta(days=1), time(), UTC) - self.since).total_seconds()
        )
        self.programs = tuple(programs)
        self.agencies = tuple(agencies)
        self.next_encounter = first_encounter_id
        self.first_person = first_person_id
        # About 0.45 persons per encounter; skewed so a few persons have many encounters.
        self.person_pool = max(1, int(count * 0.45))
        self.persons_used: set[int] = set()

    def rows(self) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        # Times ascend so a person's encounters come in order, as they would in real life.
        offsets = sorted(self.rng.randrange(self.seconds) for _ in range(self.count))
        for offset in offsets:
            yield self.encounter(self.since + timedelta(seconds=offset))

    def encounter(self, received: datetime) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        rng = self.rng
        eid = self.next_encounter
        self.next_encounter += 1
        bh = rng.random() < 0.93
        completed = rng.random() < 0.95
        disposition = _pick(rng, DISPOSITION_WEIGHTS) if completed else None
        destination = None
        if disposition == "voluntary_transport":
            destination = _pick(rng, DESTINATION_WEIGHTS)
        elif disposition in ("involuntary_hold", "ems_transport"):
            destination = "ed" if rng.random() < 0.7 else "crisis_center"
        mode = _pick(rng, MODE_WEIGHTS)
        paged = received + _minutes(rng, 4, 0.6)
        ack = paged + _minutes(rng, 1.5, 0.8)
        en_route = ack + _minutes(rng, 1, 0.5)
        on_scene = (en_route + _minutes(rng, 14, 0.5)) if mode == "in_person" else ack
        reached = disposition != "unable_to_locate" and rng.random() < 0.97
        cleared = on_scene + _minutes(rng, 45, 0.6) if reached else None
        officer_cleared = None
        team = _pick(rng, TEAM_WEIGHTS)
        if reached and cleared is not None and team == "ride_along" and mode == "in_person":
            officer_cleared = on_scene + _minutes(rng, 15, 0.6)
            if officer_cleared > cleared:
                officer_cleared = cleared
        actions = _some(rng, ACTION_WEIGHTS, 4) if reached and rng.random() < 0.9 else []
        race = _some(rng, RACE_WEIGHTS, 2)
        if len(race) > 1 and any(r in ("unknown", "declined") for r in race):
            race = race[:1]
        person: int | None = None
        if rng.random() < 0.92:
            person = self.first_person + int(self.person_pool * rng.random() ** 2.2)
            self.persons_used.add(person)
        row: dict[str, Any] = {
            "id": eid,
            "incident_id": None,
            "person_id": person,
            "program": rng.choice(self.programs),
            "team_type": team,
            "clinician": f"clin-{rng.randrange(1, 25):02d}",
            "status": "completed" if completed else "open",
            "cad_incident_no": f"SYN-{eid:08d}",
            "agency": rng.choice(self.agencies),
            "zone": _pick(rng, ZONE_WEIGHTS) if rng.random() < 0.98 else None,
            "call_type": rng.choice(CALL_TYPES),
            "call_source": _pick(rng, SOURCE_WEIGHTS),
            "priority": str(rng.randrange(1, 4)),
            "classifier_response": rng.choice(("clinician", "co-response", "police")),
            "classifier_category": _pick(rng, ISSUE_WEIGHTS),
            "bh_nexus_confirmed": bh if completed else None,
            "call_received_at": received,
            "dispatched_at": received + _minutes(rng, 2, 0.5),
            "clinician_paged_at": paged,
            "page_ack_at": ack,
            "en_route_at": en_route if mode == "in_person" else None,
            "on_scene_at": on_scene if reached else None,
            "cleared_at": cleared,
            "officer_cleared_at": officer_cleared,
            "response_mode": mode,
            "call_received_epoch": _epoch(received),
            "response_seconds": _between(on_scene if reached else None, paged),
            "page_ack_seconds": _between(ack, paged),
            "on_scene_seconds": _between(cleared, on_scene if reached else None),
            "officer_returned_seconds": _between(cleared, officer_cleared),
            "presenting_issues": _some(rng, ISSUE_WEIGHTS, 3),
            "actions": actions,
            "service_on_scene": bool(actions),
            "disposition": disposition,
            "destination_type": destination,
            "would_have_been_arrest": rng.random() < 0.08 if completed else None,
            "would_have_been_ed": rng.random() < 0.25 if completed else None,
            "use_of_force": rng.random() < 0.01 if completed else None,
            "injury_subject": rng.random() < 0.006 if completed else None,
            "injury_officer": rng.random() < 0.003 if completed else None,
            "weapon_present": rng.random() < 0.04 if completed else None,
            "demographics_source": "self_reported" if rng.random() < 0.7 else "observed",
            "race_ethnicity": race,
            "race_group": race_group(race),
            "gender": _pick(rng, GENDER_WEIGHTS),
            "age_band": _pick(rng, AGE_WEIGHTS),
            "veteran": _pick(rng, VETERAN_WEIGHTS),
            "housing": _pick(rng, HOUSING_WEIGHTS),
            "language": _pick(rng, LANGUAGE_WEIGHTS),
            "custom": {},
            "created_at": received,
            "updated_at": cleared or received,
            "completed_at": (cleared or received) if completed else None,
        }
        referrals = []
        wants = disposition == "resolved_with_referral" or (
            disposition == "voluntary_transport" and rng.random() < 0.3
        )
        if wants:
            outcome = _pick(rng, REFERRAL_OUTCOME_WEIGHTS)
            appointment = None
            if outcome in ("enrolled", "accepted", "no_show"):
                appointment = received + timedelta(
                    days=rng.randrange(1, 75), hours=rng.randrange(8, 17)
                )
            referrals.append(
                {
                    "encounter_id": eid,
                    "referred_at": received + timedelta(hours=1),
                    "provider": f"prov-{rng.randrange(1, 9)}",
                    "outcome": outcome,
                    "appointment_at": appointment,
                }
            )
        return row, referrals


def _epoch(at: datetime) -> int:
    return math.floor(at.timestamp())


def _between(later: datetime | None, earlier: datetime | None) -> int | None:
    """As encounters.derived_columns computes it in SQL (a test holds them equal)."""
    if later is None or earlier is None:
        return None
    return _epoch(later) - _epoch(earlier)


def synthetic_encounters(
    count: int,
    start: date,
    end: date,
    *,
    seed: int = 7,
    programs: Sequence[str] = ("co-responder",),
    agencies: Sequence[str] = ("PD", "SO"),
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``count`` encounter rows (with their referral rows) over ``start``..``end``, ids from 1,
    person ids from 1 (create the persons first: :func:`seed_encounters` does)."""
    yield from _Generator(seed, count, start, end, programs, agencies, 1, 1).rows()


def seed_encounters(
    conn: Connection,
    count: int,
    start: date,
    end: date,
    *,
    seed: int = 7,
    programs: Sequence[str] = ("co-responder",),
    agencies: Sequence[str] = ("PD", "SO"),
) -> SeedSummary:
    """Insert ``count`` synthetic encounters, their pseudonymous persons and referrals."""
    first_encounter = (conn.execute(select(func.max(encounters.c.id))).scalar() or 0) + 1
    first_person = (conn.execute(select(func.max(persons.c.id))).scalar() or 0) + 1
    gen = _Generator(seed, count, start, end, programs, agencies, first_encounter, first_person)
    _bulk_insert(
        conn,
        persons,
        [
            {
                "id": first_person + n,
                "pseudonym": f"syn{seed:x}-{first_person + n:x}",
                "created_at": gen.since,
            }
            for n in range(gen.person_pool)
        ],
    )
    batch: list[dict[str, Any]] = []
    referral_batch: list[dict[str, Any]] = []
    referrals = 0
    for row, refs in gen.rows():
        batch.append(row)
        referral_batch.extend(refs)
        if len(batch) >= CHUNK:
            referrals += _flush(conn, batch, referral_batch)
    referrals += _flush(conn, batch, referral_batch)
    # The report rollups, in the same transaction.
    encounters_added(conn, encounters.c.id.between(first_encounter, gen.next_encounter - 1))
    # Unused pseudonymous persons are removed again: a person exists because of an encounter.
    used = gen.persons_used
    unused = [first_person + n for n in range(gen.person_pool) if first_person + n not in used]
    for n in range(0, len(unused), 400):
        conn.execute(persons.delete().where(persons.c.id.in_(unused[n : n + 400])))
    if conn.dialect.name == "postgresql":
        for table in ("persons", "encounters", "encounter_referrals"):
            conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT coalesce(max(id), 1) FROM {table}))"
                )
            )
    return SeedSummary(count, len(used), referrals)


def _flush(
    conn: Connection, batch: list[dict[str, Any]], referral_batch: list[dict[str, Any]]
) -> int:
    _bulk_insert(conn, encounters, batch)
    n = len(referral_batch)
    _bulk_insert(conn, encounter_referrals, referral_batch)
    batch.clear()
    referral_batch.clear()
    return n


def _bulk_insert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert at the driver level (COPY on PostgreSQL): a million rows through SQLAlchemy's
    per-row processing takes many minutes. Values are encoded exactly as the column types
    would encode them (same UTC text and JSON text)."""
    if not rows:
        return
    names = list(rows[0])
    json_columns = {c.name for c in table.columns if isinstance(c.type, JSON)}
    if conn.dialect.name == "postgresql":
        columns = ", ".join(names)
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY {table.name} ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([json_text(row[n]) if n in json_columns else row[n] for n in names])
        return
    if conn.dialect.name != "sqlite":
        conn.execute(insert(table), rows)
        return

    def encoded(name: str, value: Any) -> Any:
        if value is None:
            return None
        if name in json_columns:
            return json_text(value)
        if isinstance(value, datetime):
            return sqlite_datetime_text(value)
        if isinstance(value, bool):
            return int(value)
        return value

    placeholders = ", ".join("?" for _ in names)
    conn.exec_driver_sql(
        f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({placeholders})",
        [tuple(encoded(n, row[n]) for n in names) for row in rows],
    )


def seed_demo_encounters(
    engine: Engine, count: int, months: int, today: date, seed: int = 7
) -> int:
    """Seed ``count`` encounters over the ``months`` up to ``today`` if the store has none
    (a demo's first run); how many were seeded. One transaction: all or nothing."""
    if count <= 0:
        return 0
    with engine.begin() as conn:
        if conn.execute(select(encounters.c.id).limit(1)).first() is not None:
            return 0
        start = today - timedelta(days=round(months * 30.44))
        seed_encounters(conn, count, start, today, seed=seed)
    return count
