"""``corespond rules check|test|dump|schema|backtest`` and ``corespond classify``, in process."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from corespond.daemon.cli import main
from corespond.daemon.rules_cli import _load_line
from corespond.rules.loader import load_ruleset

FIXTURES = Path(__file__).resolve().parents[1] / "rules" / "fixtures"

SITE_RULE = """\
engine: 1
lists:
  mental_call_type: {append: [zebra 44]}
rules:
  - {id: bh.call-type.housing, enabled: false}
  - id: bh.apco.welfare
    description: welfare checks go with an officer here
    status: stable
    category: welfare
    effect: include
    response: co-response
    weight: 0.6
    when: {apco_type: WELFARE}
    samples:
      positive: [{apco_type: WELFARE, expect: {response: co-response}}]
      negative: [{apco_type: NOISE}]
"""


@pytest.fixture(autouse=True)
def no_default_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without -c or PATH the commands look for the default config: make sure it is absent."""
    monkeypatch.setenv("CORESPOND_CONFIG", str(tmp_path / "absent.yaml"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def site(tmp_path: Path, text: str = SITE_RULE, name: str = "50-site.yaml") -> Path:
    directory = tmp_path / "rules.d"
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(textwrap.dedent(text))
    return directory


def config(tmp_path: Path, site_dir: str = "rules.d", timezone: str | None = None) -> Path:
    path = tmp_path / "corespond.yaml"
    tz = f", timezone: {timezone}" if timezone else ""
    path.write_text(f"state_dir: {tmp_path / 'state'}\nrules: {{site_dir: {site_dir}{tz}}}\n")
    return path


# --- check ---------------------------------------------------------------------------------------


def test_check_vendor_rules_are_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rules", "check")
    assert code == 0
    assert out.startswith("rules OK: 0 error(s), 0 warning(s)")
    assert "(vendor rules only)" in out and load_ruleset().version in out


def test_check_lists_every_error_and_warning_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = site(tmp_path)
    bad = directory / "60-bad.yaml"
    bad.write_text(
        "engine: 1\nlists:\n  unused_words: [foo]\nrules:\n"
        "  - id: site.bad\n    category: welfare\n    effect: include\n"
        "    response: sometimes\n    when: {call_type: [x]}\n"
    )
    code, out, _ = run(capsys, "rules", "check", str(directory))
    assert code == 1
    assert f"{bad}:8: error: rule site.bad: response must be clinician, co-response" in out
    assert f"{bad}:5: error: rule site.bad: missing 'description'" in out
    assert "rules FAILED: 3 error(s)" in out.splitlines()[-1]

    code, out, _ = run(capsys, "rules", "check", "--json", str(directory))
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["ruleset"] is None
    assert {"file": str(bad), "line": 8, "rule": "site.bad", "severity": "error"}.items() <= (
        report["errors"][-1].items()
    )
    assert str(bad) in report["files"]


def test_check_takes_the_configured_site_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = site(tmp_path)
    code, out, _ = run(capsys, "rules", "check", "-c", str(config(tmp_path)))
    assert code == 0 and f"vendor + {directory}" in out
    expected = load_ruleset(None, [directory]).version
    assert expected in out
    # The same through $CORESPOND_CONFIG, without -c.
    code, out, _ = run(capsys, "rules", "check", "--json")
    assert json.loads(out)["ruleset"] == load_ruleset().version


def test_check_with_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rules", "check", str(tmp_path / "nope.yaml"))
    assert code == 1 and "nope.yaml: error: cannot read" in out


# --- test ----------------------------------------------------------------------------------------


def test_test_runs_every_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rules", "test", str(site(tmp_path)))
    assert code == 0 and out.startswith("samples OK: ")


def test_test_fails_on_a_wrong_sample_and_on_a_rule_without_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = SITE_RULE.replace("expect: {response: co-response}", "expect: {response: police}")
    text += textwrap.indent(
        "- id: site.nosamples\n  description: x\n  status: test\n  category: welfare\n"
        "  effect: include\n  response: clinician\n  when: {call_type: [elder check]}\n",
        "  ",
    )
    directory = site(tmp_path, text)
    code, out, err = run(capsys, "rules", "test", str(directory))
    assert code == 1, err
    path = directory / "50-site.yaml"
    expected = "rule bh.apco.welfare: positive sample 1: expected response police, got co-response"
    assert expected in out
    assert f"{path}:" in out and "rule site.nosamples: rule has no samples" in out
    assert "samples FAILED" in out.splitlines()[-1]
    code, out, _ = run(capsys, "rules", "test", "--json", str(directory))
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert {f["rule"] for f in report["failures"]} == {"bh.apco.welfare", "site.nosamples"}


def test_test_refuses_broken_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = site(tmp_path, "engine: 1\nrules: nope\n")
    code, _, err = run(capsys, "rules", "test", str(directory))
    assert code == 1 and "error(s) in the rule files" in err and "rules must be a list" in err


# --- dump and schema -----------------------------------------------------------------------------


def test_dump_shows_a_site_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rules", "dump", "--json")
    vendor = json.loads(out)
    assert code == 0 and vendor["version"] == load_ruleset().version
    [welfare] = [r for r in vendor["rules"] if r["id"] == "bh.apco.welfare"]
    assert welfare["response"] == "clinician"

    code, out, _ = run(capsys, "rules", "dump", "-c", str(config(tmp_path)))
    assert code == 0  # no rules.d yet: the vendor set
    assert yaml.safe_load(out)["version"] == vendor["version"]

    directory = site(tmp_path)
    code, out, _ = run(capsys, "rules", "dump", "-c", str(config(tmp_path)))
    assert code == 0 and out.startswith(f"# effective rule set (vendor + {directory})")
    dump = yaml.safe_load(out)
    assert next(iter(dump)) == "version" and dump["version"] != vendor["version"]
    [welfare] = [r for r in dump["rules"] if r["id"] == "bh.apco.welfare"]
    assert welfare["response"] == "co-response"
    assert "bh.call-type.housing" in dump["disabled"]
    assert "zebra 44" in dump["lists"]["mental_call_type"]


def test_dump_honours_the_configured_timezone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, timezone="America/Denver")
    code, out, _ = run(capsys, "rules", "dump", "--json", "-c", str(path))
    assert code == 0 and json.loads(out)["timezone"] == "America/Denver"


def test_dump_with_a_broken_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rules: {watch_interval_seconds: 0}\n")
    code, _, err = run(capsys, "rules", "dump", "-c", str(path))
    assert code == 1 and "at 'rules.watch_interval_seconds'" in err


def test_schema_is_a_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rules", "schema")
    schema = json.loads(out)
    assert code == 0
    Draft202012Validator.check_schema(schema)


# --- backtest ------------------------------------------------------------------------------------


def test_backtest_reports_precision_recall_confusion_and_misses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture = FIXTURES / "backtest.csv"
    code, out, _ = run(capsys, "rules", "backtest", str(fixture), "--label", "label")
    assert code == 0
    assert f"backtest of {fixture}: 10 incidents, 0 skipped" in out
    assert "behavioral-health  precision 1.000  recall 0.833" in out
    assert "mental-health            2     0     1      1.000    0.667" in out
    assert "misses (1)" in out
    assert "row 9 id bt-9 'SUSPICIOUS PERSON': label mental-health, predicted none" in out
    assert "subj hearing voices" not in out  # misses name the call type, never the narrative

    code, out, _ = run(capsys, "rules", "backtest", str(fixture), "--label", "label", "--json")
    report = json.loads(out)
    assert report["behavioral_health"]["recall"] == 0.8333
    assert report["confusion"]["mental-health"] == {"mental-health": 2, "none": 1}
    assert report["seconds"] >= 0 and report["ruleset"] == load_ruleset().version


def test_backtest_with_site_rules_and_json_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "history.jsonl"
    rows.write_text(
        '{"id": "h1", "call_type": "ZEBRA 44", "truth": "mental-health"}\n'
        '{"id": "h2", "call_type": "NOISE COMPLAINT", "truth": "none"}\n'
    )
    code, out, _ = run(capsys, "rules", "backtest", str(rows), "--label", "truth", "--json")
    assert json.loads(out)["behavioral_health"]["recall"] == 0.0
    directory = site(tmp_path)
    code, out, _ = run(
        capsys, "rules", "backtest", str(rows), "--label", "truth", "--rules", str(directory),
        "--json",
    )  # fmt: skip
    report = json.loads(out)
    assert code == 0 and report["behavioral_health"]["recall"] == 1.0 and not report["misses"]


def test_backtest_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixture = FIXTURES / "backtest.csv"
    code, _, err = run(capsys, "rules", "backtest", str(fixture), "--label", "truth")
    assert code == 2 and "has no column 'truth'" in err
    code, _, err = run(capsys, "rules", "backtest", str(tmp_path / "x.csv"), "--label", "l")
    assert code == 1 and "cannot read" in err


# --- classify ------------------------------------------------------------------------------------


def test_classify_writes_one_decision_per_line_and_an_error_for_bad_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [
        {"id": "c1", "call_type": "SUICIDAL SUBJECT", "narrative": "RP states friend has a gun",
         "priority": "1", "agency": "pd", "lat": 40.0, "lon": -105.2},
        {"id": "c2", "call_type": "TRAFFIC COLLISION", "narrative": "two cars, no injuries"},
        {"id": "c3", "call_type": "MENTAL SUBJECT", "narative": "typo in a key"},
        {"id": "c4", "call_type_code": "WELFARE", "lat": 123, "lon": 0},
    ]  # fmt: skip
    text = "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n{not json\n"
    text += "\n".join(json.dumps(x) for x in lines[2:]) + "\n[1, 2]\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    code, out, _ = run(capsys, "classify")
    assert code == 1
    first, second, bad_json, typo, bad_lat, not_object = (json.loads(x) for x in out.splitlines())
    assert list(first) == [
        "id", "behavioral_health", "category", "response", "score", "rules", "evidence", "ruleset",
    ]  # fmt: skip
    assert first["id"] == "c1" and first["behavioral_health"] is True
    assert first["category"] == "suicide" and first["response"] == "police"
    assert "safety.weapon" in first["rules"]
    assert {"rule": "safety.weapon", "field": "narrative", "start": 23, "end": 26,
            "text": "gun"} in first["evidence"]  # fmt: skip
    assert first["ruleset"] == load_ruleset().version
    assert second["behavioral_health"] is False and second["response"] == "none"
    assert bad_json == {"line": 4, "error": "malformed-json: not valid JSON"}
    assert typo == {
        "id": "c3", "line": 5, "error": "unknown-field: unknown field 'narative' (at /narative)",
    }  # fmt: skip
    assert bad_lat["id"] == "c4" and bad_lat["error"].startswith("invalid-field: ")
    assert not_object["error"].startswith("invalid-field: an incident must be a JSON object")
    assert "not json" not in out


def test_classify_output_is_ascii_json_whatever_the_text(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [
        {"id": "a", "call_type": "MENTAL SUBJECT", "narrative": "RP hearing voices"},
        {"id": "b\u00e9", "call_type": "MENTAL SUBJECT", "narrative": "caf\u00e9: voices"},
        {"id": "c\ud800", "call_type": "MENTAL SUBJECT"},  # a lone surrogate
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(json.dumps(x) for x in lines)))
    code, out, _ = run(capsys, "classify")
    assert code == 0 and out.isascii()
    plain, accented, surrogate = out.splitlines()
    assert plain.startswith('{"id":"a","behavioral_health":true,')  # compact, like the others
    assert accented.startswith('{"id":"b\\u00e9","behavioral_health":true,')
    assert json.loads(surrogate)["id"] == "c\ud800"
    assert json.loads(accented)["id"] == "b\u00e9"


def test_classify_a_file_with_site_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "w", "call_type": "ZEBRA 44"}) + "\n")
    code, out, _ = run(capsys, "classify", str(path))
    assert code == 0 and json.loads(out)["behavioral_health"] is False
    code, out, _ = run(capsys, "classify", str(path), "--rules", str(site(tmp_path)))
    decision = json.loads(out)
    assert code == 0 and decision["category"] == "mental-health"
    assert decision["ruleset"] == load_ruleset(None, [tmp_path / "rules.d"]).version
    code, out, _ = run(capsys, "classify", str(path), "-c", str(config(tmp_path)))
    assert json.loads(out)["ruleset"] == decision["ruleset"]


def test_classify_many_lines_streams_in_chunks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"n{i}", "call_type": "WELFARE CHECK"}) + "\n"
                for i in range(4500))
    )  # fmt: skip
    code, out, _ = run(capsys, "classify", str(path))
    decisions = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [d["id"] for d in decisions] == [f"n{i}" for i in range(4500)]
    assert {d["category"] for d in decisions} == {"welfare"}


def test_classify_unreadable_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "classify", str(tmp_path / "missing.jsonl"))
    assert code == 1 and "cannot read" in err
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": "x", "call_type": "caf\xe9"}\n')
    code, _, err = run(capsys, "classify", str(latin))
    assert code == 1 and "not UTF-8" in err


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    line=st.one_of(
        st.builds(json.dumps, _JSON_VALUES),  # NaN, Infinity, big integers, escaped surrogates
        st.builds(lambda v: json.dumps(v, ensure_ascii=False), _JSON_VALUES),
        st.text(max_size=40),  # mostly not JSON
        st.sampled_from(["1e400", "-1e400", '{"a": 1, "a": 2}', '"\\ud800"', "\ufeff{}", "-0"]),
    )
)
def test_classify_reads_a_line_as_json_loads_does(line: str) -> None:
    """orjson reads the lines it can, json the rest: the values and the errors are json's."""
    try:
        want = json.loads(line)
    except ValueError:
        with pytest.raises(ValueError):
            _load_line(line)
    else:
        assert repr(_load_line(line)) == repr(want)  # repr: NaN, -0.0 and int/float kept apart
