"""The default rule set on a labelled vocabulary of invented call types in several city styles."""

from collections import Counter
from pathlib import Path

from corespond.rules.backtest import backtest, read_rows
from corespond.rules.loader import load_ruleset

VOCABULARY = Path(__file__).parent / "fixtures" / "call-types.tsv"


def test_call_type_vocabulary_precision_and_recall() -> None:
    rows = read_rows(VOCABULARY)
    assert len(rows) > 350
    labels = Counter(r["label"] for r in rows)
    assert labels["none"] > 150 and len(labels) >= 6
    report = backtest(load_ruleset(), rows, "label")
    misses = [(m.call_type, m.label, m.predicted) for m in report.misses]
    assert report.precision >= 0.98, misses
    assert report.recall >= 0.98, misses
    for category, figures in report.per_category().items():
        assert figures["precision"] >= 0.95 and figures["recall"] >= 0.95, (category, misses)
