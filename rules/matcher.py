"""The literal matcher: one Aho-Corasick automaton over every term, alias and trigger.

Text is normalized once per field without changing its length, so a span found in the
normalized text is the span in the original field. For matching, every character that is not a
letter or digit reads as a space and the text is padded with one space each side; keys are
stored padded too (``" denies "``, a stem ``" suicid"``), so the automaton only reports matches
that start and end on word boundaries and short keys ("no", "od") cost nothing inside other
words (performance.md 3.b: check boundaries without a leading ``\\b``). A key ending in a digit
also matches before a letter ("918V", "415E"): CAD codes glue suffixes on.

:meth:`LiteralMatcher.scan_field`, what the engine calls, finds the hits with an automaton per
field that holds only the keys that apply there, and groups them as it goes (terms by id,
triggers by kind). The plain form, every hit of every key listed (uncertainty triggers too),
is the tests' reference (``plain_scan`` in tests/rules/test_equivalence.py, with
pyahocorasick's trie: a second implementation, not a second copy of this one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import ahocorasick_rs

_TRANSLATE = str.maketrans({"_": " ", "-": " ", "\t": " ", "\r": " "})
# Everything that is not a letter or digit reads as a space (ASCII plus common typography).
_PUNCT = "".join(chr(c) for c in range(128) if not chr(c).isalnum())
_PUNCT += "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00b7\u2022\u00a0\u00ab\u00bb"
_WORDS_ONLY = str.maketrans(dict.fromkeys(_PUNCT, " "))
# Both mappings at once as a byte table, for ASCII text (most CAD text): bytes.translate is
# several times faster than str.translate, and ASCII lowercases one byte to one byte.
_ASCII = bytes(range(128)).decode("ascii")
_WORDS_BYTES = bytes.maketrans(
    _ASCII.encode(), _ASCII.lower().translate(_TRANSLATE).translate(_WORDS_ONLY).encode()
)


def normalize_text(text: str) -> str:
    """Lowercase with ``_``, ``-``, tab and CR as spaces; always the same length as ``text``."""
    lowered = text.lower()
    if len(lowered) != len(text):
        # A few characters (e.g. U+0130) lowercase to two; keep those as they are.
        lowered = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    return lowered.translate(_TRANSLATE)


def words_only(normalized: str) -> str:
    """``normalized`` with every non-alphanumeric character as a space (same length)."""
    return normalized.translate(_WORDS_ONLY)


@dataclass(frozen=True, slots=True)
class Key:
    """What one literal in the automaton stands for.

    ``kind`` is ``term`` (``ident`` is a term id), ``gate`` (a regex gate id, no boundaries),
    or a negation trigger kind (``pre``, ``post``, ``pseudo``, ``terminator``, ``uncertain``).
    ``fields`` limits an abbreviation to some fields (empty: all).
    """

    kind: str
    ident: int
    stem: bool = False
    fields: frozenset[str] = frozenset()


# One hit: (kind, ident, start, end) with offsets into the field's text.
Hit = tuple[str, int, int, int]


class FieldHits:
    """The hits of one field, grouped the way the engine reads them (read-only once made).

    ``raw`` is the field's text; ``text``, its normalized form (the same length: offsets
    index both), is made when first asked for: negation reads the raw text, and only regex
    rules need the normalized one. ``terms`` maps a term id to its distinct spans, ids in
    order of first occurrence and spans in scan order; ``gates`` holds the regex gate ids
    found; the trigger lists hold the (start, end) of each negation trigger of that kind, in
    scan order (uncertainty triggers are left out: they do not change a decision).
    """

    __slots__ = ("_text", "gates", "post", "pre", "pseudo", "raw", "terminators", "terms")

    def __init__(
        self,
        raw: str,
        text: str | None,
        terms: dict[int, list[tuple[int, int]]],
        gates: frozenset[int],
        pre: list[tuple[int, int]],
        post: list[tuple[int, int]],
        pseudo: list[tuple[int, int]],
        terminators: list[tuple[int, int]],
    ) -> None:
        self.raw = raw
        self._text = text
        self.terms = terms
        self.gates = gates
        self.pre = pre
        self.post = post
        self.pseudo = pseudo
        self.terminators = terminators

    @property
    def text(self) -> str:
        """``normalize_text(raw)``: what regex rules search."""
        if self._text is None:
            self._text = normalize_text(self.raw)
        return self._text

    def _key(self) -> tuple[object, ...]:
        return (
            self.text,
            self.terms,
            self.gates,
            self.pre,
            self.post,
            self.pseudo,
            self.terminators,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FieldHits) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FieldHits{self._key()!r}"


# Kinds as scan_field's per-field automata store them; the trigger codes index its lists.
_TERM, _GATE = -2, -1
_TRIGGER_CODES = {"pre": 0, "post": 1, "pseudo": 2, "terminator": 3}
_EMPTY: frozenset[int] = frozenset()
_WORD_REST = re.compile(r"[^\W_]*")  # what str.isalnum() accepts, one character at a time
FieldEntry = tuple[int, int, bool, bool]  # kind code, ident, stem, check the digit end
# What a pattern index of a field's scanner stands for: the offsets from the padded match to
# the word (add to its start, take from its end), then fast (the trigger code or _TERM when
# the key stands for one plain trigger or term, else None), that ident, and every entry.
FieldValue = tuple[int, int, int | None, int, tuple[FieldEntry, ...]]


class _FieldScanner:
    """The keys that apply to one field, as DFAs: over bytes for ASCII text, over str else.

    ``ahocorasick_rs`` reports every overlapping match as (pattern index, start, end), in
    order of end and longest first at the same end, as pyahocorasick's trie did; its byte
    DFA walks 500 characters in about half the instructions. ASCII patterns come first, so
    the byte DFA (which holds only those: the others cannot occur in ASCII text) and the
    str one share pattern indexes and ``values``.
    """

    __slots__ = ("_implementation", "_patterns", "_text", "bytes", "values")

    def __init__(self, patterns: list[str], values: list[FieldValue], dfa: bool) -> None:
        self._patterns = patterns
        self.values = values
        # A DFA walks fastest and takes longest to build: for long text (narratives); the
        # short fields' scans are remembered by the engine, an NFA is enough for them.
        self._implementation = (
            ahocorasick_rs.Implementation.DFA
            if dfa
            else ahocorasick_rs.Implementation.ContiguousNFA
        )
        ascii_only = [p.encode("ascii") for p in patterns if p.isascii()]
        self.bytes: ahocorasick_rs.BytesAhoCorasick | None = None
        if ascii_only:
            self.bytes = ahocorasick_rs.BytesAhoCorasick(
                ascii_only, implementation=self._implementation
            )
        self._text: ahocorasick_rs.AhoCorasick | None = None

    def text(self) -> ahocorasick_rs.AhoCorasick | None:
        """The DFA over every key, for text that is not ASCII (made when first needed)."""
        if self._text is None and self._patterns:
            self._text = ahocorasick_rs.AhoCorasick(
                self._patterns, implementation=self._implementation
            )
        return self._text


class LiteralMatcher:
    """Finds every literal occurrence on word boundaries, overlapping ones included."""

    def __init__(
        self, literals: Iterable[tuple[str, Key]], dfa_fields: Iterable[str] = ("narrative",)
    ) -> None:
        """``dfa_fields``: the fields whose text is long (walked by a DFA, see _FieldScanner)."""
        self._dfa_fields = frozenset(dfa_fields)
        table: dict[str, list[Key]] = {}
        for literal, key in literals:
            core = " ".join(words_only(normalize_text(literal)).split())
            if not core:
                continue
            if key.kind == "gate":
                stored = core
            elif key.stem or core[-1].isdigit():
                stored = " " + core  # the right boundary is checked in the scan
            else:
                stored = f" {core} "
            bucket = table.setdefault(stored, [])
            if key not in bucket:
                bucket.append(key)
        self.size = len(table)
        self._table = table
        self._scanners: dict[str, _FieldScanner] = {}

    def stored_keys(self) -> list[tuple[str, tuple[Key, ...]]]:
        """Every key as the automata store it (padded words-only text), with the literals it
        stands for: the plain form of what :meth:`scan_field` looks for (tests scan with it)."""
        return [(stored, tuple(keys)) for stored, keys in self._table.items()]

    def field_keys(self, field: str) -> list[tuple[str, FieldValue]]:
        """The keys :meth:`scan_field` looks for in ``field``, each with its value.

        Abbreviations limited to other fields are left out (no hit to skip later), and so
        are uncertainty triggers (they do not change a decision).
        """
        out: list[tuple[str, FieldValue]] = []
        for stored, keys in self._table.items():
            trail = 1 if stored.endswith(" ") and len(stored) > 1 else 0
            lead = 1 if stored.startswith(" ") else 0
            entries: list[FieldEntry] = []
            for k in keys:
                if (k.fields and field not in k.fields) or k.kind == "uncertain":
                    continue
                code = {"term": _TERM, "gate": _GATE}.get(k.kind)
                code = _TRIGGER_CODES[k.kind] if code is None else code
                check = k.kind != "gate" and not k.stem and not trail
                entries.append((code, k.ident, k.stem, check))
            if entries:
                # Most keys stand for one trigger or one plain term: the scan loop takes those
                # without walking the entries.
                code, ident, stem, check = entries[0]
                plain = len(entries) == 1 and not stem and not check and code != _GATE
                fast = code if plain else None
                # padded [s, e) -> text [s + lead - 1, e - trail - 1)
                out.append((stored, (lead - 1, trail + 1, fast, ident, tuple(entries))))
        return out

    def _scanner(self, field: str) -> _FieldScanner:
        keys = sorted(self.field_keys(field), key=lambda kv: not kv[0].isascii())
        scanner = _FieldScanner(
            [k for k, _ in keys], [v for _, v in keys], field in self._dfa_fields
        )
        self._scanners[field] = scanner
        return scanner

    def scan_field(self, raw: str, field: str) -> FieldHits:
        """Every hit in ``normalize_text(raw)`` on word boundaries, grouped in the same pass.

        One DFA pass over the padded words-only text; a key that stands for one plain term or
        trigger is taken at once (``fast``), the others walk their entries (stems run to the
        end of their word, a key ending in a digit must not be followed by one). ASCII text
        is never normalized here: the words-only bytes answer both questions.
        """
        scanner = self._scanners.get(field)
        if scanner is None:
            scanner = self._scanner(field)
        normalized: str | None = None
        if raw.isascii():
            automaton = scanner.bytes
            if automaton is None or not raw:
                return FieldHits(raw, None, {}, _EMPTY, [], [], [], [])
            padded = b" %b " % raw.encode("ascii").translate(_WORDS_BYTES)
            found = automaton.find_matches_as_indexes(padded, overlapping=True)

            def word_end(end: int) -> int:  # every non-alphanumeric byte is a space here
                return padded.find(b" ", end + 1) - 1

            def digit_at(end: int) -> bool:
                return 48 <= padded[end + 1] <= 57

        else:
            normalized = normalize_text(raw)
            text_automaton = scanner.text()
            if text_automaton is None:
                return FieldHits(raw, normalized, {}, _EMPTY, [], [], [], [])
            text = normalized
            found = text_automaton.find_matches_as_indexes(
                f" {words_only(text)} ", overlapping=True
            )

            def word_end(end: int) -> int:
                return _WORD_REST.match(text, end).end()  # type: ignore[union-attr]

            def digit_at(end: int) -> bool:
                return text[end].isdigit()

        terms: dict[int, list[tuple[int, int]]] = {}
        gates: set[int] | None = None
        triggers: tuple[list[tuple[int, int]], ...] = ([], [], [], [])
        values = scanner.values
        n = len(raw)
        for index, first, last in found:
            lead, trail, fast, ident, entries = values[index]
            start = first + lead
            end = last - trail
            if fast is not None:
                if fast == _TERM:
                    spans = terms.get(ident)
                    if spans is None:
                        terms[ident] = [(start, end)]
                    elif (start, end) not in spans:
                        spans.append((start, end))
                else:
                    triggers[fast].append((start, end))
                continue
            for code, ident, stem, check_digit_end in entries:
                if stem:
                    stop = word_end(end)
                elif check_digit_end and end < n and digit_at(end):
                    continue
                else:
                    stop = end
                if code == _TERM:
                    spans = terms.get(ident)
                    if spans is None:
                        terms[ident] = [(start, stop)]
                    elif (start, stop) not in spans:
                        spans.append((start, stop))
                elif code == _GATE:
                    if gates is None:
                        gates = set()
                    gates.add(ident)
                else:
                    triggers[code].append((start, stop))
        gates_found = frozenset(gates) if gates else _EMPTY
        return FieldHits(raw, normalized, terms, gates_found, *triggers)
