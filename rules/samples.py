"""Small incident dicts (rule samples, ``corespond classify`` input) and the sample runner.

An incident dict holds any of ``id``, ``call_type``, ``call_type_code``, ``apco_type``,
``narrative``, ``priority``, ``agency``, ``zone``, ``status``, ``time`` (``HH:MM`` local time or
an ISO 8601 timestamp), ``cautions`` (a list of caution types), ``mental_state``, ``lat``,
``lon``. :func:`run_samples` runs every enabled rule's samples through the effective rule set:
a positive sample must fire the rule, a negative one must not, and ``expect:`` checks the whole
decision. A rule without samples is a failure (fail2ban and Sigma do the same).
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from typing import Any

from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import (
    Caution,
    IncidentStatus,
    Location,
    Note,
    Person,
    Snapshot,
    geo_point,
    parse_time,
)
from corespond.rules.engine import RuleClassifier
from corespond.rules.model import RuleSet

INCIDENT_KEYS = frozenset(
    {
        "id",
        "call_type",
        "call_type_code",
        "apco_type",
        "narrative",
        "priority",
        "agency",
        "zone",
        "status",
        "time",
        "cautions",
        "mental_state",
        "lat",
        "lon",
    }
)
# Samples say what time it is on a fixed Monday, in the rule set's time zone.
SAMPLE_DAY = datetime(2026, 1, 5).date()
SAMPLE_NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def incident_snapshot(obj: Any, *, timezone: str = "UTC", strict: bool = True) -> Snapshot:
    """A :class:`Snapshot` from a small incident dict; raises :class:`RejectedMessage`.

    With ``strict`` False, unknown keys (such as a label column in a backtest file) are ignored.
    """
    if type(obj) is not dict and not isinstance(obj, Mapping):
        raise RejectedMessage("invalid-field", "an incident must be a JSON object", "/")
    if strict and not _ALLOWED_KEYS.issuperset(obj):
        unknown = sorted(set(obj) - _ALLOWED_KEYS)
        raise RejectedMessage("unknown-field", f"unknown field {unknown[0]!r}", f"/{unknown[0]}")
    get = obj.get

    def text(key: str) -> str | None:
        return _text(key, get(key))

    status = IncidentStatus.ACTIVE
    if text("status"):
        try:
            status = IncidentStatus(str(text("status")).lower())
        except ValueError:
            raise RejectedMessage(
                "invalid-field", "status must be active, closed or cancelled", "/status"
            ) from None
    opened = None
    when = text("time")
    if when:
        opened = _time(when, timezone)
    cautions = get("cautions") or []
    if isinstance(cautions, str):
        cautions = [cautions]
    if cautions and (
        not isinstance(cautions, list) or not all(isinstance(c, str) for c in cautions)
    ):
        raise RejectedMessage("invalid-field", "cautions must be a list of strings", "/cautions")
    location = None
    if get("lat") is not None or get("lon") is not None:
        location = Location(point=geo_point(get("lat"), get("lon"), "/lat"))
    # The other text fields, checked in this order (the first bad one is the one reported).
    values: dict[str, str] = {}
    for key in _TEXT_KEYS:
        value = get(key)
        if value.__class__ is str:
            if value:
                values[key] = value
        else:
            got = _text(key, value)
            if got is not None:
                values[key] = got
    narrative = values.get("narrative")
    mental_state = values.get("mental_state")
    return Snapshot(
        incident_id=values.get("id") or "sample",
        updated_at=opened or SAMPLE_NOW,
        status=status,
        call_type=values.get("call_type"),
        call_type_code=values.get("call_type_code"),
        apco_type=values.get("apco_type"),
        priority=values.get("priority"),
        agency=values.get("agency"),
        zone=values.get("zone"),
        opened_at=opened,
        location=location,
        cautions=tuple(Caution(c) for c in cautions) if cautions else (),
        notes=(Note(narrative),) if narrative else (),
        persons=(Person(mental_state=mental_state),) if mental_state else (),
    )


_ALLOWED_KEYS = INCIDENT_KEYS | {"expect", "_line"}
_TEXT_KEYS = (
    "narrative",
    "mental_state",
    "id",
    "call_type",
    "call_type_code",
    "apco_type",
    "priority",
    "agency",
    "zone",
)


def _text(key: str, value: object) -> str | None:
    """A text field's value: None when absent or empty; numbers read as text, nothing else."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RejectedMessage("invalid-field", "must be a string", f"/{key}")
    return str(value)


def _time(value: str, timezone: str) -> datetime:
    if len(value) <= 5 and ":" in value:
        try:
            local = time.fromisoformat(value.zfill(5))
        except ValueError:
            raise RejectedMessage(
                "invalid-field", "time must be HH:MM or ISO 8601", "/time"
            ) from None
        tz = zoneinfo.ZoneInfo(timezone)
        return datetime.combine(SAMPLE_DAY, local, tzinfo=tz).astimezone(UTC)
    return parse_time(value, "/time")


@dataclass(frozen=True, slots=True)
class SampleResult:
    rule: str
    kind: str  # positive, negative, missing
    index: int
    file: str
    line: int | None
    ok: bool
    message: str


@dataclass
class SampleReport:
    ruleset: str
    results: list[SampleResult] = field(default_factory=list)

    @property
    def failures(self) -> list[SampleResult]:
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_json(self) -> dict[str, Any]:
        return {
            "ruleset": self.ruleset,
            "ok": self.ok,
            "samples": sum(1 for r in self.results if r.kind != "missing"),
            "failures": [
                {
                    "rule": r.rule,
                    "kind": r.kind,
                    "index": r.index,
                    "file": r.file,
                    "line": r.line,
                    "message": r.message,
                }
                for r in self.failures
            ],
        }


def run_samples(ruleset: RuleSet, classifier: RuleClassifier | None = None) -> SampleReport:
    """Run every enabled rule's samples; a rule without samples fails."""
    classifier = classifier or RuleClassifier(ruleset)
    report = SampleReport(ruleset.version)
    for rule in ruleset.rules:
        if not rule.samples_positive and not rule.samples_negative:
            report.results.append(
                SampleResult(
                    rule.id, "missing", 0, rule.file, rule.line, False, "rule has no samples"
                )
            )
            continue
        if not rule.samples_positive:
            report.results.append(
                SampleResult(
                    rule.id,
                    "missing",
                    0,
                    rule.file,
                    rule.line,
                    False,
                    "rule has no positive sample",
                )
            )
        for kind, samples in (
            ("positive", rule.samples_positive),
            ("negative", rule.samples_negative),
        ):
            for i, sample in enumerate(samples):
                report.results.append(
                    _run_one(classifier, ruleset, rule.id, rule.file, kind, i, sample)
                )
    return report


def _run_one(
    classifier: RuleClassifier,
    ruleset: RuleSet,
    rule_id: str,
    file: str,
    kind: str,
    index: int,
    sample: dict[str, Any],
) -> SampleResult:
    line = sample.get("_line")
    try:
        snap = incident_snapshot(sample, timezone=ruleset.timezone)
    except RejectedMessage as err:
        return SampleResult(rule_id, kind, index, file, line, False, f"bad sample: {err}")
    fired = rule_id in classifier.fired_rules(snap)
    if kind == "positive" and not fired:
        return SampleResult(rule_id, kind, index, file, line, False, "rule did not fire")
    if kind == "negative" and fired:
        return SampleResult(rule_id, kind, index, file, line, False, "rule fired")
    expect = sample.get("expect") or {}
    decision = classifier.classify(snap)
    got = {
        "behavioral_health": str(decision.behavioral_health).lower(),
        "category": decision.category or "none",
        "response": decision.response.value,
    }
    for key, want in expect.items():
        if str(want).lower() != got.get(key):
            return SampleResult(
                rule_id,
                kind,
                index,
                file,
                line,
                False,
                f"expected {key} {want}, got {got.get(key)}",
            )
    return SampleResult(rule_id, kind, index, file, line, True, "ok")
