"""TLS settings for every listener and client: PEM files in, Twisted context factories out.

Listeners get :func:`server_tls_options` (TLS 1.2 or newer; with ``client_ca_file``, client
certificates are verified against that CA and, with ``require_client_cert``, demanded).
Clients get :func:`client_tls_options` (the server's certificate is verified against
``ca_file``, else the system's trust store, and must name ``hostname``).

The files are read and checked at once, so that a bad path, a file that is not PEM, an
encrypted key or a key that does not match its certificate is reported when the configuration
is loaded, as a :class:`TlsFileError` naming the file, not at the first connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLContextFactory
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)

from corespond.daemon.errors import SafeMessage

MINIMUM_TLS = TLSVersion.TLSv1_2


class TlsFileError(SafeMessage, ValueError):
    """A certificate, key or CA file that cannot be used; ``path`` names it."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise TlsFileError(path, f"cannot read: {err.strerror or err}") from None


def load_certificates(path: str | Path) -> list[x509.Certificate]:
    """Every PEM certificate in ``path``, in file order (leaf first for a chain file)."""
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsFileError(path, "holds no PEM certificate (BEGIN CERTIFICATE)") from None
    if not certs:
        raise TlsFileError(path, "holds no PEM certificate (BEGIN CERTIFICATE)")
    return certs


def load_private_key(path: str | Path) -> crypto.PKey:
    """The unencrypted PEM private key in ``path``."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsFileError(path, "the private key is encrypted; give an unencrypted key "
                                 "(protect it with file permissions)") from None  # fmt: skip
    except (ValueError, crypto.Error):
        raise TlsFileError(path, "holds no usable PEM private key") from None
    except Exception as err:  # cryptography raises UnsupportedAlgorithm for exotic keys
        raise TlsFileError(path, f"unsupported private key ({type(err).__name__})") from None
    try:
        return crypto.PKey.from_cryptography_key(key)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TlsFileError(path, "unsupported private key type") from None


def _x509(certs: Sequence[x509.Certificate]) -> list[crypto.X509]:
    return [crypto.X509.from_cryptography(c) for c in certs]


def _check_pair(options: CertificateOptions, cert_file: str | Path, key_file: str | Path) -> None:
    """Build the context now: OpenSSL checks there that the key belongs to the certificate."""
    try:
        options.getContext()
    except SSL.Error:
        raise TlsFileError(key_file, f"this private key does not match the certificate in "
                                     f"{cert_file}") from None  # fmt: skip


def server_tls_options(
    cert_file: str | Path,
    key_file: str | Path,
    client_ca_file: str | Path | None = None,
    require_client_cert: bool = False,
) -> IOpenSSLContextFactory:
    """Context factory for a TLS listener.

    ``cert_file`` holds the server certificate, optionally followed by its intermediates.
    With ``client_ca_file``, a client certificate, when sent, must chain to one of the CAs in
    that file; ``require_client_cert`` refuses clients that send none.
    """
    if require_client_cert and client_ca_file is None:
        raise ValueError("require_client_cert needs client_ca_file (the CA clients chain to)")
    leaf, *chain = load_certificates(cert_file)
    key = load_private_key(key_file)
    ca_certs = _x509(load_certificates(client_ca_file)) if client_ca_file is not None else None
    options = CertificateOptions(
        privateKey=key,
        certificate=crypto.X509.from_cryptography(leaf),
        extraCertChain=_x509(chain) or None,
        verify=ca_certs is not None,
        caCerts=ca_certs,
        requireCertificate=require_client_cert,
        raiseMinimumTo=MINIMUM_TLS,
    )
    _check_pair(options, cert_file, key_file)
    return cast(IOpenSSLContextFactory, options)  # zope interfaces are invisible to mypy


def client_tls_options(
    hostname: str,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> IOpenSSLClientConnectionCreator:
    """Connection creator for a TLS client to ``hostname`` (checked against the certificate).

    ``ca_file``: the CAs to trust (else the platform's store). ``cert_file``/``key_file``: our
    client certificate, for peers that demand one.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together")
    trust = (
        trustRootFromCertificates([Certificate(c) for c in _x509(load_certificates(ca_file))])
        if ca_file is not None
        else platformTrust()
    )
    client_cert = None
    extra: dict[str, object] = {"raiseMinimumTo": MINIMUM_TLS}
    if cert_file is not None and key_file is not None:
        leaf, *chain = load_certificates(cert_file)
        key = load_private_key(key_file)
        pair = CertificateOptions(privateKey=key, certificate=crypto.X509.from_cryptography(leaf))
        _check_pair(pair, cert_file, key_file)
        client_cert = PrivateCertificate.fromCertificateAndKeyPair(
            Certificate(crypto.X509.from_cryptography(leaf)), KeyPair(key)
        )
        if chain:
            extra["extraCertChain"] = _x509(chain)
    return optionsForClientTLS(
        hostname,
        trustRoot=trust,
        clientCertificate=client_cert,
        extraCertificateOptions=extra,
    )


__all__ = [
    "MINIMUM_TLS",
    "TlsFileError",
    "client_tls_options",
    "load_certificates",
    "load_private_key",
    "server_tls_options",
]
