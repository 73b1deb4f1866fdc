"""The literal matcher: one Aho-Corasick automaton over every term, alias and trigger.

Text is normalized once per field without changing its length, so a span found in the
normalized text is the span in the original field. For matching, every character that is not a
letter or digit reads as a space and the text is padded with one space each side; keys are
stored padded too (``" denies "``, a stem ``" suicid"``), so the automaton only reports matches
that start and end on word boundaries and short keys ("no", "od") cost nothing inside other
words (performance.md 3.b: check boundaries without a leading ``\\b``). A key ending in a digit
also matches before a letter ("918V", "415E"): CAD codes glue suffixes on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import ahocorasick

_TRANSLATE = str.maketrans({"_": " ", "-": " ", "\t": " ", "\r": " "})
# Everything that is not a letter or digit reads as a space (ASCII plus common typography).
_PUNCT = "".join(chr(c) for c in range(128) if not chr(c).isalnum())
_PUNCT += "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00b7\u2022\u00a0\u00ab\u00bb"
_WORDS_ONLY = str.maketrans(dict.fromkeys(_PUNCT, " "))


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


class LiteralMatcher:
    """Finds every literal occurrence on word boundaries, overlapping ones included."""

    def __init__(self, literals: Iterable[tuple[str, Key]]) -> None:
        table: dict[str, list[Key]] = {}
        for literal, key in literals:
            core = " ".join(words_only(normalize_text(literal)).split())
            if not core:
                continue
            if key.kind == "gate":
                stored = core
            elif key.stem or core[-1].isdigit():
                stored = " " + core  # the right boundary is checked in scan()
            else:
                stored = f" {core} "
            bucket = table.setdefault(stored, [])
            if key not in bucket:
                bucket.append(key)
        self._automaton = ahocorasick.Automaton()
        for stored, keys in table.items():
            lead = 1 if stored.startswith(" ") else 0
            trail = 1 if stored.endswith(" ") and len(stored) > 1 else 0
            entries = tuple(
                (k.kind, k.ident, k.stem, k.fields, k.kind != "gate" and not k.stem and not trail)
                for k in keys
            )
            self._automaton.add_word(stored, (len(stored), lead, trail, entries))
        self.size = len(table)
        if self.size:
            self._automaton.make_automaton()

    def scan(self, normalized: str, field: str) -> list[Hit]:
        """Every hit in ``normalized`` text (of a field named ``field``), offsets in that text."""
        if not self.size or not normalized:
            return []
        padded = f" {words_only(normalized)} "
        n = len(normalized)
        out: list[Hit] = []
        for last, (length, lead, trail, entries) in self._automaton.iter(padded):
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
