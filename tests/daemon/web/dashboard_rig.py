"""A dashboard served over loopback by a real reactor in a thread, with its own thread pool, a
real store, a users file, and a fake clock for sessions; a tiny cookie-keeping HTTP client."""

from __future__ import annotations

import http.client
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlalchemy import Engine
from twisted.internet import task
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from corespond.daemon.clock import Clock
from corespond.daemon.config import OutcomesConfig
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.synthetic_encounters import seed_encounters
from corespond.daemon.web.dashboard import Dashboard
from corespond.daemon.web.sessions import session_count
from corespond.daemon.web.site import WebSite
from corespond.daemon.web.users import User, add_user, hash_password
from tests.browser import ServedReactor

NOW = 1_794_994_200.0  # 2026-11-18T09:30:00Z
TODAY = date(2026, 11, 18)
PASSWORDS = {
    "dana": "dana-synthetic-pass-1",
    "root": "root-synthetic-pass-1",
    "sam": "sam-synthetic-pass-1",
    "noone": "noone-synthetic-pass",
}
OUTCOMES = OutcomesConfig(suppress_below=11)


def write_users(path: Path) -> Path:
    add_user(path, User("dana", "program_manager", hash_password(PASSWORDS["dana"])))
    add_user(path, User("root", "admin", hash_password(PASSWORDS["root"])))
    add_user(path, User("sam", "clinician", hash_password(PASSWORDS["sam"]), "clin-07"))
    return path


def seeded_engine(template: Path, tmp_path: Path, count: int = 3000) -> Engine:
    path = tmp_path / "store.db"
    shutil.copyfile(template, path)
    engine = create_store_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        seed_encounters(conn, count, date(2026, 5, 1), TODAY, seed=3)
    return engine


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def cookies(self) -> list[str]:
        return [v for k, v in self.headers if k.lower() == "set-cookie"]

    @property
    def text(self) -> str:
        return self.body.decode()


@dataclass
class Client:
    port: int
    jar: dict[str, str] = field(default_factory=dict)

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None, **headers: str
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        body = None
        hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
        if form is not None:
            body = urlencode(form).encode()
            hdrs.setdefault("content-type", "application/x-www-form-urlencoded")
        if self.jar:
            hdrs["cookie"] = "; ".join(f"{k}={v}" for k, v in self.jar.items())
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            reply = Reply(resp.status, resp.getheaders(), resp.read())
        finally:
            conn.close()
        for cookie in reply.cookies():
            name, _, rest = cookie.partition("=")
            value = rest.split(";", 1)[0]
            if "max-age=0" in cookie.lower() or not value:
                self.jar.pop(name, None)
            else:
                self.jar[name] = value
        return reply

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, form: dict[str, str]) -> Reply:
        return self.request("POST", path, form)

    def login(self, name: str, password: str | None = None) -> Reply:
        page = self.get("/dashboard/login")
        assert page.status == 200, page.status
        return self.post(
            "/dashboard/login",
            {"csrf": csrf_of(page.text), "name": name, "password": password or PASSWORDS[name]},
        )


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def cards(html: str) -> dict[str, str]:
    """The headline cards' raw values by metric key."""
    return dict(re.findall(r'data-metric="([a-z0-9_]+)" data-value="([^"]*)"', html))


@dataclass
class DashRig:
    served: ServedReactor
    dashboard: Dashboard
    port: int
    fake_time: task.Clock
    ran: list[str]  # what ran in the thread pool, by function name

    def client(self) -> Client:
        return Client(self.port)

    def sessions(self) -> int:
        """How many session rows the database holds."""
        with self.dashboard.engine.connect() as conn:
            return session_count(conn)

    def advance(self, seconds: float) -> None:
        self.served.call(self.fake_time.advance, seconds)


@pytest.fixture
def dash_rig(served: ServedReactor, sqlite_template: Path, tmp_path: Path) -> Iterator[DashRig]:
    engine = seeded_engine(sqlite_template, tmp_path)
    pool = ThreadPool(minthreads=1, maxthreads=2, name="dashboard-test")
    pool.start()
    fake_time = task.Clock()
    fake_time.advance(NOW)

    ran: list[str] = []

    def in_thread(fn: Any, *args: Any) -> Any:
        ran.append(fn.__name__)
        return deferToThreadPool(served.reactor, pool, fn, *args)

    dashboard = Dashboard(
        engine=engine,
        users_file=write_users(tmp_path / "users"),
        outcomes=OUTCOMES,
        in_thread=in_thread,
        clock=Clock(fake_time),
    )
    site = WebSite(reactor=served.reactor)
    site.mount("/dashboard", dashboard)
    port = served.listen(site)
    try:
        yield DashRig(served, dashboard, port, fake_time, ran)
    finally:
        pool.stop()
        engine.dispose()
