"""Referral figures for the metrics endpoint, and the check of certificates about to expire.

:class:`ReferralMetrics` lives on the daemon's registry (the app's ``registry``, served by the
metrics listener). Counters count what *this* daemon did after the commit that made it so
(a referral created by the CLI in another process is counted as delivered, not as queued).

:func:`certificate_checks` lists the certificate files the referrals configuration uses (each
provider's client certificate and CA bundle, the listener's certificate and client CA);
:class:`CertificateWatch` reads them at start and then daily, sets
``corespond_tls_certificate_expiry_seconds`` per file and warns (log and
``corespond_tls_certificate_expiring``) when one expires within ``WARN_DAYS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from corespond.adapters.tls import TlsFileError, load_certificates
from corespond.daemon.clock import Clock
from corespond.daemon.config import ReferralsConfig
from corespond.daemon.metric_children import MetricChildren

log = structlog.get_logger("corespond.referrals")

WARN_DAYS = 30
CHECK_EVERY = 24 * 3600.0


class ReferralMetrics(MetricChildren):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__()
        self.queued = Counter(
            "corespond_referrals_queued",
            "Referral messages built, validated and queued in the outbox, by provider",
            ["provider"],
            registry=registry,
        )
        self.held = Counter(
            "corespond_referrals_held",
            "Referrals held for a person, by provider and reason (peer-error, undeliverable, "
            "part2-no-consent, unknown-provider)",
            ["provider", "reason"],
            registry=registry,
        )
        self.delivered = Counter(
            "corespond_referrals_delivered",
            "Referral messages the provider acknowledged (AA/CA), counted after the commit",
            ["provider"],
            registry=registry,
        )
        self.retries = Counter(
            "corespond_referral_retries",
            "Sends that ended without an ACK and were put back for a retry, by provider and code",
            ["provider", "code"],
            registry=registry,
        )
        self.ack_seconds = Histogram(
            "corespond_referral_ack_seconds",
            "Time from writing a referral message to the ACK that names it, by provider",
            ["provider"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.outbox = Gauge(
            "corespond_referral_outbox_depth",
            "Referral messages waiting or being sent (pending or sending), by provider",
            ["provider"],
            registry=registry,
        )
        self.inbound = Counter(
            "corespond_hl7_inbound",
            "HL7 messages the referral listener received, by message type and result "
            "(matched, unmatched, or the error code it was answered with)",
            ["type", "result"],
            registry=registry,
        )
        self.cert_expiry = Gauge(
            "corespond_tls_certificate_expiry_seconds",
            "Seconds until a configured certificate expires (negative: expired), by use and "
            "file",
            ["use", "path"],
            registry=registry,
        )
        self.cert_expiring = Gauge(
            "corespond_tls_certificate_expiring",
            f"1 while a configured certificate expires within {WARN_DAYS} days (or has)",
            ["use", "path"],
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class CertificateCheck:
    use: str  # e.g. "provider csu client certificate"
    path: Path


def certificate_checks(config: ReferralsConfig) -> list[CertificateCheck]:
    checks: list[CertificateCheck] = []
    for provider in config.providers:
        if provider.tls is None:
            continue
        if provider.tls.cert_file is not None:
            checks.append(
                CertificateCheck(f"provider {provider.name} client", provider.tls.cert_file)
            )
        if provider.tls.ca_file is not None:
            checks.append(CertificateCheck(f"provider {provider.name} ca", provider.tls.ca_file))
    listen = config.listen
    if listen is not None and listen.tls is not None:
        checks.append(CertificateCheck("listener server", listen.tls.cert_file))
        if listen.tls.client_ca_file is not None:
            checks.append(CertificateCheck("listener client ca", listen.tls.client_ca_file))
    return checks


def earliest_expiry(path: Path) -> datetime:
    """The earliest notAfter of the certificates in ``path`` (a chain expires with its first)."""
    return min(cert.not_valid_after_utc for cert in load_certificates(path))


def check_certificates(
    checks: Iterable[CertificateCheck], now: datetime, metrics: ReferralMetrics | None = None
) -> list[tuple[CertificateCheck, datetime]]:
    """Set the expiry gauges; log a warning for, and return, what expires within WARN_DAYS."""
    expiring = []
    for check in checks:
        try:
            expires = earliest_expiry(check.path)
        except TlsFileError as err:
            log.error("tls.certificate.unreadable", path=str(check.path), error=err.problem)
            continue
        left = expires - now
        soon = left <= timedelta(days=WARN_DAYS)
        if metrics is not None:
            metrics.cert_expiry.labels(check.use, str(check.path)).set(left.total_seconds())
            metrics.cert_expiring.labels(check.use, str(check.path)).set(1 if soon else 0)
        if soon:
            expiring.append((check, expires))
            log.warning(
                "tls.certificate.expiring",
                kind=check.use,
                path=str(check.path),
                expires=expires.isoformat(),
                seconds=int(left.total_seconds()),
            )
    return expiring


class CertificateWatch:
    """Checks the referral certificates at start and every ``CHECK_EVERY`` seconds."""

    def __init__(
        self,
        config: ReferralsConfig,
        clock: Clock,
        metrics: ReferralMetrics,
        in_thread: Callable[[Callable[[], Any]], Any],
    ) -> None:
        self.checks = certificate_checks(config)
        self.clock = clock
        self.metrics = metrics
        self._in_thread = in_thread
        self._loop: Any = None

    def start(self) -> None:
        if self.checks:
            self._loop = self.clock.looping_call(CHECK_EVERY, self.check, now=True)

    def check(self) -> Any:
        now = self.clock.now()
        return self._in_thread(lambda: check_certificates(self.checks, now, self.metrics))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
