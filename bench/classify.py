"""Decisions per second of the rule engine on 500-character narratives, one core.

Three figures from the same run and the same synthetic incidents (default vendor rules):

- compiled: :class:`corespond.rules.engine.RuleClassifier` (Aho-Corasick prefilter, gated rules);
- naive: one ``\\b(?:term|term...)\\b`` regex with ``re.I`` per rule, searched over the call type
  and the narrative (no negation, no decision logic: a floor for what a plain loop costs);
- end to end: JSON line in -> incident -> decision -> JSON line out: the function
  ``corespond classify`` runs (:func:`corespond.daemon.rules_cli.classify_lines`), writing into
  memory instead of standard output.

Rates are per second of CPU time of this process (``time.process_time``), best of ``--repeat``
runs: on a shared machine, wall-clock time also counts the other processes on the core. Pin to
one core for the one-core figure: ``taskset -c 1 .venv/bin/python bench/classify.py``.

Run: .venv/bin/python bench/classify.py [--count N] [--repeat R]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import time
from collections.abc import Callable

from corespond.daemon.rules_cli import classify_lines
from corespond.daemon.snapshot import Snapshot
from corespond.rules.engine import RuleClassifier
from corespond.rules.loader import iter_conditions, load_ruleset
from corespond.rules.model import RuleSet, TextMatch
from corespond.rules.samples import incident_snapshot

CALL_TYPES = (
    "MENTAL SUBJECT",
    "10-96 MENTAL",
    "SUICIDE THREAT",
    "WELFARE CHECK",
    "TRAFFIC COLLISION",
    "BURGLARY I/P",
    "NOISE COMPLAINT",
    "EDP - ARMED",
    "INTOXICATED PERSON",
    "DRUG SALES",
    "SUSPICIOUS PERSON",
    "DISTURBANCE",
    "ASSAULT",
    "OVERDOSE",
    "CITIZEN ASSIST",
)
PHRASES = (
    "RP states subj is pacing in the lot",
    "pt denies SI",
    "no weapons seen",
    "RP does not think he is suicidal",
    "subj hearing voices, off his meds",
    "caller advises male yelling at cars",
    "units on scene, cleared",
    "veh blocking driveway",
    "neighbor reports loud music since 2200",
    "female appears intoxicated, unsteady",
    "states he has a knife in his bag",
    "family requests mobile crisis",
    "RP callback number on file",
    "subj walked toward main st",
    "negative for HI",
    "no hx of violence",
    "medics staged",
    "subj calm and cooperative at this time",
)
# Most of a real narrative is dispatch routine; BH phrases are a minority.
ROUTINE = (
    "unit 2A12 enroute",
    "caller on line 2, callback requested",
    "RP at the front desk",
    "vehicle is a silver sedan, partial plate 7KX",
    "area check requested by supervisor",
    "subj last seen heading northbound on Elm Testway",
    "medics advised, staging at corner",
    "RP will meet units in the parking lot",
    "units advised of gate code",
    "DUP CALL",
    "2nd caller same incident",
    "xfer from CHP",
    "weather clear",
    "units 10-8 at 1432",
    "subject wearing black hoodie and jeans",
    "RP requests contact by phone",
)


def incidents(count: int, seed: int = 7) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words: list[str] = []
        while sum(len(w) + 2 for w in words) < 500:
            words.append(rng.choice(PHRASES if rng.random() < 0.35 else ROUTINE))
        narrative = ". ".join(words)[:500]
        out.append(
            {
                "id": f"bench-{i}",
                "call_type": rng.choice(CALL_TYPES),
                "narrative": narrative,
                "priority": rng.choice("123"),
            }
        )
    return out


def naive_classifier(ruleset: RuleSet) -> Callable[[Snapshot], list[str]]:
    compiled: list[tuple[str, re.Pattern[str]]] = []
    for rule in ruleset.rules:
        terms = sorted(
            {
                t.key + (r"\w*" if t.stem else "")
                for c in iter_conditions(rule.when)
                if isinstance(c, TextMatch)
                for t in c.terms
            }
        )
        if terms:
            alternation = "|".join(re.escape(t).replace(re.escape(r"\w*"), r"\w*") for t in terms)
            compiled.append((rule.id, re.compile(rf"\b(?:{alternation})\b", re.I)))

    def classify(snapshot: Snapshot) -> list[str]:
        text = f"{snapshot.call_type or ''}\n{snapshot.narrative}"
        return [rid for rid, rx in compiled if rx.search(text)]

    return classify


def rate(fn: Callable[[], None], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ruleset = load_ruleset()
    engine = RuleClassifier(ruleset)
    naive = naive_classifier(ruleset)
    rows = incidents(args.count)
    snaps = [incident_snapshot(r) for r in rows]
    lines = [json.dumps(r) for r in rows]

    def run_compiled() -> None:
        for s in snaps:
            engine.classify(s)

    def run_naive() -> None:
        for s in snaps:
            naive(s)

    def run_end_to_end() -> None:
        # What `corespond classify` runs, into memory instead of standard output.
        classify_lines(ruleset, lines, io.StringIO())

    compiled = rate(run_compiled, len(snaps), args.repeat)
    naive_rate = rate(run_naive, len(snaps), min(args.repeat, 2))  # slow and only a baseline
    e2e = rate(run_end_to_end, len(lines), args.repeat)
    narrative_len = sum(len(s.narrative) for s in snaps) / len(snaps)
    print(
        f"rules: {len(ruleset.rules)} enabled, version {ruleset.version[:12]}; "
        f"{len(snaps)} incidents, narratives {narrative_len:.0f} chars; "
        f"CPU time, best of {args.repeat}"
    )
    print(f"compiled engine      {compiled:>10,.0f} decisions/s  ({1e6 / compiled:.1f} us each)")
    print(
        f"naive regex per rule {naive_rate:>10,.0f} decisions/s  ({1e6 / naive_rate:.1f} us each)"
    )
    print(f"end to end JSON line {e2e:>10,.0f} decisions/s  ({1e6 / e2e:.1f} us each)")
    print(f"compiled / naive     {compiled / naive_rate:>10.1f}x")


if __name__ == "__main__":
    main()
