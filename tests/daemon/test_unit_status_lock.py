"""A CAD unit status and another daemon's availability change at once, on one PostgreSQL: the
status reads the clinician's availability under the row lock every writer of it takes, so an
older status waits for the newer change and leaves it standing, as if it had come later."""

from __future__ import annotations

from datetime import timedelta

from corespond.daemon.decision import Response
from corespond.daemon.responders import Availability, UnitStatusChange
from corespond.daemon.store import paging as db
from corespond.daemon.store.unit_status import apply_unit_status
from tests.daemon.test_answer_race import POSTGRES_ONLY, rows, second_waits_for_first
from tests.daemon.test_escalation import World, incident, result_of, roster, world

__all__ = ["roster", "world"]  # fixtures


@POSTGRES_ONLY
def test_an_older_cad_status_waits_for_a_newer_change_and_leaves_it(w: World) -> None:
    stored = incident(w, Response.CLINICIAN)
    result_of(w.service.stop())
    now = w.service.clock.now()
    with w.engine.begin() as conn:
        earlier = now - timedelta(hours=1)
        db.write_availability(conn, "c-101", Availability.AVAILABLE, "api", earlier)
    # The CAD's "on scene" was set a minute ago; the clinician's "unavailable" (the API, on
    # another daemon) is newer and under way when the status is applied.
    change = UnitStatusChange("c-101", Availability.ON_SCENE, None, now - timedelta(minutes=1),
                              stored.incident_pk, "cad:cad-json")  # fmt: skip
    theirs = second_waits_for_first(
        w,
        lambda c: db.write_availability(c, "c-101", Availability.UNAVAILABLE, "api", now),
        lambda c: repr(apply_unit_status(c, change, now)),
    )
    assert theirs == [
        "UnitStatusOutcome(applied=False, older=True, answered=None, no_page=False)"
    ]
    assert rows(w, "SELECT availability, via FROM clinician_states") == [("unavailable", "api")]
