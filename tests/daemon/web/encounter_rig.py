"""A taken page over the real paging core and store, and the site that serves its forms.

``taken_page(w)`` stores an incident, lets the paging core page c-101 (``C1445-1``) and has
c-101 accept it through the desk, which makes the incident an encounter. ``form_site`` builds
the daemon's web site on that paging core with a real :class:`EncounterDesk` (its transactions
run inline), as ``corespond run`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import select

from corespond.daemon.clock import Clock
from corespond.daemon.config import CustomField, OutcomesConfig, WebConfig
from corespond.daemon.decision import Response
from corespond.daemon.encounter_desk import EncounterDesk, SaveHook
from corespond.daemon.pager import PageAnswer
from corespond.daemon.snapshot import Location
from corespond.daemon.store.tables import encounters
from corespond.daemon.store.writer import StoredSnapshot, write_batch
from corespond.daemon.web import WebSite, build_web_site, encounter_link_signer, link_signer
from corespond.daemon.web.encounter_form import ReferralPageFactory
from tests.daemon.store.records import decision, record, snapshot
from tests.daemon.test_escalation import INCIDENT_POINT, T, World, inline, result_of
from tests.daemon.web.rig import PUBLIC_URL, web_config

PAGE = "C1445-1"
CLINICIAN = "c-101"
CUSTOM_FIELDS = (
    CustomField("follow_up_days", "integer", required=True, minimum=0, maximum=30),
    CustomField("peer_present", "boolean"),
    CustomField("services", "multichoice", values=("food", "shelter", "detox")),
    CustomField("risk", "choice", values=("low", "moderate", "high")),
    CustomField("next_contact", "date"),
    CustomField("distance_km", "number", minimum=0),
)
OUTCOMES = OutcomesConfig(program="metro", custom_fields=CUSTOM_FIELDS)


def paged_incident(w: World) -> None:
    """A clinician call, opened ten minutes before the paging world's now, paged to c-101."""
    snap = snapshot(
        "2026-001445", narrative="ZQXNARRATIVE hearing voices", person="ZQXPERSON Example",
        address="ZQXADDRESS 12 Imaginary Lane",
    )  # fmt: skip
    snap = dataclasses.replace(
        snap,
        incident_number="2026-001445",
        opened_at=T - timedelta(minutes=10),
        location=Location(INCIDENT_POINT, "ZQXADDRESS 12 Imaginary Lane", "Testville", "TX"),
    )
    rec = record(snap, decision(Response.CLINICIAN))
    with w.engine.begin() as conn:
        (stored,) = write_batch(conn, [rec])
    assert isinstance(stored, StoredSnapshot)
    w.service.observe(rec, stored)


def taken_page(w: World, answer: PageAnswer = PageAnswer.ACCEPT) -> None:
    paged_incident(w)
    result_of(w.service.answer(PAGE, CLINICIAN, answer, "ack-page"))


def form_site(
    w: World,
    *,
    config: WebConfig | None = None,
    hooks: tuple[SaveHook, ...] = (),
    referral_page: ReferralPageFactory | None = None,
    outcomes: OutcomesConfig = OUTCOMES,
) -> tuple[WebSite, EncounterDesk]:
    config = config or web_config(public_url=PUBLIC_URL)
    clock = Clock(w.reactor)
    desk = EncounterDesk(w.engine, outcomes, clock=clock, run_in_thread=inline, hooks=hooks)
    site = build_web_site(
        config, w.service, w.service, clock=clock, reactor=w.reactor, encounter_desk=desk,
        custom_fields=outcomes.custom_fields, referral_page=referral_page,
    )  # fmt: skip
    return site, desk


def encounter_token(w: World, clinician: str = CLINICIAN, page: str = PAGE, **kw: Any) -> str:
    signer = encounter_link_signer(web_config(**kw))
    return signer.sign(page, clinician, w.reactor.seconds())


def ack_token(w: World, clinician: str = CLINICIAN, page: str = PAGE) -> str:
    return link_signer(web_config()).sign(page, clinician, w.reactor.seconds())


def form_body(token: str, form: Mapping[str, Sequence[str]], **kw: Any) -> bytes:
    nonce = encounter_link_signer(web_config(**kw)).form_nonce(token)
    return urlencode({"nonce": nonce, **form}, doseq=True).encode()


FORM_HEADERS = (
    ("Content-Type", "application/x-www-form-urlencoded"),
    ("Origin", PUBLIC_URL),
)


def stored_encounter(w: World) -> dict[str, Any]:
    with w.engine.connect() as conn:
        return dict(conn.execute(select(encounters)).mappings().one())


def received_at(w: World) -> datetime:
    at = stored_encounter(w)["call_received_at"]
    assert isinstance(at, datetime)
    return at
