"""``corespond referrals``: create, list, show, retry and cancel referrals; record consents.

The commands work on the database directly; a running daemon's worker picks up what they
queue at its next outbox scan. Output without ``--phi`` carries no protected information.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, cast

from corespond.adapters.hl7_referral import URGENCIES, Person

STATES = ("queued", "delivered", "held", "cancelled")


def register(sub: Any) -> None:
    """Add ``referrals`` to the ``corespond`` subparsers ``sub``."""
    from corespond.daemon.cli import DEFAULT_CONFIG

    top = sub.add_parser(
        "referrals",
        help="HL7 referrals to treatment providers",
        description="Create and follow HL7 referrals to treatment providers.",
    )
    actions = top.add_subparsers(metavar="ACTION")

    def action(name: str, help_: str, handler: Any) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        default = Path(os.environ.get("CORESPOND_CONFIG", DEFAULT_CONFIG))
        p.add_argument(
            "-c",
            "--config",
            type=Path,
            default=default,
            help=f"configuration file (default: $CORESPOND_CONFIG or {DEFAULT_CONFIG})",
        )
        p.add_argument("--json", action="store_true", help="JSON output")
        return p

    create = action("create", "refer the person of an incident to a provider", cmd_create)
    create.add_argument("incident", metavar="INCIDENT", help="CAD incident number or id")
    create.add_argument("--provider", required=True)
    create.add_argument("--service", required=True, help="service type")
    create.add_argument("--urgency", choices=list(URGENCIES), default="routine")
    create.add_argument("--clinician", required=True, help="referring clinician's id")
    create.add_argument(
        "--summary-file",
        type=Path,
        help="the clinician's short summary (UTF-8 text; not the CAD narrative)",
    )
    create.add_argument("--program")
    create.add_argument("--region", help="region (default: the incident's zone)")
    create.add_argument(
        "--part2",
        action="store_true",
        help="contains substance use disorder information (42 CFR Part 2)",
    )
    create.add_argument("--consent", help="recorded consent id covering this disclosure")

    lst = action("list", "referrals, newest first", cmd_list)
    lst.add_argument("--state", choices=STATES)
    lst.add_argument("--limit", type=int, default=50)

    show = action("show", "one referral with its messages, disclosures and outcomes", cmd_show)
    show.add_argument("ref", metavar="REFERRAL")
    show.add_argument(
        "--phi",
        action="store_true",
        help="include the person, the summary and the peer's error text",
    )

    retry = action("retry", "send a held referral again (the same message)", cmd_retry)
    retry.add_argument("ref", metavar="REFERRAL")
    retry.add_argument("--consent", help="for a referral held for consent: the consent id")

    cancel = action("cancel", "cancel a referral not yet delivered", cmd_cancel)
    cancel.add_argument("ref", metavar="REFERRAL")

    consent = action("consent", "record a 42 CFR Part 2 consent", cmd_consent)
    consent.add_argument("consent", metavar="CONSENT", help="the consent form's id")
    consent.add_argument("--provider", required=True, help="who may receive")
    consent.add_argument("--purpose", default="treatment")
    consent.add_argument("--expires", type=datetime.fromisoformat, help="ISO date or time")


# --- helpers -----------------------------------------------------------------------------------


def _setup(args: argparse.Namespace) -> tuple[Any, Any] | None:
    from corespond.daemon.cli import _engine, _load
    from corespond.daemon.log import configure_logging

    config = _load(args.config)
    if config is None:
        return None
    # Standard output is for the command's answer (--json is parsed by scripts).
    configure_logging(config.logging.level, config.logging.format, cast(TextIO, _Stderr()))
    if config.referrals is None:
        print("corespond: referrals are not configured (no `referrals:` section)", file=sys.stderr)
        return None
    return config, _engine(config)


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (tests swap it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _now() -> datetime:
    return datetime.now(UTC)


def _print(args: argparse.Namespace, value: Any, text: str) -> None:
    print(json.dumps(value, default=str, sort_keys=True) if args.json else text)


def _fail(err: Exception) -> int:
    print(f"corespond: {err}", file=sys.stderr)
    return 1


# --- commands ----------------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    from corespond.daemon.referrals import (
        ReferralError,
        ReferralRequest,
        create_referral,
        person_of_incident,
    )

    setup = _setup(args)
    if setup is None:
        return 1
    config, engine = setup
    try:
        summary = None
        if args.summary_file is not None:
            try:
                summary = args.summary_file.read_text(encoding="utf-8").strip() or None
            except (OSError, UnicodeDecodeError) as err:
                return _fail(
                    ValueError(
                        f"cannot read {args.summary_file}: "
                        f"{getattr(err, 'strerror', None) or type(err).__name__}"
                    )
                )
        with engine.connect() as conn:
            found = person_of_incident(conn, args.incident)
        if found is None:
            print(
                f"corespond: note: incident {args.incident} is not in the store; the referral "
                "carries no demographics",
                file=sys.stderr,
            )
            person, zone = Person(), None
        else:
            person, zone = found
        request = ReferralRequest(
            incident_ref=args.incident,
            provider=args.provider,
            service_type=args.service,
            referring_clinician=args.clinician,
            urgency=args.urgency,
            person=person,
            summary=summary,
            part2=args.part2,
            consent_ref=args.consent,
            program=args.program,
            region=args.region or zone,
        )
        try:
            created = create_referral(engine, config.referrals, request, _now())
        except ReferralError as err:
            return _fail(err)
    finally:
        engine.dispose()
    value = {
        "ref": created.ref,
        "state": created.state,
        "hold_reason": created.hold_reason,
        "control_id": created.control_id,
    }
    text = f"{created.ref} {created.state}"
    if created.hold_reason:
        text += f": {created.hold_reason}"
    _print(args, value, text)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from corespond.daemon.referrals import list_referrals

    setup = _setup(args)
    if setup is None:
        return 1
    _, engine = setup
    try:
        with engine.connect() as conn:
            rows = list_referrals(conn, state=args.state, limit=args.limit)
    finally:
        engine.dispose()
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str, sort_keys=True))
        return 0
    print(
        f"{'REFERRAL':<17} {'CREATED (UTC)':<20} {'PROVIDER':<12} {'STATE':<10} {'ACK':<3} "
        f"{'TRIES':>5}  {'OUTCOME':<9} INCIDENT / REASON"
    )
    for r in rows:
        created = r["created_at"].strftime("%Y-%m-%d %H:%M:%S")
        tail = r["incident_ref"] + (f"  {r['hold_reason']}" if r["hold_reason"] else "")
        print(
            f"{r['ref']:<17} {created:<20} {r['provider']:<12} {r['state']:<10} "
            f"{r['ack_code'] or '-':<3} {r['attempts'] or 0:>5}  {r['outcome'] or '-':<9} "
            f"{tail}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from corespond.daemon.referrals import show_referral

    def read(cfg: Any, engine: Any) -> dict[str, Any]:
        with engine.connect() as conn:
            return show_referral(conn, args.ref, with_phi=args.phi)

    detail = _act(args, read)
    if detail is None:
        return 1
    if args.json:
        print(json.dumps(detail, default=str, sort_keys=True, indent=2))
        return 0
    for key, value in detail.items():
        if isinstance(value, list):
            print(f"{key}:")
            for item in value:
                print("  - " + ", ".join(f"{k}={v}" for k, v in item.items()))
        else:
            print(f"{key}: {value}")
    return 0


def _act(args: argparse.Namespace, fn: Any) -> Any | None:
    """``fn(referrals_config, engine)``; None (after saying why) when it cannot be done."""
    from corespond.daemon.referrals import ReferralError

    setup = _setup(args)
    if setup is None:
        return None
    config, engine = setup
    try:
        return fn(config.referrals, engine)
    except ReferralError as err:
        _fail(err)
        return None
    finally:
        engine.dispose()


def cmd_retry(args: argparse.Namespace) -> int:
    from corespond.daemon.referrals import retry_referral

    done = _act(
        args,
        lambda cfg, engine: retry_referral(engine, cfg, args.ref, _now(), consent_ref=args.consent),
    )
    if done is None:
        return 1
    _print(
        args,
        {"ref": done.ref, "state": done.state, "control_id": done.control_id},
        f"{done.ref} {done.state} ({done.control_id})",
    )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from corespond.daemon.referrals import cancel_referral

    previous = _act(args, lambda cfg, engine: cancel_referral(engine, args.ref, _now()))
    if previous is None:
        return 1
    _print(
        args,
        {"ref": args.ref, "state": "cancelled", "was": previous},
        f"{args.ref} cancelled (was {previous})",
    )
    return 0


def cmd_consent(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import IntegrityError

    from corespond.daemon.referrals import record_consent

    setup = _setup(args)
    if setup is None:
        return 1
    config, engine = setup
    if config.referrals.provider(args.provider) is None:
        engine.dispose()
        return _fail(ValueError(f"unknown provider {args.provider}"))
    expires = args.expires
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    try:
        with engine.begin() as conn:
            record_consent(
                conn, args.consent, args.provider, _now(), purpose=args.purpose, expires_at=expires
            )
    except IntegrityError:
        return _fail(ValueError(f"consent {args.consent} is already recorded"))
    finally:
        engine.dispose()
    _print(
        args,
        {"consent": args.consent, "provider": args.provider, "purpose": args.purpose},
        f"consent {args.consent} recorded for {args.provider} ({args.purpose})",
    )
    return 0
