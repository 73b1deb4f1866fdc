"""The dashboard's users: a file of names, roles and scrypt password hashes.

One user a line, fields separated by white space, ``#`` starts a comment::

    # NAME          ROLE              PASSWORD HASH                          [CLINICIAN ID]
    dana            program_manager   scrypt$16384$8$1$<salt b64>$<key b64>
    sam             clinician         scrypt$16384$8$1$...$...              clin-7

The clinician id is the responder id the encounters carry (``encounters.clinician``); a
clinician sees their own encounters only. ``corespond users add`` writes the lines. Hashes are
:func:`hashlib.scrypt` (stdlib), compared in constant time; a user who does not exist costs
the same hash as one who does, so timing does not tell which names exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from corespond.daemon.errors import SafeMessage

ROLES = ("program_manager", "clinician", "admin")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
CLINICIAN_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
SCHEME = "scrypt"
# scrypt cost: about 16 MiB and tens of milliseconds per hash (OWASP's minimum is N=2^17 r=8
# p=1 for a login hash at 128 MiB; 2^14 keeps a login cheap on a 2-core host). The parameters
# are stored with each hash, so raising them later leaves old hashes valid.
N, R, P = 2**14, 8, 1
SALT_BYTES = 16
KEY_BYTES = 32
MAX_PASSWORD_BYTES = 1024
MIN_PASSWORD_CHARS = 12
MAX_FILE_BYTES = 1_048_576


class UsersFileError(SafeMessage, Exception):
    """A users file that cannot be read; the message names the line, never its content."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: str
    password_hash: str
    clinician: str | None = None

    def line(self) -> str:
        fields = [self.name, self.role, self.password_hash]
        if self.clinician is not None:
            fields.append(self.clinician)
        return " ".join(fields)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, salt: bytes | None = None) -> str:
    raw = password.encode("utf-8")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise ValueError(f"a password is at most {MAX_PASSWORD_BYTES} bytes")
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    key = hashlib.scrypt(raw, salt=salt, n=N, r=R, p=P, dklen=KEY_BYTES)
    return f"{SCHEME}${N}${R}${P}${_b64(salt)}${_b64(key)}"


def _parse_hash(text: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except ValueError:
        return None
    # Bounds that keep a hostile file from making a login cost gigabytes or hours.
    if not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        return None
    if n * r * 128 > 256 * 1024 * 1024 or not (8 <= len(salt) <= 64) or len(key) != KEY_BYTES:
        return None
    return n, r, p, salt, key


# Verified against when the user does not exist (or has an unusable hash): same cost.
_DUMMY = hash_password("corespond-no-such-user", b"\0" * SALT_BYTES)


def verify_password(password: str, password_hash: str) -> bool:
    raw = password.encode("utf-8")
    parsed = _parse_hash(password_hash)
    usable = parsed is not None and len(raw) <= MAX_PASSWORD_BYTES
    n, r, p, salt, key = parsed if parsed is not None else _parse_hash(_DUMMY)  # type: ignore[misc]
    got = hashlib.scrypt(raw[:MAX_PASSWORD_BYTES], salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES)
    return hmac.compare_digest(got, key) and usable


def parse_users(text: str) -> dict[str, User]:
    """The users of a file's text; :class:`UsersFileError` naming the first bad line."""
    users: dict[str, User] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        fields = content.split()
        where = f"line {number}"
        if len(fields) not in (3, 4):
            raise UsersFileError(
                f"{where}: expected NAME ROLE HASH [CLINICIAN], found {len(fields)} fields"
            )
        name, role, password_hash = fields[:3]
        if NAME_PATTERN.fullmatch(name) is None:
            raise UsersFileError(f"{where}: a name is 1-64 of A-Z a-z 0-9 . _ @ -")
        if role not in ROLES:
            raise UsersFileError(f"{where}: the role must be one of {', '.join(ROLES)}")
        if _parse_hash(password_hash) is None:
            raise UsersFileError(f"{where}: the password hash is not a {SCHEME} hash we accept")
        clinician = fields[3] if len(fields) == 4 else None
        if clinician is not None and CLINICIAN_PATTERN.fullmatch(clinician) is None:
            raise UsersFileError(f"{where}: a clinician id is 1-64 of A-Z a-z 0-9 . _ : -")
        if clinician is None and role == "clinician":
            raise UsersFileError(f"{where}: a clinician needs their clinician id (4th field)")
        if name in users:
            raise UsersFileError(f"{where}: a second line for the same name")
        users[name] = User(name, role, password_hash, clinician)
    return users


def read_users(path: Path) -> dict[str, User]:
    """The users in ``path`` (blocking: call it from a thread)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise UsersFileError(f"no users file at {path}") from None
    except OSError as err:
        raise UsersFileError(f"cannot read the users file {path}: {err.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise UsersFileError(f"the users file {path} is over {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsersFileError(f"{path}: not UTF-8 (byte {err.start})") from None
    try:
        return parse_users(text)
    except UsersFileError as err:
        raise UsersFileError(f"{path}: {err}") from None


def add_user(path: Path, user: User) -> bool:
    """Add ``user`` to ``path`` or replace their line; True if they were new. The file is
    replaced atomically, mode 0600; comments and other lines stay as they were."""
    lines: list[str] = []
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        parse_users("\n".join(lines))  # refuse to build on a broken file
    new = True
    out = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if fields and fields[0] == user.name:
            out.append(user.line())
            new = False
        else:
            out.append(line)
    if new:
        if not lines:
            out.append("# corespond dashboard users: NAME ROLE HASH [CLINICIAN ID]")
        out.append(user.line())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(out) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return new


__all__ = [
    "MIN_PASSWORD_CHARS",
    "ROLES",
    "User",
    "UsersFileError",
    "add_user",
    "hash_password",
    "parse_users",
    "read_users",
    "verify_password",
]
