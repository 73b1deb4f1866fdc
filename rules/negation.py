"""NegEx-style negation and uncertainty scope over one normalized text field.

A pre-negation trigger ("denies", "no", "does not") negates a match that follows it within the
same clause and at most ``window`` words later; a post-negation trigger ("ruled out", "none")
negates one before it. Pseudo-negations ("no increase", "not only") are triggers that negate
nothing, and hide the triggers inside them. A clause ends at ``.``, ``;``, ``!``, ``?``, a line
break or a terminator word ("but", "however"). Uncertainty triggers ("possible", "unk if")
mark a match uncertain; rules still count uncertain matches (err on the side of caution).
After Chapman et al., "A Simple Algorithm for Identifying Negated Findings" (NegEx, 2001).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import repeat

from corespond.rules.matcher import Hit

_CLAUSE_ENDS = ".;!?\n"
_PUNCTUATION = re.compile(f"[{re.escape(_CLAUSE_ENDS)}]")
# ASCII text -> the same length with "." for every clause end and " " for everything else.
_MARKS = bytes.maketrans(
    bytes(range(128)), bytes(46 if chr(c) in _CLAUSE_ENDS else 32 for c in range(128))
)


@dataclass(frozen=True, slots=True)
class Scope:
    negated: bool
    uncertain: bool


NOT_NEGATED = Scope(False, False)


class NegationScopes:
    """Answers "is the match at start:end negated?" for one text, from its trigger hits.

    The reference form: it sorts every trigger and finds every clause boundary up front. The
    engine asks :class:`ClauseNegation`, which gives the same ``negated`` answers on demand.
    """

    def __init__(self, text: str, triggers: list[Hit], window: int) -> None:
        self._text = text
        self._window = window
        pseudo = [(h[2], h[3]) for h in triggers if h[0] == "pseudo"]

        def live(kind: str) -> list[tuple[int, int]]:
            found = [(h[2], h[3]) for h in triggers if h[0] == kind]
            if not pseudo:
                return found
            return [t for t in found if not any(s <= t[0] and t[1] <= e for s, e in pseudo)]

        self._pre = sorted(live("pre"), key=lambda t: t[1])
        self._pre_ends = [te for _, te in self._pre]
        self._post = sorted(live("post"))
        self._post_starts = [ts for ts, _ in self._post]
        self._uncertain = sorted(live("uncertain"), key=lambda t: t[1])
        self._uncertain_ends = [te for _, te in self._uncertain]
        bounds = [(m.start(), m.end()) for m in _PUNCTUATION.finditer(text)]
        bounds += [(h[2], h[3]) for h in triggers if h[0] == "terminator"]
        bounds.sort()
        self._bound_starts = [s for s, _ in bounds]
        self._bound_ends = sorted(e for _, e in bounds)

    def scope(self, start: int, end: int) -> Scope:
        if not (self._pre or self._post or self._uncertain):
            return NOT_NEGATED
        i = bisect_right(self._bound_ends, start)
        clause_start = self._bound_ends[i - 1] if i else 0
        j = bisect_left(self._bound_starts, end)
        clause_end = self._bound_starts[j] if j < len(self._bound_starts) else len(self._text)
        negated = self._before(self._pre, self._pre_ends, clause_start, start) or self._after(
            clause_end, end
        )
        uncertain = self._before(self._uncertain, self._uncertain_ends, clause_start, start)
        return Scope(negated, uncertain)

    def _before(
        self, triggers: list[tuple[int, int]], ends: list[int], clause_start: int, start: int
    ) -> bool:
        # Triggers are sorted by end: walk back from the match to the clause start.
        k = bisect_right(ends, start)
        while k:
            k -= 1
            ts, te = triggers[k]
            if te < clause_start or not self._near(te, start):
                return False
            if ts >= clause_start:
                return True
        return False

    def _after(self, clause_end: int, end: int) -> bool:
        k = bisect_left(self._post_starts, end)
        while k < len(self._post):
            ts, te = self._post[k]
            if ts > clause_end or not self._near(end, ts):
                return False
            if te <= clause_end:
                return True
            k += 1
        return False

    def _near(self, a: int, b: int) -> bool:
        return len(self._text[a:b].split()) <= self._window


def _word_count(segment: str) -> int:
    """Words in a piece of the field's raw or normalized text, as the normalized text has
    them (``_`` and ``-`` separate words; tab and CR are white space either way)."""
    if "-" in segment or "_" in segment:
        segment = segment.replace("-", " ").replace("_", " ")
    return len(segment.split())


class ClauseNegation:
    """``NegationScopes(text, triggers, window).scope(start, end).negated``, computed lazily.

    ``text`` is the field's normalized text or its raw text (the engine passes the raw one,
    so the field need not be normalized): clause ends and word counts are the same in both.

    Classification asks about a handful of matches per text, and most have no trigger within
    reach: so nothing is sorted or searched up front, a trigger counts only if it is on the
    right side of the match and within the window, and the clause boundary on that side is
    found (``str.rfind``/``str.find`` from the match) only when such a trigger exists. A pre
    trigger negates when it ends before the match, starts inside the match's clause and is at
    most ``window`` words away; a post trigger likewise after it (the same answers as the
    walk in :meth:`NegationScopes.scope`: the window and clause tests are monotonic in the
    distance, so the walk finds a trigger exactly when one passes both tests). Triggers come
    as (start, end) lists per kind, as :class:`~corespond.rules.matcher.FieldHits` holds them.
    """

    __slots__ = ("_marks", "_post", "_pre", "_pseudo", "_terminators", "_text", "_window")

    def __init__(
        self,
        text: str,
        pre: list[tuple[int, int]],
        post: list[tuple[int, int]],
        pseudo: list[tuple[int, int]],
        terminators: list[tuple[int, int]],
        window: int,
    ) -> None:
        self._text = text
        self._window = window
        self._pre = pre
        self._post = post
        self._pseudo = pseudo
        self._terminators = terminators
        self._marks: str | None = None  # see _clause_marks(), made when first needed

    def negated(self, start: int, end: int) -> bool:
        if self._pseudo:
            self._drop_pseudo()
        text = self._text
        clause_start = -1
        for ts, te in self._pre:
            if te <= start:
                if clause_start < 0:
                    clause_start = self._clause_start(start)
                if ts >= clause_start and _word_count(text[te:start]) <= self._window:
                    return True
        clause_end = -1
        for ts, te in self._post:
            if ts >= end:
                if clause_end < 0:
                    clause_end = self._clause_end(end)
                if te <= clause_end and _word_count(text[end:ts]) <= self._window:
                    return True
        return False

    def _drop_pseudo(self) -> None:
        # A trigger inside a pseudo-negation ("no increase") negates nothing. Done once, on
        # new lists: the ones passed in may be shared.
        pseudo = self._pseudo
        self._pre = [t for t in self._pre if not any(s <= t[0] and t[1] <= e for s, e in pseudo)]
        self._post = [t for t in self._post if not any(s <= t[0] and t[1] <= e for s, e in pseudo)]
        self._pseudo = []

    def _clause_marks(self) -> str:
        """The text with "." for each clause end and " " elsewhere: one ``rfind``/``find``
        then finds the clause boundary (for ASCII text; other text keeps five searches)."""
        text = self._text
        if text.isascii():
            self._marks = text.encode("ascii").translate(_MARKS).decode("ascii")
        else:
            self._marks = ""
        return self._marks

    def _clause_start(self, start: int) -> int:
        marks = self._marks
        if marks is None:
            marks = self._clause_marks()
        if marks:
            found = marks.rfind(".", 0, start) + 1
        else:
            found = max(map(self._text.rfind, _CLAUSE_ENDS, repeat(0), repeat(start))) + 1
        for _, te in self._terminators:
            if found < te <= start:
                found = te
        return found

    def _clause_end(self, end: int) -> int:
        marks = self._marks
        if marks is None:
            marks = self._clause_marks()
        if marks:
            found = marks.find(".", end)
            if found < 0:
                found = len(marks)
        else:
            m = _PUNCTUATION.search(self._text, end)
            found = m.start() if m else len(self._text)
        for ts, _ in self._terminators:
            if end <= ts < found:
                found = ts
        return found
