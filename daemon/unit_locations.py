"""AVL from the CAD feeds: each EIDO's unit positions become the location fixes of the
clinicians who ride as those units (the roster's ``units:``).

The pipeline calls :meth:`EidoUnitLocations.observe` for every new snapshot after its commit
(the feed has its answer by then: a slow or failing location store never holds a feed). Fixes
go through the same :class:`~corespond.daemon.responders.ClinicianDesk.record_fix` as the HTTP
location endpoint and the NMEA listener, with the EIDO's timestamp as the fix time, so
``paging.max_fix_age_seconds`` applies to them as to any fix. A unit nobody rides as (a police
car, an ambulance) is ignored. Unit data that does not parse is quarantined (a copy of the
message, format ``eido-units``, with the reason and a JSON pointer) and the other units of the
message still count. An update that repeats a unit's position (each EIDO of an incident
carries every unit again) records nothing new.

A fix lost to a crash between the snapshot's commit and the fix's is not sent again: the
snapshot is kept, and the CAD's next update carries the unit's position anew.

Unit *statuses* come the same way, from every CAD format that gives them (EIDO: the resource's
status words and its own ``lastUpdateTimeStamp``; New World: the unit's latest status, at the
call's time of change). ``paging.unit_status.map`` (over
:data:`~corespond.daemon.responders.DEFAULT_UNIT_STATUSES`) says what a word means; a word it
does not know is ignored and counted (``unknown_statuses``, the metric
``corespond_cad_unit_statuses_total{outcome="unknown"}``). The change goes through
:meth:`~corespond.daemon.responders.CadUnitDesk.unit_status`: the same availability and page-
answer path as a reply, ordered by the CAD's time; a status the unit already had (every EIDO
repeats every unit) is no change and costs no transaction. A status on the call the clinician
was paged for answers that page (``Dispatched``: accept, ``EnRoute``: en route, ``OnScene``: on
scene) unless ``paging.unit_status.answers_pages`` is false or the EIDO says the unit works
another call (``activeOnIncidentId``): a dispatcher or the clinician set it in the CAD, a human
answer, not a delivery receipt. A reload (SIGHUP) applies a changed ``paging.unit_status`` to
the next status, all or nothing with the rest of the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

import structlog
from prometheus_client import CollectorRegistry, Counter
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from corespond.adapters.eido_units import (
    UnitLocations,
    may_have_unit_locations,
    unit_locations_of_message,
)
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.ingest import SnapshotState
from corespond.daemon.log import error_text
from corespond.daemon.pager import PageAnswer
from corespond.daemon.responders import (
    ASSIGNED,
    DEFAULT_UNIT_STATUSES,
    IGNORE,
    Availability,
    CadUnitDesk,
    LocationFix,
    UnitStatusChange,
    UnitStatusOutcome,
)
from corespond.daemon.roster import Roster
from corespond.daemon.snapshot import utc
from corespond.daemon.store.writer import RejectRecord, SnapshotRecord, StoredSnapshot

log = structlog.get_logger(__name__)

QUARANTINE_FORMAT = "eido-units"
# The page answer a status gives on the call the clinician was paged for.
PAGE_ANSWERS: Mapping[str, PageAnswer] = {
    ASSIGNED: PageAnswer.ACCEPT,
    Availability.EN_ROUTE.value: PageAnswer.EN_ROUTE,
    Availability.ON_SCENE.value: PageAnswer.ON_SCENE,
}


class EidoUnitLocations:
    """Turns CAD unit positions and statuses into clinicians' fixes and availability.
    ``roster()`` is read at each message (a reload's new roster counts at once);
    ``quarantine`` stores a reject record; ``statuses`` is the casefolded status map."""

    def __init__(
        self,
        desk: CadUnitDesk,
        roster: Callable[[], Roster],
        quarantine: Callable[[RejectRecord], Deferred[int]],
        *,
        statuses: Mapping[str, str] | None = None,
        answers_pages: bool = True,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.desk = desk
        self.roster = roster
        self.quarantine = quarantine
        self.statuses = dict(statuses) if statuses is not None else {
            word.casefold(): target for word, target in DEFAULT_UNIT_STATUSES.items()
        }  # fmt: skip
        self.answers_pages = answers_pages
        self._latest: dict[str, datetime] = {}  # clinician -> newest fix time sent to the desk
        # clinician -> (time, meaning) of the newest status sent to the desk: each EIDO of a
        # call repeats every unit, and a repeat must cost no transaction.
        self._status_seen: dict[str, tuple[datetime, str]] = {}
        self._unknown_said: set[tuple[str, str]] = set()
        self._answers_sent: set[tuple[str, int, str]] = set()  # (clinician, incident, meaning)
        self.recorded = 0
        self.rejected = 0
        self.statuses_applied = 0
        self.unknown_statuses = 0
        self.pages_answered = 0
        self._counter = Counter(
            "corespond_cad_unit_statuses",
            "CAD unit statuses of clinicians' units, by outcome (applied, older, unchanged, "
            "answered, unknown, failed)",
            ["outcome"],
            registry=registry,
        ) if registry is not None else None  # fmt: skip

    def reconfigure(self, statuses: Mapping[str, str], answers_pages: bool) -> list[str]:
        """A reload's ``paging.unit_status``, already checked with the rest of the file (a bad
        value fails the whole reload before this is called): the next status uses it. What
        changed, for the reload's log line (status words, never anything of a call)."""
        changes = []
        new = dict(statuses)
        if new != self.statuses:
            words = sorted(w for w in new.keys() | self.statuses.keys()
                           if new.get(w) != self.statuses.get(w))  # fmt: skip
            changes.append(f"unit status map reloaded ({', '.join(words)})")
            # A word that now means something, or something else, is news: a status the unit
            # already had is looked at again, and a word still unknown is said again.
            self._status_seen.clear()
            self._unknown_said.clear()
        if answers_pages != self.answers_pages:
            changes.append(f"unit statuses answer pages: {'yes' if answers_pages else 'no'}")
        self.statuses, self.answers_pages = new, answers_pages
        return changes

    def observe(self, record: SnapshotRecord, stored: StoredSnapshot) -> None:
        if stored.state is SnapshotState.DUPLICATE:
            return
        roster = self.roster()
        # Statuses only for units somebody rides as: most CAD units are police cars.
        ridden = bool(roster.unit_clinicians) and any(
            u.status and roster.clinician_of_unit(u.id) for u in record.snapshot.units
        )
        if record.format != "eido":
            if ridden:
                at = utc(record.snapshot.updated_at)
                for unit in record.snapshot.units:
                    if unit.status:
                        self._status(roster, record, stored, unit.id, unit.status, at, None)
            return
        if not ridden and not may_have_unit_locations(record.raw):
            return
        try:
            found = unit_locations_of_message(record.raw, statuses=ridden)
        except Exception:
            # A parser bug must not reach the pipeline: keep the message, say it was ours.
            log.exception("avl.eido.parser_failed", feed=record.feed)
            found = UnitLocations((), (RejectedMessage(
                "parser-error", "the EIDO unit-location parser failed internally"),))  # fmt: skip
        for fix in found.fixes:
            clinician_id = roster.clinician_of_unit(fix.unit)
            if clinician_id is None:
                continue
            newest = self._latest.get(clinician_id)
            if newest is not None and fix.fixed_at <= newest:
                continue
            self._latest[clinician_id] = fix.fixed_at
            location = LocationFix(clinician_id, fix.latitude, fix.longitude, fix.fixed_at,
                                   f"eido:{record.feed}")  # fmt: skip
            self.desk.record_fix(location).addCallbacks(
                self._recorded, self._failed, callbackArgs=(location, fix.unit),
                errbackArgs=(location, fix.unit),
            )  # fmt: skip
        if ridden:
            default_at = utc(record.snapshot.updated_at)
            for status in found.statuses:
                at = utc(status.at) if status.at is not None else default_at
                self._status(roster, record, stored, status.unit, status.status, at,
                             status.active_on)  # fmt: skip
        if found.problems:
            self._quarantine(record, found.problems)

    def _status(
        self,
        roster: Roster,
        record: SnapshotRecord,
        stored: StoredSnapshot,
        unit: str,
        word: str,
        at: datetime,
        active_on: str | None,
    ) -> None:
        clinician_id = roster.clinician_of_unit(unit)
        if clinician_id is None:
            return
        meaning = self.statuses.get(word.strip().casefold())
        if meaning is None:
            self.unknown_statuses += 1
            self._count("unknown")
            said = (unit.casefold(), word.strip().casefold())
            if said not in self._unknown_said and len(self._unknown_said) < 1000:
                self._unknown_said.add(said)  # once per unit and word: EIDOs repeat them
                log.info("avl.unit_status.unknown", feed=record.feed, unit=unit,
                         clinician_id=clinician_id, count=self.unknown_statuses)  # fmt: skip
            return
        if meaning == IGNORE:
            return
        own_call = self.answers_pages and (
            active_on is None or active_on == record.snapshot.incident_id
        )
        answer = PAGE_ANSWERS.get(meaning) if own_call else None
        if answer is not None:
            # Once per call and meaning: every EIDO of the call repeats the unit. Its time
            # does not matter here (a page never moves backwards).
            key = (clinician_id, stored.incident_pk, meaning)
            if key in self._answers_sent:
                answer = None
            else:
                if len(self._answers_sent) >= 10_000:
                    self._answers_sent.clear()
                self._answers_sent.add(key)
        seen = self._status_seen.get(clinician_id)
        if answer is None:
            if seen is not None and at < seen[0]:
                self._count("older")  # what the store would say, without the transaction
                return
            if seen is not None and meaning == seen[1]:
                # No change: every EIDO of a call carries every unit again, and a unit's own
                # updates repeat its status. A repeat does not undo a clinician's later word.
                return
        state = None if meaning == ASSIGNED else Availability(meaning)
        if state is None and answer is None:
            return
        if seen is None or at >= seen[0]:
            self._status_seen[clinician_id] = (at, meaning)
        change = UnitStatusChange(clinician_id, state, answer, at, stored.incident_pk,
                                  f"cad:{record.feed}")  # fmt: skip
        self.desk.unit_status(change).addCallbacks(
            self._status_done, self._status_failed, callbackArgs=(change, unit, meaning),
            errbackArgs=(change, unit),
        )  # fmt: skip

    def _status_done(self, outcome: UnitStatusOutcome, change: UnitStatusChange,
                     unit: str, meaning: str) -> None:  # fmt: skip
        if outcome.applied:
            self.statuses_applied += 1
        if outcome.answered is not None:
            self.pages_answered += 1
            self._count("answered")
        if outcome.no_page:
            # Nothing to answer yet: a page sent later for this call is answered by the next
            # EIDO that carries the status (a transaction per such EIDO until then).
            self._answers_sent.discard((change.clinician_id, change.incident_pk, meaning))
        said = "applied" if outcome.applied else "older" if outcome.older else "unchanged"
        self._count(said)
        (log.info if outcome.applied or outcome.answered else log.debug)(
            "avl.unit_status.recorded", source=change.via, clinician_id=change.clinician_id,
            unit=unit, state=change.state.value if change.state else None, outcome=said,
            page_ref=outcome.answered,
        )  # fmt: skip

    def _status_failed(self, failure: Failure, change: UnitStatusChange, unit: str) -> None:
        # The next update may carry it again.
        if self._status_seen.get(change.clinician_id, (None, None))[0] == change.at:
            del self._status_seen[change.clinician_id]
        if change.answer is not None and change.incident_pk is not None:
            call = (change.clinician_id, change.incident_pk)
            self._answers_sent = {k for k in self._answers_sent if k[:2] != call}
        self._count("failed")
        log.error("avl.unit_status.failed", source=change.via, clinician_id=change.clinician_id,
                  unit=unit, error=error_text(failure))  # fmt: skip

    def _count(self, outcome: str) -> None:
        if self._counter is not None:
            self._counter.labels(outcome).inc()

    def _recorded(self, _: object, fix: LocationFix, unit: str) -> None:
        self.recorded += 1
        log.info("avl.fix.recorded", source=fix.source, clinician_id=fix.clinician_id, unit=unit)

    def _failed(self, failure: Failure, fix: LocationFix, unit: str) -> None:
        if self._latest.get(fix.clinician_id) == fix.fixed_at:
            del self._latest[fix.clinician_id]  # the next update may carry it again
        log.error("avl.fix.failed", source=fix.source, clinician_id=fix.clinician_id, unit=unit,
                  error=error_text(failure))  # fmt: skip

    def _quarantine(self, record: SnapshotRecord, problems: tuple[RejectedMessage, ...]) -> None:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        reject = RejectRecord(
            feed=record.feed, format=QUARANTINE_FORMAT, received_at=record.received_at,
            raw=record.raw, code=first.code, reason=f"unit location: {first.reason}{more}",
            where=first.where, origin_name=None,
        )  # fmt: skip
        self.rejected += 1

        def stored(reject_id: int) -> None:
            log.warning("avl.eido.rejected", feed=record.feed, code=first.code,
                        where=first.where, count=len(problems), reject_id=reject_id)  # fmt: skip

        self.quarantine(reject).addCallbacks(
            stored,
            lambda f: log.error("avl.eido.not_quarantined", feed=record.feed,
                                error=error_text(f)),
        )  # fmt: skip


__all__ = ["QUARANTINE_FORMAT", "EidoUnitLocations"]
