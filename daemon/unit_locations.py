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
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import structlog
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from corespond.adapters.eido_units import UnitLocations, unit_locations_of_message
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.ingest import SnapshotState
from corespond.daemon.log import error_text
from corespond.daemon.responders import ClinicianDesk, LocationFix
from corespond.daemon.roster import Roster
from corespond.daemon.store.writer import RejectRecord, SnapshotRecord, StoredSnapshot

log = structlog.get_logger(__name__)

QUARANTINE_FORMAT = "eido-units"


class EidoUnitLocations:
    """Turns EIDO unit positions into clinicians' fixes. ``roster()`` is read at each message
    (a reload's new roster counts at once); ``quarantine`` stores a reject record."""

    def __init__(
        self,
        desk: ClinicianDesk,
        roster: Callable[[], Roster],
        quarantine: Callable[[RejectRecord], Deferred[int]],
    ) -> None:
        self.desk = desk
        self.roster = roster
        self.quarantine = quarantine
        self._latest: dict[str, datetime] = {}  # clinician -> newest fix time sent to the desk
        self.recorded = 0
        self.rejected = 0

    def observe(self, record: SnapshotRecord, stored: StoredSnapshot) -> None:
        if record.format != "eido" or stored.state is SnapshotState.DUPLICATE:
            return
        try:
            found = unit_locations_of_message(record.raw)
        except Exception:
            # A parser bug must not reach the pipeline: keep the message, say it was ours.
            log.exception("avl.eido.parser_failed", feed=record.feed)
            found = UnitLocations((), (RejectedMessage(
                "parser-error", "the EIDO unit-location parser failed internally"),))  # fmt: skip
        roster = self.roster()
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
        if found.problems:
            self._quarantine(record, found.problems)

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
