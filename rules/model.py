"""The rule set as values: conditions, rules, and the effective merged set the loader builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from corespond.daemon.decision import Response
from corespond.rules.problems import Problem

ENGINE_VERSION = 1

# Text fields a rule can match, as named in evidence.
TEXT_FIELDS = ("call_type", "narrative", "cautions", "persons")
# Fields compared as whole codes (case-insensitive, ``*`` suffix for a prefix).
CODE_FIELDS = ("call_type_code", "apco_type", "priority", "agency", "zone", "status")


class Effect(StrEnum):
    INCLUDE = "include"  # a behavioral-health call: sets category and a base response
    ESCALATE = "escalate"  # moves the response of a behavioral-health call up (police first)
    EXCLUDE = "exclude"  # not a behavioral-health call, whatever else matched


class Status(StrEnum):
    STABLE = "stable"
    TEST = "test"
    EXPERIMENTAL = "experimental"
    DEPRECATED = "deprecated"


# The order in which responses get more cautious; escalation only moves right.
RESPONSE_ORDER = (Response.NONE, Response.CLINICIAN, Response.CO_RESPONSE, Response.POLICE)


@dataclass(frozen=True, slots=True)
class Term:
    """A word, phrase or stem (``key`` normalized: lowercase, ``_``/``-`` read as spaces)."""

    key: str
    stem: bool = False


@dataclass(frozen=True, slots=True)
class RegexTerm:
    """A regular expression over normalized text, run only where one of ``gates`` occurs."""

    pattern: str
    gates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TextMatch:
    field: str
    terms: tuple[Term, ...]
    regexes: tuple[RegexTerm, ...] = ()
    negation: bool = True


@dataclass(frozen=True, slots=True)
class CodeMatch:
    field: str
    values: frozenset[str]
    prefixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TimeMatch:
    """Local time of day in minutes; ``start > end`` wraps past midnight. Days 0=Monday."""

    start: int
    end: int
    days: frozenset[int] = frozenset(range(7))


@dataclass(frozen=True, slots=True)
class Present:
    fields: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AllOf:
    items: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    items: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Not:
    item: Condition


Condition = TextMatch | CodeMatch | TimeMatch | Present | AllOf | AnyOf | Not


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    description: str
    status: Status
    category: str
    effect: Effect
    response: Response
    weight: float
    when: Condition
    samples_positive: tuple[dict[str, Any], ...]
    samples_negative: tuple[dict[str, Any], ...]
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class NegationSpec:
    pre: tuple[str, ...]
    post: tuple[str, ...]
    pseudo: tuple[str, ...]
    terminators: tuple[str, ...]
    uncertain: tuple[str, ...]
    window: int


@dataclass(frozen=True)
class RuleSet:
    """The effective rule set after vendor files and site overrides are merged."""

    rules: tuple[Rule, ...]
    disabled: tuple[str, ...]
    abbreviations: dict[str, tuple[str, tuple[str, ...]]]  # alias -> (meaning, fields or ())
    negation: NegationSpec
    apco_codes: dict[str, str]  # local code or call-type text (upper) -> APCO common type
    timezone: str
    version: str
    effective: dict[str, Any] = field(repr=False)  # canonical plain form, what version hashes
    warnings: tuple[Problem, ...] = ()
    files: tuple[str, ...] = ()

    def dump(self) -> dict[str, Any]:
        """The effective merged rule set, as plain data (``corespond rules dump``)."""
        return dict(self.effective, version=self.version)

    def rule(self, rule_id: str) -> Rule:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise KeyError(rule_id)
