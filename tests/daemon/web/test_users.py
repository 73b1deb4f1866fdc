"""The dashboard's users file: scrypt hashes, the parser (fuzzed), and ``corespond users add``."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corespond.daemon.web.users import (
    User,
    UsersFileError,
    add_user,
    hash_password,
    parse_users,
    read_users,
    verify_password,
)

HASH = hash_password("synthetic-password-1", b"s" * 16)


def test_hashes_verify_and_differ_by_salt() -> None:
    assert verify_password("synthetic-password-1", HASH)
    assert not verify_password("synthetic-password-2", HASH)
    assert not verify_password("synthetic-password-1", "")  # unusable hash: never a match
    assert not verify_password("synthetic-password-1", "plain-text")
    other = hash_password("synthetic-password-1")
    assert other != HASH and verify_password("synthetic-password-1", other)
    assert HASH.startswith("scrypt$16384$8$1$")


def test_a_file_with_every_kind_of_line() -> None:
    users = parse_users(
        f"# comment\n\ndana program_manager {HASH}  # trailing comment\n"
        f"sam clinician {HASH} clin-7\nroot admin {HASH}\n"
    )
    assert users["sam"] == User("sam", "clinician", HASH, "clin-7")
    assert [u.role for u in users.values()] == ["program_manager", "clinician", "admin"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dana program_manager", "line 1: expected NAME ROLE HASH [CLINICIAN], found 2 fields"),
        (f"dana boss {HASH}", "line 1: the role must be one of program_manager, clinician, admin"),
        ("dana admin md5$abc", "line 1: the password hash is not a scrypt hash we accept"),
        ("dana admin scrypt$1048576$64$1$c2FsdHNhbHQ=$" + "A" * 44,
         "line 1: the password hash is not a scrypt hash we accept"),
        (f"sam clinician {HASH}", "line 1: a clinician needs their clinician id (4th field)"),
        (f"-x admin {HASH}", "line 1: a name is 1-64 of A-Z a-z 0-9 . _ @ -"),
        (f"a admin {HASH}\na admin {HASH}", "line 2: a second line for the same name"),
    ],
)  # fmt: skip
def test_bad_lines_are_named_without_quoting_them(text: str, message: str) -> None:
    with pytest.raises(UsersFileError) as caught:
        parse_users(text)
    assert str(caught.value) == message


PARSER_MESSAGE = re.compile(
    r"line \d+: (?:expected NAME ROLE HASH \[CLINICIAN\], found \d+ fields"
    r"|a name is 1-64 of A-Z a-z 0-9 \. _ @ -"
    r"|the role must be one of [a-z_, ]+"
    r"|the password hash is not a [a-z0-9]+ hash we accept"
    r"|a clinician id is 1-64 of A-Z a-z 0-9 \. _ : -"
    r"|a clinician needs their clinician id \(4th field\)"
    r"|a second line for the same name)"
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_the_parser_never_fails_otherwise_nor_quotes_the_file(text: str) -> None:
    try:
        users = parse_users(text)
    except UsersFileError as err:
        # Every message is one of the parser's fixed sentences with a line number: nothing of
        # the file's text can reach it (a word-by-word check fails on a file that happens to
        # contain "must" or "found").
        assert PARSER_MESSAGE.fullmatch(str(err)), str(err)
        return
    for user in users.values():
        assert user.role in ("program_manager", "clinician", "admin")


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["dana", "sam", "root", "x.y@z"]),
            st.sampled_from(["program_manager", "clinician", "admin", "nobody"]),
            st.sampled_from([HASH, "scrypt$16384$8$1$$", "x"]),
            st.sampled_from(["", " clin-1", " #c", " a b"]),
        ),
        max_size=6,
    )
)
def test_structured_garbage_is_refused_precisely(rows: list[tuple[str, str, str, str]]) -> None:
    text = "\n".join(f"{n} {r} {h}{c}" for n, r, h, c in rows)
    try:
        parse_users(text)
    except UsersFileError as err:
        assert str(err).startswith("line ")
        assert HASH not in str(err)


def test_read_users_errors(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="no users file at"):
        read_users(tmp_path / "missing")
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(UsersFileError, match="not UTF-8"):
        read_users(tmp_path / "bin")


def test_add_user_keeps_other_lines_and_replaces_the_same_name(tmp_path: Path) -> None:
    path = tmp_path / "users"
    assert add_user(path, User("dana", "admin", HASH))
    path.write_text(path.read_text() + "# keep me\n")
    assert add_user(path, User("sam", "clinician", HASH, "clin-1"))
    assert not add_user(path, User("dana", "program_manager", HASH))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "# keep me" in path.read_text()
    users = read_users(path)
    assert [(u.name, u.role) for u in users.values()] == [
        ("dana", "program_manager"),
        ("sam", "clinician"),
    ]


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corespond.daemon.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=60,
        env={**os.environ, "CORESPOND_CONFIG": "/nonexistent/corespond.yaml"},
    )  # fmt: skip


def test_users_add_command(tmp_path: Path) -> None:
    path = tmp_path / "users"
    done = _cli("users", "add", "dana", "--role", "program_manager", "--file", str(path),
                "--password-stdin", stdin="synthetic-password-9\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "synthetic-password-9" not in path.read_text() + done.stdout + done.stderr
    assert verify_password("synthetic-password-9", read_users(path)["dana"].password_hash)
    short = _cli("users", "add", "sam", "--role", "clinician", "--clinician", "c1",
                 "--file", str(path), "--password-stdin", stdin="short\n")  # fmt: skip
    assert short.returncode == 1 and "at least 12 characters" in short.stderr
    no_id = _cli("users", "add", "sam", "--role", "clinician", "--file", str(path),
                 "--password-stdin", stdin="synthetic-password-9\n")  # fmt: skip
    assert no_id.returncode == 2 and "--clinician" in no_id.stderr
    assert list(read_users(path)) == ["dana"]
