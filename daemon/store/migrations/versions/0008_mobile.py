"""Automatic referrals: one row per incident, trigger, provider and service type that a
configured trigger (``referrals.auto``: a disposition saved on an encounter, or a rule in the
incident's decision) asks for, claimed by a worker until the referral exists.

Revision ID: 0008_mobile
Revises: 0007_pagelat
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_mobile"
down_revision: str | None = "0007_pagelat"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types in tables.py: a migration must not change when the models do.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "auto_referrals",
        sa.Column("id", Id, nullable=False),
        sa.Column("incident_pk", Id, nullable=False),
        sa.Column("trigger", sa.String(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("service_type", sa.String(), nullable=False),
        sa.Column("referring_clinician", sa.String(), nullable=True),
        sa.Column("program", sa.String(), nullable=True),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("due_at", Time, nullable=False),
        sa.Column("claimed_by", sa.String(), nullable=True),
        sa.Column("lease_until", Time, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("done_at", Time, nullable=True),
        sa.Column("referral_ref", sa.String(), nullable=True),
        sa.Column("refusal", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["incident_pk"], ["incidents.id"], name="fk_auto_referrals_incident_pk_incidents"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_auto_referrals"),
        sa.UniqueConstraint(
            "incident_pk",
            "trigger",
            "provider",
            "service_type",
            name="uq_auto_referrals_incident_pk_trigger_provider_service_type",
        ),
    )
    op.create_index("ix_auto_referrals_state_due_at", "auto_referrals", ["state", "due_at"])


def downgrade() -> None:
    op.drop_index("ix_auto_referrals_state_due_at", table_name="auto_referrals")
    op.drop_table("auto_referrals")
