"""The compiled rule engine: :class:`RuleClassifier` fills the ``Classifier`` protocol.

Compilation turns a :class:`RuleSet` into a literal automaton per text field (the terms some
rule reads from that field, their abbreviations, negation triggers, regex gates) and, per rule,
a closure over the hits plus the set of literals or codes without which the rule cannot fire,
folded into one bit mask of rules per literal or code. Classifying one snapshot scans each text
field once, ORs the masks of what it found, then evaluates only those rules, in file order;
regular expressions run only where their gate literal occurred (performance.md section 5.1).

What keeps it fast (``bench/classify.py``; ``tests/rules/test_equivalence.py`` holds every
shortcut to the decisions of a plain evaluation of every rule):

- include rules are evaluated first: when none fires, nothing else can change the decision;
- negation is worked out only for a match some evaluated rule would count, once per term and
  field, and without building clause tables (:class:`ClauseNegation`);
- call types, cautions, mental states and code combinations repeat from call to call: their
  scans and lookups are remembered, a few thousand per classifier (the narrative is not).

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

import functools
import re
import zoneinfo
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from corespond.daemon.decision import Decision, Evidence, Response
from corespond.daemon.snapshot import IncidentStatus, Snapshot
from corespond.rules.matcher import FieldHits, Key, LiteralMatcher, normalize_text
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
from corespond.rules.negation import ClauseNegation

SCANNED_FIELDS = ("call_type", "narrative", "cautions", "persons")
_RECENT_SIZE = 4096  # distinct short field texts remembered per classifier
_RECENT_NARRATIVES = 1024  # narratives remembered per classifier (a few KB each)
_STATUS = {s: (s.value.upper(), s.value) for s in IncidentStatus}  # as status codes compare
_RANK = {r: i for i, r in enumerate(RESPONSE_ORDER)}

Span = tuple[str, int, int]  # field, start, end
Apco = tuple[str, str]  # APCO code, the field it came from (evidence)
Token = tuple[str, ...] | tuple[str, str, int]
# A compiled condition: the spans it matched when true, None when false.
Check = Callable[["_Context"], list[Span] | None]


def field_text(snapshot: Snapshot, field: str) -> str:
    """The text that evidence offsets for ``field`` index into."""
    if field == "narrative":
        return snapshot.narrative
    if field == "cautions":
        return "\n".join([c.type for c in snapshot.cautions])
    if field == "persons":
        return "\n".join([p.mental_state or "" for p in snapshot.persons])
    value = getattr(snapshot, field, None)
    return value if isinstance(value, str) else ""


@functools.lru_cache(maxsize=4096)
def _code(value: str) -> str:
    """A code as compared: case, ``_``/``-`` and runs of spaces do not matter."""
    return " ".join(normalize_text(value).split()).upper()


def _position(fired: tuple[int, Rule, list[Span]]) -> int:
    return fired[0]


class _Context:
    """Everything one classification computes once and every rule reads."""

    __slots__ = (
        "apco",
        "codes",
        "found",
        "kept",
        "local_time",
        "negation",
        "raw",
        "snapshot",
    )

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.raw: dict[str, str] = {}  # scanned field -> its text as evidence quotes it
        self.found: dict[str, FieldHits] = {}  # scanned field -> what the scan found
        # scanned field -> term id -> its spans that no trigger negates (ids in scan order)
        self.kept: dict[str, dict[int, list[Span]]] = {}
        self.negation: dict[str, ClauseNegation] = {}  # fields with pre or post triggers
        self.codes: dict[str, tuple[str, str]] = {}  # field -> (normalized code, raw text)
        self.apco: list[Apco] = []
        self.local_time: datetime | None = None

    def is_negated(self, field: str, start: int, end: int) -> bool:
        scopes = self.negation.get(field)
        return scopes is not None and scopes.negated(start, end)


# What scanning one field's text gives, the same every time for the same text: the hits, the
# rules they point at, the spans no trigger negates (see _Context.kept), the negation scopes.
_Scanned = tuple[FieldHits, int, dict[int, list[Span]], ClauseNegation | None]


def _kept_spans(
    field: str, terms: dict[int, list[tuple[int, int]]], scopes: ClauseNegation | None
) -> dict[int, list[Span]]:
    """Each found term's spans less the negated ones (terms left with none are left out).

    Worked out for every term found, in one pass: every term a field's automaton holds is
    one that some rule reads there, so almost all of them are asked for anyway.
    """
    if scopes is None:
        return {ident: [(field, s, e) for s, e in places] for ident, places in terms.items()}
    negated = scopes.negated
    kept: dict[int, list[Span]] = {}
    for ident, places in terms.items():
        got = [(field, s, e) for s, e in places if not negated(s, e)]
        if got:
            kept[ident] = got
    return kept


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
        self._term_fields: dict[int, set[str]] = {}  # term id -> fields rules read it from
        self._gate_fields: dict[int, set[str]] = {}
        self._regexes: dict[str, re.Pattern[str]] = {}
        self._needs_time = False
        self._rules: list[_CompiledRule] = []
        # Bit i of a mask stands for self._rules[i]: the rules a found literal or code may fire.
        self._always = 0
        self._term_masks: dict[str, dict[int, int]] = {f: {} for f in SCANNED_FIELDS}
        self._gate_masks: dict[str, dict[int, int]] = {f: {} for f in SCANNED_FIELDS}
        self._code_masks: dict[tuple[str, str], int] = {}
        self._apco_masks: dict[str, int] = {}
        for rule in ruleset.rules:
            bit = 1 << len(self._rules)
            self._rules.append(_CompiledRule(rule, self._compile(rule.when)))
            tokens = self._tokens(rule.when)
            if tokens is None:
                self._always |= bit
                continue
            for token in tokens:
                if token[0] == "t" or token[0] == "g":
                    _, field, ident = token
                    assert isinstance(field, str) and isinstance(ident, int)
                    table = self._term_masks if token[0] == "t" else self._gate_masks
                    table[field][ident] = table[field].get(ident, 0) | bit
                elif token[0] == "code":
                    key = (str(token[1]), str(token[2]))
                    self._code_masks[key] = self._code_masks.get(key, 0) | bit
                else:
                    code = str(token[1])
                    self._apco_masks[code] = self._apco_masks.get(code, 0) | bit
        self._include_mask = sum(
            1 << i for i, c in enumerate(self._rules) if c.rule.effect is Effect.INCLUDE
        )
        self._window = ruleset.negation.window
        self._checks = [c.check for c in self._rules]
        self._version = ruleset.version
        self._not_behavioral = Decision(False, None, Response.NONE, 0.0, (), (), self.version)
        # fired rule positions -> what _decide makes of them (see _outcome)
        self._outcomes: dict[tuple[int, ...], _Outcome] = {}
        self._recent_evidence: dict[tuple[str, str, int, int, str], Evidence] = {}
        self._recent: dict[tuple[str, str], _Scanned] = {}
        self._recent_narratives: dict[tuple[str, str], _Scanned] = {}
        self._recent_codes: dict[
            tuple[object, ...], tuple[dict[str, tuple[str, str]], list[Apco], int]
        ] = {}
        self._matcher = LiteralMatcher(self._literals())

    @property
    def version(self) -> str:
        return self.ruleset.version

    # --- compilation -------------------------------------------------------------------------

    def _term_id(self, term: Term) -> int:
        return self._terms.setdefault(term, len(self._terms))

    def _literals(self) -> Iterable[tuple[str, Key]]:
        # A term or gate is looked for only in the fields some rule reads it from: a hit
        # elsewhere could not change a decision, and every hit costs time.
        # An abbreviation stands for its meaning: it matches every term its meaning holds.
        # (A substring test first: most pairs fail it, and it is a C loop.)
        abbreviations = [
            (alias, meaning, f" {meaning} ", fields)
            for alias, (meaning, fields) in self.ruleset.abbreviations.items()
        ]
        for term, ident in self._terms.items():
            used = frozenset(self._term_fields[ident])
            key = term.key
            yield key, Key("term", ident, term.stem, used)
            if term.stem:
                holding = [
                    (alias, fields)
                    for alias, meaning, _, fields in abbreviations
                    if key in meaning and _holds(meaning, term)
                ]
            else:
                needle = f" {key} "  # what _holds() tests
                holding = [
                    (alias, fields)
                    for alias, _, padded, fields in abbreviations
                    if needle in padded
                ]
            for alias, fields in holding:
                where = used.intersection(fields) if fields else used
                if where:
                    yield alias, Key("term", ident, False, where)
        for gate, ident in self._gates.items():
            yield gate, Key("gate", ident, False, frozenset(self._gate_fields[ident]))
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
        if isinstance(cond, AnyOf) and all(
            isinstance(c, TextMatch) and c.negation and not c.regexes for c in cond.items
        ):
            return self._compile_any_text(cond.items)
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

    def _compile_any_text(self, items: tuple[TextMatch, ...]) -> Check:
        """``any`` of plain terms in several fields ("a weapon in the call type, narrative or
        cautions"): what ``any_of`` over their ``terms_only`` gives, in one call."""
        wanted: list[tuple[str, frozenset[int]]] = []
        for cond in items:
            ids = frozenset(self._term_id(t) for t in cond.terms)
            for ident in ids:
                self._term_fields.setdefault(ident, set()).add(cond.field)
            wanted.append((cond.field, ids))

        def any_text(ctx: _Context) -> list[Span] | None:
            spans: list[Span] = []
            kept_by_field = ctx.kept
            for field, ids in wanted:
                kept = kept_by_field.get(field)
                if kept:
                    for ident, got in kept.items():
                        if ident in ids:
                            spans += got
            return spans or None

        return any_text

    def _compile_text(self, cond: TextMatch) -> Check:
        field = cond.field
        ids = frozenset(self._term_id(t) for t in cond.terms)
        for ident in ids:
            self._term_fields.setdefault(ident, set()).add(field)
        regexes: list[tuple[re.Pattern[str], tuple[int, ...]]] = []
        for rx in cond.regexes:
            pattern = self._regexes.setdefault(rx.pattern, re.compile(rx.pattern))
            gates = tuple(self._gate_id(g) for g in rx.gates)
            for ident in gates:
                self._gate_fields.setdefault(ident, set()).add(field)
            regexes.append((pattern, gates))
        negation = cond.negation

        if negation:

            def terms_only(ctx: _Context) -> list[Span] | None:
                kept = ctx.kept.get(field)
                if not kept:
                    return None
                spans: list[Span] = []
                for ident, got in kept.items():  # in scan order, as evidence lists them
                    if ident in ids:
                        spans += got
                return spans or None

        else:

            def terms_only(ctx: _Context) -> list[Span] | None:
                found = ctx.found.get(field)
                if found is None:
                    return None
                spans = [
                    (field, s, e)
                    for ident, places in found.terms.items()
                    if ident in ids
                    for s, e in places
                ]
                return spans or None

        if not regexes:
            return terms_only

        def text_match(ctx: _Context) -> list[Span] | None:
            spans = terms_only(ctx) or []
            for pattern, gates in regexes:
                found = ctx.found.get(field)
                if found is None or not found.text:
                    continue
                if gates and found.gates.isdisjoint(gates):
                    continue
                text = found.text
                for m in pattern.finditer(text):
                    if m.end() > m.start() and (
                        not negation or not ctx.is_negated(field, m.start(), m.end())
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
        ctx, candidates = self._prepare(snapshot)
        # Without an include rule nothing else changes the decision: most calls end here.
        includes = self._run(ctx, candidates & self._include_mask)
        if not includes:
            return self._not_behavioral
        others = self._run(ctx, candidates & ~self._include_mask)
        fired = includes
        if others:  # each list is in file order already
            fired = includes + others
            fired.sort(key=_position)
        return self._decide(snapshot, ctx, fired)

    def fired_rules(self, snapshot: Snapshot) -> tuple[str, ...]:
        """Every rule whose condition holds, whether or not it shapes the decision."""
        return tuple(rule.id for rule, _ in self._evaluate(snapshot)[1])

    def _evaluate(self, snapshot: Snapshot) -> tuple[_Context, list[tuple[Rule, list[Span]]]]:
        ctx, candidates = self._prepare(snapshot)
        return ctx, [(rule, spans) for _, rule, spans in self._run(ctx, candidates)]

    def _run(self, ctx: _Context, candidates: int) -> list[tuple[int, Rule, list[Span]]]:
        """The rules in ``candidates`` (a mask) that fire, in file order, with their spans."""
        fired: list[tuple[int, Rule, list[Span]]] = []
        checks = self._checks
        while candidates:
            lowest = candidates & -candidates
            candidates ^= lowest
            position = lowest.bit_length() - 1
            matched = checks[position](ctx)
            if matched is not None:
                fired.append((position, self._rules[position].rule, matched))
        return fired

    def _prepare(self, snapshot: Snapshot) -> tuple[_Context, int]:
        """Scan and look up everything once; the mask of rules the findings point at."""
        ctx = _Context(snapshot)
        candidates = self._always
        if snapshot.call_type:
            candidates |= self._scan_into(ctx, "call_type", snapshot.call_type)
        if snapshot.notes:
            candidates |= self._scan_into(ctx, "narrative", snapshot.narrative)
        for field in ("cautions", "persons"):
            if getattr(snapshot, field):
                raw = field_text(snapshot, field)
                if raw:
                    candidates |= self._scan_into(ctx, field, raw)
        key = (
            snapshot.call_type_code,
            snapshot.priority,
            snapshot.agency,
            snapshot.zone,
            snapshot.status,
            snapshot.apco_type,
            snapshot.call_type,
        )
        codes = self._recent_codes.get(key)
        if codes is None:
            if len(self._recent_codes) >= _RECENT_SIZE:
                self._recent_codes.clear()
            codes = self._recent_codes[key] = self._codes(snapshot)
        ctx.codes, ctx.apco, mask = codes
        candidates |= mask
        if self._needs_time:
            when = snapshot.opened_at or snapshot.updated_at
            ctx.local_time = when.astimezone(self._tz) if when.tzinfo else when
        return ctx, candidates

    def _codes(self, snapshot: Snapshot) -> tuple[dict[str, tuple[str, str]], list[Apco], int]:
        """The code fields as rules compare them, the APCO types, and the rules they point at.

        A handful of code combinations make up most calls: the engine remembers them, and
        the dict and list are shared between contexts (rules only read them).
        """
        codes: dict[str, tuple[str, str]] = {}
        candidates = 0
        code_masks = self._code_masks
        for field in ("call_type_code", "priority", "agency", "zone"):
            value = getattr(snapshot, field)
            if value:
                code = _code(value)
                codes[field] = (code, value)
                candidates |= code_masks.get((field, code), 0)
        status = codes["status"] = _STATUS[snapshot.status]
        candidates |= code_masks.get(("status", status[0]), 0)
        table = self.ruleset.apco_codes
        apcos: list[Apco] = []
        if snapshot.apco_type:
            apcos.append((_code(snapshot.apco_type), "apco_type"))
        for field in ("call_type_code", "call_type"):
            value = getattr(snapshot, field)
            if value:
                apco = table.get(_code(value))
                if apco is not None:
                    apcos.append((apco, field))
        for apco, _ in apcos:
            candidates |= self._apco_masks.get(apco, 0)
        return codes, apcos, candidates

    def _scan_into(self, ctx: _Context, field: str, raw: str) -> int:
        """Scans one text field into ``ctx``; the mask of rules its hits point at."""
        # Call types, cautions and mental states come from a small vocabulary: remember them.
        # Every update of an incident repeats its notes too, and many add none (a unit's
        # status, a closing): a recent narrative is scanned once, in a smaller cache of its
        # own (a few KB each). The scan is a pure function of the field and the text.
        if field == "narrative":
            recent, limit = self._recent_narratives, _RECENT_NARRATIVES
        else:
            recent, limit = self._recent, _RECENT_SIZE
        key = (field, raw)
        got = recent.get(key)
        if got is None:
            if len(recent) >= limit:
                recent.clear()
            got = recent[key] = self._scan(field, raw)
        found, candidates, kept, scopes = got
        ctx.raw[field] = raw
        ctx.found[field] = found
        ctx.kept[field] = kept
        if scopes is not None:
            ctx.negation[field] = scopes
        return candidates

    def _scan(self, field: str, raw: str) -> _Scanned:
        found = self._matcher.scan_field(raw, field)
        scopes = None
        if found.pre or found.post:
            scopes = ClauseNegation(
                found.raw, found.pre, found.post, found.pseudo, found.terminators, self._window
            )
        return found, self._mask(field, found), _kept_spans(field, found.terms, scopes), scopes

    def _mask(self, field: str, found: FieldHits) -> int:
        """The rules that the hits of one field point at."""
        candidates = 0
        masks = self._term_masks[field]
        for ident in found.terms:
            candidates |= masks.get(ident, 0)
        if found.gates:
            masks = self._gate_masks[field]
            for ident in found.gates:
                candidates |= masks.get(ident, 0)
        return candidates

    def _decide(
        self, snapshot: Snapshot, ctx: _Context, fired: list[tuple[int, Rule, list[Span]]]
    ) -> Decision:
        """The decision from the rules that fired (at least one include among them).

        Everything but the evidence and the closed-call response depends only on which
        rules fired, and a few combinations make up most calls: remembered per combination.
        """
        positions = tuple([position for position, _, _ in fired])
        outcome = self._outcomes.get(positions)
        if outcome is None:
            if len(self._outcomes) >= _RECENT_SIZE:
                self._outcomes.clear()
            outcome = self._outcomes[positions] = _outcome(fired)
        behavioral, category, response, score, rules = outcome
        evidence = _evidence(ctx, fired, self._recent_evidence)
        if behavioral and snapshot.status is not IncidentStatus.ACTIVE:
            # Closed or cancelled: still a behavioral-health call for the record, nobody to send.
            response = Response.NONE
        return Decision(behavioral, category, response, score, rules, evidence, self._version)


_Outcome = tuple[bool, str | None, Response, float, tuple[str, ...]]


def _outcome(fired: list[tuple[int, Rule, list[Span]]]) -> _Outcome:
    """Behavioral health, category, response (of an active call), score and rule ids."""
    top: Rule | None = None
    miss = 1.0
    response = Response.NONE
    excluded = False
    for _, rule, _ in fired:
        effect = rule.effect
        if effect is Effect.INCLUDE:
            if top is None or rule.weight > top.weight:
                top = rule
            miss *= 1.0 - rule.weight
        elif effect is Effect.EXCLUDE:
            excluded = True
            continue
        # Include and escalate rules: the most cautious response wins.
        if _RANK[rule.response] > _RANK[response]:
            response = rule.response
    rules = tuple(rule.id for _, rule, _ in fired)
    if excluded or top is None:
        return False, None, Response.NONE, 0.0, rules
    return True, top.category, response, round(1.0 - miss, 3), rules


def _holds(meaning: str, term: Term) -> bool:
    """Whether an abbreviation's meaning contains ``term`` as whole words (or a word start)."""
    if term.stem:
        return any(meaning[i:].startswith(term.key) for i in _word_starts(meaning))
    padded = f" {meaning} "
    return f" {term.key} " in padded


def _word_starts(text: str) -> list[int]:
    return [i for i, c in enumerate(text) if c != " " and (i == 0 or text[i - 1] == " ")]


def _compile_code(cond: CodeMatch) -> Check:
    values, field = cond.values, cond.field
    prefixes = tuple(cond.prefixes)  # str.startswith takes them all at once

    def matches(code: str) -> bool:
        return code in values or (bool(prefixes) and code.startswith(prefixes))

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


def _evidence(
    ctx: _Context,
    fired: list[tuple[int, Rule, list[Span]]],
    recent: dict[tuple[str, str, int, int, str], Evidence],
) -> tuple[Evidence, ...]:
    """The evidence of the rules that fired, each span once per rule, in order.

    An ``Evidence`` costs about 5.7k instructions to build, and those of the short fields
    (call types, codes, cautions) repeat from call to call: those are shared from
    ``recent`` (they are immutable). Narrative spans are built each time.
    """
    out: list[Evidence] = []
    raws = ctx.raw
    for _, rule, spans in fired:
        if len(spans) > 1:
            spans = list(dict.fromkeys(spans))  # each span once, first come first
        rule_id = rule.id
        for field, start, end in spans:
            raw = raws.get(field)
            if raw is None:
                raw = field_text(ctx.snapshot, field)
            text = raw[start:end]
            if field == "narrative":
                out.append(Evidence(rule_id, field, start, end, text))
                continue
            key = (rule_id, field, start, end, text)
            evidence = recent.get(key)
            if evidence is None:
                if len(recent) >= _RECENT_SIZE:
                    recent.clear()
                evidence = recent[key] = Evidence(rule_id, field, start, end, text)
            out.append(evidence)
    return tuple(out)
