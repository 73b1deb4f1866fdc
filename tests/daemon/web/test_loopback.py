"""The web listener over a real TLS socket on 127.0.0.1, as the daemon opens it."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from pathlib import Path

from corespond.daemon.clock import Clock
from corespond.daemon.config import ListenConfig, ServerTlsConfig
from corespond.daemon.feeds import listen
from corespond.daemon.responders import Availability
from corespond.daemon.web import build_web_site
from tests.adapters.tlsfiles import SERVER_NAME, make_pki
from tests.browser import ServedReactor, served
from tests.daemon.web.desks import DictDesks
from tests.daemon.web.rig import SYSTEM_TOKEN, web_config

__all__ = ["served"]  # the fixture, imported for pytest


class _Https(http.client.HTTPSConnection):
    """Connects to 127.0.0.1 but checks the certificate against the server's name."""

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=30)
        self.sock = self._context.wrap_socket(sock, server_hostname=SERVER_NAME)  # type: ignore[attr-defined]


def test_availability_over_https(served: ServedReactor, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    where = ListenConfig("127.0.0.1", 0, ServerTlsConfig(pki.server_cert, pki.server_key))
    desks = DictDesks(clinicians={"clin-7": Availability.OFF_DUTY})
    site = build_web_site(
        web_config(listen=where), desks, desks,
        clock=Clock(served.reactor), reactor=served.reactor,
    )  # fmt: skip
    port = served.call(listen, served.reactor, where, site)
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
        served.call(port.stopListening)
    assert response.status == 200 and body == {"clinician_id": "clin-7", "state": "available"}
    assert response.getheader("strict-transport-security") == "max-age=31536000"
    assert served.call(lambda: dict(desks.clinicians)) == {"clin-7": Availability.AVAILABLE}
