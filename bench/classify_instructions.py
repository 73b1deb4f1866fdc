"""Instructions per decision of the rule engine, counted by callgrind (load does not move them).

The same synthetic incidents as ``bench/classify.py``. The classifier is built and warmed on
the first ``--warm`` incidents with instrumentation off; callgrind counts only the loop over the
next ``--count`` (switched on and off with ``callgrind_control``), so the total it reports
divided by ``--count`` is the figure per decision:

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.out \\
        .venv/bin/python bench/classify_instructions.py --count 1000
    callgrind_annotate /tmp/cg.out | head   # "PROGRAM TOTALS" / 1000

``--stage end-to-end`` counts ``classify_lines`` (what ``corespond classify`` runs) instead.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from classify import incidents

from corespond.daemon.rules_cli import classify_lines
from corespond.rules.engine import RuleClassifier
from corespond.rules.loader import load_ruleset
from corespond.rules.samples import incident_snapshot


def _instrument(on: bool) -> None:
    command = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--stage", choices=("engine", "end-to-end"), default="engine")
    parser.add_argument("--no-callgrind", action="store_true", help="run without toggling")
    args = parser.parse_args()
    ruleset = load_ruleset()
    engine = RuleClassifier(ruleset)
    rows = incidents(args.warm + args.count)
    snaps = [incident_snapshot(r) for r in rows]
    lines = [json.dumps(r) for r in rows]
    for s in snaps[: args.warm]:
        engine.classify(s)
    measured = snaps[args.warm :]
    gc.collect()
    if not args.no_callgrind:
        _instrument(True)
    if args.stage == "engine":
        for s in measured:
            engine.classify(s)
    else:
        classify_lines(ruleset, lines[args.warm :], io.StringIO())
    if not args.no_callgrind:
        _instrument(False)


if __name__ == "__main__":
    main()
