"""The corespond command, in process: check-config, db upgrade, replay, incidents."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from corespond.daemon.cli import EX_CONFIG, main
from corespond.daemon.snapshot import snapshot_to_json
from corespond.rules.loader import load_ruleset

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def config_file(tmp_path: Path, body: str = "") -> Path:
    config = tmp_path / "corespond.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "feeds:\n"
        "  cad-files:\n"
        "    format: newworld\n"
        "    source: county\n"
        f"    transport: {{type: spool, directory: {tmp_path / 'spool'}}}\n" + body
    )
    return config


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_config_reports_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = config_file(tmp_path)
    code, out, _ = run(capsys, "check-config", "-c", str(good))
    assert code == 0 and "configuration OK (1 feeds)" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: {batch_max: 0, colour: blue}\nfeeds: {x: {format: eido}}\n")
    code, _, err = run(capsys, "check-config", "-c", str(bad))
    assert code == 1
    assert "bad.yaml:1: at 'store.batch_max'" in err
    assert "bad.yaml:1: at 'store.colour': unknown key 'colour'" in err
    assert "bad.yaml:2: at 'feeds.x'" in err


def test_run_with_a_broken_config_exits_ex_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense: true\n")
    assert run(capsys, "run", "-c", str(bad))[0] == EX_CONFIG


def test_replay_stores_classifies_and_reports_each_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_file(tmp_path)
    assert run(capsys, "db", "upgrade", "-c", str(config))[0] == 0
    files = sorted((FIXTURES / "newworld").glob("bh-*.xml"))
    assert len(files) >= 3
    code, out, _ = run(capsys, "replay", "-c", str(config), "--feed", "cad-files", *map(str, files))
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["snapshot"] for line in lines] == ["new"] * len(files)
    assert len({line["incident_id"] for line in lines}) == 1
    # Classified by the rule engine: the vendor rules (the config has no rules.d).
    assert {line["decision"]["ruleset"] for line in lines} == {load_ruleset().version}
    # Again: every message is a duplicate, and the store holds one incident.
    code, out, _ = run(capsys, "replay", "-c", str(config), "--feed", "cad-files", *map(str, files))
    assert [json.loads(line)["snapshot"] for line in out.splitlines()] == ["duplicate"] * len(files)
    code, out, _ = run(capsys, "incidents", "list", "--json", "-c", str(config))
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["source"] == "county" and row["snapshot_count"] == len(files)
    code, out, _ = run(capsys, "incidents", "show", row["external_id"], "-c", str(config))
    assert code == 0 and "snapshots:" in out and "decisions:" in out


def test_replay_dry_run_reports_rejects_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.jsonl"
    welfare = {"id": "INC-9", "updated_at": "2026-11-26T20:00:00Z", "apco_type": "WELFARE"}
    good.write_text(json.dumps(welfare) + '\n{"id": "INC-10"}\n')
    broken = tmp_path / "broken.json"
    shutil.copy(FIXTURES / "eido" / "bad-malformed.json", broken)
    code, out, _ = run(capsys, "replay", "--dry-run", str(good), str(broken))
    assert code == 1
    first, second, third = (json.loads(line) for line in out.splitlines())
    assert first["snapshot"] == "new" and first["decision"]["category"] == "welfare"
    assert second == {
        "file": str(good), "message": 2,
        "error": "missing-field: required field is missing (at /updated_at)",
    }  # fmt: skip
    assert third["file"] == str(broken) and third["error"].startswith("malformed-json: ")


def test_replay_needs_a_format_it_can_tell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = tmp_path / "call.txt"
    odd.write_text("hello")
    code, out, _ = run(capsys, "replay", "--dry-run", str(odd))
    assert code == 1 and json.loads(out)["error"] == "cannot tell the format: give --format"
    code, _, err = run(capsys, "replay", str(odd))
    assert code == 2 and "--dry-run" in err


def test_incidents_show_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path)
    run(capsys, "db", "upgrade", "-c", str(config))
    code, _, err = run(capsys, "incidents", "show", "nope", "-c", str(config))
    assert code == 1 and "no incident 'nope'" in err


def test_jsonl_round_trip_through_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import UTC, datetime

    from corespond.daemon.snapshot import Note, Snapshot

    snap = Snapshot("INC-77", datetime(2026, 11, 26, tzinfo=UTC), apco_type="EDP",
                    notes=(Note("SUBJ states he has a knife"),))  # fmt: skip
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(snapshot_to_json(snap)) + "\n")
    code, out, _ = run(capsys, "replay", "--dry-run", str(path))
    decision = json.loads(out)["decision"]
    assert code == 0 and decision["response"] == "police"
    [knife] = [e for e in decision["evidence"] if e["field"] == "narrative"]
    assert knife["text"] == "knife"


def test_replay_classifies_with_the_configured_site_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules_d = tmp_path / "rules.d"
    rules_d.mkdir()
    (rules_d / "50-welfare.yaml").write_text(
        "engine: 1\nrules:\n  - id: bh.apco.welfare\n    description: with an officer here\n"
        "    status: stable\n    category: welfare\n    effect: include\n"
        "    response: co-response\n    weight: 0.6\n    when: {apco_type: WELFARE}\n"
        "    samples: {positive: [{apco_type: WELFARE}], negative: [{apco_type: NOISE}]}\n"
    )
    config = config_file(tmp_path, "rules: {site_dir: rules.d}\n")
    line = {"id": "INC-9", "updated_at": "2026-11-26T20:00:00Z", "apco_type": "WELFARE"}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(line) + "\n")
    code, out, _ = run(capsys, "replay", "--dry-run", "-c", str(config), str(path))
    decision = json.loads(out)["decision"]
    assert code == 0 and decision["response"] == "co-response"
    assert decision["ruleset"] == load_ruleset(None, [rules_d]).version
    (rules_d / "50-welfare.yaml").write_text("engine: 1\nrules: nope\n")
    code, _, err = run(capsys, "replay", "--dry-run", "-c", str(config), str(path))
    assert code == 1 and "50-welfare.yaml" in err and "rules must be a list" in err
