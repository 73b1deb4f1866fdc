"""The program managers' dashboard at ``/dashboard``: the outcome report of a period, on one
server-rendered page with inline SVG charts, behind a login.

Every figure comes from :mod:`corespond.daemon.outcomes` (the SQL ``corespond report
outcomes`` runs, in the web's thread pool, never on the reactor), small cells suppressed by
the report's own rule; histogram bins of the response-time chart are suppressed by the same
rule. Each chart has a CSV link that serves its data to the same logged-in roles.

Roles: ``program_manager`` and ``admin`` see the program-wide figures; a ``clinician`` sees
only how many of their own encounters are open and completed in the period (no program-wide
figure, no CSV). Pages carry no script; their one style sheet is inline, allowed by its hash in
the Content-Security-Policy.

Paths: ``/dashboard/`` (GET, ``?from=YYYY-MM-DD&to=YYYY-MM-DD``, default the last 90 days),
``/dashboard/login`` (GET, POST), ``/dashboard/logout`` (POST),
``/dashboard/csv/<chart>.csv`` (GET, same query).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date, timedelta
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import structlog
from sqlalchemy import Connection, Engine, func, select
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from corespond.daemon.clock import Clock
from corespond.daemon.config import OutcomesConfig
from corespond.daemon.log import error_text
from corespond.daemon.outcomes import (
    ALL,
    DURATIONS,
    Aggregates,
    Metric,
    Report,
    ReportRequest,
    Value,
    assemble_report,
    default_referral_outcomes,
    duration_histograms,
    encounter_counts,
    referrals_per_encounter,
    report_aggregates,
)
from corespond.daemon.store.engine import READ_ONLY
from corespond.daemon.store.tables import encounters
from corespond.daemon.web.sessions import (
    COOKIE,
    LoginGate,
    LoginThrottle,
    Session,
    SessionStore,
    csrf_ok,
)
from corespond.daemon.web.site import NotFound, answer_when, body_of, plain_response
from corespond.daemon.web.users import User, UsersFileError, read_users, verify_password

log = structlog.get_logger(__name__)

InThread = Callable[..., Deferred[Any]]

PREFIX = "/dashboard"
LOGIN_COOKIE = b"corespond_login"
DEFAULT_DAYS = 90
MAX_DAYS = 3660
MANAGERS = ("program_manager", "admin")
MAX_FIELD_CHARS = 1024
# A period's figures are kept this long, so the CSVs of the page just shown cost nothing.
CACHE_SECONDS = 300
CACHE_PERIODS = 8

# The headline cards: report metric keys, in order.
HEADLINE = (
    "bh_encounters", "persons", "arrest_avoidance", "enforcement", "no_action",
    "voluntary_transport", "involuntary_hold", "ed_diversion", "jail_diversion", "referral",
    "response_p50", "response_p90", "officer_hours_returned", "frequent_utilizers",
)  # fmt: skip
DISPOSITIONS = (
    "no_action", "resolved_with_referral", "voluntary_transport", "involuntary_hold",
    "ems_transport", "enforcement",
)  # fmt: skip
TREND = ("bh_encounters", "arrest_avoidance", "involuntary_hold", "response_p50")
DEMOGRAPHICS = (("race", "Race / ethnicity"), ("gender", "Gender"), ("age", "Age band"))
RESPONSE_BINS = (0, 10, 20, 30, 45, 60, 90)  # minutes; the last bin is open-ended
DURATION_KEYS = tuple(DURATIONS)
CHARTS = ("headline", "trend", "dispositions", "response", "demographics", "areas")

STYLE = """
:root{--ink:#1d2433;--muted:#5b6475;--line:#d8dde6;--bar:#2f6f9f;--bg:#f6f7f9;--card:#fff}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--ink);background:var(--bg)}
header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;
justify-content:space-between;padding:.75rem 1.25rem;background:var(--card);
border-bottom:1px solid var(--line)}
header h1{font-size:1.15rem;margin:0}
main{max-width:1180px;margin:0 auto;padding:1rem 1.25rem 3rem}
form.period{display:flex;flex-wrap:wrap;gap:.5rem;align-items:end}
label{display:flex;flex-direction:column;font-size:.8rem;color:var(--muted)}
input{font:inherit;padding:.35rem .5rem;border:1px solid var(--line);border-radius:6px}
button{font:inherit;padding:.4rem .9rem;border:0;border-radius:6px;background:var(--bar);
color:#fff;cursor:pointer}
button.link{background:none;color:var(--bar);padding:0;text-decoration:underline}
.who{font-size:.85rem;color:var(--muted);display:flex;gap:.75rem;align-items:center}
.who form{margin:0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.75rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.7rem .8rem}
.card .v{font-size:1.35rem;font-weight:600;font-variant-numeric:tabular-nums}
.card .k{font-size:.8rem;color:var(--muted)}
.card .d{font-size:.72rem;color:var(--muted);margin-top:.25rem}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:.9rem 1rem;margin-top:1rem}
section h2{font-size:1rem;margin:0 0 .5rem;display:flex;justify-content:space-between;gap:1rem}
section h2 a{font-size:.8rem;font-weight:400;color:var(--bar)}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(360px,100%),1fr));
gap:.5rem 1.5rem}
svg{max-width:100%;height:auto;display:block}
svg text{font:12px system-ui,sans-serif;fill:var(--ink)}
svg .muted{fill:var(--muted)}
svg rect.bar{fill:var(--bar)}
table{border-collapse:collapse;width:100%;font-size:.85rem;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid var(--line)}
td.n{text-align:right}
.note{font-size:.78rem;color:var(--muted)}
.error{color:#a12622;font-weight:600}
.login{max-width:340px;margin:4rem auto;background:var(--card);border:1px solid var(--line);
border-radius:8px;padding:1.25rem;display:flex;flex-direction:column;gap:.75rem}
"""
STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
PAGE_CSP = (
    f"default-src 'none'; style-src 'sha256-{STYLE_HASH}'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


# --- the data ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DashboardData:
    overall: Report
    response_histogram: list[tuple[int, int]]  # (seconds, encounters), from the report's SQL
    monthly: Report
    demographics: dict[str, Report]


def report_request(outcomes: OutcomesConfig, start: date, end: date) -> ReportRequest:
    """The request ``corespond report outcomes --from START --to END`` makes."""
    return ReportRequest(
        start=start,
        end=end,
        suppress_below=outcomes.suppress_below,
        frequent_utilizer=outcomes.frequent_utilizer,
        zone_population=dict(outcomes.zone_population),
    )


def load_dashboard(engine: Engine, req: ReportRequest) -> DashboardData:
    """Every report the page shows, in one read transaction (blocking: run it in a thread).

    The whole report for the period; by month and by demographic group only the report's
    per-encounter queries (the page shows no per-person metric by group), assembled by the
    report's own code, so each figure shown is the one ``corespond report outcomes --by``
    prints."""
    with engine.connect() as conn, conn.execution_options(**{READ_ONLY: True}).begin():
        agg = report_aggregates(conn, req)
        overall = assemble_report(req, agg)
        monthly = _encounter_report(conn, replace(req, by="month"), durations=True)
        demographics = {
            by: _encounter_report(conn, replace(req, by=by), durations=False)
            for by, _ in DEMOGRAPHICS
        }
    return DashboardData(
        overall, list(agg.durations["response"].get(ALL, [])), monthly, demographics
    )


def _encounter_report(conn: Connection, req: ReportRequest, *, durations: bool) -> Report:
    """The report's per-encounter metrics by ``req.by`` (its person metrics are left empty)."""
    referrals = referrals_per_encounter(default_referral_outcomes())
    hist = duration_histograms(conn, req) if durations else {k: {} for k in DURATION_KEYS}
    agg = Aggregates(
        encounters=encounter_counts(conn, req, referrals, stored_referrals=True),
        persons={},
        durations=hist,
        cad_calls=None,
        zones={},
    )
    return assemble_report(req, agg)


def clinician_counts(engine: Engine, req: ReportRequest, clinician: str) -> dict[str, int]:
    """The clinician's own encounters received in the period, by status (blocking)."""
    e = encounters.c
    with engine.connect() as conn, conn.execution_options(**{READ_ONLY: True}).begin():
        rows = conn.execute(
            select(e.status, func.count())
            .where(e.clinician == clinician)
            .where(e.call_received_at >= req.since, e.call_received_at < req.until)
            .group_by(e.status)
        ).all()
    return {str(status): int(n) for status, n in rows}


def response_bins(
    histogram: Sequence[tuple[int, int]], suppress_below: int
) -> list[tuple[str, Value]]:
    """Response times in minute bins; a bin counting 1 to ``suppress_below - 1`` is suppressed,
    as the report suppresses its cells."""
    edges = [m * 60 for m in RESPONSE_BINS]
    counts = [0] * len(edges)
    for seconds, n in histogram:
        i = max(j for j, edge in enumerate(edges) if seconds >= edge) if seconds >= 0 else 0
        counts[i] += n
    out = []
    for i, n in enumerate(counts):
        if i + 1 < len(RESPONSE_BINS):
            label = f"{RESPONSE_BINS[i]}-{RESPONSE_BINS[i + 1]} min"
        else:
            label = f"{RESPONSE_BINS[i]}+ min"
        out.append((label, Value(n, suppressed=0 < n < suppress_below)))
    return out


# --- CSV ---------------------------------------------------------------------------------------


CSV_COLUMNS = ("chart", "series", "group", "value", "numerator", "denominator", "suppressed")


def _csv_row(chart: str, series: str, group: str, v: Value) -> dict[str, Any]:
    hidden = v.suppressed
    return {
        "chart": chart,
        "series": series,
        "group": group,
        "value": "" if hidden or v.value is None else v.value,
        "numerator": "" if hidden or v.numerator is None else v.numerator,
        "denominator": "" if hidden or v.denominator is None else v.denominator,
        "suppressed": hidden,
    }


def chart_rows(data: DashboardData, chart: str) -> list[dict[str, Any]]:
    """The data behind one chart, one row per value (suppressed values left empty)."""
    overall = data.overall
    rows: list[dict[str, Any]] = []
    if chart == "headline":
        for key in HEADLINE:
            rows.append(_csv_row(chart, key, ALL, overall.metric(key).values[ALL]))
    elif chart == "trend":
        for key in TREND:
            metric = data.monthly.metric(key)
            for group in data.monthly.groups:
                rows.append(_csv_row(chart, key, group, metric.values[group]))
    elif chart == "dispositions":
        for key in DISPOSITIONS:
            rows.append(_csv_row(chart, key, ALL, overall.metric(key).values[ALL]))
    elif chart == "response":
        bins = response_bins(data.response_histogram, overall.request.suppress_below)
        for label, value in bins:
            rows.append(_csv_row(chart, "response_time", label, value))
    elif chart == "demographics":
        for by, _ in DEMOGRAPHICS:
            report = data.demographics[by]
            metric = report.metric("bh_encounters")
            for group in report.groups:
                rows.append(_csv_row(chart, f"bh_encounters_by_{by}", group, metric.values[group]))
    elif chart == "areas":
        for metric in overall.areas:
            for zone, value in metric.values.items():
                rows.append(_csv_row(chart, metric.key, zone, value))
    else:
        raise KeyError(chart)
    return rows


def chart_csv(data: DashboardData, chart: str) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for row in chart_rows(data, chart):
        writer.writerow({k: _csv_safe(v) for k, v in row.items()})
    return out.getvalue().encode("utf-8")


def _csv_safe(value: Any) -> Any:
    """No cell a spreadsheet would run as a formula (zone and group names come from data)."""
    formula = isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r")
    if formula and not _is_number(value):
        return "'" + value
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- SVG ---------------------------------------------------------------------------------------


def bar_chart(
    title: str, bars: Sequence[tuple[str, Value]], kind: str, chart_id: str, *, narrow: bool = False
) -> str:
    """Horizontal bars, one per (label, value); a suppressed or empty value has no bar and says
    so. Rates are drawn on a 0-100% scale, counts and times against the largest bar. Drawn at
    its natural size (text stays legible), scaled down only on a narrower screen."""
    row_h = 22
    width, label_w, value_w = (380, 118, 112) if narrow else (680, 190, 150)
    plot_w = width - label_w - value_w
    height = row_h * max(1, len(bars)) + 8
    shown = [v.value for _, v in bars if not v.suppressed and v.value is not None]
    top = 1.0 if kind == "rate" else max([float(x) for x in shown] + [1.0])
    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}" '
        f'data-chart="{chart_id}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, (label, v) in enumerate(bars):
        y = 4 + i * row_h
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">'
            f"{escape(_short(label, 16 if narrow else 28))}</text>"
        )
        if not v.suppressed and v.value is not None:
            w = max(1.0, plot_w * float(v.value) / top) if v.value else 0.0
            parts.append(
                f'<rect class="bar" x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" '
                f'rx="2"><title>{escape(label)}: {escape(v.shown(kind))}</title></rect>'
            )
        text = v.shown(kind)
        parts.append(
            f'<text x="{width - value_w + 6}" y="{y + 15}" class="muted" '
            f'data-group="{escape(label)}">{escape(text)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _short(label: str, most: int) -> str:
    label = label.strip(" .").replace("_", " ")
    return label if len(label) <= most else label[: most - 1] + "…"


# --- HTML --------------------------------------------------------------------------------------


def _page(title: str, body: str) -> bytes:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>"
    ).encode()


def login_page(csrf: str, error: str | None = None, name: str = "") -> bytes:
    problem = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return _page(
        "Sign in - corespond",
        f'<form class="login" method="post" action="{PREFIX}/login">'
        "<h1>corespond dashboard</h1>"
        f"{problem}"
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
        f'<label>Name<input name="name" autocomplete="username" required value="{escape(name)}">'
        "</label>"
        '<label>Password<input name="password" type="password" autocomplete="current-password" '
        "required></label>"
        '<button type="submit">Sign in</button></form>',
    )


def _header(session: Session, start: date, end: date, error: str | None) -> str:
    problem = f' <span class="error" role="alert">{escape(error)}</span>' if error else ""
    return (
        "<header><h1>Co-responder outcomes</h1>"
        f'<form class="period" method="get" action="{PREFIX}/">'
        f'<label>From<input type="date" name="from" value="{start.isoformat()}"></label>'
        f'<label>To<input type="date" name="to" value="{end.isoformat()}"></label>'
        f'<button type="submit">Show</button>{problem}</form>'
        f'<div class="who"><span>{escape(session.user)} ({escape(session.role)})</span>'
        f'<form method="post" action="{PREFIX}/logout">'
        f'<input type="hidden" name="csrf" value="{escape(session.csrf)}">'
        '<button class="link" type="submit">Sign out</button></form></div></header>'
    )


def _csv_link(chart: str, start: date, end: date) -> str:
    query = urlencode({"from": start.isoformat(), "to": end.isoformat()})
    return f'<a href="{PREFIX}/csv/{chart}.csv?{query}" download>CSV</a>'


def _section(title: str, chart: str, start: date, end: date, body: str) -> str:
    return (
        f'<section id="{chart}"><h2><span>{escape(title)}</span>'
        f"{_csv_link(chart, start, end)}</h2>{body}</section>"
    )


def _card(metric: Metric) -> str:
    v = metric.values[ALL]
    raw = "suppressed" if v.suppressed else ("" if v.value is None else repr(v.value))
    return (
        f'<div class="card" data-metric="{metric.key}" data-value="{escape(raw)}">'
        f'<div class="k">{escape(metric.label.strip(" ."))}</div>'
        f'<div class="v">{escape(v.shown(metric.kind))}</div>'
        f'<div class="d">{escape(metric.definition)}</div></div>'
    )


def dashboard_page(
    session: Session, data: DashboardData, start: date, end: date, error: str | None = None
) -> bytes:
    overall = data.overall
    cards = "".join(_card(overall.metric(k)) for k in HEADLINE)
    headline = _section(
        "Headline figures", "headline", start, end, f'<div class="cards">{cards}</div>'
    )
    trend_parts = []
    for key in TREND:
        metric = data.monthly.metric(key)
        bars = [(g, metric.values[g]) for g in data.monthly.groups]
        trend_parts.append(
            f'<div><h3 class="note">{escape(metric.label.strip(" ."))}</h3>'
            f"{bar_chart(metric.label, bars, metric.kind, f'trend-{key}', narrow=True)}</div>"
        )
    trend = _section(
        "Trends by month", "trend", start, end, f'<div class="grid2">{"".join(trend_parts)}</div>'
    )
    disp_bars = [(overall.metric(k).label, overall.metric(k).values[ALL]) for k in DISPOSITIONS]
    dispositions = _section(
        "Dispositions (share of documented BH encounters)", "dispositions", start, end,
        bar_chart("Dispositions", disp_bars, "rate", "dispositions"),
    )  # fmt: skip
    bins = response_bins(data.response_histogram, overall.request.suppress_below)
    p50 = overall.metric("response_p50").values[ALL].shown("seconds")
    p90 = overall.metric("response_p90").values[ALL].shown("seconds")
    response = _section(
        "Response time (clinician paged to on scene)", "response", start, end,
        bar_chart("Response time distribution", bins, "count", "response")
        + f'<p class="note">Median {escape(p50)}, 90th percentile {escape(p90)}.</p>',
    )  # fmt: skip
    demo_parts = []
    for by, title in DEMOGRAPHICS:
        report = data.demographics[by]
        metric = report.metric("bh_encounters")
        bars = [(g, metric.values[g]) for g in report.groups]
        demo_parts.append(
            f'<div><h3 class="note">{escape(title)}</h3>'
            f"{bar_chart(title, bars, 'count', f'demographics-{by}', narrow=True)}</div>"
        )
    demographics = _section(
        "Who is served (BH encounters)", "demographics", start, end,
        f'<div class="grid2">{"".join(demo_parts)}</div>',
    )  # fmt: skip
    area_parts = []
    for metric in overall.areas:
        bars = list(metric.values.items())
        area_parts.append(
            f'<div><h3 class="note">{escape(metric.label)}</h3>'
            f"{bar_chart(metric.label, bars, metric.kind, f'areas-{metric.key}')}</div>"
        )
    areas = _section(
        "Areas of greatest need", "areas", start, end,
        "".join(area_parts) or '<p class="note">No BH encounters with a zone.</p>',
    )  # fmt: skip
    notes = "".join(f"<li>{escape(n)}</li>" for n in overall.notes)
    body = (
        _header(session, start, end, error)
        + "<main>"
        + f'<p class="note">{start.isoformat()} to {end.isoformat()}, all programs (UTC days). '
        + "The same figures as <code>corespond report outcomes</code>.</p>"
        + headline
        + trend
        + dispositions
        + response
        + demographics
        + areas
        + f'<section><h2>Notes</h2><ul class="note">{notes}</ul></section>'
        + "</main>"
    )
    return _page(f"Outcomes {start.isoformat()} to {end.isoformat()}", body)


def clinician_page(
    session: Session, counts: dict[str, int], start: date, end: date, error: str | None
) -> bytes:
    rows = "".join(
        f'<tr><td>{escape(status)}</td><td class="n" data-status="{escape(status)}">{n}</td></tr>'
        for status, n in sorted(counts.items())
    )
    body = (
        _header(session, start, end, error)
        + "<main><section><h2>Your encounters</h2>"
        + (
            f"<table><tr><th>status</th><th>encounters</th></tr>{rows}</table>"
            if rows
            else '<p class="note">You have no encounters in this period.</p>'
        )
        + '<p class="note">Program-wide figures are for program managers.</p>'
        + "</section></main>"
    )
    return _page("Your encounters", body)


# --- the resource ------------------------------------------------------------------------------


class PeriodError(ValueError):
    pass


def parse_period(args: dict[bytes, list[bytes]], today: date) -> tuple[date, date]:
    """``from`` and ``to`` of the query (both optional; default the last 90 days)."""

    def day(name: bytes) -> date | None:
        values = args.get(name)
        if not values or not values[0]:
            return None
        try:
            return date.fromisoformat(values[0].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise PeriodError(f"'{name.decode()}' must be a date YYYY-MM-DD") from None

    end = day(b"to") or today
    start = day(b"from") or end - timedelta(days=DEFAULT_DAYS - 1)
    if end < start:
        raise PeriodError("the period ends before it starts")
    if (end - start).days >= MAX_DAYS:
        raise PeriodError(f"a period is at most {MAX_DAYS} days")
    return start, end


def _cookie(request: Request, name: bytes) -> str | None:
    value = request.getCookie(name)
    if value is None:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def _form(request: Request) -> dict[str, str] | None:
    from urllib.parse import parse_qs

    body, _ = body_of(request)
    if body is None:
        return None
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != b"application/x-www-form-urlencoded":
        return None
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        return None
    return {k: v[0][:MAX_FIELD_CHARS] for k, v in parsed.items() if v}


class Dashboard(Resource):
    """Mounted at ``/dashboard``."""

    def __init__(
        self,
        *,
        engine: Engine,
        users_file: Path,
        outcomes: OutcomesConfig,
        in_thread: InThread,
        clock: Clock,
        sessions: SessionStore | None = None,
        throttle: LoginThrottle | None = None,
        gate: LoginGate | None = None,
        hash_in_thread: InThread | None = None,
    ) -> None:
        """``sessions``: the daemon's (default: in ``engine``, through ``in_thread``);
        ``hash_in_thread``: where password hashes run, a small pool of their own so that a
        flood of sign-ins cannot hold the threads reports and spool ingest use (default
        ``in_thread``); ``gate``: the global bound on sign-ins."""
        super().__init__()
        self.engine = engine
        self.users_file = users_file
        self.outcomes = outcomes
        self.in_thread = in_thread
        self.clock = clock
        self.sessions = sessions if sessions is not None else SessionStore(engine, clock, in_thread)
        self.throttle = throttle if throttle is not None else LoginThrottle(clock)
        self.gate = gate if gate is not None else LoginGate(clock)
        self.hash_in_thread = hash_in_thread if hash_in_thread is not None else in_thread
        self._cache: dict[tuple[date, date], tuple[float, DashboardData]] = {}

    def _data(self, req: ReportRequest) -> Deferred[DashboardData]:
        """The period's figures: computed in the thread pool, or kept from the last
        ``CACHE_SECONDS`` (the reactor thread alone reads and writes the cache)."""
        key = (req.start, req.end)
        now = self.clock.seconds()
        kept = self._cache.get(key)
        if kept is not None and now - kept[0] < CACHE_SECONDS:
            return succeed(kept[1])

        def keep(data: DashboardData) -> DashboardData:
            self._cache[key] = (now, data)
            for old in sorted(self._cache, key=lambda k: self._cache[k][0])[:-CACHE_PERIODS]:
                del self._cache[old]
            return data

        d: Deferred[DashboardData] = self.in_thread(load_dashboard, self.engine, req)
        return d.addCallback(keep)

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"" and not request.postpath:
            return _Route(self._index)
        if path == b"login" and not request.postpath:
            return _Route(self._login)
        if path == b"logout" and not request.postpath:
            return _Route(self._logout)
        if path == b"csv" and len(request.postpath or ()) == 1:
            return _Route(self._csv)
        return NotFound()

    def render(self, request: Request) -> bytes:
        # /dashboard without the slash
        return self._redirect(request, f"{PREFIX}/")

    # -- helpers

    def _html(self, request: Request, status: int, body: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", PAGE_CSP.encode())
        return body

    def _redirect(self, request: Request, to: str) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"location", to.encode())
        return b""

    def _session(self, request: Request) -> Deferred[Session | None]:
        return self.sessions.get(_cookie(request, COOKIE))

    def _set_cookie(self, request: Request, name: bytes, value: str, path: str) -> None:
        request.addCookie(
            name, value.encode(), path=path.encode(), secure=True, httpOnly=True,
            sameSite="strict",
        )  # fmt: skip

    def _clear_cookie(self, request: Request, name: bytes, path: str) -> None:
        request.addCookie(
            name, b"", path=path.encode(), secure=True, httpOnly=True, sameSite="strict",
            max_age=b"0",
        )  # fmt: skip

    def _today(self) -> date:
        return self.clock.now().date()

    # -- pages

    def _current(self, request: Request) -> Deferred[Session | None]:
        """The request's session, if its user is still in the users file with the same role
        (read in the thread pool): removing a user or changing their role ends their
        sessions at their next request."""

        def found(session: Session | None) -> Deferred[Session | None]:
            if session is None:
                return succeed(None)

            def check(users: dict[str, User]) -> Deferred[Session | None] | Session:
                user = users.get(session.user)
                if user is not None and (user.role, user.clinician) == (
                    session.role, session.clinician,
                ):  # fmt: skip
                    return session
                log.info("web.session.revoked", role=session.role)
                return self.sessions.end_user(session.user).addCallback(lambda _: None)

            d: Deferred[dict[str, User]] = self.in_thread(read_users, self.users_file)
            return d.addCallback(check)

        return self._session(request).addCallback(found)

    def _index(self, request: Request) -> bytes | int:
        if request.method != b"GET":
            return plain_response(request, 405, "Method not allowed.")
        error = None
        try:
            start, end = parse_period(request.args or {}, self._today())
            status = 200
        except PeriodError as err:
            error, status = str(err), 400
            end = self._today()
            start = end - timedelta(days=DEFAULT_DAYS - 1)
        req = report_request(self.outcomes, start, end)

        def page(session: Session | None) -> Deferred[bytes] | bytes:
            if session is None:
                return self._redirect(request, f"{PREFIX}/login")
            if session.role in MANAGERS:
                return self._data(req).addCallback(
                    lambda data: self._html(
                        request, status, dashboard_page(session, data, start, end, error)
                    )
                )
            clinician = session.clinician or ""
            d: Deferred[dict[str, int]] = self.in_thread(
                clinician_counts, self.engine, req, clinician
            )
            return d.addCallback(
                lambda counts: self._html(
                    request, status, clinician_page(session, counts, start, end, error)
                )
            )

        d: Deferred[bytes] = self._current(request).addCallback(page)
        return answer_when(request, d, lambda body: body, self._failed(request))

    def _failed(self, request: Request) -> Callable[[Failure], bytes]:
        def failed(failure: Failure) -> bytes:
            if failure.check(UsersFileError):
                log.error("web.users_file.bad", error=error_text(failure))
            else:
                log.error("web.dashboard.failed", error=error_text(failure))
            return plain_response(request, 503, "The figures could not be computed; try again.")

        return failed

    def _csv(self, request: Request) -> bytes | int:
        if request.method != b"GET":
            return plain_response(request, 405, "Method not allowed.")
        name = (request.postpath or [b""])[0]
        chart = name[:-4].decode("ascii", "replace") if name.endswith(b".csv") else ""
        if chart not in CHARTS:
            return plain_response(request, 404, "Not found.")
        try:
            start, end = parse_period(request.args or {}, self._today())
        except PeriodError as err:
            return plain_response(request, 400, str(err))
        req = report_request(self.outcomes, start, end)

        def csv_of(session: Session | None) -> Deferred[bytes] | bytes:
            if session is None:
                return plain_response(request, 401, "Sign in first.")
            if session.role not in MANAGERS:
                return plain_response(
                    request, 403, "Program-wide figures are for program managers."
                )
            return self._data(req).addCallback(done)

        def done(data: DashboardData) -> bytes:
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"text/csv; charset=utf-8")
            filename = f"corespond-{chart}-{start.isoformat()}-{end.isoformat()}.csv"
            request.setHeader(b"content-disposition", f'attachment; filename="{filename}"'.encode())
            return chart_csv(data, chart)

        d: Deferred[bytes] = self._current(request).addCallback(csv_of)
        return answer_when(request, d, lambda body: body, self._failed(request))

    def _login(self, request: Request) -> bytes | int:
        if request.method == b"GET":

            def sign_in_form(session: Session | None) -> bytes:
                if session is not None:
                    return self._redirect(request, f"{PREFIX}/")
                token = secrets.token_urlsafe(24)
                self._set_cookie(request, LOGIN_COOKIE, token, f"{PREFIX}/login")
                return self._html(request, 200, login_page(token))

            return answer_when(
                request, self._session(request), sign_in_form, self._unavailable(request)
            )
        if request.method != b"POST":
            return plain_response(request, 405, "Method not allowed.")
        form = _form(request)
        expected = _cookie(request, LOGIN_COOKIE)
        presented = (form or {}).get("csrf")
        if (
            form is None
            or expected is None
            or presented is None
            or not secrets.compare_digest(expected.encode(), presented.encode())
        ):
            log.info("web.login", outcome="bad-form")
            return plain_response(request, 403, "The sign-in form expired: load it again.")
        name = form.get("name", "").strip()
        password = form.get("password", "")
        locked_for = self.throttle.locked_for(name)
        if locked_for:
            return self._too_many(request, expected, name, "locked", locked_for,
                                  "Too many failed sign-ins: try again later.")  # fmt: skip
        wait = self.gate.admit()
        if wait is not None:
            # Every name together: a flood of sign-ins costs no hash and holds no thread.
            return self._too_many(request, expected, name, "busy", wait,
                                   "Sign-in is busy: try again in a moment.")  # fmt: skip

        def check() -> tuple[str, str | None, str | None]:
            users = read_users(self.users_file)
            user = users.get(name)
            ok = verify_password(password, user.password_hash if user else "")
            if user is None or not ok:
                return "refused", None, None
            return "ok", user.role, user.clinician

        def hashed(result: Any) -> Any:
            self.gate.done()
            return result

        def done(result: tuple[str, str | None, str | None]) -> bytes | Deferred[bytes]:
            outcome, role, clinician = result
            if outcome != "ok" or role is None:
                self.throttle.failed(name)
                log.info("web.login", outcome="refused")
                return self._html(
                    request, 401, login_page(expected, "Wrong name or password.", name)
                )
            self.throttle.succeeded(name)

            def started(session_id: str) -> bytes:
                self._set_cookie(request, COOKIE, session_id, PREFIX)
                self._clear_cookie(request, LOGIN_COOKIE, f"{PREFIX}/login")
                log.info("web.login", outcome="ok", role=role)
                return self._redirect(request, f"{PREFIX}/")

            return self.sessions.start(name, role, clinician).addCallback(started)

        def failed(failure: Failure) -> bytes:
            if failure.check(UsersFileError):
                log.error("web.users_file.bad", error=error_text(failure))
            else:
                log.error("web.login.failed", error=error_text(failure))
            return plain_response(request, 503, "Sign-in is unavailable; tell an administrator.")

        d: Deferred[Any] = self.hash_in_thread(check).addBoth(hashed)
        return answer_when(request, d.addCallback(done), lambda body: body, failed)

    def _too_many(
        self, request: Request, csrf: str, name: str, outcome: str, retry_after: int, error: str
    ) -> bytes:
        log.info("web.login", outcome=outcome)
        request.setHeader(b"retry-after", str(retry_after).encode())
        return self._html(request, 429, login_page(csrf, error, name))

    def _unavailable(self, request: Request) -> Callable[[Failure], bytes]:
        def failed(failure: Failure) -> bytes:
            log.error("web.session.failed", error=error_text(failure))
            return plain_response(request, 503, "Sign-in is unavailable; try again.")

        return failed

    def _logout(self, request: Request) -> bytes | int:
        if request.method != b"POST":
            return plain_response(request, 405, "Method not allowed.")
        form = _form(request)
        session_id = _cookie(request, COOKIE)

        def check(session: Session | None) -> bytes | Deferred[bytes]:
            if session is None:
                return self._redirect(request, f"{PREFIX}/login")
            if form is None or not csrf_ok(session, form.get("csrf")):
                return plain_response(request, 403, "The form expired: reload the page.")

            def ended(_: None) -> bytes:
                self._clear_cookie(request, COOKIE, PREFIX)
                log.info("web.logout", role=session.role)
                return self._redirect(request, f"{PREFIX}/login")

            return self.sessions.end(session_id).addCallback(ended)

        d = self.sessions.get(session_id).addCallback(check)
        return answer_when(request, d, lambda body: body, self._unavailable(request))


class _Route(Resource):
    isLeaf = True

    def __init__(self, handler: Callable[[Request], bytes | int]) -> None:
        super().__init__()
        self._handler = handler

    def render(self, request: Request) -> bytes | int:
        return self._handler(request)


__all__ = [
    "CHARTS",
    "Dashboard",
    "DashboardData",
    "chart_csv",
    "chart_rows",
    "load_dashboard",
    "parse_period",
    "report_request",
    "response_bins",
]
