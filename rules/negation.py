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

from corespond.rules.matcher import Hit

_PUNCTUATION = re.compile(r"[.;!?\n]")


@dataclass(frozen=True, slots=True)
class Scope:
    negated: bool
    uncertain: bool


NOT_NEGATED = Scope(False, False)


class NegationScopes:
    """Answers "is the match at start:end negated?" for one text, from its trigger hits."""

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
