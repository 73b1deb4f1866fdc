"""POST /api/v1/encounters/<id>: a clinician's documentation, refused field by field."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.testing import MemoryReactorClock

from corespond.daemon.app import Corespond
from corespond.daemon.config import load_config
from corespond.daemon.encounters import (
    EncounterInvalid,
    EncounterNotFound,
    Prefill,
    create_encounter,
)
from corespond.daemon.store import migrate
from tests.daemon.web.rig import SYSTEM_TOKEN, parse, raw, web_rig


def post(r: Any, path: str, body: Any, token: str | None = SYSTEM_TOKEN) -> Any:
    headers = [("Content-Type", "application/json")]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return r.send(raw("POST", path, data, headers))


class Updater:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, Any], bool]] = []
        self.pending: list[Deferred[dict[str, Any]]] = []

    def __call__(self, eid: int, changes: dict[str, Any], complete: bool) -> Deferred[Any]:
        self.calls.append((eid, changes, complete))
        self.pending.append(Deferred())
        return self.pending[-1]


def test_an_update_is_answered_after_the_commit() -> None:
    updater = Updater()
    r = web_rig(encounters=updater)
    changes = {"disposition": "resolved_on_scene", "actions": ["assessment"]}
    transport = post(r, "/api/v1/encounters/42", {"changes": changes, "complete": True})
    assert transport.value() == b"" and updater.calls == [(42, changes, True)]
    updater.pending[0].callback({"id": 42, "status": "completed"})
    got = parse(transport.value())
    assert got.status == 200 and json.loads(got.body) == {"id": 42, "status": "completed"}


def test_every_problem_is_listed_and_unknown_encounters_are_404() -> None:
    invalid = EncounterInvalid([("disposition", "not in the vocabulary"), ("age_band", "bad")])
    r = web_rig(encounters=lambda *_: fail(invalid))
    got = parse(post(r, "/api/v1/encounters/7", {"changes": {"disposition": "x"}}).value())
    assert got.status == 400
    assert [p["where"] for p in json.loads(got.body)["problems"]] == ["disposition", "age_band"]
    r = web_rig(encounters=lambda *_: fail(EncounterNotFound(7)))
    assert parse(post(r, "/api/v1/encounters/7", {"changes": {}}).value()).status == 404


def test_bad_requests() -> None:
    r = web_rig(encounters=lambda *_: succeed({"id": 1, "status": "open"}))
    assert parse(post(r, "/api/v1/encounters/x1", {}).value()).status == 400
    got = parse(post(r, "/api/v1/encounters/1", {"changes": [], "complete": True}).value())
    assert got.status == 400 and json.loads(got.body)["where"] == "/changes"
    got = parse(post(r, "/api/v1/encounters/1", {"complete": "yes"}).value())
    assert json.loads(got.body)["where"] == "/complete"
    assert parse(post(r, "/api/v1/encounters/1", {}, token=None).value()).status == 401
    assert parse(post(web_rig(), "/api/v1/encounters/1", {}).value()).status == 404


def test_the_daemon_updates_the_encounter_in_one_transaction(tmp_path: Path) -> None:
    (tmp_path / "corespond.yaml").write_text(f"state_dir: {tmp_path / 'state'}\n")
    app = Corespond(load_config(tmp_path / "corespond.yaml"), MemoryReactorClock())
    try:
        migrate.upgrade(app.engine)
        when = datetime(2026, 11, 1, 3, tzinfo=UTC)
        with app.engine.begin() as conn:
            eid = create_encounter(conn, Prefill(program="alpha", call_received_at=when), when)
        # The encounter desk (API and form) runs its transaction right here, not in a thread.
        app.encounter_desk._run = maybeDeferred
        done: list[Any] = []
        changes = {"bh_nexus_confirmed": True, "disposition": "resolved_on_scene"}
        app.update_encounter(eid, changes, True).addCallback(done.append)
        assert done == [{"id": eid, "status": "completed"}]
        failed: list[Any] = []
        app.update_encounter(eid, {"disposition": "teleported"}, False).addErrback(failed.append)
        assert failed[0].check(EncounterInvalid)
    finally:
        app.engine.dispose()
