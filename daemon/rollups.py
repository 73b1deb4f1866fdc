"""Outcome report rollups, kept in the same transaction as every encounter change.

The outcome report over a million encounters reads, instead of the encounters themselves:

- ``report_rollup_counts``: per UTC month x program x value of one reporting dimension
  (:data:`DIMENSIONS`), every count the report needs (tables.ROLLUP_COUNTS);
- ``report_rollup_durations``: the same cells with per-second counts of each duration, so
  medians and percentiles stay exact (the report prints whole seconds);
- ``report_person_facts``: one row per BH encounter linked to a person, with the seconds to
  that person's next BH encounter and since the ``fu_threshold - 1``-th one before it (all
  programs, and within the encounter's program), so the per-person pass is a plain grouping;
  and the encounter's referrals (referred, enrolled, when, linked within 30 / 90 days), so it
  joins no referrals either (the ``referred`` count is in the count rollups).

Referral flags move with a referral as well as with an encounter: a referral recorded on an
encounter, an HL7 referral stored, discarded or cancelled, an RRI^I12 outcome; their writers
run inside :func:`keeping_referral_flags` (an HL7 referral belongs to the encounters of its
CAD incident number).

Counts are kept by difference: before a change, the changing encounters' contribution is
subtracted; after it, the new one is added (an UPSERT adding signed counts, which two daemons
on one PostgreSQL may run at once). Person facts are recomputed for every person an encounter
belonged to before or after the change, under that person's row lock. Everything is plain SQL
(Core) on SQLite and PostgreSQL; :func:`rebuild_rollups` recomputes it all (migration 0006,
``corespond report rebuild-rollups``, a changed frequent-utilizer threshold).

The frequent-utilizer threshold is configuration: the facts hold the span for the threshold
in ``report_rollup_state``; a report with another threshold does not use them (it takes the
exact window pass over the encounters and says so) until the rollups are rebuilt.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    bindparam,
    delete,
    func,
    literal,
    literal_column,
    select,
    true,
    union_all,
)
from sqlalchemy.dialects import postgresql, sqlite

from corespond.daemon.store.sql_time import epoch_month
from corespond.daemon.store.tables import (
    ROLLUP_COUNTS,
    encounters,
    persons,
    report_person_facts,
    report_rollup_counts,
    report_rollup_durations,
    report_rollup_state,
)

# Reporting dimension -> encounter column (None: the one cell of "all encounters").
DIMENSIONS: dict[str, str | None] = {
    "all": None,
    "agency": "agency",
    "zone": "zone",
    "race": "race_group",
    "gender": "gender",
    "age": "age_band",
}
# The report's --by -> the dimension its rollup rows are read from.
DIMENSION_OF_GROUPING: dict[str | None, str] = {
    None: "all",
    "month": "all",
    "program": "all",
    "agency": "agency",
    "zone": "zone",
    "race": "race",
    "gender": "gender",
    "age": "age",
}
FU_THRESHOLD = "fu_threshold"
DEFAULT_FU_THRESHOLD = 3
_BATCH = 500  # ids or persons per IN list


def _cell(dim: str) -> tuple[ColumnElement[Any], ColumnElement[Any], list[Any]]:
    """(recorded, value, what to group by) of an encounter in dimension ``dim``. Grouped by
    the column itself: PostgreSQL does not see two bound "" as the same expression."""
    column = DIMENSIONS[dim]
    if column is None:
        return true(), literal_column("''"), []
    c = encounters.c[column]
    return c.is_not(None), func.coalesce(c, literal_column("''")), [c]


def rollup_count_columns() -> dict[str, Any]:
    """Every count the rollups keep, as aggregate SQL over ``encounters``."""
    from corespond.daemon.outcomes import encounter_count_columns, referred_condition

    e = encounters.c
    counts = encounter_count_columns()
    counts["referred"] = func.count().filter(
        and_(e.bh_nexus_confirmed.is_(True), referred_condition())
    )
    assert tuple(counts) == ROLLUP_COUNTS, "tables.ROLLUP_COUNTS is out of step"
    return counts


def apply_delta(
    conn: Connection, where: ColumnElement[bool], sign: int, *, durations: bool = True
) -> None:
    """Add (sign 1) or subtract (sign -1) the contribution of the encounters ``where``;
    without ``durations``, to the counts alone (a referral changes no time)."""
    for stmt in _delta_statements(conn.dialect.name, where, sign, durations):
        conn.execute(stmt)


def _apply_delta_ids(conn: Connection, ids: list[int], sign: int, *, durations: bool) -> None:
    """:func:`apply_delta` for the encounters ``ids``, with statements built once: building
    them (a union of six selects of every count) took about 15 ms of CPU a call, on the
    writer that pages share (a referral's rollup upkeep rides an ingest batch on SQLite)."""
    if len(ids) == 1 and conn.dialect.name == "sqlite":  # one encounter: the usual case
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        for sql, values, at in _sqlite_one_id_delta(sign, durations):
            bound = list(values)
            for i in at:
                bound[i] = ids[0]
            cursor.execute(sql, bound)
        return
    for stmt in _id_delta_statements(conn.dialect.name, sign, durations):
        conn.execute(stmt, {"delta_ids": ids})


def prepare_referral_upkeep() -> None:
    """Compile the statements an HL7 referral's rollup upkeep runs on SQLite (about 0.15 s of
    CPU): at start, in a thread, rather than in the first such referral's ingest batch."""
    for sign in (-1, 1):
        _sqlite_one_id_delta(sign, False)


@functools.cache
def _sqlite_one_id_delta(sign: int, durations: bool) -> list[tuple[str, list[Any], list[int]]]:
    """Each of :func:`apply_delta`'s statements for one encounter, compiled once for SQLite's
    own cursor: (its SQL, its positional values, where the encounter's id goes). Through
    SQLAlchemy each execution bound its 300 parameters anew: about 0.4 ms of CPU each."""
    out = []
    where = encounters.c.id == bindparam("delta_id", 0)
    for stmt in _delta_statements("sqlite", where, sign, durations):
        compiled = stmt.compile(
            dialect=sqlite.dialect(), compile_kwargs={"render_postcompile": True}
        )
        assert not compiled._bind_processors  # the values go to the driver as they are
        values = compiled.construct_params()
        names = compiled.positiontup or []
        at = [i for i, name in enumerate(names) if name == "delta_id"]
        assert at
        out.append((str(compiled), [values[name] for name in names], at))
    return out


@functools.cache
def _id_delta_statements(dialect: str, sign: int, durations: bool) -> list[Any]:
    where = encounters.c.id.in_(bindparam("delta_ids", expanding=True))
    return _delta_statements(dialect, where, sign, durations)


def _delta_statements(
    dialect: str, where: ColumnElement[bool], sign: int, durations: bool
) -> list[Any]:
    from corespond.daemon.outcomes import DURATIONS

    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    e = encounters.c
    month = epoch_month(e.call_received_epoch).label("month")
    counts = rollup_count_columns()
    parts = []
    for dim in DIMENSIONS:
        recorded, value, by = _cell(dim)
        parts.append(
            select(
                literal(dim).label("dim"),
                recorded.label("recorded"),
                value.label("value"),
                month,
                e.program.label("program"),
                *((expr * sign).label(name) for name, expr in counts.items()),
            )
            .where(where)
            .group_by(*by, epoch_month(e.call_received_epoch), e.program)
        )
    rows = union_all(*parts).subquery("delta")
    names = ["dim", "recorded", "value", "month", "program", *ROLLUP_COUNTS]
    r = report_rollup_counts
    stmt = insert(r).from_select(names, select(*(rows.c[n] for n in names)).where(true()))
    statements = [
        stmt.on_conflict_do_update(
            index_elements=list(r.primary_key.columns),
            set_={n: r.c[n] + stmt.excluded[n] for n in ROLLUP_COUNTS},
        )
    ]
    if not durations:
        return statements
    parts = []
    for measure, column in DURATIONS.items():
        seconds = e[column]
        cond = and_(where, e.bh_nexus_confirmed.is_(True), seconds.is_not(None))
        if measure == "officer_returned":  # as the report: where the officer left first
            cond = and_(cond, seconds > 0)
        for dim in DIMENSIONS:
            recorded, value, by = _cell(dim)
            parts.append(
                select(
                    literal(measure).label("measure"),
                    literal(dim).label("dim"),
                    recorded.label("recorded"),
                    value.label("value"),
                    seconds.label("seconds"),
                    month,
                    e.program.label("program"),
                    (func.count() * sign).label("n"),
                )
                .where(cond)
                .group_by(*by, seconds, epoch_month(e.call_received_epoch), e.program)
            )
    rows = union_all(*parts).subquery("delta")
    names = ["measure", "dim", "recorded", "value", "seconds", "month", "program", "n"]
    d = report_rollup_durations
    stmt = insert(d).from_select(names, select(*(rows.c[n] for n in names)).where(true()))
    statements.append(
        stmt.on_conflict_do_update(
            index_elements=list(d.primary_key.columns), set_={"n": d.c.n + stmt.excluded.n}
        )
    )
    return statements


def fu_threshold(conn: Connection) -> int | None:
    """The frequent-utilizer threshold the person facts hold (None: no rollups built)."""
    value = conn.execute(_FU_THRESHOLD).scalar()
    return None if value is None else int(value)


_FU_THRESHOLD = select(report_rollup_state.c.value).where(
    report_rollup_state.c.name == FU_THRESHOLD
)  # built once: every change to an encounter or a referral reads it


def refresh_persons(
    conn: Connection, person_ids: Iterable[int | None], threshold: int | None = None
) -> None:
    """Recompute the person facts of ``person_ids`` (all persons: :func:`rebuild_rollups`)."""
    ids = sorted({p for p in person_ids if p is not None})
    if not ids:
        return
    if threshold is None:
        threshold = fu_threshold(conn)
        if threshold is None:
            return  # no rollups built: nothing to keep
    for n in range(0, len(ids), _BATCH):
        batch = ids[n : n + _BATCH]
        if conn.dialect.name == "postgresql":
            # Two daemons changing one person's encounters recompute one after the other.
            conn.execute(
                select(persons.c.id).where(persons.c.id.in_(batch)).order_by(persons.c.id)
                .with_for_update()
            )  # fmt: skip
        conn.execute(delete(report_person_facts).where(report_person_facts.c.person_id.in_(batch)))
        _insert_facts(conn, encounters.c.person_id.in_(batch), threshold)


def _insert_facts(conn: Connection, where: ColumnElement[bool], threshold: int) -> None:
    from corespond.daemon.outcomes import (
        LINKAGE_DAYS,
        default_referral_outcomes,
        referrals_per_encounter,
    )

    e = encounters.c
    # Each encounter's referrals, read for these encounters only.
    flags = referrals_per_encounter(default_referral_outcomes(where), where)
    r = flags.c
    order = (e.call_received_epoch, e.id)
    person = {"partition_by": e.person_id, "order_by": order}
    program = {"partition_by": (e.person_id, e.program), "order_by": order}
    back = threshold - 1
    query = select(
        e.person_id,
        e.call_received_epoch,
        e.id,
        e.program,
        epoch_month(e.call_received_epoch),
        e.agency,
        e.zone,
        e.race_group,
        e.gender,
        e.age_band,
        func.lead(e.call_received_epoch).over(**person) - e.call_received_epoch,
        func.lead(e.call_received_epoch).over(**program) - e.call_received_epoch,  # type: ignore[arg-type]
        e.call_received_epoch - func.lag(e.call_received_epoch, back).over(**person),
        e.call_received_epoch - func.lag(e.call_received_epoch, back).over(**program),  # type: ignore[arg-type]
        func.coalesce(r.referred, 0),
        func.coalesce(r.enrolled, 0),
        r.enrolled_at,
        *(func.coalesce(r[f"linked_{d}"], 0) for d in LINKAGE_DAYS),
    ).select_from(encounters.outerjoin(flags, r.encounter_id == e.id))
    query = query.where(where, e.bh_nexus_confirmed.is_(True), e.person_id.is_not(None))
    f = report_person_facts.c
    names = [
        f.person_id, f.call_received_epoch, f.encounter_id, f.program, f.month, f.agency,
        f.zone, f.race_group, f.gender, f.age_band, f.gap, f.gap_program, f.span,
        f.span_program, f.referred, f.enrolled, f.enrolled_at,
        *(f[f"linked_{d}"] for d in LINKAGE_DAYS),
    ]  # fmt: skip
    conn.execute(report_person_facts.insert().from_select(names, query))


def _person_ids(conn: Connection, where: ColumnElement[bool], lock: bool) -> list[tuple[int, Any]]:
    query = select(encounters.c.id, encounters.c.person_id).where(where)
    if lock:
        query = query.with_for_update()
    return [(int(i), p) for i, p in conn.execute(query)]


@contextlib.contextmanager
def keeping_rollups(
    conn: Connection, where: ColumnElement[bool], *, durations: bool = True
) -> Iterator[None]:
    """Around a change to the encounters ``where`` (an update, a delete, a person merge) or to
    their referrals (``durations`` False: a referral moves no time): the rollups follow it in
    the same transaction. The rows are locked first."""
    if fu_threshold(conn) is None:
        yield
        return
    before = _person_ids(conn, where, lock=True)
    ids = [i for i, _ in before]
    for n in range(0, len(ids), _BATCH):
        _apply_delta_ids(conn, ids[n : n + _BATCH], -1, durations=durations)
    yield
    after: list[tuple[int, Any]] = []
    for n in range(0, len(ids), _BATCH):
        _apply_delta_ids(conn, ids[n : n + _BATCH], 1, durations=durations)
        after += _person_ids(conn, encounters.c.id.in_(ids[n : n + _BATCH]), lock=False)
    refresh_persons(conn, [p for _, p in before] + [p for _, p in after])


def keeping_referral_flags(
    conn: Connection, *, encounter_id: int | None = None, incident_ref: str | None = None
) -> contextlib.AbstractContextManager[None]:
    """Around a change to a referral (created, cancelled, deleted, an RRI^I12 outcome): the
    referral counts and the person facts of the encounters it belongs to follow it. A
    referral recorded on an encounter names ``encounter_id``; an HL7 referral belongs to the
    encounters of its CAD incident (``incident_ref``), if any is recorded yet."""
    if encounter_id is not None:
        return keeping_rollups(conn, encounters.c.id == encounter_id, durations=False)
    if incident_ref is None or not _incident_has_encounters(conn, incident_ref):
        # No encounter to follow the referral (the usual case when it is made: a referral
        # from the field comes before its encounter is written up), so nothing to keep.
        return contextlib.nullcontext()
    return keeping_rollups(conn, encounters.c.cad_incident_no == incident_ref, durations=False)


# Whether a CAD incident has encounters: one indexed look. A new referral rides an ingest
# batch (on SQLite) and its rollup upkeep read the threshold and the encounters' ids through
# SQLAlchemy (about 0.25 ms of the writer's CPU) to find nothing to do.
_ENCOUNTER_OF_INCIDENT = (
    select(encounters.c.id).where(encounters.c.cad_incident_no == bindparam("b_incident")).limit(1)
)
_SQLITE_ENCOUNTER_OF_INCIDENT = "SELECT 1 FROM encounters WHERE cad_incident_no = ? LIMIT 1"


def _incident_has_encounters(conn: Connection, incident_ref: str) -> bool:
    if conn.dialect.name == "sqlite":  # the driver's cursor: a tenth of the CPU
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        return cursor.execute(_SQLITE_ENCOUNTER_OF_INCIDENT, (incident_ref,)).fetchone() is not None
    return conn.execute(_ENCOUNTER_OF_INCIDENT, {"b_incident": incident_ref}).first() is not None


def encounters_added(conn: Connection, where: ColumnElement[bool]) -> None:
    """After inserting the encounters ``where``: count them in."""
    if fu_threshold(conn) is None:
        return
    apply_delta(conn, where, 1)
    refresh_persons(conn, [p for _, p in _person_ids(conn, where, lock=False)])


def rebuild_rollups(conn: Connection, threshold: int | None = None) -> None:
    """Recompute every rollup from the encounters; ``threshold``: the frequent-utilizer
    threshold the person facts are for (default: the one they hold, else 3)."""
    if threshold is None:
        threshold = fu_threshold(conn) or DEFAULT_FU_THRESHOLD
    if threshold < 1:
        raise ValueError("the frequent-utilizer threshold must be at least 1")
    for table in (report_rollup_counts, report_rollup_durations, report_person_facts):
        conn.execute(delete(table))
    apply_delta(conn, true(), 1)
    _insert_facts(conn, true(), threshold)
    state = report_rollup_state
    conn.execute(delete(state).where(state.c.name == FU_THRESHOLD))
    conn.execute(state.insert().values(name=FU_THRESHOLD, value=threshold))
