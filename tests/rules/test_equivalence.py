"""The compiled engine decides exactly as a plain evaluation of every rule would.

``Reference`` below is the straightforward reading of the rule semantics: every rule's
condition tree evaluated against every snapshot (no prefilter of candidate rules, no include
rules first, no caches), hits from :func:`plain_scan` (pyahocorasick's trie holding every
literal for every field, not the engine's ahocorasick_rs automata), and negation from
:class:`NegationScopes` built for the whole field.
The engine's shortcuts (rule bit masks, per-field automata, lazy negation, remembered call
types) must not change a single decision, rule id or evidence span.
"""

from __future__ import annotations

import random
import textwrap
import zoneinfo
from datetime import UTC, datetime, timedelta
from pathlib import Path

import ahocorasick
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corespond.daemon.decision import Decision, Evidence, Response
from corespond.daemon.snapshot import Caution, IncidentStatus, Note, Person, Snapshot
from corespond.rules.engine import RuleClassifier, field_text
from corespond.rules.loader import load_ruleset
from corespond.rules.matcher import (
    FieldHits,
    Hit,
    Key,
    LiteralMatcher,
    normalize_text,
    words_only,
)
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
from corespond.rules.negation import ClauseNegation, NegationScopes

Span = tuple[str, int, int]
SCANNED = ("call_type", "narrative", "cautions", "persons")
RANK = {r: i for i, r in enumerate(RESPONSE_ORDER)}


def _code(value: str) -> str:
    return " ".join(normalize_text(value).split()).upper()


def _holds(meaning: str, term: Term) -> bool:
    words = meaning.split()
    if term.stem:
        return any(" ".join(words[i:]).startswith(term.key) for i in range(len(words)))
    return f" {term.key} " in f" {meaning} "


class Reference:
    """Every rule, evaluated directly; the decision made from the rules that fired."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.terms: dict[Term, int] = {}
        self.gates: dict[str, int] = {}
        for rule in ruleset.rules:
            self._collect(rule.when)
        literals: list[tuple[str, Key]] = []
        for term, ident in self.terms.items():
            literals.append((term.key, Key("term", ident, term.stem)))
            for alias, (meaning, fields) in ruleset.abbreviations.items():
                if _holds(meaning, term):
                    literals.append((alias, Key("term", ident, False, frozenset(fields))))
        literals += [(gate, Key("gate", ident)) for gate, ident in self.gates.items()]
        neg = ruleset.negation
        for kind, words in (
            ("pre", neg.pre),
            ("post", neg.post),
            ("pseudo", neg.pseudo),
            ("terminator", neg.terminators),
            ("uncertain", neg.uncertain),
        ):
            literals += [(w, Key(kind, 0)) for w in words]
        self.matcher = LiteralMatcher(literals)
        self.tz = zoneinfo.ZoneInfo(ruleset.timezone)

    def _collect(self, cond: Condition) -> None:
        if isinstance(cond, TextMatch):
            for t in cond.terms:
                self.terms.setdefault(t, len(self.terms))
            for rx in cond.regexes:
                for g in rx.gates:
                    self.gates.setdefault(g, len(self.gates))
        elif isinstance(cond, Not):
            self._collect(cond.item)
        elif isinstance(cond, AllOf | AnyOf):
            for item in cond.items:
                self._collect(item)

    def fired(self, snap: Snapshot) -> list[tuple[Rule, list[Span]]]:
        hits = {
            f: plain_scan(self.matcher, normalize_text(field_text(snap, f)), f)
            for f in SCANNED
            if field_text(snap, f)
        }
        out = []
        for rule in self.ruleset.rules:
            spans = self.holds(rule.when, snap, hits)
            if spans is not None:
                out.append((rule, spans))
        return out

    def holds(self, cond: Condition, snap: Snapshot, hits: dict[str, list[Hit]]) -> list | None:
        if isinstance(cond, TextMatch):
            return self.text(cond, snap, hits)
        if isinstance(cond, CodeMatch):
            return self.code(cond, snap)
        if isinstance(cond, TimeMatch):
            return self.time(cond, snap)
        if isinstance(cond, Present):
            return [] if all(field_text(snap, f).strip() for f in cond.fields) else None
        if isinstance(cond, Not):
            return [] if self.holds(cond.item, snap, hits) is None else None
        results = [self.holds(c, snap, hits) for c in cond.items]
        if isinstance(cond, AllOf):
            if any(r is None for r in results):
                return None
            return [s for r in results if r is not None for s in r]
        matched = [r for r in results if r is not None]
        return [s for r in matched for s in r] if matched else None

    def text(self, cond: TextMatch, snap: Snapshot, hits: dict[str, list[Hit]]) -> list | None:
        field = cond.field
        if field not in hits:
            return None
        text = normalize_text(field_text(snap, field))
        found = hits[field]
        triggers = [h for h in found if h[0] not in ("term", "gate")]
        scopes = NegationScopes(text, triggers, self.ruleset.negation.window)
        terms: dict[int, list[tuple[int, int]]] = {}
        for kind, ident, start, end in found:
            if kind == "term" and (start, end) not in terms.setdefault(ident, []):
                terms[ident].append((start, end))
        ids = {self.terms[t] for t in cond.terms}
        spans: list[Span] = []
        for ident, places in terms.items():
            if ident in ids:
                for start, end in places:
                    if not cond.negation or not scopes.scope(start, end).negated:
                        spans.append((field, start, end))
        gates_found = {h[1] for h in found if h[0] == "gate"}
        for rx in cond.regexes:
            if rx.gates and not gates_found & {self.gates[g] for g in rx.gates}:
                continue
            for m in __import__("re").finditer(rx.pattern, text):
                if m.end() > m.start() and (
                    not cond.negation or not scopes.scope(m.start(), m.end()).negated
                ):
                    spans.append((field, m.start(), m.end()))
        return spans or None

    def code(self, cond: CodeMatch, snap: Snapshot) -> list | None:
        def matches(code: str) -> bool:
            return code in cond.values or any(code.startswith(p) for p in cond.prefixes)

        if cond.field == "apco_type":
            table = self.ruleset.apco_codes
            sources = []
            if snap.apco_type:
                sources.append((_code(snap.apco_type), "apco_type"))
            for f in ("call_type_code", "call_type"):
                value = getattr(snap, f)
                if value and _code(value) in table:
                    sources.append((table[_code(value)], f))
            spans = [(f, 0, len(getattr(snap, f))) for code, f in sources if matches(code)]
            return spans or None
        if cond.field == "status":
            return [] if matches(snap.status.value.upper()) else None
        value = getattr(snap, cond.field)
        if not value or not matches(_code(value)):
            return None
        return [(cond.field, 0, len(value))]

    def time(self, cond: TimeMatch, snap: Snapshot) -> list | None:
        when = snap.opened_at or snap.updated_at
        t = when.astimezone(self.tz) if when.tzinfo else when
        minute, day = t.hour * 60 + t.minute, t.weekday()
        if cond.start < cond.end:
            ok = cond.start <= minute < cond.end and day in cond.days
        elif minute >= cond.start:
            ok = day in cond.days
        else:
            ok = minute < cond.end and (day - 1) % 7 in cond.days
        return [] if ok else None

    def classify(self, snap: Snapshot) -> Decision:
        fired = self.fired(snap)
        version = self.ruleset.version
        includes = [r for r, _ in fired if r.effect is Effect.INCLUDE]
        if not includes:
            return Decision(False, None, Response.NONE, 0.0, (), (), version)
        evidence = []
        for rule, spans in fired:
            for field, start, end in dict.fromkeys(spans):
                quoted = field_text(snap, field)[start:end]
                evidence.append(Evidence(rule.id, field, start, end, quoted))
        rules = tuple(r.id for r, _ in fired)
        if any(r.effect is Effect.EXCLUDE for r, _ in fired):
            return Decision(False, None, Response.NONE, 0.0, rules, tuple(evidence), version)
        top = max(includes, key=lambda r: (r.weight, -includes.index(r)))
        miss = 1.0
        for r in includes:
            miss *= 1.0 - r.weight
        response = max(
            (r.response for r, _ in fired if r.effect is not Effect.EXCLUDE), key=RANK.__getitem__
        )
        if snap.status is not IncidentStatus.ACTIVE:
            response = Response.NONE
        return Decision(
            True, top.category, response, round(1.0 - miss, 3), rules, tuple(evidence), version
        )


SITE_RULES = """\
engine: 1
rules:
  - id: site.regex-threat
    description: a threat to kill or hurt, by regex behind a gate
    status: test
    category: mental-health
    effect: include
    response: clinician
    weight: 0.4
    when: {narrative: {regex: {pattern: "threat\\\\w* to (?:kill|hurt)", gate: threat}}}
    samples:
      positive: [{narrative: "made threats to kill"}]
      negative: [{narrative: "no threats"}]
  - id: site.knife-anyway
    description: a knife even when negated
    status: test
    category: safety
    effect: escalate
    response: police
    weight: 0.5
    when: {narrative: {any: [knife], negation: false}}
    samples:
      positive: [{call_type: MENTAL SUBJECT, narrative: "no knife"}]
      negative: [{call_type: MENTAL SUBJECT, narrative: "calm"}]
  - id: site.welfare-not-calm-overnight
    description: a welfare call, not calm, overnight
    status: test
    category: welfare
    effect: include
    response: co-response
    weight: 0.3
    when:
      all:
        - call_type: [welfare*, wc]
        - not: {narrative: [calm]}
        - time: {from: "21:00", to: "07:00"}
    samples:
      positive: [{call_type: WELFARE CHECK, time: "23:00"}]
      negative: [{call_type: WELFARE CHECK, time: "12:00"}]
  - id: site.caution-and-state
    description: a caution or a mental state, with a narrative present
    status: test
    category: mental-health
    effect: include
    response: clinician
    weight: 0.2
    when:
      all:
        - any: [{cautions: [mental*, violent]}, {mental_state: [psych*, agitated]}]
        - present: [narrative]
    samples:
      positive: [{cautions: [Mental health], narrative: "x"}]
      negative: [{cautions: [Mental health]}]
"""

CALL_TYPES = [
    "MENTAL SUBJECT",
    "10-96 MENTAL",
    "5150",
    "SUICIDE THREAT",
    "SUICIDAL SUBJ WPN",
    "EDP - ARMED",
    "WELFARE CHECK",
    "WC",
    "TRAFFIC COLLISION",
    "BURGLARY I/P",
    "DRUG SALES",
    "OVERDOSE",
    "INTOXICATED PERSON",
    "ASSAULT",
    "MENTAL-P1",
    "PSYCH_In Progress",
    "İSTANBUL MENTAL",
    "",
]
WORDS = [
    "pt", "denies", "SI", "HI", "no", "not", "weapons", "knife", "seen", "states", "he", "has",
    "a", "gun", "suicidal", "sucidal", "negative", "for", "hx", "of", "violence", "but",
    "however", "possible", "hearing", "voices", "off", "his", "meds", "intoxicated", "ETOH",
    "OD", "narcan", "unresponsive", "calm", "cooperative", "RP", "subj", "combative", "threats",
    "threatening", "to", "kill", "hurt", "no increase", "not only", "ruled out", "none",
    "self-harm",
    "e.d.p.", "5150", "10-96", "W/", "wpn", "psych", "mental", "crisis", "welfare", "check",
    "loud music", "parking", "advised", "reports", "denied", "unfounded", "  ", "\t",
]  # fmt: skip
SEPARATORS = [" ", " ", " ", ". ", "; ", ", ", "\n", "-", "_", "/", "? "]
STATUSES = list(IncidentStatus)
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> tuple[RuleClassifier, Reference]:
    site = tmp_path_factory.mktemp("site")
    (site / "50-site.yaml").write_text(textwrap.dedent(SITE_RULES))
    ruleset = load_ruleset(site=[Path(site)])
    return RuleClassifier(ruleset), Reference(ruleset)


@st.composite
def narratives(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS))))
    noise = draw(st.text(max_size=12))
    return "".join(w + s for w, s in parts) + noise


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    notes = draw(st.lists(narratives(), max_size=3))
    cautions = draw(st.lists(st.sampled_from(["Mental health", "Violent", "Weapons", "x"])))
    states = draw(st.lists(st.sampled_from(["Psychotic", "agitated", "", "calm"]), max_size=2))
    return Snapshot(
        incident_id="prop",
        updated_at=T0 + timedelta(minutes=draw(st.integers(0, 7 * 24 * 60))),
        status=draw(st.sampled_from(STATUSES)),
        call_type=draw(st.sampled_from(CALL_TYPES) | st.text(max_size=20)) or None,
        call_type_code=draw(st.sampled_from([None, "5150", "918V", "415E", "MNTL"])),
        apco_type=draw(st.sampled_from([None, "EDP", "MTLV", "SUICTHRT", "OD", "TRAFFIC"])),
        priority=draw(st.sampled_from([None, "1", "2", "3", "P1"])),
        cautions=tuple(Caution(c) for c in cautions),
        notes=tuple(Note(n) for n in notes),
        persons=tuple(Person(mental_state=s or None) for s in states),
    )


@settings(max_examples=400, deadline=None)
@given(snap=snapshots())
def test_engine_decides_as_the_reference(
    engines: tuple[RuleClassifier, Reference], snap: Snapshot
) -> None:
    engine, reference = engines
    assert engine.classify(snap) == reference.classify(snap)
    assert engine.fired_rules(snap) == tuple(r.id for r, _ in reference.fired(snap))


def test_engine_decides_as_the_reference_on_bench_like_narratives(
    engines: tuple[RuleClassifier, Reference],
) -> None:
    rng = random.Random(3)
    engine, reference = engines
    for i in range(300):
        narrative = "".join(
            rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(rng.randrange(80))
        )
        snap = Snapshot(
            incident_id=str(i),
            updated_at=T0,
            call_type=rng.choice(CALL_TYPES) or None,
            priority=rng.choice(["1", "2", "3"]),
            notes=(Note(narrative),),
        )
        assert engine.classify(snap) == reference.classify(snap)


@settings(max_examples=300, deadline=None)
@given(text=narratives(), field=st.sampled_from(SCANNED))
def test_grouped_scan_finds_what_the_plain_scan_finds(
    engines: tuple[RuleClassifier, Reference], text: str, field: str
) -> None:
    matcher = engines[1].matcher
    found = matcher.scan_field(text, field)
    normalized = normalize_text(text)
    hits = plain_scan(matcher, normalized, field)
    assert found.text == normalized
    terms: dict[int, list[tuple[int, int]]] = {}
    for kind, ident, start, end in hits:
        if kind == "term" and (start, end) not in terms.setdefault(ident, []):
            terms[ident].append((start, end))
    assert found.terms == terms
    assert list(found.terms) == list(terms)  # first-occurrence order, as evidence shows it
    assert found.gates == {h[1] for h in hits if h[0] == "gate"}
    for kind, got in (
        ("pre", found.pre),
        ("post", found.post),
        ("pseudo", found.pseudo),
        ("terminator", found.terminators),
    ):
        assert got == [(h[2], h[3]) for h in hits if h[0] == kind]


@settings(max_examples=300, deadline=None)
@given(text=narratives(), data=st.data())
def test_lazy_negation_answers_as_the_scopes(
    engines: tuple[RuleClassifier, Reference], text: str, data: st.DataObject
) -> None:
    reference = engines[1]
    normalized = normalize_text(text)
    hits = plain_scan(reference.matcher, normalized, "narrative")
    found = reference.matcher.scan_field(text, "narrative")
    window = data.draw(st.integers(0, 8))
    scopes = NegationScopes(normalized, hits, window)
    lazy = ClauseNegation(
        normalized, found.pre, found.post, found.pseudo, found.terminators, window
    )
    spans = [(h[2], h[3]) for h in hits] + data.draw(
        st.lists(st.tuples(st.integers(0, len(text)), st.integers(0, len(text))), max_size=5)
    )
    # The engine hands it the raw text (never normalized for a plain scan): same answers.
    on_raw = ClauseNegation(text, found.pre, found.post, found.pseudo, found.terminators, window)
    for a, b in spans:
        start, end = min(a, b), max(a, b)
        assert lazy.negated(start, end) == scopes.scope(start, end).negated
        assert on_raw.negated(start, end) == lazy.negated(start, end)


def plain_scan(matcher: LiteralMatcher, normalized: str, field: str) -> list[Hit]:
    """Every hit in ``normalized`` text (of a field named ``field``), offsets in that text:
    one pyahocorasick trie over every key of ``matcher`` (the plain form the engine's
    ``scan_field`` must agree with; it was ``LiteralMatcher.scan`` until stop 12)."""
    held = _PLAIN.get(id(matcher))
    if held is not None and held[0] is matcher:
        automaton = held[1]
    else:
        automaton = ahocorasick.Automaton()
        _PLAIN[id(matcher)] = (matcher, automaton)  # the matcher held: its id stays its own
        for stored, keys in matcher.stored_keys():
            lead = 1 if stored.startswith(" ") else 0
            trail = 1 if stored.endswith(" ") and len(stored) > 1 else 0
            entries = tuple(
                (k.kind, k.ident, k.stem, k.fields, k.kind != "gate" and not k.stem and not trail)
                for k in keys
            )
            automaton.add_word(stored, (len(stored), lead, trail, entries))
        if len(automaton):
            automaton.make_automaton()
    if not len(automaton) or not normalized:
        return []
    padded = f" {words_only(normalized)} "
    n = len(normalized)
    out: list[Hit] = []
    for last, (length, lead, trail, entries) in automaton.iter(padded):
        # padded index i is text index i - 1
        start = last - length + 1 + lead - 1
        end = last + 1 - trail - 1
        for kind, ident, stem, fields, check_digit_end in entries:
            if fields and field not in fields:
                continue
            if stem:
                stop = end  # evidence shows the whole word a stem matched
                while stop < n and normalized[stop].isalnum():
                    stop += 1
                out.append((kind, ident, start, stop))
            elif check_digit_end:
                if end >= n or not normalized[end].isdigit():
                    out.append((kind, ident, start, end))
            else:
                out.append((kind, ident, start, end))
    return out


_PLAIN: dict[int, tuple[LiteralMatcher, ahocorasick.Automaton]] = {}


def trie_scan_field(matcher: LiteralMatcher, raw: str, field: str) -> FieldHits:
    """The scan ``LiteralMatcher.scan_field`` replaced (stop 10): pyahocorasick's trie over
    the same keys, its hits grouped the way the engine reads them. Kept as the reference."""
    automata = _TRIES.setdefault(id(matcher), {})
    automaton = automata.get(field)
    if automaton is None:
        automaton = automata[field] = ahocorasick.Automaton()
        for stored, value in matcher.field_keys(field):
            automaton.add_word(stored, (len(stored), *value))
        if len(automaton):
            automaton.make_automaton()
    normalized = normalize_text(raw)
    padded = f" {words_only(normalized)} "
    terms: dict[int, list[tuple[int, int]]] = {}
    gates: set[int] = set()
    triggers: tuple[list[tuple[int, int]], ...] = ([], [], [], [])
    if not len(automaton) or not normalized:
        return FieldHits(raw, normalized, terms, frozenset(), *triggers)
    for last, (length, lead, trail, _, _, entries) in automaton.iter(padded):
        start = last - length + 1 + lead
        end = last + 1 - trail
        for code, ident, stem, check_digit_end in entries:
            if stem:
                stop = end
                while stop < len(normalized) and normalized[stop].isalnum():
                    stop += 1
            elif check_digit_end and end < len(normalized) and normalized[end].isdigit():
                continue
            else:
                stop = end
            if code == -2:  # a term
                if (start, stop) not in terms.setdefault(ident, []):
                    terms[ident].append((start, stop))
            elif code == -1:  # a regex gate
                gates.add(ident)
            else:
                triggers[code].append((start, stop))
    return FieldHits(raw, normalized, terms, frozenset(gates), *triggers)


_TRIES: dict[int, dict[str, ahocorasick.Automaton]] = {}


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


# Words glued to digits and letters too: keys ending in a digit ("5150") must not match
# before another digit, stems run to the end of their word.
GLUED = st.lists(
    st.tuples(
        st.sampled_from(WORDS) | st.sampled_from(["5150", "10-96", "988", "p1", "suicid"]),
        st.sampled_from([" ", "", "0", "7", "x", "al", ". "]),
    )
).map(lambda parts: "".join(w + s for w, s in parts))


@settings(max_examples=400, deadline=None)
@given(
    text=narratives() | narratives().map(_ascii) | GLUED | st.text(max_size=40),
    field=st.sampled_from(SCANNED),
    which=st.sampled_from([0, 1]),
)
def test_dfa_scan_finds_what_the_trie_scan_found(
    engines: tuple[RuleClassifier, Reference], text: str, field: str, which: int
) -> None:
    # scan_field walks a byte DFA (ASCII) or a str DFA (other text) with ahocorasick_rs;
    # trie_scan_field is the pyahocorasick scan it replaced: the same hits in the same order.
    matcher = engines[0]._matcher if which == 0 else engines[1].matcher
    new = matcher.scan_field(text, field)
    old = trie_scan_field(matcher, text, field)
    assert new == old
    assert list(new.terms) == list(old.terms)
