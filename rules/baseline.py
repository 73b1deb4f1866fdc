"""A small fixed classifier: the stand-in until the rule-file engine fills the same interface.

It knows the APCO common incident types that co-responder programs take (research note
cad-feeds.md section 5), a few local call-type words, and the words that put police first
(weapons, violence). It is deliberately plain: no negation handling beyond a short window of
"no"/"denies"/"without" before a word, no site overrides. The rules engine replaces it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from corespond.daemon.decision import Decision, Evidence, Response
from corespond.daemon.snapshot import IncidentStatus, Snapshot

# APCO ANS 2.103.2 common type -> (category, response when nothing else is known)
APCO_TYPES: dict[str, tuple[str, Response]] = {
    "EDP": ("mental-health", Response.CLINICIAN),
    "MNTL": ("mental-health", Response.CLINICIAN),
    "MTLV": ("mental-health", Response.POLICE),
    "SUICTHRT": ("suicide", Response.CO_RESPONSE),
    "SUICIDE": ("suicide", Response.POLICE),
    "OD": ("substance", Response.CO_RESPONSE),
    "INTOX": ("substance", Response.CLINICIAN),
    "WELFARE": ("welfare", Response.CLINICIAN),
}

# Local call-type text -> category. Word stems, matched on word starts.
LOCAL_TYPE_WORDS: tuple[tuple[str, str], ...] = (
    ("suicid", "suicide"),
    ("mental", "mental-health"),
    ("psych", "mental-health"),
    ("emotional", "mental-health"),
    ("edp", "mental-health"),
    ("5150", "mental-health"),
    ("crisis", "mental-health"),
    ("welfare", "welfare"),
    ("overdose", "substance"),
    ("intox", "substance"),
)

# Words that put police first; matched in the call type and the narrative.
POLICE_FIRST_WORDS: tuple[str, ...] = (
    "armed", "weapon", "wpn", "gun", "firearm", "knife", "shots", "violent", "assault",
    "hostage", "barricad", "combative",
)  # fmt: skip

NEGATIONS = ("no ", "denies ", "without ", "not ", "negative for ")


@dataclass(frozen=True, slots=True)
class _Hit:
    rule: str
    field: str
    start: int
    end: int
    text: str


class BaselineClassifier:
    """Fills :class:`corespond.daemon.decision.Classifier`."""

    def __init__(self) -> None:
        stems = "|".join(re.escape(s) for s, _ in LOCAL_TYPE_WORDS)
        self._local_type = re.compile(rf"(?<![a-z0-9])(?:{stems})")
        police = "|".join(re.escape(w) for w in POLICE_FIRST_WORDS)
        self._police_first = re.compile(rf"(?<![a-z0-9])(?:{police})")
        material = repr((sorted(APCO_TYPES.items()), LOCAL_TYPE_WORDS, POLICE_FIRST_WORDS))
        self._version = "baseline-" + hashlib.sha256(material.encode()).hexdigest()[:12]

    @property
    def version(self) -> str:
        return self._version

    def classify(self, snapshot: Snapshot) -> Decision:
        hits: list[_Hit] = []
        category: str | None = None
        response = Response.NONE

        apco = (snapshot.apco_type or "").upper()
        if apco in APCO_TYPES:
            category, response = APCO_TYPES[apco]
            hits.append(_Hit(f"apco.{apco.lower()}", "apco_type", 0, len(apco), apco))

        call_type = (snapshot.call_type or "").lower()
        for m in self._local_type.finditer(call_type):
            stem = m.group(0)
            found = dict(LOCAL_TYPE_WORDS)[stem]
            hits.append(_Hit(f"local-type.{stem}", "call_type", m.start(), m.end(), m.group(0)))
            if category is None:
                category, response = found, Response.CLINICIAN

        if snapshot.mental_states and category is None:
            category, response = "mental-health", Response.CLINICIAN
            hits.append(_Hit("eido.mental-state", "persons", 0, 0, ""))

        if category is not None:
            for field, text in (("call_type", call_type), ("narrative", snapshot.narrative)):
                lowered = text.lower()
                for m in self._police_first.finditer(lowered):
                    if _negated(lowered, m.start()):
                        continue
                    hits.append(
                        _Hit(f"police-first.{m.group(0)}", field, m.start(), m.end(),
                             text[m.start() : m.end()])
                    )  # fmt: skip
                    response = Response.POLICE
            if any(c.type.lower().startswith(("weapon", "violen")) for c in snapshot.cautions):
                hits.append(_Hit("police-first.caution", "cautions", 0, 0, ""))
                response = Response.POLICE

        if snapshot.status is not IncidentStatus.ACTIVE and category is not None:
            # A closed call is still behavioral-health for the record, but needs no one sent.
            response = Response.NONE

        behavioral = category is not None
        score = min(1.0, 0.5 + 0.1 * len(hits)) if behavioral else 0.0
        return Decision(
            behavioral_health=behavioral,
            category=category,
            response=response,
            score=round(score, 2),
            rules=tuple(dict.fromkeys(h.rule for h in hits)),
            evidence=tuple(Evidence(h.rule, h.field, h.start, h.end, h.text) for h in hits),
            ruleset=self._version,
        )


def _negated(text: str, start: int) -> bool:
    window = text[max(0, start - 20) : start]
    return any(neg in window for neg in NEGATIONS)
