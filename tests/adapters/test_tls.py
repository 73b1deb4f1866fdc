"""TLS contexts: real handshakes in memory (TLSMemoryBIOProtocol over iosim), generated PKI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.protocol import Factory

from corespond.adapters.tls import TlsFileError, client_tls_options, server_tls_options
from tests.adapters.tlsfiles import SERVER_NAME, Pki, _Recorder, make_pki, tls_connect


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def talk(server_options: object, client_options: object) -> tuple[_Recorder, _Recorder]:
    """Handshake, then the client says hello; returns (client, server) recorders."""
    client, server, pump = tls_connect(
        Factory.forProtocol(_Recorder),
        server_options,
        Factory.forProtocol(_Recorder),
        client_options,
    )
    assert isinstance(client, _Recorder) and isinstance(server, _Recorder)
    if client.lost is None:
        transport: Any = client.transport
        transport.write(b"hello")
        pump.flush()
    return client, server


def test_server_certificate_verified_by_client(pki: Pki) -> None:
    client, server = talk(
        server_tls_options(pki.server_cert, pki.server_key),
        client_tls_options(SERVER_NAME, ca_file=pki.ca_cert),
    )
    assert server.received == b"hello"
    assert client.lost is None and server.lost is None


def test_client_refuses_server_from_untrusted_ca(pki: Pki) -> None:
    client, server = talk(
        server_tls_options(pki.server_cert, pki.server_key),
        client_tls_options(SERVER_NAME, ca_file=pki.other_ca_cert),
    )
    assert server.received == b""
    assert client.lost is not None and client.lost.check(SSL.Error)


def test_client_refuses_wrong_hostname(pki: Pki) -> None:
    client, server = talk(
        server_tls_options(pki.server_cert, pki.server_key),
        client_tls_options("elsewhere.example.test", ca_file=pki.ca_cert),
    )
    assert server.received == b""
    assert client.lost is not None


def test_mutual_tls_with_client_certificate(pki: Pki) -> None:
    _client, server = talk(
        server_tls_options(pki.server_cert, pki.server_key, pki.ca_cert, require_client_cert=True),
        client_tls_options(SERVER_NAME, pki.ca_cert, pki.client_cert, pki.client_key),
    )
    assert server.received == b"hello"
    assert server.lost is None
    peer = server.transport.getPeerCertificate()  # type: ignore[union-attr]
    assert peer.get_subject().CN == "cad-notifier.example.test"


def test_required_client_certificate_refused_when_missing(pki: Pki) -> None:
    _client, server = talk(
        server_tls_options(pki.server_cert, pki.server_key, pki.ca_cert, require_client_cert=True),
        client_tls_options(SERVER_NAME, ca_file=pki.ca_cert),
    )
    assert server.received == b""
    assert server.lost is not None and server.lost.check(SSL.Error)


def test_client_certificate_from_other_ca_refused(pki: Pki) -> None:
    _client, server = talk(
        server_tls_options(pki.server_cert, pki.server_key, pki.ca_cert, require_client_cert=True),
        client_tls_options(SERVER_NAME, pki.ca_cert, pki.rogue_client_cert, pki.rogue_client_key),
    )
    assert server.received == b""
    assert server.lost is not None


def test_optional_client_certificate(pki: Pki) -> None:
    """With a client CA but not required: anonymous clients pass, bad certificates do not."""
    options = server_tls_options(pki.server_cert, pki.server_key, pki.ca_cert)
    _c, server = talk(options, client_tls_options(SERVER_NAME, ca_file=pki.ca_cert))
    assert server.received == b"hello"
    _c, server = talk(
        options,
        client_tls_options(SERVER_NAME, pki.ca_cert, pki.rogue_client_cert, pki.rogue_client_key),
    )
    assert server.received == b""


def test_tls_below_1_2_refused(pki: Pki) -> None:
    from twisted.internet.ssl import CertificateOptions, TLSVersion

    old = CertificateOptions(
        insecurelyLowerMinimumTo=TLSVersion.TLSv1_0, lowerMaximumSecurityTo=TLSVersion.TLSv1_1
    )
    client, server = talk(server_tls_options(pki.server_cert, pki.server_key), old)
    assert server.received == b""
    assert server.lost is not None or client.lost is not None


def test_file_errors_name_the_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TlsFileError, match=r"nope.pem: cannot read"):
        server_tls_options(missing, pki.server_key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsFileError, match=r"garbage.pem: holds no PEM certificate"):
        server_tls_options(garbage, pki.server_key)
    with pytest.raises(TlsFileError, match=r"garbage.pem: holds no usable PEM private key"):
        server_tls_options(pki.server_cert, garbage)
    with pytest.raises(TlsFileError, match=r"garbage.pem"):
        client_tls_options(SERVER_NAME, ca_file=garbage)
    # A key that is not the certificate's: reported now, not at the first handshake.
    with pytest.raises(TlsFileError, match=r"client.key: this private key does not match"):
        server_tls_options(pki.server_cert, pki.client_key)
    with pytest.raises(TlsFileError, match=r"server.key: this private key does not match"):
        client_tls_options(SERVER_NAME, pki.ca_cert, pki.client_cert, pki.server_key)


def test_encrypted_key_named(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsFileError, match=r"locked.key: the private key is encrypted"):
        server_tls_options(pki.server_cert, locked)


def test_require_client_cert_needs_ca(pki: Pki) -> None:
    with pytest.raises(ValueError, match=r"client_ca_file"):
        server_tls_options(pki.server_cert, pki.server_key, require_client_cert=True)
    with pytest.raises(ValueError, match=r"go together"):
        client_tls_options(SERVER_NAME, cert_file=pki.client_cert)
