"""The compiled rule engine: :class:`RuleClassifier` fills the ``Classifier`` protocol.

Compilation turns a :class:`RuleSet` into one literal automaton (terms, abbreviations, negation
triggers, regex gates) and, per rule, a closure over the hits plus the set of literals or codes
without which the rule cannot fire. Classifying one snapshot scans each text field once, then
evaluates only the rules some hit points at; regular expressions run only where their gate
literal occurred (performance.md section 5.1).

How a decision is made from the rules that fired:

- ``include`` rules make the call behavioral-health; the category is the one of the fired include
  rule with the highest weight (the first in file order on ties); the base response is the most
  cautious of their responses; the score is ``1 - prod(1 - weight)``.
- ``escalate`` rules move the response up (clinician < co-response < police), never down.
- ``exclude`` rules make it not behavioral-health, whatever else matched.
- A closed or cancelled incident keeps its category, with response ``none``.

Evidence fields and the text their offsets index: ``call_type``, ``call_type_code``,
``apco_type``, ``narrative`` (``Snapshot.narrative``), ``cautions`` (caution types joined by
``\\n``, see :func:`field_text`) and ``persons`` (each person's mental state, ``\\n``-joined).
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from corespond.daemon.decision import Decision, Evidence, Response
from corespond.daemon.snapshot import IncidentStatus, Snapshot
from corespond.rules.matcher import Hit, Key, LiteralMatcher, normalize_text
from corespond.rules.model import (
    RESPONSE_ORDER,
    AllOf,
    AnyOf,
    CodeMatch,
    Condition,
    Effect,
    Not,
    Present,
    Rule,
    RuleSet,
    Term,
    TextMatch,
    TimeMatch,
)
from corespond.rules.negation import NOT_NEGATED, NegationScopes, Scope

SCANNED_FIELDS = ("call_type", "narrative", "cautions", "persons")
_RANK = {r: i for i, r in enumerate(RESPONSE_ORDER)}

Span = tuple[str, int, int]  # field, start, end
Token = tuple[str, ...] | tuple[str, str, int]
# A compiled condition: the spans it matched when true, None when false.
Check = Callable[["_Context"], list[Span] | None]


def field_text(snapshot: Snapshot, field: str) -> str:
    """The text that evidence offsets for ``field`` index into."""
    if field == "narrative":
        return snapshot.narrative
    if field == "cautions":
        return "\n".join(c.type for c in snapshot.cautions)
    if field == "persons":
        return "\n".join(p.mental_state or "" for p in snapshot.persons)
    value = getattr(snapshot, field, None)
    return value if isinstance(value, str) else ""


def _code(value: str | None) -> str:
    return " ".join(normalize_text(value).split()).upper() if value else ""


class _Context:
    """Everything one classification computes once and every rule reads."""

    __slots__ = (
        "apco",
        "codes",
        "gates",
        "hits",
        "local_time",
        "negation",
        "raw",
        "scopes",
        "snapshot",
        "text",
        "triggers",
        "window",
    )

    def __init__(self, snapshot: Snapshot, window: int) -> None:
        self.snapshot = snapshot
        self.window = window
        self.raw: dict[str, str] = {}
        self.text: dict[str, str] = {}
        self.hits: dict[str, dict[int, list[tuple[int, int]]]] = {}
        self.gates: dict[str, set[int]] = {}
        self.triggers: dict[str, list[Hit]] = {}
        self.negation: dict[str, NegationScopes] = {}
        self.scopes: dict[tuple[str, int, int], Scope] = {}
        self.codes: dict[str, tuple[str, str]] = {}  # field -> (normalized code, raw text)
        self.apco: list[tuple[str, str]] = []  # (APCO code, evidence field)
        self.local_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rule: Rule
    check: Check


class RuleClassifier:
    """Classifies snapshots with a loaded :class:`RuleSet`; fills the ``Classifier`` protocol."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self._tz = zoneinfo.ZoneInfo(ruleset.timezone)
        self._terms: dict[Term, int] = {}
        self._gates: dict[str, int] = {}
        self._regexes: dict[str, re.Pattern[str]] = {}
        self._needs_time = False
        self._rules: list[_CompiledRule] = []
        self._index: dict[Token, list[int]] = {}
        self._always: list[int] = []
        for rule in ruleset.rules:
            position = len(self._rules)
            self._rules.append(_CompiledRule(rule, self._compile(rule.when)))
            tokens = self._tokens(rule.when)
            if tokens is None:
                self._always.append(position)
            else:
                for token in tokens:
                    self._index.setdefault(token, []).append(position)
        self._matcher = LiteralMatcher(self._literals())
        self._has_apco_rules = any(t[0] == "apco" for t in self._index) or bool(self._always)

    @property
    def version(self) -> str:
        return self.ruleset.version

    # --- compilation -------------------------------------------------------------------------

    def _term_id(self, term: Term) -> int:
        return self._terms.setdefault(term, len(self._terms))

    def _literals(self) -> Iterable[tuple[str, Key]]:
        for term, ident in self._terms.items():
            yield term.key, Key("term", ident, term.stem)
            # An abbreviation stands for its meaning: it matches every term its meaning holds.
            for alias, (meaning, fields) in self.ruleset.abbreviations.items():
                if _holds(meaning, term):
                    yield alias, Key("term", ident, False, frozenset(fields))
        for gate, ident in self._gates.items():
            yield gate, Key("gate", ident)
        neg = self.ruleset.negation
        for kind, words in (
            ("pre", neg.pre),
            ("post", neg.post),
            ("pseudo", neg.pseudo),
            ("terminator", neg.terminators),
            ("uncertain", neg.uncertain),
        ):
            for word in words:
                yield word, Key(kind, 0)

    def _compile(self, cond: Condition) -> Check:
        if isinstance(cond, TextMatch):
            return self._compile_text(cond)
        if isinstance(cond, CodeMatch):
            return _compile_code(cond)
        if isinstance(cond, TimeMatch):
            self._needs_time = True
            return _compile_time(cond)
        if isinstance(cond, Present):
            fields = cond.fields

            def present(ctx: _Context) -> list[Span] | None:
                return [] if all(field_text(ctx.snapshot, f).strip() for f in fields) else None

            return present
        if isinstance(cond, Not):
            inner = self._compile(cond.item)
            return lambda ctx: [] if inner(ctx) is None else None
        parts = [self._compile(c) for c in cond.items]
        if isinstance(cond, AllOf):

            def all_of(ctx: _Context) -> list[Span] | None:
                spans: list[Span] = []
                for part in parts:
                    got = part(ctx)
                    if got is None:
                        return None
                    spans.extend(got)
                return spans

            return all_of
        assert isinstance(cond, AnyOf)

        def any_of(ctx: _Context) -> list[Span] | None:
            spans: list[Span] | None = None
            for part in parts:
                got = part(ctx)
                if got is not None:
                    spans = (spans or []) + got
            return spans

        return any_of

    def _compile_text(self, cond: TextMatch) -> Check:
        field = cond.field
        ids = frozenset(self._term_id(t) for t in cond.terms)
        regexes: list[tuple[re.Pattern[str], tuple[int, ...]]] = []
        for rx in cond.regexes:
            pattern = self._regexes.setdefault(rx.pattern, re.compile(rx.pattern))
            regexes.append((pattern, tuple(self._gate_id(g) for g in rx.gates)))
        negation = cond.negation

        def text_match(ctx: _Context) -> list[Span] | None:
            spans: list[Span] = []
            hits = ctx.hits.get(field)
            if hits:
                for ident, found in hits.items():
                    if ident not in ids:
                        continue
                    for start, end in found:
                        if not negation or not _scope(ctx, field, start, end).negated:
                            spans.append((field, start, end))
            for pattern, gates in regexes:
                if gates and not ctx.gates.get(field, set()).intersection(gates):
                    continue
                text = ctx.text.get(field)
                if not text:
                    continue
                for m in pattern.finditer(text):
                    if m.end() > m.start() and (
                        not negation or not _scope(ctx, field, m.start(), m.end()).negated
                    ):
                        spans.append((field, m.start(), m.end()))
            return spans or None

        return text_match

    def _gate_id(self, gate: str) -> int:
        return self._gates.setdefault(gate, len(self._gates))

    def _tokens(self, cond: Condition) -> set[Token] | None:
        """Tokens of which at least one must be present for ``cond`` to hold (None: unknown)."""
        if isinstance(cond, TextMatch):
            out: set[Token] = {("t", cond.field, self._term_id(t)) for t in cond.terms}
            for rx in cond.regexes:
                if not rx.gates:
                    return None
                out.update(("g", cond.field, self._gate_id(g)) for g in rx.gates)
            return out
        if isinstance(cond, CodeMatch):
            if cond.prefixes:
                return None
            if cond.field == "apco_type":
                return {("apco", v) for v in cond.values}
            return {("code", cond.field, v) for v in cond.values}
        if isinstance(cond, AllOf):
            best: set[Token] | None = None
            for item in cond.items:
                got = self._tokens(item)
                if got is not None and (best is None or len(got) < len(best)):
                    best = got
            return best
        if isinstance(cond, AnyOf):
            union: set[Token] = set()
            for item in cond.items:
                got = self._tokens(item)
                if got is None:
                    return None
                union |= got
            return union
        return None  # time, present, not: evaluate always

    # --- classification ----------------------------------------------------------------------

    def classify(self, snapshot: Snapshot) -> Decision:
        ctx, fired = self._evaluate(snapshot)
        return self._decide(snapshot, ctx, fired)

    def fired_rules(self, snapshot: Snapshot) -> tuple[str, ...]:
        """Every rule whose condition holds, whether or not it shapes the decision."""
        return tuple(rule.id for rule, _ in self._evaluate(snapshot)[1])

    def _evaluate(self, snapshot: Snapshot) -> tuple[_Context, list[tuple[Rule, list[Span]]]]:
        ctx = _Context(snapshot, self.ruleset.negation.window)
        tokens: set[Token] = set()
        for field in SCANNED_FIELDS:
            raw = field_text(snapshot, field)
            if not raw:
                continue
            text = normalize_text(raw)
            ctx.raw[field] = raw
            ctx.text[field] = text
            terms: dict[int, list[tuple[int, int]]] = {}
            triggers: list[Hit] = []
            gates: set[int] = set()
            for hit in self._matcher.scan(text, field):
                kind, ident, start, end = hit
                if kind == "term":
                    spans = terms.get(ident)
                    if spans is None:
                        terms[ident] = [(start, end)]
                        tokens.add(("t", field, ident))
                    elif (start, end) not in spans:
                        spans.append((start, end))
                elif kind == "gate":
                    gates.add(ident)
                    tokens.add(("g", field, ident))
                else:
                    triggers.append(hit)
            ctx.hits[field] = terms
            ctx.gates[field] = gates
            ctx.triggers[field] = triggers
        for field in ("call_type_code", "priority", "agency", "zone"):
            value = getattr(snapshot, field)
            if value:
                code = _code(value)
                ctx.codes[field] = (code, value)
                tokens.add(("code", field, code))
        ctx.codes["status"] = (snapshot.status.value.upper(), snapshot.status.value)
        tokens.add(("code", "status", snapshot.status.value.upper()))
        table = self.ruleset.apco_codes
        if snapshot.apco_type:
            ctx.apco.append((_code(snapshot.apco_type), "apco_type"))
        if snapshot.call_type_code and _code(snapshot.call_type_code) in table:
            ctx.apco.append((table[_code(snapshot.call_type_code)], "call_type_code"))
        if snapshot.call_type and _code(snapshot.call_type) in table:
            ctx.apco.append((table[_code(snapshot.call_type)], "call_type"))
        for apco, _ in ctx.apco:
            tokens.add(("apco", apco))
        if self._needs_time:
            when = snapshot.opened_at or snapshot.updated_at
            ctx.local_time = when.astimezone(self._tz) if when.tzinfo else when

        candidates = set(self._always)
        for token in tokens:
            positions = self._index.get(token)
            if positions:
                candidates.update(positions)
        fired: list[tuple[Rule, list[Span]]] = []
        for position in sorted(candidates):
            compiled = self._rules[position]
            matched = compiled.check(ctx)
            if matched is not None:
                fired.append((compiled.rule, matched))
        return ctx, fired

    def _decide(
        self, snapshot: Snapshot, ctx: _Context, fired: list[tuple[Rule, list[Span]]]
    ) -> Decision:
        includes = [(r, s) for r, s in fired if r.effect is Effect.INCLUDE]
        if not includes:
            return Decision(False, None, Response.NONE, 0.0, (), (), self.version)
        excludes = [(r, s) for r, s in fired if r.effect is Effect.EXCLUDE]
        evidence = tuple(_evidence(ctx, fired))
        rules = tuple(r.id for r, _ in fired)
        if excludes:
            return Decision(False, None, Response.NONE, 0.0, rules, evidence, self.version)
        top = includes[0][0]
        miss = 1.0
        response = Response.NONE
        for rule, _ in includes:
            if rule.weight > top.weight:
                top = rule
            miss *= 1.0 - rule.weight
            if _RANK[rule.response] > _RANK[response]:
                response = rule.response
        for rule, _ in fired:
            if rule.effect is Effect.ESCALATE and _RANK[rule.response] > _RANK[response]:
                response = rule.response
        if snapshot.status is not IncidentStatus.ACTIVE:
            # Closed or cancelled: still a behavioral-health call for the record, nobody to send.
            response = Response.NONE
        return Decision(
            True, top.category, response, round(1.0 - miss, 3), rules, evidence, self.version
        )


def _holds(meaning: str, term: Term) -> bool:
    """Whether an abbreviation's meaning contains ``term`` as whole words (or a word start)."""
    if term.stem:
        return any(meaning[i:].startswith(term.key) for i in _word_starts(meaning))
    padded = f" {meaning} "
    return f" {term.key} " in padded


def _word_starts(text: str) -> list[int]:
    return [i for i, c in enumerate(text) if c != " " and (i == 0 or text[i - 1] == " ")]


def _scope(ctx: _Context, field: str, start: int, end: int) -> Scope:
    cached = ctx.scopes.get((field, start, end))
    if cached is not None:
        return cached
    got = ctx.scopes[(field, start, end)] = _new_scope(ctx, field, start, end)
    return got


def _new_scope(ctx: _Context, field: str, start: int, end: int) -> Scope:
    scopes = ctx.negation.get(field)
    if scopes is None:
        triggers = ctx.triggers.get(field)
        if not triggers:
            return NOT_NEGATED
        scopes = ctx.negation[field] = NegationScopes(ctx.text[field], triggers, ctx.window)
    return scopes.scope(start, end)


def _compile_code(cond: CodeMatch) -> Check:
    values, prefixes, field = cond.values, cond.prefixes, cond.field

    def matches(code: str) -> bool:
        return code in values or any(code.startswith(p) for p in prefixes)

    if field == "apco_type":

        def apco_spans(ctx: _Context) -> list[Span] | None:
            spans: list[Span] = []
            for code, source in ctx.apco:
                if matches(code):
                    spans.append((source, 0, len(getattr(ctx.snapshot, source) or "")))
            return spans or None

        return apco_spans

    def code(ctx: _Context) -> list[Span] | None:
        got = ctx.codes.get(field)
        if got is None or not matches(got[0]):
            return None
        if field == "status":
            return []
        return [(field, 0, len(got[1]))]

    return code


def _compile_time(cond: TimeMatch) -> Check:
    start, end, days = cond.start, cond.end, cond.days

    def in_window(ctx: _Context) -> list[Span] | None:
        t = ctx.local_time
        if t is None:
            return None
        minute = t.hour * 60 + t.minute
        day = t.weekday()
        if start < end:
            ok = start <= minute < end and day in days
        else:
            # Wraps past midnight: the day is the one the window started on.
            if minute >= start:
                ok = day in days
            elif minute < end:
                ok = (day - 1) % 7 in days
            else:
                ok = False
        return [] if ok else None

    return in_window


def _evidence(ctx: _Context, fired: list[tuple[Rule, list[Span]]]) -> Iterable[Evidence]:
    for rule, spans in fired:
        seen: set[Span] = set()
        for span in spans:
            if span in seen:
                continue
            seen.add(span)
            field, start, end = span
            raw = ctx.raw.get(field)
            if raw is None:
                raw = field_text(ctx.snapshot, field)
            yield Evidence(rule.id, field, start, end, raw[start:end])
