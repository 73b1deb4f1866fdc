"""Backtest a rule set on labelled historical incidents (``corespond rules backtest``).

Rows come from CSV (a header row) or JSON lines; each is an incident dict (see
:mod:`corespond.rules.samples`; unknown columns are ignored) with a ground-truth column. A label
is a category (``suicide``, ``mental-health``, ...), or a yes/no word (``true``, ``yes``, ``1``,
``bh``; ``false``, ``no``, ``0``, ``none``, empty) when only behavioral-health-or-not is known.
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corespond.daemon.errors import RejectedMessage
from corespond.rules.engine import RuleClassifier
from corespond.rules.model import RuleSet
from corespond.rules.samples import incident_snapshot

NO_WORDS = frozenset({"", "none", "no", "false", "0", "n", "not-bh", "non-bh"})
YES_WORDS = frozenset({"yes", "true", "1", "y", "bh", "behavioral-health"})


@dataclass(frozen=True, slots=True)
class Miss:
    row: int
    id: str | None
    call_type: str | None  # public CAD vocabulary, never the narrative
    label: str
    predicted: str


@dataclass
class BacktestReport:
    ruleset: str
    rows: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row, reason)
    seconds: float = 0.0
    confusion: dict[str, Counter[str]] = field(default_factory=dict)  # label -> predicted -> n
    misses: list[Miss] = field(default_factory=list)
    bh_tp: int = 0
    bh_fp: int = 0
    bh_fn: int = 0
    bh_tn: int = 0

    @property
    def precision(self) -> float:
        """Behavioral-health or not: of the calls flagged, the share that were."""
        return _ratio(self.bh_tp, self.bh_tp + self.bh_fp)

    @property
    def recall(self) -> float:
        return _ratio(self.bh_tp, self.bh_tp + self.bh_fn)

    def per_category(self) -> dict[str, dict[str, float | int]]:
        labels = {k for k in self.confusion if k not in ("bh", "none")}
        labels |= {p for c in self.confusion.values() for p in c if p != "none"}
        out: dict[str, dict[str, float | int]] = {}
        for cat in sorted(labels):
            tp = self.confusion.get(cat, Counter())[cat]
            fp = sum(c[cat] for label, c in self.confusion.items() if label != cat)
            fn = sum(n for p, n in self.confusion.get(cat, Counter()).items() if p != cat)
            out[cat] = {
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "precision": _ratio(tp, tp + fp),
                "recall": _ratio(tp, tp + fn),
            }
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "ruleset": self.ruleset,
            "rows": self.rows,
            "skipped": [{"row": r, "reason": why} for r, why in self.skipped],
            "seconds": round(self.seconds, 4),
            "behavioral_health": {
                "precision": round(self.precision, 4),
                "recall": round(self.recall, 4),
                "tp": self.bh_tp,
                "fp": self.bh_fp,
                "fn": self.bh_fn,
                "tn": self.bh_tn,
            },
            "categories": self.per_category(),
            "confusion": {k: dict(v) for k, v in sorted(self.confusion.items())},
            "misses": [_miss_json(m) for m in self.misses],
        }


def _miss_json(m: Miss) -> dict[str, Any]:
    return {
        "row": m.row,
        "id": m.id,
        "call_type": m.call_type,
        "label": m.label,
        "predicted": m.predicted,
    }


def _ratio(a: int, b: int) -> float:
    return a / b if b else 1.0


def read_rows(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a CSV or TSV file (by its header) or of a JSON-lines file (``.jsonl``)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{n}: not a JSON object") from None
                rows.append(obj)
        return rows
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    return list(csv.DictReader(lines, dialect=dialect))


def backtest(
    ruleset: RuleSet,
    rows: Iterable[Mapping[str, Any]],
    label_column: str,
    classifier: RuleClassifier | None = None,
) -> BacktestReport:
    """Classify every row and compare with its label: precision, recall, confusion, misses."""
    classifier = classifier or RuleClassifier(ruleset)
    report = BacktestReport(ruleset.version)
    started = time.perf_counter()
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping) or label_column not in row:
            report.skipped.append((n, f"no {label_column!r} column"))
            continue
        incident = {k: v for k, v in row.items() if k != label_column}
        try:
            snap = incident_snapshot(incident, timezone=ruleset.timezone, strict=False)
        except RejectedMessage as err:
            report.skipped.append((n, str(err)))
            continue
        decision = classifier.classify(snap)
        report.rows += 1
        raw = str(row[label_column] if row[label_column] is not None else "").strip().lower()
        label_bh = raw not in NO_WORDS
        predicted = decision.category if decision.behavioral_health else "none"
        if raw in NO_WORDS:
            label = "none"
        elif raw in YES_WORDS:
            label = "bh"
        else:
            label = raw
        shown = predicted or "none"
        report.confusion.setdefault(label, Counter())[shown] += 1
        if label_bh and decision.behavioral_health:
            report.bh_tp += 1
        elif decision.behavioral_health:
            report.bh_fp += 1
        elif label_bh:
            report.bh_fn += 1
        else:
            report.bh_tn += 1
        wrong = (label_bh != decision.behavioral_health) or (
            label not in ("bh", "none") and label != shown
        )
        if wrong:
            ident = row.get("id")
            call_type = row.get("call_type")
            report.misses.append(
                Miss(
                    n,
                    str(ident) if ident is not None else None,
                    str(call_type) if call_type else None,
                    label,
                    shown,
                )
            )
    report.seconds = time.perf_counter() - started
    return report
