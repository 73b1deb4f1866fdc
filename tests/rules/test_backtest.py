import json
from pathlib import Path

from corespond.rules.backtest import backtest, read_rows
from corespond.rules.loader import load_ruleset

FIXTURES = Path(__file__).parent / "fixtures"
RULESET = load_ruleset()


def test_backtest_csv_report() -> None:
    report = backtest(RULESET, read_rows(FIXTURES / "backtest.csv"), "label")
    assert report.rows == 10 and report.skipped == []
    # bt-9 is labelled mental-health but nothing in it says so: the one miss.
    assert [(m.id, m.label, m.predicted) for m in report.misses] == [
        ("bt-9", "mental-health", "none")
    ]
    assert (report.bh_tp, report.bh_fp, report.bh_fn, report.bh_tn) == (5, 0, 1, 4)
    assert report.precision == 1.0 and round(report.recall, 3) == 0.833
    cats = report.per_category()
    assert (
        round(cats["mental-health"]["recall"], 3) == 0.667 and cats["suicide"]["precision"] == 1.0
    )
    assert report.confusion["mental-health"]["none"] == 1
    out = report.as_json()
    assert out["seconds"] >= 0 and out["behavioral_health"]["fn"] == 1
    json.dumps(out)


def test_backtest_json_lines_and_yes_no_labels(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    rows = [
        {"id": "a", "call_type": "EDP", "bh": "yes"},
        {"id": "b", "call_type": "DUI", "bh": "no"},
        {"id": "c", "call_type": "PARKING", "bh": "true"},
        {"id": "d", "call_type": 42},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = backtest(RULESET, read_rows(path), "bh")
    assert report.rows == 3 and report.skipped == [(4, "no 'bh' column")]
    assert [m.id for m in report.misses] == ["c"]
    assert report.precision == 1.0 and report.recall == 0.5
