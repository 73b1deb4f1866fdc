"""The dashboard over loopback: sign-in, roles, sessions on the injected clock, CSRF, the login
throttle, CSV downloads, and figures equal to the outcome report's."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from corespond.daemon.outcomes import ALL, Value, outcome_report, report_json
from corespond.daemon.store.tables import encounters
from corespond.daemon.synthetic_encounters import seed_encounters
from corespond.daemon.web.dashboard import (
    CACHE_SECONDS,
    CHARTS,
    DEFAULT_DAYS,
    DEMOGRAPHICS,
    PAGE_CSP,
    TREND,
    PeriodError,
    clinician_counts,
    load_dashboard,
    parse_period,
    report_request,
    response_bins,
)
from corespond.daemon.web.sessions import ABSOLUTE_SECONDS, IDLE_SECONDS, LOCKOUT_SECONDS
from tests.browser import served
from tests.daemon.web.dashboard_rig import (
    OUTCOMES,
    PASSWORDS,
    TODAY,
    DashRig,
    cards,
    csrf_of,
    dash_rig,
)

__all__ = ["dash_rig", "served"]  # the fixtures, imported for pytest


def _expected_cards(rig: DashRig, start: date, end: date) -> dict[str, str]:
    with rig.dashboard.engine.connect() as conn:
        report = outcome_report(conn, report_request(OUTCOMES, start, end))
    out = {}
    for metric in report.metrics:
        v = metric.values[ALL]
        out[metric.key] = "suppressed" if v.suppressed else repr(v.value)
    return out


def test_nothing_without_signing_in(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    r = c.get("/dashboard/")
    assert (r.status, r.header("location")) == (303, "/dashboard/login")
    assert c.get("/dashboard").header("location") == "/dashboard/"
    assert c.get("/dashboard/csv/headline.csv").status == 401
    # A made-up session id is nobody.
    c.jar["corespond_session"] = "x" * 43
    assert c.get("/dashboard/").status == 303
    assert c.get("/dashboard/nothing").status == 404


def test_a_program_manager_signs_in_and_sees_the_reports_figures(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    page = c.get("/dashboard/login")
    assert page.status == 200 and page.header("content-security-policy") == PAGE_CSP
    login_cookie = next(x for x in page.cookies() if x.startswith("corespond_login="))
    assert "Secure" in login_cookie and "HttpOnly" in login_cookie
    r = c.post(
        "/dashboard/login",
        {"csrf": csrf_of(page.text), "name": "dana", "password": PASSWORDS["dana"]},
    )
    assert (r.status, r.header("location")) == (303, "/dashboard/")
    [session_cookie] = [x for x in r.cookies() if x.startswith("corespond_session=")]
    attributes = {a.strip().lower() for a in session_cookie.split(";")[1:]}
    assert {"secure", "httponly", "samesite=strict", "path=/dashboard"} <= attributes
    assert len(session_cookie.split(";")[0].split("=", 1)[1]) >= 43  # 32 random bytes
    page = c.get("/dashboard/")
    assert page.status == 200
    assert page.header("content-security-policy") == PAGE_CSP
    assert page.header("cache-control") == "no-store"
    assert "<script" not in page.text and " style=" not in page.text
    start = TODAY - timedelta(days=DEFAULT_DAYS - 1)
    assert f'name="from" value="{start.isoformat()}"' in page.text
    shown = cards(page.text)
    expected = _expected_cards(dash_rig, start, TODAY)
    assert len(shown) == 14
    assert shown == {k: expected[k] for k in shown}
    assert shown["bh_encounters"] not in ("", "suppressed", "0")
    for chart in CHARTS:
        assert f"/dashboard/csv/{chart}.csv?from={start.isoformat()}" in page.text
    # Another period.
    page = c.get("/dashboard/?from=2026-06-01&to=2026-07-31")
    assert (
        cards(page.text)["bh_encounters"]
        == _expected_cards(dash_rig, date(2026, 6, 1), date(2026, 7, 31))["bh_encounters"]
    )
    bad = c.get("/dashboard/?from=2026-07-31&to=2026-06-01")
    assert bad.status == 400 and "the period ends before it starts" in bad.text
    assert c.get("/dashboard/?from=yesterday").status == 400


def test_an_admin_sees_the_same_as_a_program_manager(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    assert c.login("root").status == 303
    assert len(cards(c.get("/dashboard/").text)) == 14
    assert c.get("/dashboard/csv/areas.csv").status == 200


def test_a_clinician_sees_only_their_own_encounters(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    assert c.login("sam").status == 303
    page = c.get("/dashboard/")
    assert page.status == 200
    assert cards(page.text) == {}  # no program-wide figure
    assert "data-chart" not in page.text and "/csv/" not in page.text
    assert "Your encounters" in page.text
    start = TODAY - timedelta(days=DEFAULT_DAYS - 1)
    req = report_request(OUTCOMES, start, TODAY)
    own = clinician_counts(dash_rig.dashboard.engine, req, "clin-07")
    assert sum(own.values()) > 0
    shown = dict(re.findall(r'data-status="([a-z_]+)">(\d+)<', page.text))
    assert shown == {status: str(n) for status, n in own.items()}
    for chart in CHARTS:
        assert c.get(f"/dashboard/csv/{chart}.csv").status == 403


def test_wrong_passwords_and_unknown_names_are_refused_alike(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    wrong = c.login("dana", "not-the-password")
    unknown = c.login("nobody", "not-the-password")
    assert wrong.status == unknown.status == 401
    assert "Wrong name or password." in wrong.text and "Wrong name or password." in unknown.text
    assert "corespond_session" not in c.jar


def test_login_needs_the_forms_csrf_token(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    c.get("/dashboard/login")
    form = {"name": "dana", "password": PASSWORDS["dana"]}
    assert c.post("/dashboard/login", form).status == 403
    assert c.post("/dashboard/login", {**form, "csrf": "forged"}).status == 403
    # The right token without its cookie (another site's form) is refused too.
    page = c.get("/dashboard/login")
    token = csrf_of(page.text)
    c.jar.pop("corespond_login")
    assert c.post("/dashboard/login", {**form, "csrf": token}).status == 403
    assert "corespond_session" not in c.jar


def test_logout_needs_the_csrf_token_and_ends_the_session(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    c.login("dana")
    page = c.get("/dashboard/")
    assert c.post("/dashboard/logout", {"csrf": "forged"}).status == 403
    assert c.get("/dashboard/").status == 200  # still signed in
    session_id = c.jar["corespond_session"]
    r = c.post("/dashboard/logout", {"csrf": csrf_of(page.text)})
    assert (r.status, r.header("location")) == (303, "/dashboard/login")
    c.jar["corespond_session"] = session_id  # a copy of the old cookie is worth nothing
    assert c.get("/dashboard/").status == 303
    assert dash_rig.sessions() == 0


def test_sessions_expire_when_idle_and_after_the_absolute_limit(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    c.login("dana")
    dash_rig.advance(IDLE_SECONDS - 1)
    assert c.get("/dashboard/csv/headline.csv").status == 200  # renews the idle time
    dash_rig.advance(IDLE_SECONDS - 1)
    assert c.get("/dashboard/csv/headline.csv").status == 200
    dash_rig.advance(IDLE_SECONDS)
    assert c.get("/dashboard/csv/headline.csv").status == 401
    c.login("dana")
    for _ in range(math.ceil(ABSOLUTE_SECONDS / (IDLE_SECONDS - 60))):
        assert c.get("/dashboard/csv/headline.csv").status == 200
        dash_rig.advance(IDLE_SECONDS - 60)
    assert c.get("/dashboard/csv/headline.csv").status == 401


def test_five_failures_lock_the_name_for_ten_minutes(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    for _ in range(5):
        assert c.login("dana", "guess-guess-guess").status == 401
    locked = c.login("dana")  # even the right password
    assert locked.status == 429 and "Too many failed sign-ins" in locked.text
    assert c.login("root").status == 303  # other names are not locked
    dash_rig.advance(LOCKOUT_SECONDS)
    assert dash_rig.client().login("dana").status == 303
    # Names that do not exist are locked the same way.
    c = dash_rig.client()
    for _ in range(5):
        c.login("ghost", "guess-guess-guess")
    assert c.login("ghost", "guess-guess-guess").status == 429


def test_every_chart_downloads_as_csv(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    c.login("dana")
    start, end = date(2026, 5, 1), TODAY
    with dash_rig.dashboard.engine.connect() as conn:
        report = outcome_report(conn, report_request(OUTCOMES, start, end))
    for chart in CHARTS:
        r = c.get(f"/dashboard/csv/{chart}.csv?from={start}&to={end}")
        assert r.status == 200, chart
        assert r.header("content-type") == "text/csv; charset=utf-8"
        assert r.header("content-disposition") == (
            f'attachment; filename="corespond-{chart}-{start}-{end}.csv"'
        )
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert rows and {row["chart"] for row in rows} == {chart}
        if chart == "headline":
            by_key = {row["series"]: row for row in rows}
            v = report.metric("arrest_avoidance").values[ALL]
            assert float(by_key["arrest_avoidance"]["value"]) == pytest.approx(v.value)
            assert int(by_key["arrest_avoidance"]["numerator"]) == v.numerator
        if chart == "areas":
            zones = report.areas[0].values
            assert {row["group"] for row in rows} == set(zones)
            for row in rows:
                v = zones[row["group"]]
                assert row["value"] == ("" if v.suppressed else str(v.value))
    assert c.get("/dashboard/csv/secrets.csv").status == 404
    assert c.get("/dashboard/csv/headline.csv?to=x").status == 400


def test_a_periods_figures_are_computed_once_for_the_page_and_its_csvs(dash_rig: DashRig) -> None:
    c = dash_rig.client()
    c.login("dana")
    assert c.get("/dashboard/").status == 200
    for chart in CHARTS:
        assert c.get(f"/dashboard/csv/{chart}.csv").status == 200
    assert dash_rig.ran.count("load_dashboard") == 1
    assert c.get("/dashboard/?from=2026-06-01").status == 200  # another period
    assert dash_rig.ran.count("load_dashboard") == 2
    dash_rig.advance(CACHE_SECONDS)
    assert c.get("/dashboard/csv/trend.csv").status == 200
    assert dash_rig.ran.count("load_dashboard") == 3


def test_response_bins_are_suppressed_like_report_cells() -> None:
    histogram = [(30, 40), (9 * 60 + 59, 1), (12 * 60, 5), (25 * 60, 11), (200 * 60, 3)]
    bins = dict(response_bins(histogram, 11))
    assert bins["0-10 min"] == Value(41)
    assert bins["10-20 min"] == Value(5, suppressed=True)
    assert bins["20-30 min"] == Value(11)
    assert bins["30-45 min"] == Value(0)  # zero is shown: it identifies nobody
    assert bins["90+ min"] == Value(3, suppressed=True)
    assert sum(v.value or 0 for v in bins.values()) == 60


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 50)), max_size=30))
def test_response_bins_count_everything_once(histogram: list[tuple[int, int]]) -> None:
    bins = response_bins(histogram, 11)
    assert sum(int(v.value or 0) for _, v in bins) == sum(n for _, n in histogram)
    assert all(v.suppressed == (0 < int(v.value or 0) < 11) for _, v in bins)


def test_the_daemon_mounts_the_dashboard_when_users_are_configured(tmp_path: Path) -> None:
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from corespond.daemon.app import Corespond
    from corespond.daemon.config import load_config
    from tests.adapters.test_http_feed import parse_response as parse
    from tests.daemon.web.desks import DictDesks
    from tests.daemon.web.rig import PEER
    from tests.daemon.web.test_site import daemon_config

    def started(config: Path) -> Any:
        desks = DictDesks()
        app = Corespond(load_config(config), MemoryReactorClock(), page_desk=desks,
                        clinician_desk=desks)  # fmt: skip
        app._start_web()
        return app

    config = daemon_config(tmp_path)
    app = started(config)
    try:
        assert b"dashboard" not in app.web_site.resource.children  # no users_file: none
    finally:
        app.engine.dispose()
    config.write_text(config.read_text() + "  users_file: users\n")
    app = started(config)
    try:
        proto = app.web_site.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        proto.makeConnection(transport)
        proto.dataReceived(b"GET /dashboard/login HTTP/1.1\r\nHost: x\r\n\r\n")
        got = parse(transport.value())
        assert got.status == 200 and b"Sign in" in got.body
        assert got.headers[b"content-security-policy"] == PAGE_CSP.encode()
    finally:
        app.engine.dispose()


def test_the_queries_on_both_backends(engine: Engine) -> None:
    """What the page loads is the report's, and a clinician's counts are their encounters'."""
    with engine.begin() as conn:
        seed_encounters(conn, 1200, date(2026, 1, 1), date(2026, 6, 30), seed=4)
    req = report_request(OUTCOMES, date(2026, 2, 1), date(2026, 5, 31))
    data = load_dashboard(engine, req)
    with engine.connect() as conn:
        assert report_json(data.overall) == report_json(outcome_report(conn, req))
        # Every figure shown by group is the full `--by` report's.
        by_month = outcome_report(conn, replace(req, by="month"))
        assert data.monthly.groups == by_month.groups
        for key in TREND:
            assert data.monthly.metric(key) == by_month.metric(key)
        for by, _ in DEMOGRAPHICS:
            full = outcome_report(conn, replace(req, by=by))
            assert data.demographics[by].groups == full.groups
            assert data.demographics[by].metric("bh_encounters") == full.metric("bh_encounters")
        rows = conn.execute(
            select(encounters.c.clinician, encounters.c.status, encounters.c.call_received_at)
        ).all()
    assert data.monthly.groups == ["2026-02", "2026-03", "2026-04", "2026-05"]
    assert set(data.demographics) == {"race", "gender", "age"}
    assert sum(n for _, n in data.response_histogram) == sum(
        v.value or 0 for _, v in response_bins(data.response_histogram, 1_000_000)
    )
    expected: dict[str, int] = {}
    for clinician, status, received in rows:
        if clinician == "clin-07" and req.since <= received < req.until:
            expected[status] = expected.get(status, 0) + 1
    assert sum(expected.values()) > 0
    assert clinician_counts(engine, req, "clin-07") == expected
    assert clinician_counts(engine, req, "nobody") == {}


def _iso(d: date) -> bytes:
    return d.isoformat().encode()


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([b"from", b"to", b"x"]),
        st.lists(st.one_of(st.binary(max_size=12), st.dates().map(_iso)), max_size=2),
    )
)  # fmt: skip
def test_the_period_parser_accepts_a_period_or_says_why(args: dict[bytes, list[bytes]]) -> None:
    try:
        start, end = parse_period(args, TODAY)
    except PeriodError as err:
        assert str(err) in (
            "'from' must be a date YYYY-MM-DD", "'to' must be a date YYYY-MM-DD",
            "the period ends before it starts", "a period is at most 3660 days",
        )  # fmt: skip
        return
    assert start <= end and (end - start).days < 3660


def test_a_flood_of_names_never_unlocks_one() -> None:
    from twisted.internet import task

    from corespond.daemon.clock import Clock
    from corespond.daemon.web import sessions

    clock = task.Clock()
    throttle = sessions.LoginThrottle(Clock(clock))
    for _ in range(sessions.MAX_FAILURES):
        throttle.failed("dana")
    for i in range(sessions.MAX_TRACKED_NAMES * 2):
        throttle.failed(f"flood-{i}")
    assert throttle.locked("dana")
    assert len(throttle._names) <= sessions.MAX_TRACKED_NAMES
    clock.advance(sessions.LOCKOUT_SECONDS)
    assert not throttle.locked("dana")


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300), st.sampled_from([b"application/x-www-form-urlencoded", b"text/plain"])
)
def test_the_form_parser_takes_any_body(body: bytes, content_type: bytes) -> None:
    from twisted.web.test.requesthelper import DummyRequest

    from corespond.daemon.web.dashboard import MAX_FIELD_CHARS, _form

    request = DummyRequest([b"login"])
    request.content = io.BytesIO(body)
    request.requestHeaders.setRawHeaders(b"content-type", [content_type])
    form = _form(request)  # type: ignore[arg-type]
    if content_type != b"application/x-www-form-urlencoded":
        assert form is None
    elif form is not None:
        assert len(form) <= 10 and all(len(v) <= MAX_FIELD_CHARS for v in form.values())


def test_removing_a_user_or_changing_their_role_ends_their_sessions(
    dash_rig: DashRig,
) -> None:
    from corespond.daemon.web.users import User, add_user, hash_password

    users_file = dash_rig.dashboard.users_file
    dana, root = dash_rig.client(), dash_rig.client()
    dana.login("dana")
    root.login("root")
    assert dana.get("/dashboard/csv/headline.csv").status == 200
    # dana becomes a clinician: the manager's session is over.
    add_user(users_file, User("dana", "clinician", hash_password(PASSWORDS["dana"]), "clin-07"))
    assert dana.get("/dashboard/csv/headline.csv").status == 401
    assert dana.get("/dashboard/").header("location") == "/dashboard/login"
    assert dana.login("dana").status == 303  # signs in again, as what they now are
    assert cards(dana.get("/dashboard/").text) == {}
    # root is removed from the file.
    users_file.write_text(
        "\n".join(line for line in users_file.read_text().splitlines() if "root" not in line)
    )
    assert root.get("/dashboard/").status == 303
    assert dash_rig.sessions() == 1  # dana's new one
    # A broken file fails closed.
    users_file.write_text("dana boss x\n")
    assert dana.get("/dashboard/").status == 503
