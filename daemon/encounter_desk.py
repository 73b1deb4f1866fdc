"""The encounter desk: the one way the API and the clinician's form save an encounter.

``POST /api/v1/encounters/<id>`` calls :meth:`EncounterDesk.update`; the mobile encounter form
behind a signed link calls :meth:`EncounterDesk.for_page` and :meth:`EncounterDesk.update_for_page`.
Both save through :func:`save_encounter` (``encounters.update_encounter`` and whatever must ride
in the same transaction, such as a configured automatic referral), one transaction per call,
in the thread the daemon gives (the store's writer thread on SQLite).

A link opens an encounter only for the clinician the page went to, only once that clinician has
taken the call (accepted, en route or on scene), and only the encounter of that page's incident:
:func:`page_encounter` checks all three, inside the transaction that reads or saves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, select
from twisted.internet.defer import Deferred

from corespond.daemon.clock import Clock
from corespond.daemon.config import OutcomesConfig
from corespond.daemon.encounters import EncounterInvalid, update_encounter
from corespond.daemon.errors import SafeMessage
from corespond.daemon.store.tables import encounters, escalation_chains, incidents, pages

T = TypeVar("T")
# States of a page whose clinician has taken the call.
TAKEN_STATES = ("accepted", "en_route", "on_scene")
# Runs in a save's transaction after the encounter changed: (conn, encounter row, now).
SaveHook = Callable[[Connection, Mapping[str, Any], datetime], None]


class EncounterClosed(SafeMessage, LookupError):
    """A link that opens no encounter (any more). ``code``: ``no-encounter``."""

    def __init__(self) -> None:
        super().__init__("no-encounter: this link opens no encounter")
        self.code = "no-encounter"


@dataclass(frozen=True, slots=True)
class PageEncounter:
    """The encounter a clinician's link opens, and what the forms show around it."""

    encounter_id: int
    page_ref: str
    clinician_id: str
    incident_ref: str  # the CAD incident number
    program: str
    zone: str | None
    values: dict[str, Any]  # the encounter's columns


@dataclass(frozen=True, slots=True)
class FormSave:
    """What a form's save came to: the encounter after it, or as it is and why not."""

    encounter: PageEncounter
    problems: tuple[tuple[str, str], ...]

    @property
    def saved(self) -> bool:
        return not self.problems


def page_encounter(conn: Connection, page_ref: str, clinician_id: str) -> PageEncounter | None:
    """The encounter ``clinician_id`` may document through the link of page ``page_ref``:
    the page went to them, they took the call, and the encounter is that incident's. None
    otherwise (nothing says which check failed)."""
    p, c, i = pages.c, escalation_chains.c, incidents.c
    row = conn.execute(
        select(
            p.kind, p.clinician_id, p.state, c.accepted_by, c.program, i.incident_number,
            i.external_id, i.zone, encounters.c.id.label("encounter_id"),
        )
        .select_from(
            pages.join(escalation_chains, c.id == p.chain_id)
            .join(incidents, i.id == p.incident_pk)
            .outerjoin(encounters, encounters.c.incident_id == p.incident_pk)
        )
        .where(p.page_ref == page_ref)
    ).first()  # fmt: skip
    if (
        row is None
        or row.kind != "page"
        or row.clinician_id != clinician_id
        or row.state not in TAKEN_STATES
        or row.accepted_by != clinician_id
        or row.encounter_id is None
    ):
        return None
    values = conn.execute(select(encounters).where(encounters.c.id == row.encounter_id)).mappings()
    return PageEncounter(
        encounter_id=int(row.encounter_id),
        page_ref=page_ref,
        clinician_id=clinician_id,
        incident_ref=row.incident_number or row.external_id,
        program=row.program,
        zone=row.zone,
        values=dict(values.one()),
    )


def save_encounter(
    conn: Connection,
    encounter_id: int,
    changes: Mapping[str, Any],
    config: OutcomesConfig,
    now: datetime,
    *,
    complete: bool,
    hooks: tuple[SaveHook, ...] = (),
) -> dict[str, Any]:
    """Validate and apply ``changes`` (``EncounterInvalid`` lists every problem), then run
    the hooks in the same transaction; the encounter's columns after the change."""
    row = update_encounter(conn, encounter_id, changes, config, now, complete=complete)
    for hook in hooks:
        hook(conn, row, now)
    return row


class EncounterDesk:
    """Saves encounters for the API and the form; every Deferred fires after the commit."""

    def __init__(
        self,
        engine: Engine,
        config: OutcomesConfig,
        *,
        clock: Clock,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]],
        hooks: tuple[SaveHook, ...] = (),
    ) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self._run = run_in_thread
        self.hooks = hooks

    def _save(
        self, conn: Connection, encounter_id: int, changes: Mapping[str, Any], complete: bool
    ) -> dict[str, Any]:
        return save_encounter(conn, encounter_id, changes, self.config, self.clock.now(),
                              complete=complete, hooks=self.hooks)  # fmt: skip

    def update(
        self, encounter_id: int, changes: dict[str, Any], complete: bool
    ) -> Deferred[dict[str, Any]]:
        """The API's update: ``{"id", "status"}`` once committed."""

        def work() -> dict[str, Any]:
            with self.engine.begin() as conn:
                row = self._save(conn, encounter_id, changes, complete)
            return {"id": row["id"], "status": row["status"]}

        return self._run(work)

    def for_page(self, page_ref: str, clinician_id: str) -> Deferred[PageEncounter | None]:
        def work() -> PageEncounter | None:
            with self.engine.connect() as conn:
                return page_encounter(conn, page_ref, clinician_id)

        return self._run(work)

    def update_for_page(
        self, page_ref: str, clinician_id: str, changes: Mapping[str, Any], complete: bool
    ) -> Deferred[FormSave]:
        """The form's update. The link is checked again in the saving transaction (the call
        may have been taken by someone else since the form was shown); problems come back
        with the encounter as it still is (nothing saved), not as a failure."""

        def work() -> FormSave:
            try:
                with self.engine.begin() as conn:
                    found = page_encounter(conn, page_ref, clinician_id)
                    if found is None:
                        raise EncounterClosed()
                    self._save(conn, found.encounter_id, changes, complete)
                    after = page_encounter(conn, page_ref, clinician_id)
                assert after is not None
                return FormSave(after, ())
            except EncounterInvalid as err:
                with self.engine.connect() as conn:
                    unchanged = page_encounter(conn, page_ref, clinician_id)
                if unchanged is None:
                    raise EncounterClosed() from None
                return FormSave(unchanged, tuple(err.problems))

        return self._run(work)


__all__ = [
    "TAKEN_STATES",
    "EncounterClosed",
    "EncounterDesk",
    "FormSave",
    "PageEncounter",
    "SaveHook",
    "page_encounter",
    "save_encounter",
]
