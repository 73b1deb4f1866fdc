"""The daemon's web listener: the clinician's ack page and the API, on one twisted.web Site.

:func:`build_web_site` builds it from the ``web:`` configuration and the paging core's desks;
:class:`~corespond.daemon.web.ack.AckLinks` makes the signed links pages carry. Gateway
callbacks and the dashboard are mounted on the same site with
:meth:`~corespond.daemon.web.site.WebSite.mount`.
"""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from corespond.daemon.clock import Clock
from corespond.daemon.config import WebConfig
from corespond.daemon.responders import ClinicianDesk, PageDesk
from corespond.daemon.signed_links import LinkKeys, LinkSigner
from corespond.daemon.web.ack import AckLinks, AckPages
from corespond.daemon.web.api import ApiV1, EncounterUpdater, ReferralCreator
from corespond.daemon.web.auth import SystemTokens
from corespond.daemon.web.site import WebSite


def link_signer(config: WebConfig) -> LinkSigner:
    keys = LinkKeys.from_text(config.link_key, config.link_previous_key)
    return LinkSigner(keys, config.link_lifetime_seconds)


def ack_links(config: WebConfig, clock: Clock) -> AckLinks:
    """What the paging core calls to put a signed link in a page."""
    return AckLinks(link_signer(config), config.public_url, clock)


def build_web_site(
    config: WebConfig,
    page_desk: PageDesk,
    clinician_desk: ClinicianDesk,
    *,
    clock: Clock,
    reactor: Any = None,
    referrals: ReferralCreator | None = None,
    encounters: EncounterUpdater | None = None,
) -> WebSite:
    """The site ``corespond run`` listens with: ``/ack/<token>`` and ``/api/v1`` (with
    ``/api/v1/referrals`` when ``referrals`` creates them)."""
    signer = link_signer(config)
    site = WebSite(max_body_bytes=config.max_body_bytes, reactor=reactor)
    site.mount(
        "/ack",
        AckPages(
            page_desk,
            signer=signer,
            clock=clock,
            public_url=config.public_url,
            zone=ZoneInfo(config.timezone),
        ),
    )
    systems = SystemTokens({s.name: s.token for s in config.systems})
    site.mount(
        "/api/v1",
        ApiV1(
            clinician_desk,
            systems=systems,
            signer=signer,
            clock=clock,
            referrals=referrals,
            encounters=encounters,
        ),
    )
    return site


__all__ = ["AckLinks", "WebSite", "ack_links", "build_web_site", "link_signer"]
