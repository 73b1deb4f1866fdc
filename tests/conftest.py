"""Root test configuration: a real PostgreSQL server for the session, and store fixtures.

The server is started from the PostgreSQL binaries on this machine (Debian package
``postgresql``) in a temporary directory, on 127.0.0.1 and a free port, with fsync off. Without
the binaries the session fails, unless CORESPOND_TEST_SKIP_POSTGRES=1 (then the PostgreSQL
variants of the store tests are skipped).

Fixtures:

- ``backend``: "sqlite" or "postgresql" (the PostgreSQL one is marked ``postgres``);
- ``db_url``: the URL of an empty database on that backend, fresh per test;
- ``engine``: an engine on a fresh database already at the head schema revision.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

SKIP_POSTGRES = os.environ.get("CORESPOND_TEST_SKIP_POSTGRES") == "1"
_TEMPLATE = "corespond_head"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    _names: Iterator[int]

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def admin(self) -> Engine:
        from sqlalchemy import create_engine

        return create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")

    def create_database(self, template: str = "template0") -> str:
        name = f"test_{os.getpid()}_{next(self._names)}"
        engine = self.admin()
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
        finally:
            engine.dispose()
        return name

    def drop_database(self, name: str) -> None:
        engine = self.admin()
        try:
            with engine.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            engine.dispose()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if SKIP_POSTGRES:
        pytest.skip("CORESPOND_TEST_SKIP_POSTGRES=1")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
            "/usr/lib/postgresql/*/bin: install the Debian package `postgresql`, or set "
            "CORESPOND_TEST_SKIP_POSTGRES=1 to skip the PostgreSQL tests",
            pytrace=False,
        )
    root = Path(tempfile.mkdtemp(prefix="corespond-pg-"))
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root.
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    data, log = root / "data", root / "server.log"
    port = _free_port()
    env = dict(os.environ, LC_ALL="C", HOME=str(root))

    def run(*args: str) -> None:
        done = subprocess.run(args, capture_output=True, text=True, env=env, **run_as)
        if done.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed:\n{done.stdout}\n{done.stderr}\n{tail}")

    run(initdb, "-D", str(data), "-U", "corespond", "--auth=trust", "-E", "UTF8",
        "--no-sync")  # fmt: skip
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=60"
    )
    run(pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    server = PostgresServer("127.0.0.1", port, "corespond", itertools.count(1))
    try:
        from corespond.daemon.store import migrate

        # A database at the head revision, copied for every test (much faster than migrating).
        engine = server.admin()
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{_TEMPLATE}" TEMPLATE template0'))
        engine.dispose()
        migrate.upgrade(server.url(_TEMPLATE))
        yield server
    finally:
        run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from corespond.daemon.store import migrate

    path = tmp_path_factory.mktemp("sqlite-template") / "head.db"
    migrate.upgrade(f"sqlite:///{path}")  # disposing the engine checkpoints the WAL
    return path


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database()
    yield server.url(name)
    server.drop_database(name)


@pytest.fixture
def engine(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a fresh database at the head schema revision."""
    from corespond.daemon.store.engine import create_store_engine

    if backend == "sqlite":
        path = tmp_path / "store.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        eng = create_store_engine(f"sqlite:///{path}")
        yield eng
        eng.dispose()
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database(template=_TEMPLATE)
    eng = create_store_engine(server.url(name))
    yield eng
    eng.dispose()
    server.drop_database(name)
