"""What a clinician's free-text reply means: an answer word and, if typed, a page reference.

Every two-way gateway whose replies are free text (SMS, a WCTP reply without a multiple-choice
code) asks :func:`read_reply`. The words are the core's, not a gateway's: a page says "Reply
1=Accept 2=Decline 3=En route (ref C1445-2)", so ``1``, ``A``, ``accept``, ``yes`` accept,
``2``, ``D``, ``decline``, ``no`` decline, ``3``, ``en route``, ``omw`` mean en route and
``4``, ``on scene`` on scene. The answer is the first word (or two-word phrase) of the reply;
a reference like ``C1445-2`` may stand anywhere in it. Anything else is ``answer=None``: the
core stores the text for a person and does not guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from corespond.daemon.pager import OFFERED_ANSWERS, PageAnswer

# Longest phrases first, so "en route" wins over "en".
_ANSWER_WORDS: tuple[tuple[str, PageAnswer], ...] = (
    ("on scene", PageAnswer.ON_SCENE),
    ("onscene", PageAnswer.ON_SCENE),
    ("en route", PageAnswer.EN_ROUTE),
    ("enroute", PageAnswer.EN_ROUTE),
    ("en-route", PageAnswer.EN_ROUTE),
    ("on my way", PageAnswer.EN_ROUTE),
    ("omw", PageAnswer.EN_ROUTE),
    ("accepted", PageAnswer.ACCEPT),
    ("accept", PageAnswer.ACCEPT),
    ("ack", PageAnswer.ACCEPT),
    ("yes", PageAnswer.ACCEPT),
    ("ok", PageAnswer.ACCEPT),
    ("a", PageAnswer.ACCEPT),
    ("y", PageAnswer.ACCEPT),
    ("1", PageAnswer.ACCEPT),
    ("declined", PageAnswer.DECLINE),
    ("decline", PageAnswer.DECLINE),
    ("no", PageAnswer.DECLINE),
    ("d", PageAnswer.DECLINE),
    ("n", PageAnswer.DECLINE),
    ("2", PageAnswer.DECLINE),
    ("e", PageAnswer.EN_ROUTE),
    ("3", PageAnswer.EN_ROUTE),
    ("s", PageAnswer.ON_SCENE),
    ("4", PageAnswer.ON_SCENE),
)
# What a two-way gateway offers as multiple-choice codes; also what the page text lists.
ANSWER_LABELS: dict[PageAnswer, str] = {
    PageAnswer.ACCEPT: "Accept",
    PageAnswer.DECLINE: "Decline",
    PageAnswer.EN_ROUTE: "En route",
    PageAnswer.ON_SCENE: "On scene",
}
ANSWER_CODES: dict[PageAnswer, str] = {
    PageAnswer.ACCEPT: "1",
    PageAnswer.DECLINE: "2",
    PageAnswer.EN_ROUTE: "3",
    PageAnswer.ON_SCENE: "4",
}
# A page reference: a letter, digits, a dash and the attempt number, e.g. C1445-2.
PAGE_REF = re.compile(r"(?<![A-Za-z0-9])([A-Za-z][0-9]{1,9}-[0-9]{1,4})(?![A-Za-z0-9-])")
_SEPARATORS = re.compile(r"[\s.,;:!?()\[\]\"'/#*]+")
MAX_REPLY_CHARS = 1600  # a long SMS concatenation; beyond it we read only the start


@dataclass(frozen=True, slots=True)
class ReadReply:
    answer: PageAnswer | None
    page_ref: str | None


def read_reply(text: str) -> ReadReply:
    """The answer and the page reference in a clinician's reply (either may be None)."""
    text = text[:MAX_REPLY_CHARS]
    found = PAGE_REF.search(text)
    page_ref = found.group(1).upper() if found else None
    rest = PAGE_REF.sub(" ", text) if found else text
    words = " ".join(w for w in _SEPARATORS.split(rest.casefold()) if w)
    # "ref" before or after the reference is filler, not an answer.
    if words.startswith("ref "):
        words = words[4:]
    answer = None
    for phrase, meaning in _ANSWER_WORDS:
        if words == phrase or words.startswith(phrase + " "):
            answer = meaning
            break
    return ReadReply(answer, page_ref)


def answer_for_choice(code: str) -> PageAnswer | None:
    """The answer a multiple-choice code (``1``..``4``) or label stands for."""
    return read_reply(code).answer


def reply_prompt(answers: tuple[PageAnswer, ...] = OFFERED_ANSWERS) -> str:
    """``Reply 1=Accept 2=Decline 3=En route``: the line a one-text gateway appends to a page."""
    return "Reply " + " ".join(f"{ANSWER_CODES[a]}={ANSWER_LABELS[a]}" for a in answers)
