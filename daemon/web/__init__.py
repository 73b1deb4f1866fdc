"""The daemon's web listener: the clinician's ack page, encounter and referral forms, and the
API, on one twisted.web Site.

:func:`build_web_site` builds it from the ``web:`` configuration and the paging core's desks;
:class:`~corespond.daemon.web.ack.AckLinks` makes the signed links pages carry. Gateway
callbacks and the dashboard are mounted on the same site with
:meth:`~corespond.daemon.web.site.WebSite.mount`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from zoneinfo import ZoneInfo

from corespond.daemon.clock import Clock
from corespond.daemon.config import CustomField, WebConfig
from corespond.daemon.encounter_desk import EncounterDesk
from corespond.daemon.responders import ClinicianDesk, PageDesk
from corespond.daemon.signed_links import ENCOUNTER_PURPOSE, LinkKeys, LinkSigner
from corespond.daemon.web.ack import AckLinks, AckPages
from corespond.daemon.web.api import ApiV1, EncounterUpdater, ReferralCreator
from corespond.daemon.web.auth import SystemTokens
from corespond.daemon.web.encounter_form import (
    EncounterLinks,
    EncounterPages,
    ReferralPageFactory,
)
from corespond.daemon.web.site import WebSite

# What SIGHUP may change in the web section without a restart: the link keys (and the lifetime
# of new links) and the systems' tokens, which are secrets an operator rotates.
RELOADABLE = (
    "link_key_file", "link_key", "link_previous_key_file", "link_previous_key",
    "link_lifetime_seconds", "encounter_link_lifetime_seconds", "systems",
)  # fmt: skip


def link_keys(config: WebConfig) -> LinkKeys:
    return LinkKeys.from_text(config.link_key, config.link_previous_key)


def link_signer(config: WebConfig) -> LinkSigner:
    return LinkSigner(link_keys(config), config.link_lifetime_seconds)


def encounter_link_signer(config: WebConfig) -> LinkSigner:
    """Signs the encounter-form links a taken page offers (same key, their own purpose)."""
    return LinkSigner(link_keys(config), config.encounter_link_lifetime_seconds, ENCOUNTER_PURPOSE)


def system_tokens(config: WebConfig) -> SystemTokens:
    return SystemTokens({s.name: s.token for s in config.systems})


def web_restart_needed(old: WebConfig | None, new: WebConfig | None) -> bool:
    """Whether going from ``old`` to ``new`` changes more than :data:`RELOADABLE` holds."""
    if old is None or new is None:
        return old is not new
    return replace(new, **{name: getattr(old, name) for name in RELOADABLE}) != old


def ack_links(config: WebConfig, clock: Clock, signer: LinkSigner | None = None) -> AckLinks:
    """What the paging core calls to put a signed link in a page (``signer``: the one the web
    site checks links with, so that a key reload reaches both)."""
    return AckLinks(signer or link_signer(config), config.public_url, clock)


def build_web_site(
    config: WebConfig,
    page_desk: PageDesk,
    clinician_desk: ClinicianDesk,
    *,
    clock: Clock,
    reactor: Any = None,
    referrals: ReferralCreator | None = None,
    encounters: EncounterUpdater | None = None,
    signer: LinkSigner | None = None,
    encounter_signer: LinkSigner | None = None,
    systems: SystemTokens | None = None,
    encounter_desk: EncounterDesk | None = None,
    custom_fields: Sequence[CustomField] = (),
    referral_page: ReferralPageFactory | None = None,
) -> WebSite:
    """The site ``corespond run`` listens with: ``/ack/<token>`` and ``/api/v1`` (with
    ``/api/v1/referrals`` when ``referrals`` creates them); with an ``encounter_desk`` also
    the encounter form at ``/encounter/<token>`` (and its referral form from
    ``referral_page``), linked from a taken page. ``signer``, ``encounter_signer`` and
    ``systems``: the daemon's own, which a reload updates in place; made from ``config`` when
    not given."""
    signer = signer or link_signer(config)
    zone = ZoneInfo(config.timezone)
    site = WebSite(max_body_bytes=config.max_body_bytes, reactor=reactor)
    forms: EncounterLinks | None = None
    if encounter_desk is not None:
        encounter_signer = encounter_signer or encounter_link_signer(config)
        forms = EncounterLinks(encounter_signer, config.public_url, clock,
                               referrals=referral_page is not None)  # fmt: skip
        site.mount(
            "/encounter",
            EncounterPages(
                encounter_desk, signer=encounter_signer, clock=clock,
                public_url=config.public_url, zone=zone, custom_fields=custom_fields,
                referral_page=referral_page,
            ),
        )  # fmt: skip
    site.mount(
        "/ack",
        AckPages(
            page_desk,
            signer=signer,
            clock=clock,
            public_url=config.public_url,
            zone=zone,
            forms=forms,
        ),
    )
    systems = systems or system_tokens(config)
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


__all__ = [
    "RELOADABLE",
    "AckLinks",
    "WebSite",
    "ack_links",
    "build_web_site",
    "encounter_link_signer",
    "link_keys",
    "link_signer",
    "system_tokens",
    "web_restart_needed",
]
