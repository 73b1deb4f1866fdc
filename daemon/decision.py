"""What the classifier says about one snapshot, and the interface a classifier fills."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from corespond.daemon.slotted import fast_init
from corespond.daemon.snapshot import Snapshot


class Response(StrEnum):
    CLINICIAN = "clinician"  # a clinician may go without police
    CO_RESPONSE = "co-response"  # a clinician with an officer
    POLICE = "police"  # behavioral-health related, but police first; the clinician is told
    NONE = "none"


@fast_init
@dataclass(frozen=True, slots=True)
class Evidence:
    """The exact text a rule matched. ``text`` may quote the narrative: it is protected."""

    rule: str
    field: str
    start: int
    end: int
    text: str


@fast_init
@dataclass(frozen=True, slots=True)
class Decision:
    behavioral_health: bool
    category: str | None
    response: Response
    score: float
    rules: tuple[str, ...]
    evidence: tuple[Evidence, ...]
    ruleset: str

    def same_outcome(self, other: Decision | None) -> bool:
        """Whether a dispatcher would act the same on both (evidence aside)."""
        return other is not None and (
            self.behavioral_health,
            self.category,
            self.response,
        ) == (other.behavioral_health, other.category, other.response)

    def public_json(self) -> dict[str, Any]:
        return {
            "behavioral_health": self.behavioral_health,
            "category": self.category,
            "response": self.response.value,
            "score": self.score,
            "rules": list(self.rules),
            "ruleset": self.ruleset,
        }

    def evidence_json(self) -> list[dict[str, Any]]:
        return [
            {"rule": e.rule, "field": e.field, "start": e.start, "end": e.end, "text": e.text}
            for e in self.evidence
        ]

    def as_json(self) -> dict[str, Any]:
        return dict(self.public_json(), evidence=self.evidence_json())


class Classifier(Protocol):
    """Turns a snapshot into a decision. Pure and fast: it runs for every snapshot."""

    @property
    def version(self) -> str:
        """A hash that changes whenever the rules that decide change."""
        ...

    def classify(self, snapshot: Snapshot) -> Decision: ...
