"""The web listener over a real TLS socket on 127.0.0.1, as the daemon opens it."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from corespond.daemon.clock import Clock
from corespond.daemon.config import ListenConfig, ServerTlsConfig
from corespond.daemon.feeds import listen
from corespond.daemon.responders import Availability
from corespond.daemon.web import build_web_site
from tests.adapters.tlsfiles import SERVER_NAME, make_pki
from tests.browser import ServedReactor
from tests.daemon.web.desks import DictDesks
from tests.daemon.web.rig import SYSTEM_TOKEN, web_config


@pytest.fixture
def reactor_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedReactor]:
    served = ServedReactor()
    # Twisted's TLS layer batches small writes on the *global* reactor unless told otherwise;
    # here the global one never runs, so it must use ours (the hook exists for tests).
    monkeypatch.setattr("twisted.protocols.tls._get_default_clock", lambda: served.reactor)
    served.start()
    try:
        yield served
    finally:
        served.stop()


class _Https(http.client.HTTPSConnection):
    """Connects to 127.0.0.1 but checks the certificate against the server's name."""

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=30)
        self.sock = self._context.wrap_socket(sock, server_hostname=SERVER_NAME)  # type: ignore[attr-defined]


def test_availability_over_https(reactor_thread: ServedReactor, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    where = ListenConfig("127.0.0.1", 0, ServerTlsConfig(pki.server_cert, pki.server_key))
    desks = DictDesks(clinicians={"clin-7": Availability.OFF_DUTY})
    site = build_web_site(
        web_config(listen=where), desks, desks,
        clock=Clock(reactor_thread.reactor), reactor=reactor_thread.reactor,
    )  # fmt: skip
    port = reactor_thread.call(listen, reactor_thread.reactor, where, site)
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        conn = _Https("127.0.0.1", port.getHost().port, context=context)
        conn.request(
            "POST",
            "/api/v1/clinicians/clin-7/availability",
            body=b'{"state": "available"}',
            headers={"Authorization": f"Bearer {SYSTEM_TOKEN}", "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
    finally:
        reactor_thread.call(port.stopListening)
    assert response.status == 200 and body == {"clinician_id": "clin-7", "state": "available"}
    assert response.getheader("strict-transport-security") == "max-age=31536000"
    assert reactor_thread.call(lambda: dict(desks.clinicians)) == {"clin-7": Availability.AVAILABLE}
