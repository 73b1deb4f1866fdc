"""Each clinician's latest position, kept with every fix (``clinician_positions``), on SQLite
and PostgreSQL; and the migration that fills it from the fix history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, insert, text

from corespond.daemon.dispatcher import Fix
from corespond.daemon.responders import LocationFix
from corespond.daemon.store import migrate
from corespond.daemon.store import paging as db
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.tables import location_fixes

T = datetime(2026, 3, 9, 14, 0, tzinfo=UTC)


def test_the_latest_fix_is_the_position_and_a_late_one_does_not_move_it(engine: Engine) -> None:
    def fix(cid: str, lat: float, minutes: int) -> None:
        with engine.begin() as conn:
            at = T + timedelta(minutes=minutes)
            db.write_fix(conn, LocationFix(cid, lat, -97.75, at, "http"), T + timedelta(hours=1))

    fix("c-1", 30.1, 0)
    fix("c-2", 30.2, 0)
    fix("c-1", 30.3, 5)
    fix("c-1", 30.4, 2)  # arrives late: older than the one kept
    with engine.connect() as conn:
        assert db.latest_fixes(conn) == {
            "c-1": Fix(30.3, -97.75, T + timedelta(minutes=5)),
            "c-2": Fix(30.2, -97.75, T),
        }
        history = conn.execute(text("SELECT count(*) FROM location_fixes")).scalar()
    assert history == 4  # every fix is still in the history


def test_the_migration_fills_positions_from_the_history(db_url: str) -> None:
    engine = create_store_engine(db_url)
    try:
        migrate.upgrade(engine, "0009_rollup")
        rows = [
            ("c-1", 30.1, T), ("c-1", 30.3, T + timedelta(minutes=5)),
            ("c-1", 30.2, T + timedelta(minutes=1)), ("c-2", 30.5, T), ("c-2", 30.6, T),
        ]  # fmt: skip
        with engine.begin() as conn:
            conn.execute(
                insert(location_fixes),
                [
                    dict(clinician_id=cid, lat=lat, lon=-97.75, fixed_at=at, received_at=at,
                         source="http", accuracy_m=None)
                    for cid, lat, at in rows
                ],
            )  # fmt: skip
        migrate.upgrade(engine)
        with engine.connect() as conn:
            assert db.latest_fixes(conn) == {
                "c-1": Fix(30.3, -97.75, T + timedelta(minutes=5)),
                "c-2": Fix(30.6, -97.75, T),  # equal times: the later row
            }
    finally:
        engine.dispose()
