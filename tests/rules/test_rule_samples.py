"""One test per vendor rule id: its embedded samples, through the whole effective rule set."""

import pytest

from corespond.rules.engine import RuleClassifier
from corespond.rules.loader import load_ruleset
from corespond.rules.samples import run_samples

RULESET = load_ruleset()
CLASSIFIER = RuleClassifier(RULESET)


@pytest.mark.parametrize("rule_id", [r.id for r in RULESET.rules])
def test_rule_samples(rule_id: str) -> None:
    report = run_samples(RULESET, CLASSIFIER)
    mine = [r for r in report.results if r.rule == rule_id]
    assert mine, "rule has no samples"
    failures = [f"{r.file}:{r.line} {r.kind}[{r.index}]: {r.message}" for r in mine if not r.ok]
    assert not failures, failures


def test_vendor_rules_load_without_warnings() -> None:
    assert [str(w) for w in RULESET.warnings] == []
