"""The dashboard in a real headless Chromium over a real socket: the demo's synthetic
encounters, sign in, change the period, the same numbers as ``corespond report outcomes
--format json``, a CSV downloaded by the browser, and a screenshot.

With ``CORESPOND_DOCS_SCREENSHOT=1`` the test also writes the README's ``docs/dashboard.png``
(a desktop-width view of the same page); otherwise the source tree is left alone.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from corespond.daemon.clock import Clock
from corespond.daemon.config import OutcomesConfig
from corespond.daemon.outcomes import Value
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.synthetic_encounters import seed_demo_encounters
from corespond.daemon.web.dashboard import HEADLINE, Dashboard
from corespond.daemon.web.site import WebSite
from corespond.daemon.web.users import User, add_user, hash_password
from tests.browser import ServedReactor, browser, served

__all__ = ["browser", "served"]  # the fixtures, imported for pytest

pytestmark = pytest.mark.browser

PASSWORD = "dana-synthetic-pass-1"
DOCS_PNG = Path(__file__).resolve().parents[3] / "docs" / "dashboard.png"
DEADLINE = 30.0


def _cli_report(config: Path, start: date, end: date) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "corespond.daemon.cli", "report", "outcomes", "-c", str(config),
         "--format", "json", "--from", start.isoformat(), "--to", end.isoformat()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _shown(kind: str, cell: dict[str, Any]) -> str:
    """What the page shows for a report cell of the CLI's JSON."""
    if cell.get("suppressed"):
        return "suppressed"
    value = Value(cell["value"], cell.get("numerator"), cell.get("denominator"))
    return value.shown(kind)


@pytest.fixture
def demo_site(served: ServedReactor, sqlite_template: Path, tmp_path: Path) -> Iterator[str]:
    """The dashboard on the demo's seeded encounters; its base URL. Also writes the config the
    CLI reads (same database)."""
    db = tmp_path / "store.db"
    shutil.copyfile(sqlite_template, db)
    engine = create_store_engine(f"sqlite:///{db}")
    today = datetime.now(UTC).date()
    assert seed_demo_encounters(engine, 2400, 4, today) == 2400
    (tmp_path / "corespond.yaml").write_text(
        f"state_dir: {tmp_path / 'state'}\nstore: {{url: 'sqlite:///{db}'}}\nfeeds: {{}}\n"
    )
    users = tmp_path / "users"
    add_user(users, User("dana", "program_manager", hash_password(PASSWORD)))
    pool = ThreadPool(minthreads=1, maxthreads=2, name="dashboard-browser")
    pool.start()

    def in_thread(fn: Any, *args: Any) -> Any:
        return deferToThreadPool(served.reactor, pool, fn, *args)

    site = WebSite(reactor=served.reactor)
    site.mount(
        "/dashboard",
        Dashboard(
            engine=engine,
            users_file=users,
            outcomes=OutcomesConfig(),
            in_thread=in_thread,
            clock=Clock(served.reactor),
        ),
    )
    port = served.listen(site)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        pool.stop()
        engine.dispose()


def _arrived(browser: Any, url: str) -> None:
    """A bounded wait until ``url`` has loaded (a click on a submit button may return before
    the navigation it starts)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, DEADLINE).until(
        lambda b: (
            b.current_url == url and b.execute_script("return document.readyState") == "complete"
        )
    )


def _cards(browser: Any) -> dict[str, tuple[str, str]]:
    from selenium.webdriver.common.by import By

    out = {}
    for card in browser.find_elements(By.CSS_SELECTOR, "[data-metric]"):
        value = card.find_element(By.CLASS_NAME, "v").text
        out[card.get_attribute("data-metric")] = (card.get_attribute("data-value"), value)
    return out


def test_sign_in_change_the_period_check_download(
    browser: Any, demo_site: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{demo_site}/dashboard/")
    assert browser.current_url == f"{demo_site}/dashboard/login"
    browser.find_element(By.NAME, "name").send_keys("dana")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    # The answer waits for the password hash in the thread pool: the click may return first.
    _arrived(browser, f"{demo_site}/dashboard/")
    [cookie] = browser.get_cookies()
    assert cookie["name"] == "corespond_session" and cookie["httpOnly"] and cookie["secure"]
    assert cookie["sameSite"] == "Strict"

    # Change the period with the form (date inputs take their value as the page's own).
    today = datetime.now(UTC).date()
    start, end = today - timedelta(days=75), today - timedelta(days=10)
    for name, day in (("from", start), ("to", end)):
        field = browser.find_element(By.NAME, name)
        browser.execute_script("arguments[0].value = arguments[1]", field, day.isoformat())
    browser.find_element(By.CSS_SELECTOR, "form.period button").click()
    _arrived(browser, f"{demo_site}/dashboard/?from={start.isoformat()}&to={end.isoformat()}")
    assert browser.find_element(By.NAME, "from").get_attribute("value") == start.isoformat()

    # The numbers on the page are the CLI's for the same period.
    report = _cli_report(tmp_path / "corespond.yaml", start, end)
    metrics = {m["key"]: m for m in report["metrics"]}
    shown = _cards(browser)
    assert list(shown) == list(HEADLINE)
    for key, (raw, text) in shown.items():
        cell = metrics[key]["values"]["all"]
        assert text == _shown(metrics[key]["kind"], cell), key
        assert raw == ("suppressed" if cell.get("suppressed") else repr(cell["value"])), key
    assert metrics["bh_encounters"]["values"]["all"]["value"] > 100  # not a vacuous check
    zones = {
        z: _shown("count", v) for z, v in report["areas"][0]["values"].items()
    }  # the areas chart's labels carry the zone names
    chart = browser.find_element(By.CSS_SELECTOR, 'svg[data-chart="areas-zone_encounters"]')
    drawn = {
        t.get_attribute("data-group"): t.text
        for t in chart.find_elements(By.CSS_SELECTOR, "text[data-group]")
    }
    assert drawn == zones
    # The page honours its CSP: nothing was refused in the console.
    refused = [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert refused == []

    # A CSV downloads through the browser, with the session cookie.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    browser.find_element(By.CSS_SELECTOR, "#dispositions h2 a").click()
    name = f"corespond-dispositions-{start.isoformat()}-{end.isoformat()}.csv"
    # A bounded wait for Chromium to finish writing the file (it tells no one).
    WebDriverWait(browser, DEADLINE, poll_frequency=0.05).until(
        lambda _: (downloads / name).exists()
    )
    with (downloads / name).open(newline="") as f:
        rows = {row["series"]: row for row in csv.DictReader(f)}
    for key in ("no_action", "involuntary_hold", "enforcement"):
        cell = metrics[key]["values"]["all"]
        if cell.get("suppressed"):
            assert rows[key]["value"] == ""
        else:
            assert float(rows[key]["value"]) == pytest.approx(cell["value"])
            assert int(rows[key]["numerator"]) == cell["numerator"]

    browser.save_screenshot(str(tmp_path / "dashboard-phone.png"))
    assert (tmp_path / "dashboard-phone.png").stat().st_size > 10_000

    # A desktop-sized, full-page view of the default period, for the README.
    browser.get(f"{demo_site}/dashboard/")
    width = 1280
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
    )
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": int(height), "deviceScaleFactor": 1, "mobile": False},
    )
    desktop = tmp_path / "dashboard.png"
    browser.save_screenshot(str(desktop))
    assert desktop.stat().st_size > 10_000
    if os.environ.get("CORESPOND_DOCS_SCREENSHOT") == "1":
        DOCS_PNG.parent.mkdir(exist_ok=True)
        shutil.copyfile(desktop, DOCS_PNG)
