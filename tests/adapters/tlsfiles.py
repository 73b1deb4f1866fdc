"""Throwaway PKI for tests: a CA, a server and a client certificate, generated at test time.

Nothing here is ever committed: the keys live in the test's temporary directory. EC P-256
keys keep generation to a few milliseconds.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect

SERVER_NAME = "cad.example.test"


@dataclass(frozen=True, slots=True)
class Pki:
    """Paths of one generated PKI (all PEM)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # a CA that signed nothing here: trusting it must fail
    rogue_client_cert: Path  # a client certificate from the other CA
    rogue_client_key: Path


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(common: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common: str,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(common), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    """Generate a CA, a server certificate for :data:`SERVER_NAME` and a client certificate
    into ``directory``, plus an unrelated CA and a client certificate it signed."""
    ca, ca_key = _ca("corespond test CA")
    server, server_key = _leaf(SERVER_NAME, ca, ca_key, server=True)
    client, client_key = _leaf("cad-notifier.example.test", ca, ca_key, server=False)
    other, other_key = _ca("someone else's CA")
    rogue, rogue_key = _leaf("rogue.example.test", other, other_key, server=False)
    return Pki(
        ca_cert=_write_cert(directory / "ca.pem", ca),
        server_cert=_write_cert(directory / "server.pem", server),
        server_key=_write_key(directory / "server.key", server_key),
        client_cert=_write_cert(directory / "client.pem", client),
        client_key=_write_key(directory / "client.key", client_key),
        other_ca_cert=_write_cert(directory / "other-ca.pem", other),
        rogue_client_cert=_write_cert(directory / "rogue.pem", rogue),
        rogue_client_key=_write_key(directory / "rogue.key", rogue_key),
    )


class _Recorder(Protocol):
    """Collects what it receives and how the connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None
        self.handshake_done = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


def tls_connect(
    server_factory: Any,
    server_options: Any,
    client_factory: Any,
    client_options: Any,
    *,
    clock: MemoryReactorClock | None = None,
    greet: bool = True,
) -> tuple[Protocol, Protocol, IOPump]:
    """Connect ``client_factory``'s protocol to ``server_factory``'s through real TLS
    (TLSMemoryBIOProtocol on both ends) over iosim's in-memory transports.

    Returns the wrapped (application) client and server protocols and the pump."""
    # TLS output is flushed by a callLater(0) on this clock, which the pump advances.
    reactor: Any = clock or MemoryReactorClock()
    server_tls = TLSMemoryBIOFactory(server_options, False, server_factory, clock=reactor)
    client_tls = TLSMemoryBIOFactory(client_options, True, client_factory, clock=reactor)
    address: Any = IPv4Address("TCP", "192.0.2.1", 443)
    server = server_tls.buildProtocol(address)
    client = client_tls.buildProtocol(address)
    assert server is not None and client is not None
    # Taken now: the wrapper forgets its protocol when the connection is lost.
    inner_client, inner_server = client.wrappedProtocol, server.wrappedProtocol
    pump = connect(
        server,
        FakeTransport(server, isServer=True, peerAddress=IPv4Address("TCP", "192.0.2.9", 50000)),
        client,
        FakeTransport(client, isServer=False),
        greet=greet,
        clock=reactor,
    )
    return inner_client, inner_server, pump


__all__ = ["SERVER_NAME", "Pki", "make_pki", "tls_connect"]
