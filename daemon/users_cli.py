"""``corespond users add NAME --role ROLE``: write a dashboard user's scrypt hash to the users
file (``web.users_file`` of the configuration, or ``--file``). The password is asked twice on
the terminal, or read from one line of stdin with ``--password-stdin``; it is never an argument
(arguments show in ``ps``). A running daemon reads the file at each sign-in: no restart.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from corespond.daemon.web.users import (
    CLINICIAN_PATTERN,
    MAX_PASSWORD_BYTES,
    MIN_PASSWORD_CHARS,
    NAME_PATTERN,
    ROLES,
    User,
    UsersFileError,
    add_user,
    hash_password,
)


def register(sub: Any) -> None:
    """Add the ``users`` command to the ``corespond`` subparsers ``sub``."""
    from corespond.daemon.cli import DEFAULT_CONFIG

    users = sub.add_parser("users", help="the dashboard's users")
    actions = users.add_subparsers(metavar="ACTION")
    add = actions.add_parser(
        "add",
        help="add a user, or set an existing user's role and password",
        description="Add a dashboard user, or replace an existing user's role and password.",
    )
    add.set_defaults(handler=cmd_users_add)
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument(
        "--clinician", metavar="ID",
        help="the clinician's responder id (required with --role clinician)",
    )  # fmt: skip
    add.add_argument(
        "--file", type=Path,
        help="the users file (default: web.users_file of the configuration)",
    )  # fmt: skip
    add.add_argument(
        "-c", "--config", type=Path, default=None,
        help=f"configuration file (default: $CORESPOND_CONFIG or {DEFAULT_CONFIG})",
    )  # fmt: skip
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")


def _fail(message: str, status: int = 1) -> int:
    print(f"corespond users add: {message}", file=sys.stderr)
    return status


def cmd_users_add(args: argparse.Namespace) -> int:
    if NAME_PATTERN.fullmatch(args.name) is None:
        return _fail("a name is 1-64 of A-Z a-z 0-9 . _ @ -", 2)
    if args.role == "clinician" and not args.clinician:
        return _fail("--role clinician needs --clinician ID (their responder id)", 2)
    if args.clinician is not None and CLINICIAN_PATTERN.fullmatch(args.clinician) is None:
        return _fail("a clinician id is 1-64 of A-Z a-z 0-9 . _ : -", 2)
    path = args.file
    if path is None:
        from corespond.daemon.cli import DEFAULT_CONFIG, _load

        config = _load(args.config or Path(os.environ.get("CORESPOND_CONFIG", DEFAULT_CONFIG)))
        if config is None:
            return 1
        if config.web is None or config.web.users_file is None:
            return _fail("the configuration has no web.users_file (or give --file)")
        path = config.web.users_file
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            return _fail("the passwords differ")
    if len(password) < MIN_PASSWORD_CHARS:
        return _fail(f"a password has at least {MIN_PASSWORD_CHARS} characters")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        return _fail(f"a password has at most {MAX_PASSWORD_BYTES} bytes")
    user = User(args.name, args.role, hash_password(password), args.clinician)
    try:
        new = add_user(path, user)
    except UsersFileError as err:
        return _fail(f"{path}: {err}")
    except OSError as err:
        return _fail(f"cannot write {path}: {err.strerror}")
    print(f"{'added' if new else 'updated'} {args.name} ({args.role}) in {path}")
    return 0
