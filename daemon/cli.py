"""The ``corespond`` command. ``run`` is the process entry point: the only code that touches the
global reactor."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corespond.daemon import __version__

DEFAULT_CONFIG = "/etc/corespond/corespond.yaml"
EX_CONFIG = 78  # sysexits.h: systemd's RestartPreventExitStatus stops a restart loop on it
REPLAY_MAX_BYTES = 64 * 1024 * 1024
FORMAT_BY_SUFFIX = {".json": "eido", ".xml": "newworld", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return 2
    try:
        code: int = args.handler(args)
    except BrokenPipeError:  # `corespond incidents list | head`
        return 0
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corespond",
        description="Behavioral-health co-responder daemon: CAD ingest, classification, paging.",
    )
    parser.add_argument("--version", action="version", version=f"corespond {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, help_: str, handler: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    def with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
        default = Path(os.environ.get("CORESPOND_CONFIG", DEFAULT_CONFIG)) if required else None
        p.add_argument(
            "-c", "--config", type=Path, default=default,
            help=f"configuration file (default: $CORESPOND_CONFIG or {DEFAULT_CONFIG})",
        )  # fmt: skip

    with_config(command("run", "run the daemon in the foreground", cmd_run))
    with_config(command("check-config", "check the configuration; exit 0 if valid", cmd_check))

    db = command("db", "database schema", None)
    db_sub = db.add_subparsers(metavar="ACTION")
    up = db_sub.add_parser("upgrade", help="migrate the database to the current schema")
    up.set_defaults(handler=cmd_db_upgrade)
    with_config(up)

    replay = command(
        "replay",
        "send recorded CAD messages through parsing, storing and classification "
        "(no outbound action); one JSON line per message",
        cmd_replay,
    )
    with_config(replay, required=False)
    replay.add_argument("--format", choices=["eido", "newworld", "xml-mapped", "jsonl"])
    replay.add_argument("--feed", help="take format, source and limits from this configured feed")
    replay.add_argument("--mapping", type=Path, help="mapping file for --format xml-mapped")
    replay.add_argument(
        "--source", default="replay",
        help="namespace of the incident ids without --feed (default: replay)",
    )  # fmt: skip
    replay.add_argument("--timezone", default="UTC", help="zone of naive CAD times (default UTC)")
    replay.add_argument(
        "--dry-run",
        action="store_true",
        help="store into a throwaway database, not the configured one",
    )
    replay.add_argument("files", nargs="+", type=Path, metavar="FILE")

    incidents = command("incidents", "what the store holds", None)
    inc_sub = incidents.add_subparsers(metavar="ACTION")
    lst = inc_sub.add_parser("list", help="recent incidents, newest first")
    lst.set_defaults(handler=cmd_incidents_list)
    with_config(lst)
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--status", choices=["active", "closed", "cancelled"])
    lst.add_argument(
        "--behavioral-health", action="store_true", help="only behavioral-health calls"
    )
    show = inc_sub.add_parser("show", help="one incident with its snapshots and decisions")
    show.set_defaults(handler=cmd_incidents_show)
    with_config(show)
    show.add_argument("ref", metavar="ID", help="number, external id, or SOURCE:EXTERNAL_ID")
    show.add_argument("--json", action="store_true")

    from corespond.daemon import rules_cli

    rules_cli.register(sub)
    from corespond.daemon import paging_cli

    paging_cli.register(sub)
    from corespond.daemon import referrals_cli

    referrals_cli.register(sub)
    from corespond.daemon import report_cli

    report_cli.register(sub)
    from corespond.daemon import users_cli

    users_cli.register(sub)
    return parser


# --- config ------------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    """The configuration, or None after printing every problem to stderr."""
    from corespond.daemon.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as err:
        print(f"corespond: {path}: {len(err.problems)} configuration error(s):", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    print(f"{args.config}: configuration OK ({len(config.feeds)} feeds)")
    return 0


def _engine(config: Any) -> Any:
    from corespond.daemon.store.engine import create_store_engine

    return create_store_engine(
        config.store.url,
        sqlite_synchronous=config.store.sqlite_synchronous,
        password=config.store.password,
    )


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from corespond.daemon.store import migrate

    config = _load(args.config)
    if config is None:
        return 1
    engine = _engine(config)
    try:
        revision = migrate.upgrade(engine)
    finally:
        engine.dispose()
    print(f"database at schema revision {revision}")
    return 0


# --- run ---------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    import structlog

    from corespond.daemon.log import configure_logging, error_text

    config = _load(args.config)
    if config is None:
        return EX_CONFIG
    configure_logging(config.logging.level, config.logging.format)
    log = structlog.get_logger("corespond.daemon.run")

    from twisted.internet import reactor  # the one place the global reactor is touched
    from twisted.internet.defer import ensureDeferred

    from corespond.daemon.app import Corespond
    from corespond.daemon.clock import Clock
    from corespond.daemon.memory import CollectorPolicy, GcProbe
    from corespond.daemon.stall_probe import StallProbe

    probe = GcProbe.from_environment()  # benchmarks only: every collection's pause
    stalls = StallProbe.from_environment(reactor)  # diagnosis only: the late reactor's stack
    if stalls is not None:
        reactor.callWhenRunning(stalls.start)
        reactor.addSystemEventTrigger("before", "shutdown", stalls.stop)
    try:
        # What start-up built (modules, rules, config, schema) lives as long as the process:
        # frozen, a full collection no longer walks it (daemon/memory.py says when).
        daemon = Corespond(config, reactor, memory=CollectorPolicy(Clock(reactor)))
    except Exception as err:
        log.critical("daemon.start.failed", error=error_text(err))
        print(f"corespond: cannot start: {err}", file=sys.stderr)
        return 1
    outcome: dict[str, Any] = {"code": 0, "summary": None}

    def start_failed(failure: Any) -> None:
        outcome["code"] = 1
        log.critical("daemon.start.failed", error=error_text(failure))
        print(f"corespond: cannot start: {error_text(failure, limit=100_000)}", file=sys.stderr)
        reactor.stop()

    def stop() -> Any:
        def done(summary: Any) -> None:
            outcome["summary"] = summary

        def failed(failure: Any) -> None:
            outcome["code"] = 1
            log.critical("daemon.stop.failed", error=error_text(failure))

        return ensureDeferred(daemon.stop()).addCallbacks(done, failed)

    def reload(*_: Any) -> None:
        reactor.callFromThread(  # type: ignore[attr-defined]
            lambda: ensureDeferred(daemon.reload())
        )

    reactor.callWhenRunning(lambda: ensureDeferred(daemon.start()).addErrback(start_failed))
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    signal.signal(signal.SIGHUP, reload)
    reactor.run()  # SIGINT and SIGTERM stop it; the shutdown trigger drains and commits
    if probe is not None:
        probe.close()
    if outcome["summary"] is not None:
        print(outcome["summary"].text(), file=sys.stderr)
    return int(outcome["code"])


# --- replay ------------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from corespond.daemon.feeds import build_format, feed_context
    from corespond.daemon.ingest import Origin
    from corespond.daemon.pipeline import FeedContext, prepare_records
    from corespond.daemon.rules_cli import VENDOR_ONLY, config_rules, load_rules
    from corespond.daemon.store import migrate
    from corespond.daemon.store.engine import create_store_engine
    from corespond.daemon.store.writer import RejectRecord, write_batch
    from corespond.rules.engine import RuleClassifier

    config = _load(args.config) if args.config else None
    if args.config and config is None:
        return 1
    if config is None and not args.dry_run:
        print("corespond replay: give -c CONFIG (to store into its database) or --dry-run",
              file=sys.stderr)  # fmt: skip
        return 2

    feed: FeedContext | None = None
    if args.feed:
        if config is None:
            print("corespond replay: --feed needs -c CONFIG", file=sys.stderr)
            return 2
        matches = [f for f in config.feeds if f.name == args.feed]
        if not matches:
            print(
                f"corespond replay: no feed named {args.feed!r} in {args.config}", file=sys.stderr
            )
            return 2
        feed = feed_context(matches[0])

    def context_for(path: Path) -> FeedContext | None:
        if feed is not None:
            return feed
        fmt = args.format or FORMAT_BY_SUFFIX.get(path.suffix.lower())
        if fmt is None:
            return None
        return FeedContext(
            name="replay",
            source=args.source,
            format=build_format(fmt, mapping=args.mapping, timezone=args.timezone),
            max_message_bytes=REPLAY_MAX_BYTES,
        )

    # The configuration's rules (vendor + rules.site_dir), else the vendor rules alone.
    ruleset = load_rules(config_rules(config) if config is not None else VENDOR_ONLY)
    if ruleset is None:
        return 1
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.dry_run:
        tmp = tempfile.TemporaryDirectory(prefix="corespond-replay-")
        engine = create_store_engine(f"sqlite:///{tmp.name}/replay.db", sqlite_synchronous="normal")
    else:
        engine = _engine(config)
    classifier = RuleClassifier(ruleset)
    rejected = 0
    try:
        migrate.upgrade(engine)
        for path in args.files:
            ctx = context_for(path)
            if ctx is None:
                print(
                    json.dumps(
                        {"file": str(path), "error": "cannot tell the format: give --format"}
                    )
                )
                rejected += 1
                continue
            try:
                payload = path.read_bytes()
            except OSError as err:
                print(json.dumps({"file": str(path), "error": f"cannot read: {err.strerror}"}))
                rejected += 1
                continue
            origin = Origin(feed=ctx.name, name=path.name)
            records = prepare_records(ctx, payload, origin, datetime.now(UTC), classifier)
            with engine.begin() as conn:
                results = write_batch(conn, records)
            for n, (record, result) in enumerate(zip(records, results, strict=True), start=1):
                line: dict[str, Any] = {"file": str(path)}
                if len(records) > 1:
                    line["message"] = n
                if isinstance(record, RejectRecord):
                    rejected += 1
                    where = f" (at {record.where})" if record.where else ""
                    line["error"] = f"{record.code}: {record.reason}{where}"
                else:
                    line.update(
                        incident_id=result.external_id,
                        snapshot=result.state.value,
                        decision=record.decision.as_json(),
                    )
                print(json.dumps(line))
    finally:
        engine.dispose()
        if tmp is not None:
            tmp.cleanup()
    return 1 if rejected else 0


# --- incidents ---------------------------------------------------------------------------------


def cmd_incidents_list(args: argparse.Namespace) -> int:
    from corespond.daemon.store.queries import list_incidents

    config = _load(args.config)
    if config is None:
        return 1
    engine = _engine(config)
    try:
        with engine.connect() as conn:
            rows = list_incidents(
                conn,
                limit=args.limit,
                status=args.status,
                behavioral_health=True if args.behavioral_health else None,
            )
    finally:
        engine.dispose()
    if args.json:
        for row in rows:
            print(json.dumps(_plain(row), default=str))
        return 0
    print(
        f"{'ID':>6}  {'UPDATED (UTC)':<20} {'STATUS':<9} {'TYPE':<10} {'RESPONSE':<11} "
        f"{'SNAPS':>5}  EXTERNAL ID"
    )
    for row in rows:
        updated = row.updated_at.strftime("%Y-%m-%d %H:%M:%S") if row.updated_at else "-"
        kind = row.apco_type or row.call_type_code or "-"
        print(f"{row.id:>6}  {updated:<20} {row.status:<9} {kind:<10} {row.response or '-':<11} "
              f"{row.snapshot_count:>5}  {row.external_id}")  # fmt: skip
    return 0


def cmd_incidents_show(args: argparse.Namespace) -> int:
    from corespond.daemon.store.queries import incident_detail

    config = _load(args.config)
    if config is None:
        return 1
    engine = _engine(config)
    try:
        with engine.connect() as conn:
            detail = incident_detail(conn, args.ref)
    finally:
        engine.dispose()
    if detail is None:
        print(f"corespond: no incident {args.ref!r}", file=sys.stderr)
        return 1
    plain = _plain(detail)
    if args.json:
        print(json.dumps(plain, default=str, indent=2))
        return 0
    _print_tree(plain)
    return 0


def _plain(value: Any) -> Any:
    """Dataclasses, enums and decisions as JSON-ready values."""
    import dataclasses
    from datetime import datetime
    from enum import Enum

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def _print_tree(value: Any, indent: int = 0) -> None:
    pad = "  " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                print(f"{pad}{key}:")
                _print_tree(item, indent + 1)
            else:
                print(f"{pad}{key}: {item if item not in (None, [], {}) else '-'}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                print(f"{pad}-")
                _print_tree(item, indent + 1)
            else:
                print(f"{pad}- {item}")
    else:
        print(f"{pad}{value}")


if __name__ == "__main__":
    sys.exit(main())
