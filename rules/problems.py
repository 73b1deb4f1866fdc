"""What is wrong with a rule set: every problem at once, each with file:line and rule id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from corespond.daemon.errors import SafeMessage

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One error or warning found while loading or checking rule files."""

    file: str
    line: int | None
    rule: str | None
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        rule = f" rule {self.rule}:" if self.rule else ""
        return f"{where}: {self.severity}:{rule} {self.message}"

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "rule": self.rule,
            "severity": self.severity,
            "message": self.message,
        }


class RuleSetError(SafeMessage, Exception):
    """A rule set that cannot be built; ``problems`` holds every error (and the warnings)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        super().__init__(
            f"{len(errors)} error(s) in the rule files:\n" + "\n".join(map(str, errors))
        )


class ProblemLog:
    """Collects problems while a loader walks the files, so that all are reported together."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def error(self, file: str, line: int | None, message: str, rule: str | None = None) -> None:
        self.items.append(Problem(file, line, rule, message, "error"))

    def warning(self, file: str, line: int | None, message: str, rule: str | None = None) -> None:
        self.items.append(Problem(file, line, rule, message, "warning"))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.items if p.severity == "error"]
