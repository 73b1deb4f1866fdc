"""Pseudonymous persons: encounters of one person linked without raw identifiers in reports.

A recorded identifier (name and date of birth, a local MRN, a CAD person id) is normalized and
turned into a keyed blind index, HMAC-SHA256 under a secret key read from a file
(``outcomes.person_key_file``). Equal identifiers give equal indexes, so a second encounter
finds the person of the first; without the key nobody can test a guess against the index. The
raw identifier is kept only in the protected column ``person_identifiers.value`` (so the index
can be rebuilt under a new key); encounters and every report see only ``persons.id``.

Matching is exact on the normalized form (case, accents, punctuation, spacing and name order do
not matter). When identifiers of one encounter point at different persons, the strongest kind
wins (MRN, then CAD person id, then name and date of birth) and nothing is merged: merging
people is a decision for a person, not for this code.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError

from corespond.daemon.errors import SafeMessage
from corespond.daemon.store.tables import person_identifiers, persons

# Strongest first: the order in which a conflict is settled.
KINDS = ("mrn", "cad_person", "name_dob")
PSEUDONYM_BYTES = 8
MAX_IDENTIFIER_CHARS = 200


class IdentifierInvalid(SafeMessage, ValueError):
    """An identifier that cannot be used; the message names the field, never the value."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class PersonLink:
    person_id: int
    pseudonym: str
    created: bool
    conflicts: int  # identifiers that pointed at another person (left unlinked)


def normalized_name(name: str) -> str:
    """Lowercase letters of each name part, accents removed, parts sorted (order-free)."""
    decomposed = unicodedata.normalize("NFKD", name)
    letters = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    parts = re.findall(r"[^\W\d_]+", letters)
    return " ".join(sorted(parts))


def normalized_code(code: str) -> str:
    """An MRN or CAD person id: uppercase, without spaces, hyphens, dots or slashes."""
    return re.sub(r"[\s\-./]", "", unicodedata.normalize("NFKC", code)).upper()


def identifiers_of(raw: Mapping[str, object], where: str = "person") -> dict[str, str]:
    """The normalized identifiers (by kind) of a ``person`` object from a form or the API:
    ``name`` with ``dob`` (YYYY-MM-DD), ``mrn``, ``cad_person_id``; any may be absent."""
    unknown = set(raw) - {"name", "dob", "mrn", "cad_person_id"}
    if unknown:
        raise IdentifierInvalid(f"{where}.{sorted(unknown)[0]}", "is not a person identifier")
    for key, value in raw.items():
        if value is not None and not isinstance(value, str):
            raise IdentifierInvalid(f"{where}.{key}", "must be a string")
        if isinstance(value, str) and len(value) > MAX_IDENTIFIER_CHARS:
            raise IdentifierInvalid(f"{where}.{key}", f"is longer than {MAX_IDENTIFIER_CHARS}")
    out: dict[str, str] = {}
    name, dob = raw.get("name"), raw.get("dob")
    if (name is None) != (dob is None):
        missing = "dob" if dob is None else "name"
        raise IdentifierInvalid(f"{where}.{missing}", "name and dob are matched together")
    if isinstance(name, str) and isinstance(dob, str):
        parts = normalized_name(name)
        if not parts:
            raise IdentifierInvalid(f"{where}.name", "holds no letters")
        try:
            born = date.fromisoformat(dob)
        except ValueError:
            raise IdentifierInvalid(f"{where}.dob", "must be a date YYYY-MM-DD") from None
        if len(dob) != 10 or born.year < 1880:
            raise IdentifierInvalid(f"{where}.dob", "must be a date YYYY-MM-DD")
        out["name_dob"] = f"{parts}|{born.isoformat()}"
    for key, kind in (("mrn", "mrn"), ("cad_person_id", "cad_person")):
        value = raw.get(key)
        if isinstance(value, str):
            code = normalized_code(value)
            if not code:
                raise IdentifierInvalid(f"{where}.{key}", "is empty")
            out[kind] = code
    return out


def blind_index(key: bytes, kind: str, normalized: str) -> str:
    """HMAC-SHA256 of the kind and normalized identifier, hex."""
    message = f"{kind}\x1f{normalized}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A short fingerprint naming the key an index was made with (for key rotation)."""
    return hashlib.sha256(b"corespond-person-key\x00" + key).hexdigest()[:16]


def link_person(
    conn: Connection, key: bytes, identifiers: Mapping[str, str], now: datetime
) -> PersonLink | None:
    """The person these normalized identifiers belong to, created if none; None when there is
    no identifier. Identifiers not yet known are added to that person."""
    if not identifiers:
        return None
    indexes = {kind: blind_index(key, kind, value) for kind, value in identifiers.items()}
    for attempt in range(2):
        found = _owners(conn, indexes)
        owner = next((found[kind] for kind in KINDS if kind in found), None)
        created = owner is None
        try:
            with conn.begin_nested():
                if owner is None:
                    pseudonym = secrets.token_hex(PSEUDONYM_BYTES)
                    owner = conn.execute(
                        insert(persons)
                        .values(pseudonym=pseudonym, created_at=now)
                        .returning(persons.c.id)
                    ).scalar_one()
                new = [kind for kind in indexes if kind not in found]
                if new:
                    conn.execute(
                        insert(person_identifiers),
                        [
                            {
                                "person_id": owner,
                                "kind": kind,
                                "blind_index": indexes[kind],
                                "key_id": key_id(key),
                                "value": identifiers[kind],
                                "created_at": now,
                            }
                            for kind in new
                        ],
                    )
        except IntegrityError:
            # Another transaction recorded one of these identifiers first: look again.
            if attempt:
                raise
            continue
        conflicts = sum(1 for person in found.values() if person != owner)
        pseudonym = conn.execute(
            select(persons.c.pseudonym).where(persons.c.id == owner)
        ).scalar_one()
        return PersonLink(owner, pseudonym, created, conflicts)
    raise AssertionError("unreachable")


def _owners(conn: Connection, indexes: Mapping[str, str]) -> dict[str, int]:
    rows = conn.execute(
        select(person_identifiers.c.kind, person_identifiers.c.person_id).where(
            person_identifiers.c.blind_index.in_(list(indexes.values()))
        )
    ).all()
    return {kind: person for kind, person in rows if kind in indexes}
