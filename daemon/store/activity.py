"""Reads over the paging and referral tables: what a run did (the stop summary) and which
accepted calls have no referral yet (the demo's referral driver).

Synchronous functions over a Connection, plain dataclasses out: run them in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, func, select

from corespond.daemon.store.tables import (
    auto_referrals,
    encounters,
    escalation_chains,
    escalation_steps,
    incidents,
    location_fixes,
    pages,
    referral_messages,
    referrals,
)

# Page states a human answer leaves behind: took the call, or turned it down.
TOOK_CALL = ("accepted", "en_route", "on_scene")


@dataclass(frozen=True, slots=True)
class ReferralCount:
    state: str  # queued, delivered, held, cancelled, ...
    ack_code: str | None  # AA, AE, ... of the latest message; None: no ACK (yet)
    outcome: str | None  # the provider's RRI^I12: accepted, rejected, pending; None: none yet
    count: int


@dataclass(frozen=True, slots=True)
class Activity:
    """Paging and referral work since ``since`` (created since then)."""

    pages_sent: int  # submitted to a gateway: pages to clinicians and notices
    clinician_pages: int  # of those, answerable pages to clinicians
    accepted: int  # clinicians who took the call (accept, en route, on scene)
    declined: int
    unanswered: int  # clinician pages submitted and still without an answer
    chains: int  # dispatch chains started
    escalated: int  # dispatch chains that went past their first step
    reached_supervisor: int
    reached_dispatch: int  # chains that told dispatch no clinician was available
    referrals: tuple[ReferralCount, ...] = ()
    avl_fixes: int = 0  # clinicians' positions from the CAD feeds (EIDO unit locations)
    cad_answers: int = 0  # pages a CAD unit status answered (the unit went on the call)
    encounters_completed: int = 0  # of incidents (not seeded ones), completed this run
    auto_referrals: int = 0  # referrals a configured trigger (referrals.auto) created

    @property
    def referral_total(self) -> int:
        return sum(r.count for r in self.referrals)


def _count(conn: Connection, *where: ColumnElement[bool]) -> int:
    return int(conn.execute(select(func.count()).select_from(pages).where(*where)).scalar_one())


def activity_since(conn: Connection, since: datetime) -> Activity:
    p, c, s = pages.c, escalation_chains.c, escalation_steps.c
    sent = and_(p.created_at >= since, p.submitted_at.is_not(None))
    clinician = and_(sent, p.kind == "page")
    dispatch_chains = and_(c.created_at >= since, c.kind == "dispatch")

    def chains_with_step(*where: ColumnElement[bool]) -> int:
        return int(
            conn.execute(
                select(func.count(func.distinct(s.chain_id)))
                .select_from(escalation_steps.join(escalation_chains, c.id == s.chain_id))
                .where(dispatch_chains, s.state == "done", *where)
            ).scalar_one()
        )

    chains = int(
        conn.execute(
            select(func.count()).select_from(escalation_chains).where(dispatch_chains)
        ).scalar_one()
    )
    latest = (
        select(referral_messages.c.referral_id, func.max(referral_messages.c.id).label("mid"))
        .group_by(referral_messages.c.referral_id)
        .subquery()
    )
    r, m = referrals.c, referral_messages.c
    rows = conn.execute(
        select(r.state, m.ack_code, r.outcome, func.count())
        .select_from(
            referrals.outerjoin(latest, latest.c.referral_id == r.id).outerjoin(
                referral_messages, m.id == latest.c.mid
            )
        )
        .where(r.created_at >= since)
        .group_by(r.state, m.ack_code, r.outcome)
        .order_by(r.state, m.ack_code, r.outcome)
    ).all()
    return Activity(
        pages_sent=_count(conn, sent),
        clinician_pages=_count(conn, clinician),
        accepted=_count(conn, clinician, p.state.in_(TOOK_CALL)),
        declined=_count(conn, clinician, p.state == "declined"),
        unanswered=_count(conn, clinician, p.answered_at.is_(None)),
        chains=chains,
        escalated=chains_with_step(s.step >= 1),
        reached_supervisor=chains_with_step(s.action == "supervisor"),
        reached_dispatch=chains_with_step(s.action == "dispatch"),
        referrals=tuple(ReferralCount(row[0], row[1], row[2], int(row[3])) for row in rows),
        **_field_work(conn, since),
    )


def _field_work(conn: Connection, since: datetime) -> dict[str, int]:
    f, e, a, p = location_fixes.c, encounters.c, auto_referrals.c, pages.c

    def count(table: Any, *where: ColumnElement[bool]) -> int:
        return int(conn.execute(select(func.count()).select_from(table).where(*where))
                   .scalar_one())  # fmt: skip

    return {
        "avl_fixes": count(location_fixes, f.received_at >= since, f.source.like("eido:%")),
        "cad_answers": count(pages, p.answered_at >= since, p.answered_via.like("cad:%")),
        "encounters_completed": count(encounters, e.completed_at >= since,
                                      e.incident_id.is_not(None), e.status == "completed"),
        "auto_referrals": count(auto_referrals, a.done_at >= since, a.state == "done",
                                a.referral_ref.is_not(None)),
    }  # fmt: skip


@dataclass(frozen=True, slots=True)
class AcceptedCall:
    incident_number: str
    program: str
    zone: str | None
    clinician_id: str


def accepted_without_referral(conn: Connection, since: datetime) -> list[AcceptedCall]:
    """Dispatch chains accepted since ``since`` whose incident has no referral yet."""
    c, i = escalation_chains.c, incidents.c
    has_referral = (
        select(referrals.c.id).where(referrals.c.incident_ref == i.incident_number).exists()
    )
    rows = conn.execute(
        select(i.incident_number, c.program, i.zone, c.accepted_by)
        .select_from(escalation_chains.join(incidents, i.id == c.incident_pk))
        .where(
            c.kind == "dispatch",
            c.state == "accepted",
            c.closed_at >= since,
            c.accepted_by.is_not(None),
            i.incident_number.is_not(None),
            ~has_referral,
        )
        .order_by(c.closed_at)
    ).all()
    return [AcceptedCall(row[0], row[1], row[2], row[3]) for row in rows]


def open_pages_of(conn: Connection, clinician_ids: list[str]) -> list[tuple[str, str]]:
    """(clinician, incident external id) of the open pages to these clinicians (the demo's
    dispatcher puts their CAD units on those calls)."""
    p, i = pages.c, incidents.c
    rows = conn.execute(
        select(p.clinician_id, i.external_id)
        .select_from(pages.join(incidents, i.id == p.incident_pk))
        .where(p.kind == "page", p.state == "open", p.clinician_id.in_(clinician_ids))
        .order_by(p.id)
    ).all()
    return [(row[0], row[1]) for row in rows]


__all__ = ["AcceptedCall", "Activity", "ReferralCount", "accepted_without_referral",
           "activity_since", "open_pages_of"]  # fmt: skip
