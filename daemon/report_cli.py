"""``corespond report outcomes``: the outcome report of a period, as a table, CSV, JSON or HTML.

Every figure is printed with its definition, the frequent-utilizer definition in use and the
suppression rule; small cells are suppressed; the output names no person and no incident.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import html
import json
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import IO, Any

from corespond.daemon.outcomes import (
    GROUPINGS,
    Metric,
    Report,
    ReportRequest,
    outcome_report,
    report_json,
    report_rows,
)

FORMATS = ("table", "csv", "json", "html")
CSV_COLUMNS = (
    "metric", "label", "group", "value", "numerator", "denominator", "suppressed", "definition"
)  # fmt: skip


def register(sub: Any) -> None:
    """Add the ``report`` command to the ``corespond`` subparsers ``sub``."""
    from corespond.daemon.cli import DEFAULT_CONFIG

    report = sub.add_parser("report", help="outcome reports", description="Outcome reports.")
    kinds = report.add_subparsers(metavar="REPORT")
    outcomes = kinds.add_parser(
        "outcomes",
        help="diversion, linkage, repeat encounters, response times and who is served",
        description="Every outcome metric of a period with its definition; small cells "
        "suppressed; no personal identifiers.",
    )
    outcomes.set_defaults(handler=cmd_outcomes)
    outcomes.add_argument(
        "-c", "--config", type=Path, default=None,
        help=f"configuration file (default: $CORESPOND_CONFIG or {DEFAULT_CONFIG})",
    )  # fmt: skip
    outcomes.add_argument("--from", dest="start", required=True, type=_day, metavar="DATE")
    outcomes.add_argument("--to", dest="end", required=True, type=_day, metavar="DATE",
                          help="last day of the period (inclusive), UTC")  # fmt: skip
    outcomes.add_argument("--program", metavar="P", help="only this program's encounters")
    outcomes.add_argument("--by", choices=GROUPINGS, help="one column per group")
    outcomes.add_argument("--format", choices=FORMATS, default="table")
    outcomes.add_argument("-o", "--output", type=Path, help="write here instead of stdout")

    export = kinds.add_parser(
        "encounters",
        help="one row per encounter: coded fields, pseudonymous person, custom fields",
        description="Every encounter received in the period, one row each: the coded fields, "
        "the person's pseudonym and the program's custom fields. Not for publication: it is "
        "row-level data (no names, CAD numbers or free text).",
    )
    export.set_defaults(handler=cmd_encounters)
    export.add_argument("-c", "--config", type=Path, default=None, help="configuration file")
    export.add_argument("--from", dest="start", required=True, type=_day, metavar="DATE")
    export.add_argument("--to", dest="end", required=True, type=_day, metavar="DATE")
    export.add_argument("--program", metavar="P")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument("-o", "--output", type=Path, help="write here instead of stdout")

    rebuild = kinds.add_parser(
        "rebuild-rollups",
        help="recompute the outcome report's rollups from the encounters",
        description="Recompute the rollups the outcome report reads (counts, per-second "
        "durations, per-person facts) from the stored encounters, for the configured "
        "frequent-utilizer threshold, in one transaction. The daemon keeps them up to date "
        "itself: run this after changing outcomes.frequent_utilizer.threshold (until then "
        "reports take the slower exact path and say so).",
    )
    rebuild.set_defaults(handler=cmd_rebuild_rollups)
    rebuild.add_argument("-c", "--config", type=Path, default=None, help="configuration file")


def cmd_rebuild_rollups(args: argparse.Namespace) -> int:
    from corespond.daemon.rollups import rebuild_rollups

    opened = _open_store(args.config, "rebuild-rollups")
    if isinstance(opened, int):
        return opened
    config, engine = opened
    threshold = config.outcomes.frequent_utilizer.threshold
    try:
        with engine.begin() as conn:
            rebuild_rollups(conn, threshold)
    finally:
        engine.dispose()
    print(f"report rollups rebuilt (frequent-utilizer threshold {threshold})")
    return 0


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a date YYYY-MM-DD") from None


def cmd_outcomes(args: argparse.Namespace) -> int:
    from corespond.daemon.store.engine import READ_ONLY

    opened = _open_store(args.config, "outcomes")
    if isinstance(opened, int):
        return opened
    config, engine = opened
    try:
        req = ReportRequest(
            start=args.start,
            end=args.end,
            program=args.program,
            by=args.by,
            suppress_below=config.outcomes.suppress_below,
            frequent_utilizer=config.outcomes.frequent_utilizer,
            zone_population=dict(config.outcomes.zone_population),
        )
    except ValueError as err:
        engine.dispose()
        print(f"corespond report outcomes: {err}", file=sys.stderr)
        return 2
    try:
        with engine.connect() as conn, conn.execution_options(**{READ_ONLY: True}).begin():
            report = outcome_report(conn, req)
    finally:
        engine.dispose()
    with _output(args.output) as out:
        write_report(report, args.format, out)
    return 0


def cmd_encounters(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime, time, timedelta

    from corespond.daemon.encounters import export_encounters
    from corespond.daemon.store.engine import READ_ONLY

    if args.end < args.start:
        print("corespond report encounters: the period ends before it starts", file=sys.stderr)
        return 2
    opened = _open_store(args.config, "encounters")
    if isinstance(opened, int):
        return opened
    config, engine = opened
    since = datetime.combine(args.start, time(), UTC)
    until = datetime.combine(args.end + timedelta(days=1), time(), UTC)
    fields = config.outcomes.custom_fields
    try:
        with engine.connect() as conn, conn.execution_options(**{READ_ONLY: True}).begin():
            rows = export_encounters(conn, since, until, fields, args.program)
            with _output(args.output) as out:
                if args.format == "json":
                    for row in rows:
                        out.write(json.dumps(row, default=str, sort_keys=False) + "\n")
                else:
                    first = next(rows, None)
                    if first is None:
                        return 0
                    writer = csv.DictWriter(out, list(first), lineterminator="\n")
                    writer.writeheader()
                    writer.writerow(first)
                    writer.writerows(rows)
    finally:
        engine.dispose()
    return 0


def _open_store(config_path: Path | None, command: str) -> tuple[Any, Any] | int:
    """The configuration and an engine on a current schema, or the exit status."""
    import os

    from corespond.daemon.cli import DEFAULT_CONFIG, _engine, _load
    from corespond.daemon.store import migrate

    config = _load(config_path or Path(os.environ.get("CORESPOND_CONFIG", DEFAULT_CONFIG)))
    if config is None:
        return 1
    engine = _engine(config)
    if not migrate.is_up_to_date(engine):
        engine.dispose()
        print(
            f"corespond report {command}: the database schema is not current; run "
            "`corespond db upgrade`",
            file=sys.stderr,
        )
        return 1
    return config, engine


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    with path.open("w", encoding="utf-8", newline="") as out:
        yield out


def write_report(report: Report, fmt: str, out: IO[str]) -> None:
    if fmt == "json":
        json.dump(report_json(report), out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(report_rows(report))
    elif fmt == "html":
        out.write(report_html(report))
    else:
        out.write(report_table(report))


def _title(report: Report) -> str:
    req = report.request
    program = f", program {req.program}" if req.program else ", all programs"
    by = f", by {req.by}" if req.by else ""
    return f"Outcome report {req.start.isoformat()} to {req.end.isoformat()}{program}{by}"


def report_table(report: Report) -> str:
    """Plain text: one row per metric, one column per group, the definition last."""
    lines = [_title(report), ""]
    lines += _grid(report.metrics, report.groups, "metric")
    for area in report.areas:
        lines += ["", f"{area.label}: {area.definition}"]
        lines += [f"  {zone:<20} {value.shown(area.kind)}" for zone, value in area.values.items()]
    lines += ["", *report.notes, ""]
    return "\n".join(lines)


def _grid(metrics: list[Metric], groups: list[str], first: str) -> list[str]:
    cells = [[m.label, *(m.values[g].shown(m.kind) for g in groups), m.definition] for m in metrics]
    header = [first, *groups, "definition"]
    widths = [max(len(str(row[i])) for row in [header, *cells]) for i in range(len(header) - 1)]

    def line(row: list[str]) -> str:
        return (
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )

    return [line(header), *(line(row) for row in cells)]


def report_html(report: Report) -> str:
    """A standalone HTML page (escaped, no scripts)."""
    e = html.escape

    def table(metrics: list[Metric], columns: list[str], first: str) -> str:
        head = "".join(f"<th>{e(c)}</th>" for c in [first, *columns, "definition"])
        rows = []
        for m in metrics:
            cells = "".join(
                f"<td>{e(m.values[c].shown(m.kind)) if c in m.values else ''}</td>" for c in columns
            )
            rows.append(f"<tr><th>{e(m.label)}</th>{cells}<td>{e(m.definition)}</td></tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"

    zones = sorted({z for a in report.areas for z in a.values}, key=lambda z: (
        -next((a.values[z].value or 0 for a in report.areas if z in a.values), 0), z))  # fmt: skip
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(_title(report))}</title>",
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}</style>",
        "</head><body>",
        f"<h1>{e(_title(report))}</h1>",
        table(report.metrics, report.groups, "metric"),
        "<h2>Areas of greatest need</h2>",
        table(report.areas, zones, "measure"),
        "<h2>Definitions and rules</h2><ul>",
        *(f"<li>{e(note)}</li>" for note in report.notes),
        "</ul></body></html>\n",
    ]
    return "\n".join(parts)
