"""A real headless Chromium for browser tests, and a real Twisted server for it to talk to.

Chromium and its driver are Debian's (packages ``chromium`` and ``chromium-driver``, installed by
``.ci/run``); selenium drives them. Without them the session fails, unless
``CORESPOND_TEST_SKIP_BROWSER=1`` (then the tests marked ``browser`` are skipped).

Fixtures (import them into a test module, or a conftest, to use them):

- ``browser``: a fresh headless Chromium with a phone's viewport (390x844, as an iPhone 12-15
  in CSS pixels), its own profile directory under the test's tmp dir, nothing fetched from the
  network by the browser itself (no sync, no component updates, no first-run pages);
- ``served``: a private Twisted reactor (never the global one) running in a thread, with
  ``listen(site)`` to serve a site on 127.0.0.1 and ``call(fn, *args)`` to run code on the
  reactor thread and get its result (Deferreds are waited for). It needs no browser: plain
  loopback tests (TLS included) use it too.

Nothing sleeps: selenium's ``get`` and a form's ``click`` return once the new page has loaded.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

SKIP_BROWSER = os.environ.get("CORESPOND_TEST_SKIP_BROWSER") == "1"
PHONE_VIEWPORT = (390, 844)
PHONE_PIXEL_RATIO = 3.0
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-default-browser-check",
)


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (
            f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
        )
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if SKIP_BROWSER:
        pytest.skip("CORESPOND_TEST_SKIP_BROWSER=1")
    chromium = _binary("chromium", "chromium-browser")
    driver_path = _binary("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(
            "chromium and chromedriver not found: install the Debian packages `chromium` and "
            "`chromium-driver`, or set CORESPOND_TEST_SKIP_BROWSER=1 to skip the browser tests",
            pytrace=False,
        )
    # Selenium Manager would otherwise look for drivers online.
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    width, height = PHONE_VIEWPORT
    options.add_argument(f"--window-size={width},{height}")
    options.add_experimental_option(
        "mobileEmulation",
        {"deviceMetrics": {"width": width, "height": height, "pixelRatio": PHONE_PIXEL_RATIO,
                           "touch": True}},
    )  # fmt: skip
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class ServedReactor:
    """A reactor of the test's own, run in a thread; the test thread calls into it."""

    def __init__(self) -> None:
        from twisted.internet.selectreactor import SelectReactor

        self.reactor: Any = SelectReactor()
        self._thread = threading.Thread(
            target=self.reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
        )
        self._ports: list[Any] = []

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the reactor thread; its result (a Deferred's, once it fires)."""
        from twisted.internet.threads import blockingCallFromThread

        return blockingCallFromThread(self.reactor, fn, *args)

    def listen(self, factory: Any, port: int = 0) -> int:
        """Serve ``factory`` on 127.0.0.1 (``port`` 0: a free one); the port number."""
        listening = self.call(self.reactor.listenTCP, port, factory, 50, "127.0.0.1")
        self._ports.append(listening)
        return int(listening.getHost().port)

    def stop(self) -> None:
        for port in self._ports:
            self.call(port.stopListening)
        self.reactor.callFromThread(self.reactor.stop)
        self._thread.join(timeout=30)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedReactor]:
    served = ServedReactor()
    # Twisted's TLS layer batches small writes on the *global* reactor unless told otherwise;
    # in tests the global one never runs, so TLS listeners must use ours (a hook for tests).
    monkeypatch.setattr("twisted.protocols.tls._get_default_clock", lambda: served.reactor)
    served.start()
    try:
        yield served
    finally:
        served.stop()
