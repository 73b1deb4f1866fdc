"""Automatic referrals (``referrals.auto``): config checked with file:line, a disposition or a
rule triggers once per incident and trigger, across re-saves and restarts, with the referral
and the row's mark in one transaction; on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred

from corespond.daemon.auto_referrals import (
    AutoReferrals,
    claim_due,
    disposition_hook,
    requests_of_claims,
    scan_rule_triggers,
)
from corespond.daemon.clock import Clock
from corespond.daemon.config import AutoReferralConfig, ConfigError, load_config
from corespond.daemon.decision import Response
from corespond.daemon.encounter_desk import EncounterDesk
from corespond.daemon.store.tables import (
    auto_referrals,
    encounters,
    referral_messages,
    referrals,
)
from corespond.daemon.store.writer import StoredSnapshot, write_batch
from tests.daemon.referral_rig import config as referrals_config
from tests.daemon.referral_rig import provider
from tests.daemon.store.records import decision, record, snapshot
from tests.daemon.test_escalation import World, inline, roster, world
from tests.daemon.web.encounter_rig import OUTCOMES, taken_page

__all__ = ["roster", "world"]  # fixtures, imported for pytest

DISPOSITION = AutoReferralConfig("disposition:resolved_with_referral", "csu", "outpatient")
RULE = AutoReferralConfig("rule:bh.apco.overdose", "detox-west", "detox", urgency="stat",
                          referring_clinician="oncall-lead")  # fmt: skip
CONFIG = referrals_config(
    provider("csu", service_types=("crisis-stabilization", "outpatient")),
    provider("detox-west", service_types=("detox",)),
    auto=(DISPOSITION, RULE),
)


# --- config -------------------------------------------------------------------------------------

PROVIDERS = """\
referrals:
  sending_application: CORESPOND
  sending_facility: COUNTY-BH
  providers:
    csu:
      host: 127.0.0.1
      port: 2575
      receiving_application: BHRECV
      receiving_facility: CSU
      service_types: [outpatient]
"""


def test_auto_entries_are_read_and_every_mistake_is_named_with_file_and_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "corespond.yaml"
    path.write_text(
        PROVIDERS
        + "  auto:\n"
        + "    - when: {disposition: resolved_with_referral}\n"
        + "      provider: csu\n"
        + "      service: outpatient\n"
        + "    - when: {rule: bh.apco.overdose}\n"
        + "      provider: csu\n"
        + "      service: outpatient\n"
        + "      urgency: stat\n"
        + "      part2: true\n"
    )
    auto = load_config(path).referrals.auto  # type: ignore[union-attr]
    assert auto == (
        AutoReferralConfig("disposition:resolved_with_referral", "csu", "outpatient"),
        AutoReferralConfig(
            "rule:bh.apco.overdose", "csu", "outpatient", urgency="stat", part2=True
        ),
    )
    path.write_text(
        PROVIDERS
        + "  auto:\n"
        + "    - {when: {disposition: resolved_with_referal}, provider: csu, service: outpatient}\n"
        + "    - {when: {rule: bh.apco.overdose}, provider: detox, service: outpatient}\n"
        + "    - {when: {rule: bh.apco.overdos}, provider: csu, service: detox}\n"
        + "    - {when: {disposition: arrest}, provider: csu, service: outpatient}\n"
        + "    - {when: {disposition: arrest}, provider: csu, service: outpatient}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    found = [str(p) for p in caught.value.problems]
    expect = [
        (12, "referrals.auto[0].when.disposition", "did you mean 'resolved_with_referral'"),
        (13, "referrals.auto[1].provider", "unknown provider 'detox' (configured: csu)"),
        (14, "referrals.auto[2].service", "provider csu does not take service type 'detox'"),
        (14, "referrals.auto[2].when.rule", "no rule 'bh.apco.overdos' in the rule set (did you "
                                            "mean 'bh.apco.overdose'"),
        (16, "referrals.auto[4]", "given twice"),
    ]  # in file order
    assert len(found) == len(expect), found
    for (line, key, words), problem in zip(expect, found, strict=True):
        assert f"corespond.yaml:{line}: at '{key}'" in problem and words in problem, problem
    # A trigger is one disposition or one rule.
    path.write_text(
        PROVIDERS + "  auto:\n"
        "    - {when: {rule: a, disposition: arrest}, provider: csu, service: outpatient}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = [str(p) for p in caught.value.problems]
    assert "corespond.yaml:12: at 'referrals.auto[0].when'" in problem


# --- triggers ------------------------------------------------------------------------------------


def rows(w: World, table: Any) -> list[dict[str, Any]]:
    with w.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table).order_by(table.c.id)).mappings()]


def inline_create(w: World) -> Any:
    """The service's create without its builder process: create_referral, inline."""
    from corespond.daemon.referrals import create_referral

    def create(request: Any, on_stored: Any) -> Deferred[Any]:
        return maybeDeferred(create_referral, w.engine, CONFIG, request, datetime.now(UTC),
                             on_stored=on_stored)  # fmt: skip

    return create


def auto_worker(w: World, config: Any = CONFIG) -> AutoReferrals:
    return AutoReferrals(w.engine, config, clock=Clock(w.reactor), run_in_thread=inline,
                         create=inline_create(w))  # fmt: skip


def run(worker: AutoReferrals) -> int:
    """One pass: the referrals it created."""
    done: list[Any] = []
    ensureDeferred(worker._work()).addBoth(done.append)
    assert done and isinstance(done[0], int), done
    return done[0]


def desk(w: World) -> EncounterDesk:
    return EncounterDesk(w.engine, OUTCOMES, clock=Clock(w.reactor), run_in_thread=inline,
                         hooks=(disposition_hook(CONFIG.auto),))  # fmt: skip


def test_a_disposition_refers_once_per_incident_across_resaves_and_restarts(w: World) -> None:
    taken_page(w)
    d = desk(w)
    (encounter,) = [r["id"] for r in rows(w, encounters)]
    d.update(encounter, {"disposition": "resolved_on_scene"}, False)
    assert rows(w, auto_referrals) == []  # not a configured disposition
    d.update(encounter, {"disposition": "resolved_with_referral"}, False)
    (wanted,) = rows(w, auto_referrals)
    assert (wanted["trigger"], wanted["provider"], wanted["service_type"], wanted["state"]) == (
        "disposition:resolved_with_referral", "csu", "outpatient", "pending",
    )  # fmt: skip
    assert wanted["referring_clinician"] == "c-101" and wanted["program"] == "metro"
    assert run(auto_worker(w)) == 1
    (made,) = rows(w, referrals)
    (wanted,) = rows(w, auto_referrals)
    assert wanted["state"] == "done" and wanted["referral_ref"] == made["ref"]
    assert (made["incident_ref"], made["provider"], made["service_type"], made["state"]) == (
        "2026-001445", "csu", "outpatient", "queued",
    )  # fmt: skip
    assert made["referring_clinician"] == "c-101" and made["summary"] is None
    assert made["person"]["family"] == "Example"  # the person recorded on the incident
    assert len(rows(w, referral_messages)) == 1
    # Saved again (the form, the API), with the same disposition and after a change: no more.
    d.update(encounter, {"disposition": "resolved_with_referral", "gender": "woman"}, False)
    d.update(encounter, {"disposition": "other"}, False)
    d.update(encounter, {"disposition": "resolved_with_referral"}, True)
    assert len(rows(w, auto_referrals)) == 1
    # A new worker (a restart) finds nothing to do.
    assert run(auto_worker(w)) == 0 and len(rows(w, referrals)) == 1


def overdose_incident(w: World, number: str, updated: float = 0) -> None:
    snap = dataclasses.replace(snapshot(number, updated=updated), incident_number=number)
    dec = dataclasses.replace(decision(Response.POLICE), rules=("mh.confused", "bh.apco.overdose"))
    with w.engine.begin() as conn:
        (stored,) = write_batch(conn, [record(snap, dec)])
    assert isinstance(stored, StoredSnapshot)


def test_a_rule_in_the_decision_refers_once_even_after_a_restart(w: World) -> None:
    worker = auto_worker(w)
    assert run(worker) == 0
    overdose_incident(w, "2026-002000")
    assert run(worker) == 1
    (made,) = rows(w, referrals)
    assert (made["provider"], made["urgency"], made["referring_clinician"]) == (
        "detox-west", "stat", "oncall-lead",
    )  # fmt: skip
    (wanted,) = rows(w, auto_referrals)
    assert wanted["trigger"] == "rule:bh.apco.overdose" and wanted["state"] == "done"
    # A later snapshot of the same incident, decided the same way: nothing new.
    overdose_incident(w, "2026-002000", updated=30)
    assert run(worker) == 0
    # A restart looks back a day: the incident is seen again, and nothing is created twice.
    again = auto_worker(w)
    assert run(again) == 0 and len(rows(w, referrals)) == 1


def test_a_rule_fired_while_the_daemon_was_down_is_caught_up_at_start(w: World) -> None:
    overdose_incident(w, "2026-002001")  # decided before any worker ran
    assert run(auto_worker(w)) == 1


def test_the_referral_and_its_mark_commit_together(w: World) -> None:
    overdose_incident(w, "2026-002003")
    with w.engine.begin() as conn:
        scan_rule_triggers(conn, CONFIG.auto, 0, datetime.now(UTC))
        (claim,) = claim_due(conn, datetime.now(UTC), "w-a", timedelta(minutes=2))
    # Its lease ran out and another worker took it: the first one's create rolls back whole.
    with w.engine.begin() as conn:
        conn.execute(update(auto_referrals).values(claimed_by="w-b"))
    [(_, asked)] = requests_of_claims(w.engine, CONFIG, [claim])
    first, second = auto_worker(w), auto_worker(w)
    first.worker_id, second.worker_id = "w-a", "w-b"
    assert created_by(first._create_one(claim, asked, datetime.now(UTC))) == 0
    assert rows(w, referrals) == [] and rows(w, referral_messages) == []
    assert created_by(second._create_one(claim, asked, datetime.now(UTC))) == 1
    assert len(rows(w, referrals)) == 1 and rows(w, auto_referrals)[0]["state"] == "done"


def created_by(work: Any) -> int:
    done: list[Any] = []
    ensureDeferred(work).addBoth(done.append)
    assert done and isinstance(done[0], int), done
    return done[0]


def test_a_trigger_no_longer_configured_is_refused_with_its_reason(w: World) -> None:
    overdose_incident(w, "2026-002004")
    with w.engine.begin() as conn:
        scan_rule_triggers(conn, CONFIG.auto, 0, Clock(w.reactor).now())
    without = dataclasses.replace(CONFIG, auto=(DISPOSITION,))
    assert run(auto_worker(w, without)) == 0
    (row,) = rows(w, auto_referrals)
    assert row["state"] == "refused"
    assert row["refusal"] == "no referrals.auto entry for rule:bh.apco.overdose any more"
    assert rows(w, referrals) == []


def test_the_daemon_saves_encounters_with_the_disposition_trigger(tmp_path: Path) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from corespond.daemon.app import Corespond

    path = tmp_path / "corespond.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n" + PROVIDERS + "  auto:\n"
        "    - {when: {disposition: resolved_with_referral}, provider: csu, service: outpatient}\n"
    )
    app = Corespond(load_config(path), MemoryReactorClock())
    try:
        (hook,) = app.encounter_desk.hooks
        assert hook.__qualname__.startswith("disposition_hook")
    finally:
        app.engine.dispose()


def test_a_rule_the_site_switched_off_is_no_trigger(tmp_path: Path) -> None:
    site = tmp_path / "rules.d"
    site.mkdir()
    (site / "20-local.yaml").write_text(
        "engine: 1\nrules:\n  - {id: bh.apco.overdose, enabled: false}\n"
    )
    path = tmp_path / "corespond.yaml"
    path.write_text(
        f"rules: {{site_dir: {site}}}\n" + PROVIDERS + "  auto:\n"
        "    - {when: {rule: bh.apco.overdose}, provider: csu, service: outpatient}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = [str(p) for p in caught.value.problems]
    assert "corespond.yaml:13: at 'referrals.auto[0].when.rule'" in problem
    assert "switched off" in problem


# --- through the referral service, woken after the commit ---------------------------------------


def test_a_disposition_wakes_the_worker_once_its_save_has_committed(w: World) -> None:
    """No poll: the save's commit wakes the worker, which creates the referral through the
    service's create (here create_referral, inline) with the row's mark in its transaction.
    A save that asks for nothing wakes nothing."""
    from corespond.daemon.auto_referrals import AfterCommitWake

    wake = AfterCommitWake()
    worker = auto_worker(w)
    wake.target = worker.wake
    taken_page(w)
    d = EncounterDesk(w.engine, OUTCOMES, clock=Clock(w.reactor), run_in_thread=wake.runner(inline),
                      hooks=(disposition_hook(CONFIG.auto, wake.mark),))  # fmt: skip
    (encounter,) = [r["id"] for r in rows(w, encounters)]
    saved: list[Any] = []
    d.update(encounter, {"disposition": "resolved_on_scene"}, False).addCallback(saved.append)
    assert wake.woken == 0 and rows(w, auto_referrals) == []
    d.update(encounter, {"disposition": "resolved_with_referral"}, False).addCallback(saved.append)
    assert wake.woken == 1
    (made,) = rows(w, referrals)
    (wanted,) = rows(w, auto_referrals)
    assert wanted["state"] == "done" and wanted["referral_ref"] == made["ref"]
    assert [s["status"] for s in saved] == [saved[0]["status"]] * 2  # the desk's own answers
    d.update(encounter, {"disposition": "resolved_with_referral", "gender": "woman"}, False)
    assert wake.woken == 1 and len(rows(w, referrals)) == 1  # asked for before: no wake


def test_automatic_referrals_are_built_in_the_builder_process(w: World) -> None:
    """The daemon's path: ReferralService.create, so hl7apy never runs in the daemon's
    process (nor on the writer thread its pages share). Its transaction claims the message
    for the outbox worker: the pass polls the worker no more (an empty claim on the writer
    that pages share)."""
    import os

    from corespond.daemon.referrals import ReferralService
    from tests.daemon.referral_rig import Loop, build_in_pid

    loop = Loop()
    service = ReferralService(w.engine, loop.reactor, CONFIG, clock=loop.clock,
                              build=build_in_pid)  # fmt: skip
    service.start()
    worker = AutoReferrals.of_service(w.engine, CONFIG, service, service.worker.clock)
    overdose_incident(w, "2026-002010")
    polls: list[bool] = []
    poll = service.worker.poll
    service.worker.poll = lambda: polls.append(True) or poll()  # type: ignore[method-assign]
    try:
        loop.spin(lambda: service.started.called, turns=6000)
        polls.clear()  # the worker's own first look, at start
        worker.poll()
        loop.spin(lambda: [r["state"] for r in rows(w, auto_referrals)] == ["done"], turns=6000)
        loop.spin(lambda: not worker._polling)
        loop.settle()
    finally:
        stopped = ensureDeferred(service.stop())
        loop.spin(lambda: stopped.called)
    assert polls == []
    (made,) = rows(w, referrals)
    assert rows(w, auto_referrals)[0]["referral_ref"] == made["ref"]
    (message,) = [r["message"] for r in rows(w, referral_messages)]
    [segment] = [s for s in message.split(b"\r") if s.startswith(b"ZPD|")]
    assert int(segment.split(b"|")[1]) != os.getpid()
