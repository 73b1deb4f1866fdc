"""``corespond rules check|test|dump|schema|backtest`` and ``corespond classify``.

Which site rules a command uses: the PATHs (or ``--rules PATH``) given; else, with ``-c
CONFIG``, that configuration's ``rules.site_dir`` and ``rules.timezone``; else the default
configuration's (``$CORESPOND_CONFIG`` or /etc/corespond/corespond.yaml) when it exists; else
the vendor rules alone. The vendor rules always come first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
CLASSIFY_CHUNK = 2000  # output lines written per write(): fast, and still streams


@dataclass(frozen=True, slots=True)
class RuleSource:
    """The site paths and time zone a command loads, and how to say where they came from."""

    site: tuple[Path, ...]
    timezone: str | None
    described: str


def register(sub: Any) -> None:
    """Add the ``rules`` and ``classify`` commands to the ``corespond`` subparsers ``sub``."""
    rules = sub.add_parser(
        "rules",
        help="check, test, show and measure the classification rules",
        description="Check, test, show and measure the classification rules. Site rules come "
        "from PATH arguments, else from -c CONFIG's rules.site_dir, else from the default "
        "configuration if it exists; the vendor rules always come first.",
    )
    actions = rules.add_subparsers(metavar="ACTION")

    def action(name: str, help_: str, handler: Callable[[argparse.Namespace], int]) -> Any:
        p = actions.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    check = action("check", "every error and warning of the rule files; exit 0 if none", cmd_check)
    _site_arguments(check)
    _json_flag(check)

    test = action(
        "test", "run every rule's samples; fails on a failing sample or a rule without", cmd_test
    )
    _site_arguments(test)
    _json_flag(test)

    dump = action(
        "dump", "the effective merged rule set (YAML, or --json), with its version", cmd_dump
    )
    _site_arguments(dump)
    _json_flag(dump)

    action("schema", "JSON Schema of a rule file, for editors", cmd_schema)

    backtest = action(
        "backtest",
        "classify labelled historical incidents (CSV, TSV or JSON lines) and report precision, "
        "recall and confusion per category, the misses and the time taken",
        cmd_backtest,
    )
    backtest.add_argument("file", type=Path, metavar="FILE")
    backtest.add_argument(
        "--label", required=True, metavar="COLUMN", help="the column with the true category"
    )
    _rules_option(backtest)
    _config_option(backtest)
    _json_flag(backtest)

    classify = sub.add_parser(
        "classify",
        help="classify incidents: JSON lines in, one JSON decision per line out",
        description='Read one incident per line ({"id", "call_type", "call_type_code", '
        '"narrative", "priority", "agency", "lat", "lon"}) and write one decision per line '
        '({"id", "behavioral_health", "category", "response", "score", "rules", "evidence", '
        '"ruleset"}). A bad line gets {"id", "error"} and the exit status is 1.',
    )
    classify.set_defaults(handler=cmd_classify)
    classify.add_argument("file", nargs="?", default="-", metavar="FILE", help="[-: stdin]")
    _rules_option(classify)
    _config_option(classify)


def _site_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="site rule file or dir")
    _config_option(p)


def _rules_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rules", dest="paths", action="append", type=Path, default=[], metavar="PATH",
        help="site rule file or directory (repeatable) [the configured rules.site_dir]",
    )  # fmt: skip


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c", "--config", type=Path, default=None,
        help="take rules.site_dir and rules.timezone from this configuration",
    )  # fmt: skip


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


# --- where the rules come from ------------------------------------------------------------------


def rule_source(paths: Sequence[Path], config_path: Path | None) -> RuleSource | None:
    """The site rules a command loads (see the module doc); None after printing a config
    error."""
    if paths and config_path is None:
        return RuleSource(tuple(paths), None, "vendor + " + " ".join(map(str, paths)))
    explicit = config_path is not None
    if config_path is None:
        from corespond.daemon.cli import DEFAULT_CONFIG

        config_path = Path(os.environ.get("CORESPOND_CONFIG", DEFAULT_CONFIG))
        if not config_path.is_file():
            return VENDOR_ONLY
    from corespond.daemon.cli import _load

    config = _load(config_path)
    if config is None:
        return None
    source = config_rules(config, paths)
    if explicit:
        return source
    return RuleSource(source.site, source.timezone, f"{source.described} (from {config_path})")


def config_rules(config: Any, paths: Sequence[Path] = ()) -> RuleSource:
    """The site rules of a loaded configuration, plus ``paths``."""
    from corespond.daemon.classification import site_paths

    configured = site_paths(config.rules)
    where = f"vendor + {config.rules.site_dir}" if configured else "vendor"
    if not configured:
        where += f" ({config.rules.site_dir} does not exist)"
    where += "".join(f" + {p}" for p in paths)
    return RuleSource((*configured, *paths), config.rules.timezone, where)


VENDOR_ONLY = RuleSource((), None, "vendor rules only")


def load_rules(source: RuleSource) -> Any:
    """The rule set, or None after printing every error to stderr."""
    from corespond.rules.loader import load_ruleset
    from corespond.rules.problems import RuleSetError

    try:
        return load_ruleset(None, source.site, timezone=source.timezone)
    except RuleSetError as err:
        errors = [p for p in err.problems if p.severity == "error"]
        print(f"corespond: {len(errors)} error(s) in the rule files ({source.described}):",
              file=sys.stderr)  # fmt: skip
        for problem in errors:
            print(f"  {problem}", file=sys.stderr)
        return None


def _source(args: argparse.Namespace) -> RuleSource | None:
    return rule_source(args.paths, args.config)


# --- rules check / test / dump / schema ---------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from corespond.rules.loader import check_ruleset, load_ruleset, rule_files

    source = _source(args)
    if source is None:
        return EXIT_FAILED
    problems = check_ruleset(None, source.site, timezone=source.timezone)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    version = None
    rule_count = 0
    if not errors:
        ruleset = load_ruleset(None, source.site, timezone=source.timezone)
        version, rule_count = ruleset.version, len(ruleset.rules)
    files = [str(f) for f in rule_files(None, source.site)]
    if args.json:
        print(json.dumps({
            "ok": not errors,
            "ruleset": version,
            "rules": rule_count,
            "files": files,
            "errors": [p.as_json() for p in errors],
            "warnings": [p.as_json() for p in warnings],
        }, indent=2))  # fmt: skip
    else:
        for problem in problems:
            print(problem)
        verdict = "OK" if not errors else "FAILED"
        summary = f"rules {verdict}: {len(errors)} error(s), {len(warnings)} warning(s) in "
        summary += f"{len(files)} files ({source.described})"
        if version:
            summary += f"; {rule_count} rules, ruleset {version}"
        print(summary)
    return EXIT_FAILED if errors else EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    from corespond.rules.samples import run_samples

    source = _source(args)
    if source is None:
        return EXIT_FAILED
    ruleset = load_rules(source)
    if ruleset is None:
        return EXIT_FAILED
    report = run_samples(ruleset)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
        return EXIT_OK if report.ok else EXIT_FAILED
    for failure in report.failures:
        where = f"{failure.file}:{failure.line}" if failure.line else failure.file
        what = "" if failure.kind == "missing" else f" {failure.kind} sample {failure.index + 1}:"
        print(f"{where}: rule {failure.rule}:{what} {failure.message}")
    samples = sum(1 for r in report.results if r.kind != "missing")
    verdict = "OK" if report.ok else "FAILED"
    print(f"samples {verdict}: {samples} samples of {len(ruleset.rules)} rules, "
          f"{len(report.failures)} failure(s); ruleset {ruleset.version}")  # fmt: skip
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_dump(args: argparse.Namespace) -> int:
    source = _source(args)
    if source is None:
        return EXIT_FAILED
    ruleset = load_rules(source)
    if ruleset is None:
        return EXIT_FAILED
    dump = ruleset.dump()
    if args.json:
        print(json.dumps(dump, indent=2))
        return EXIT_OK
    import yaml

    # The version first: it is what logs and stored decisions name.
    ordered = {"version": dump.pop("version"), **dump}
    print(f"# effective rule set ({source.described})")
    sys.stdout.write(
        yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, default_flow_style=False)
    )
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from corespond.rules.schema import rules_json_schema

    print(json.dumps(rules_json_schema(), indent=2))
    return EXIT_OK


# --- rules backtest -----------------------------------------------------------------------------


def cmd_backtest(args: argparse.Namespace) -> int:
    from corespond.rules.backtest import backtest, read_rows

    source = _source(args)
    if source is None:
        return EXIT_FAILED
    try:
        rows = read_rows(args.file)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        print(f"corespond: cannot read {args.file}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    if rows and all(args.label not in row for row in rows if isinstance(row, dict)):
        print(f"corespond: {args.file} has no column {args.label!r}", file=sys.stderr)
        return EXIT_USAGE
    ruleset = load_rules(source)
    if ruleset is None:
        return EXIT_FAILED
    report = backtest(ruleset, rows, args.label)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
        return EXIT_OK
    _print_backtest(report, source, args.file)
    return EXIT_OK


def _print_backtest(report: Any, source: RuleSource, path: Path) -> None:
    out: list[str] = [
        f"backtest of {path}: {report.rows} incidents, {len(report.skipped)} skipped, "
        f"{report.seconds:.3f} s ({source.described})",
        f"ruleset {report.ruleset}",
        "",
        f"behavioral-health  precision {report.precision:.3f}  recall {report.recall:.3f}  "
        f"(tp {report.bh_tp}, fp {report.bh_fp}, fn {report.bh_fn}, tn {report.bh_tn})",
        "",
        f"{'category':<20} {'tp':>5} {'fp':>5} {'fn':>5} {'precision':>10} {'recall':>8}",
    ]
    for category, m in report.per_category().items():
        out.append(
            f"{category:<20} {m['tp']:>5} {m['fp']:>5} {m['fn']:>5} "
            f"{m['precision']:>10.3f} {m['recall']:>8.3f}"
        )
    out += ["", "confusion (label: predicted count, ...)"]
    for label, predicted in sorted(report.confusion.items()):
        counts = ", ".join(f"{p} {n}" for p, n in predicted.most_common())
        out.append(f"  {label:<18} {counts}")
    out += ["", f"misses ({len(report.misses)})"]
    for miss in report.misses:
        ident = f" id {miss.id}" if miss.id else ""
        call_type = f" {miss.call_type!r}" if miss.call_type else ""
        out.append(
            f"  row {miss.row}{ident}{call_type}: label {miss.label}, predicted {miss.predicted}"
        )
    if report.skipped:
        out += ["", f"skipped ({len(report.skipped)})"]
        out += [f"  row {row}: {reason}" for row, reason in report.skipped]
    print("\n".join(out))


# --- classify -----------------------------------------------------------------------------------


def cmd_classify(args: argparse.Namespace) -> int:
    source = _source(args)
    if source is None:
        return EXIT_FAILED
    stream: IO[str]
    if args.file == "-":
        stream = sys.stdin
    else:
        try:
            stream = open(args.file, encoding="utf-8")  # noqa: SIM115 (closed below)
        except OSError as err:
            print(f"corespond: cannot read {args.file}: {err.strerror}", file=sys.stderr)
            return EXIT_FAILED
    try:
        ruleset = load_rules(source)
        if ruleset is None:
            return EXIT_FAILED
        bad = classify_lines(ruleset, stream, sys.stdout)
    except UnicodeDecodeError:
        print(f"corespond: {args.file} is not UTF-8 text", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if stream is not sys.stdin:
            stream.close()
    return EXIT_FAILED if bad else EXIT_OK


_ASCII_JSON = json.JSONEncoder(separators=(",", ":")).encode


def _json_line(value: Any) -> str:
    """One compact JSON output line, ASCII only (escapes), whatever stdout's encoding is.

    orjson takes about 1 us for a decision with its evidence, json about 9 (of the 100 us a
    line costs end to end); orjson writes non-ASCII as UTF-8, so a line that has any (rare in
    CAD text), or that orjson cannot encode (a lone surrogate), is written by json instead.
    """
    try:
        line = orjson.dumps(value).decode()
    except TypeError:
        return _ASCII_JSON(value)
    return line if line.isascii() else _ASCII_JSON(value)


def _load_line(line: str) -> Any:
    """``json.loads(line)``, by orjson (about 0.7 us for a 600-byte incident, json 3.7) when
    that gives the same value. What orjson refuses (NaN, Infinity, 1e400, integers past 2**64,
    lone surrogate escapes) goes to json, which gives the value or the error it always gave;
    so does a line where orjson read a number of 2**63 or more as a float (it does that for
    integers below -2**63, which json keeps exact). Raises ValueError.
    """
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)
    if type(value) is dict:
        for item in value.values():
            if item.__class__ is not str and not _exact(item):
                return json.loads(line)
        return value
    return value if _exact(value) else json.loads(line)


def _exact(value: Any) -> bool:
    """Whether ``value`` holds no float of 2**63 or more (see _load_line)."""
    kind = value.__class__
    if kind is float:
        return abs(value) < 9.223372036854776e18
    if kind is dict:
        return all(_exact(v) for v in value.values())
    if kind is list:
        return all(_exact(v) for v in value)
    return True


def classify_lines(ruleset: Any, lines: Iterable[str], out: IO[str]) -> int:
    """Write one decision (or error) per non-blank input line; return how many lines were bad."""
    from corespond.daemon.errors import RejectedMessage
    from corespond.rules.engine import RuleClassifier
    from corespond.rules.samples import incident_snapshot

    classifier = RuleClassifier(ruleset)
    classify = classifier.classify
    timezone = ruleset.timezone
    dumps = _json_line
    loads = _load_line
    pending: list[str] = []
    bad = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        ident: Any = None
        try:
            obj = loads(line)
        except ValueError:  # never quote the line: it may hold a narrative
            bad += 1
            pending.append(dumps({"line": number, "error": "malformed-json: not valid JSON"}))
            continue
        if type(obj) is dict:
            ident = obj.get("id")
        try:
            snapshot = incident_snapshot(obj, timezone=timezone)
        except RejectedMessage as err:
            bad += 1
            where = f" (at {err.where})" if err.where else ""
            failed: dict[str, Any] = {"id": ident} if ident is not None else {}
            failed.update(line=number, error=f"{err.code}: {err.reason}{where}")
            pending.append(dumps(failed))
        else:
            d = classify(snapshot)
            pending.append(dumps({
                "id": ident,
                "behavioral_health": d.behavioral_health,
                "category": d.category,
                "response": d.response.value,
                "score": d.score,
                "rules": list(d.rules),
                "evidence": [
                    {"rule": e.rule, "field": e.field, "start": e.start, "end": e.end,
                     "text": e.text}
                    for e in d.evidence
                ],
                "ruleset": d.ruleset,
            }))  # fmt: skip
        if len(pending) >= CLASSIFY_CHUNK:
            out.write("\n".join(pending) + "\n")
            pending.clear()
    if pending:
        out.write("\n".join(pending) + "\n")
    out.flush()
    return bad
