"""``corespond pages list|show`` and ``corespond clinicians list|status``.

Read-only views of the paging tables for a sysadmin: page references, states, the
dispatcher's reasons, clinician ids and gateways. Endpoint addresses and reply texts are
protected and never printed; the page text is free of protected information by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from corespond.daemon.config import Config


def register(sub: Any) -> None:
    """Add the ``pages`` and ``clinicians`` commands to the ``corespond`` subparsers ``sub``."""
    from corespond.daemon.cli import DEFAULT_CONFIG

    def action(
        parent: Any, name: str, help_: str, handler: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        p.add_argument(
            "-c", "--config", type=Path,
            default=Path(os.environ.get("CORESPOND_CONFIG", DEFAULT_CONFIG)),
            help=f"configuration file (default: $CORESPOND_CONFIG or {DEFAULT_CONFIG})",
        )  # fmt: skip
        p.add_argument("--json", action="store_true", help="JSON (one object per line for lists)")
        return p

    pages = sub.add_parser("pages", help="pages sent and their answers")
    page_actions = pages.add_subparsers(metavar="ACTION")
    lst = action(page_actions, "list", "recent pages, newest first", cmd_pages_list)
    lst.add_argument("--limit", type=int, default=50)
    show = action(
        page_actions, "show", "one page: its chain, the dispatcher's reasons, replies",
        cmd_pages_show,
    )  # fmt: skip
    show.add_argument("ref", metavar="PAGE_REF", help="the page reference, e.g. C1445-2")

    clinicians = sub.add_parser("clinicians", help="the roster's clinicians and their state")
    clinician_actions = clinicians.add_subparsers(metavar="ACTION")
    action(clinician_actions, "list", "the clinicians of the roster", cmd_clinicians_list)
    action(
        clinician_actions, "status",
        "availability, on call now, last location fix age and open pages", cmd_clinicians_status,
    )  # fmt: skip


def _read(args: argparse.Namespace, fn: Callable[[Connection, Config], Any]) -> tuple[Any, int]:
    from corespond.daemon.cli import _engine, _load

    config = _load(args.config)
    if config is None:
        return None, 1
    engine = _engine(config)
    try:
        with engine.connect() as conn:
            return fn(conn, config), 0
    finally:
        engine.dispose()


def _rows(
    args: argparse.Namespace, fn: Callable[[Connection, Config], list[dict[str, Any]]]
) -> list[dict[str, Any]] | None:
    """The rows ``fn`` reads (None when the config does not load); printed as JSON lines
    already when ``--json`` was asked for."""
    rows, status = _read(args, fn)
    if status:
        return None
    if args.json:
        for row in rows:
            print(_json_line(row))
    return list(rows)


def _roster(config: Config) -> Any:
    if config.paging is None:
        raise SystemExit("corespond: paging is not configured (no paging: section)")
    return config.paging.roster


def _json_line(value: Any, indent: int | None = None) -> str:
    from corespond.daemon.cli import _plain

    return json.dumps(_plain(value), default=str, indent=indent)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def cmd_pages_list(args: argparse.Namespace) -> int:
    from corespond.daemon.store.paging import list_pages

    rows = _rows(args, lambda conn, _: list_pages(conn, args.limit))
    if rows is None:
        return 1
    if args.json:
        return 0
    print(f"{'PAGE':<12} {'CREATED (UTC)':<20} {'KIND':<7} {'TO':<12} {'STATE':<10} "
          f"{'DELIVERY':<10} {'GATEWAY':<8} {'RECEIPT':<10} INCIDENT")  # fmt: skip
    for r in rows:
        print(f"{r['page_ref']:<12} {_when(r['created_at']):<20} {r['kind']:<7} "
              f"{r['clinician_id'] or '(group)':<12} {r['state']:<10} {r['delivery']:<10} "
              f"{r['gateway'] or '-':<8} {r['receipt'] or '-':<10} {r['external_id']}")  # fmt: skip
    return 0


def cmd_pages_show(args: argparse.Namespace) -> int:
    from corespond.daemon.cli import _plain, _print_tree
    from corespond.daemon.store.paging import page_detail

    detail, status = _read(args, lambda conn, _: page_detail(conn, args.ref))
    if status:
        return status
    if detail is None:
        print(f"corespond: no page {args.ref!r}", file=sys.stderr)
        return 1
    if args.json:
        print(_json_line(detail, indent=2))
    else:
        _print_tree(json.loads(json.dumps(_plain(detail), default=str)))
    return 0


def cmd_clinicians_list(args: argparse.Namespace) -> int:
    def listing(_: Connection, config: Config) -> list[dict[str, Any]]:
        roster = _roster(config)
        return [
            {
                "clinician_id": c.id,
                "program": c.program,
                "skills": sorted(c.skills),
                "gateways": [e.gateway for e in c.endpoints],
            }
            for c in roster.clinicians.values()
        ]

    rows = _rows(args, listing)
    if rows is None:
        return 1
    if args.json:
        return 0
    print(f"{'CLINICIAN':<14} {'PROGRAM':<12} {'GATEWAYS':<20} SKILLS")
    for r in rows:
        print(f"{r['clinician_id']:<14} {r['program']:<12} {','.join(r['gateways']):<20} "
              f"{','.join(r['skills']) or '-'}")  # fmt: skip
    return 0


def cmd_clinicians_status(args: argparse.Namespace) -> int:
    from corespond.daemon.store.paging import clinician_status

    now = datetime.now(UTC)
    rows = _rows(args, lambda conn, config: clinician_status(conn, _roster(config), now))
    if rows is None:
        return 1
    if args.json:
        return 0
    print(f"{'CLINICIAN':<14} {'PROGRAM':<12} {'AVAILABILITY':<13} {'ON CALL':<8} "
          f"{'FIX AGE':>9} {'OPEN PAGES':>10}")  # fmt: skip
    for r in rows:
        age = "-" if r["fix_age_seconds"] is None else f"{r['fix_age_seconds']}s"
        print(f"{r['clinician_id']:<14} {r['program']:<12} {r['availability']:<13} "
              f"{'yes' if r['on_call'] else 'no':<8} {age:>9} {r['open_pages']:>10}")  # fmt: skip
    return 0
