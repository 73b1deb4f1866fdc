import json
import textwrap
from pathlib import Path

import jsonschema
import pytest

from corespond.daemon.decision import Response
from corespond.rules.engine import RuleClassifier
from corespond.rules.loader import VENDOR_DIR, check_ruleset, load_ruleset, plain
from corespond.rules.problems import ProblemLog, RuleSetError
from corespond.rules.samples import incident_snapshot
from corespond.rules.schema import rules_json_schema
from corespond.rules.yamlsource import read_yaml

GOOD_RULE = """\
engine: 1
lists:
  words: [mental*]
rules:
  - id: t.mental
    description: test
    status: test
    category: mental-health
    effect: include
    response: clinician
    when: {call_type: $words}
    samples: {positive: ["MENTAL"], negative: ["NOISE"]}
"""


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    vendor = tmp_path / "vendor"
    write(vendor, "10.yaml", text)
    with pytest.raises(RuleSetError) as info:
        load_ruleset(vendor)
    return [str(p) for p in info.value.problems if p.severity == "error"]


def test_every_error_at_once_with_file_line_and_rule(tmp_path: Path) -> None:
    errors = problems_of(
        tmp_path,
        """\
        engine: 1
        rules:
          - id: a.one
            description: x
            status: stabel
            category: suicide
            effect: include
            response: clinician
            when: {call_type: $nolist}
          - id: a.two
            description: x
            status: stable
            category: suicide
            effect: include
            response: sometimes
            when: {narative: [x]}
        """,
    )
    f = str(tmp_path / "vendor" / "10.yaml")
    assert f"{f}:5: error: rule a.one: status must be one of: " in errors[0]
    assert any(e.startswith(f"{f}:9: error: rule a.one: unknown list 'nolist'") for e in errors)
    assert any(e.startswith(f"{f}:15: error: rule a.two: response must be") for e in errors)
    assert any(
        e.startswith(f"{f}:16: error: rule a.two: unknown condition 'narative'") for e in errors
    )
    assert len(errors) == 4


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    errors = problems_of(tmp_path, "engine: 1\nrules:\n  - id: [unclosed\n")
    assert ":4: error: YAML syntax" in errors[0] or ":3: error: YAML syntax" in errors[0]


def test_engine_version_is_required_and_checked(tmp_path: Path) -> None:
    assert "missing 'engine: 1'" in problems_of(tmp_path, "rules: []\n")[0]
    assert "needs rule engine 2" in problems_of(tmp_path, "engine: 2\n")[0]


def test_yaml_pitfalls_keep_codes_as_written(tmp_path: Path) -> None:
    vendor = tmp_path / "vendor"
    write(
        vendor,
        "10.yaml",
        """\
        engine: 1
        rules:
          - id: t.codes
            description: codes that YAML 1.1 would turn into numbers and booleans
            status: test
            category: mental-health
            effect: include
            response: clinician
            when: {any: [{call_type_code: [0800, NO, 10:30, 1e3, ~x]}, {priority: [0800]}]}
            samples: {positive: [{call_type_code: "0800"}, {call_type_code: "no"}], negative: []}
        """,
    )
    ruleset = load_ruleset(vendor)
    c = RuleClassifier(ruleset)
    for code in ("0800", "NO", "10:30", "1e3"):
        assert c.classify(incident_snapshot({"call_type_code": code})).behavioral_health, code
    assert not c.classify(incident_snapshot({"call_type_code": "800"})).behavioral_health


def test_ambiguous_booleans_and_nulls_are_rejected(tmp_path: Path) -> None:
    write(tmp_path / "vendor", "20.yaml", "engine: 1\nrules:\n  - {id: t.mental, enabled: NO}\n")
    errors = problems_of(tmp_path, GOOD_RULE)
    assert any(
        "20.yaml:3: error: rule t.mental: enabled must be true or false" in e for e in errors
    )
    (tmp_path / "vendor" / "20.yaml").unlink()
    errors = problems_of(tmp_path, GOOD_RULE.replace("[mental*]", "[mental*, ~]"))
    assert any(":3: error: item of list 'words' must be text" in e for e in errors)
    errors = problems_of(tmp_path, "engine: 1\nengine: 1\n")
    assert "duplicate key 'engine' (first at line 1)" in errors[0]
    errors = problems_of(tmp_path, "engine: !!python/object:os.system 1\n")
    assert "not allowed" in errors[0]


def test_site_overrides_disables_and_appends(tmp_path: Path) -> None:
    site = tmp_path / "rules.d"
    write(
        site,
        "20-local.yaml",
        """\
        engine: 1
        lists:
          mental_call_type: {append: [ment eval]}
        rules:
          - {id: bh.call-type.housing, enabled: false}
          - id: bh.call-type.welfare
            description: our welfare checks go with an officer
            status: stable
            category: welfare
            effect: include
            response: co-response
            weight: 0.6
            when: {call_type: [welfare*]}
            samples: {positive: ["WELFARE CHECK"], negative: ["NOISE"]}
        """,
    )
    write(site, "30-codes.tsv", "local\tapco\n4M\tEDP\n")
    vendor = load_ruleset()
    ruleset = load_ruleset(None, [site])
    assert ruleset.version != vendor.version
    c = RuleClassifier(ruleset)
    assert c.classify(incident_snapshot({"call_type": "WELFARE CHECK"})).response is (
        Response.CO_RESPONSE
    )
    assert not c.classify(incident_snapshot({"call_type": "HOMELESS PERSON"})).behavioral_health
    assert c.classify(incident_snapshot({"call_type": "MENT EVAL"})).category == "mental-health"
    assert c.classify(incident_snapshot({"call_type_code": "4m"})).category == "mental-health"
    dump = ruleset.dump()
    assert "bh.call-type.housing" in dump["disabled"]
    assert "ment eval" in dump["lists"]["mental_call_type"]
    [welfare] = [r for r in dump["rules"] if r["id"] == "bh.call-type.welfare"]
    assert welfare["response"] == "co-response"
    assert dump["apco_codes"]["4M"] == "EDP"
    json.dumps(dump)


def test_overlapping_site_ids_warn(tmp_path: Path) -> None:
    site = tmp_path / "rules.d"
    for name in ("a.yaml", "b.yaml"):
        write(
            site,
            name,
            GOOD_RULE.replace("lists:\n  words: [mental*]\n", "").replace("$words", "[mental*]"),
        )
    warnings = [str(p) for p in check_ruleset(None, [site]) if p.severity == "warning"]
    assert any("overlapping id" in w and "t.mental" in w and "b.yaml:3" in w for w in warnings)


def test_site_cannot_duplicate_vendor_list_silently_but_vendor_can_not_twice(
    tmp_path: Path,
) -> None:
    vendor = tmp_path / "vendor"
    write(vendor, "10.yaml", GOOD_RULE)
    write(vendor, "20.yaml", "engine: 1\nrules:\n  - id: t.mental\n    enabled: false\n")
    ruleset = load_ruleset(vendor)
    assert ruleset.rules == () and ruleset.disabled == ("t.mental",)
    write(vendor, "30.yaml", GOOD_RULE)
    with pytest.raises(RuleSetError, match="also defined in vendor file"):
        load_ruleset(vendor)


def test_warnings_unused_list_never_fires(tmp_path: Path) -> None:
    vendor = tmp_path / "vendor"
    write(
        vendor,
        "10.yaml",
        GOOD_RULE.replace(
            "  words: [mental*]\n", "  words: [mental*]\n  spare: [x]\n  empty: []\n"
        ).replace("$words", "$empty"),
    )
    found = [str(p) for p in check_ruleset(vendor)]
    assert any("list 'spare' is never used" in p for p in found)
    assert any("rule t.mental: can never fire: no terms for call_type" in p for p in found)
    assert any("list 'words' is never used" in p for p in found)


def test_version_is_stable_and_tracks_rule_changes(tmp_path: Path) -> None:
    a = load_ruleset()
    b = load_ruleset()
    assert a.version == b.version and len(a.version) == 64
    vendor = tmp_path / "vendor"
    write(vendor, "10.yaml", GOOD_RULE)
    v1 = load_ruleset(vendor).version
    write(
        vendor,
        "10.yaml",
        "# a comment and new samples only\n" + GOOD_RULE.replace('"NOISE"', '"TRAFFIC"'),
    )
    assert load_ruleset(vendor).version == v1
    write(vendor, "10.yaml", GOOD_RULE.replace("clinician", "co-response"))
    assert load_ruleset(vendor).version != v1


def test_vendor_files_match_the_json_schema() -> None:
    schema = rules_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in sorted(VENDOR_DIR.glob("*.yaml")):
        doc = plain(read_yaml(path.read_text(), str(path), ProblemLog()))
        doc["engine"] = int(doc["engine"])
        for rule in doc.get("rules", []):
            if "weight" in rule:
                rule["weight"] = float(rule["weight"])
            if "enabled" in rule:
                rule["enabled"] = rule["enabled"] == "true"
        if "negation" in doc:
            doc["negation"]["window"] = int(doc["negation"]["window"])
        jsonschema.validate(doc, schema)
