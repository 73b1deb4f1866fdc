"""Referrals: HL7 v2 referrals, their outbox, Part 2 consents and disclosures, inbound
HL7 messages and the providers' RRI^I12 outcomes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types in tables.py: a migration must not change when the models do.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "referral_consents",
        sa.Column("id", Id, nullable=False),
        sa.Column("consent_ref", sa.String(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("purpose", sa.String(), nullable=False),
        sa.Column("recorded_at", Time, nullable=False),
        sa.Column("expires_at", Time, nullable=True),
        sa.Column("revoked_at", Time, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_referral_consents"),
        sa.UniqueConstraint("consent_ref", name="uq_referral_consents_consent_ref"),
    )
    op.create_table(
        "referrals",
        sa.Column("id", Id, nullable=False),
        sa.Column("ref", sa.String(length=32), nullable=False),
        sa.Column("incident_ref", sa.String(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("service_type", sa.String(), nullable=False),
        sa.Column("urgency", sa.String(length=16), nullable=False),
        sa.Column("program", sa.String(), nullable=True),
        sa.Column("region", sa.String(), nullable=True),
        sa.Column("referring_clinician", sa.String(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("hold_reason", sa.String(), nullable=True),
        sa.Column("part2", sa.Boolean(), nullable=False),
        sa.Column("consent_id", Id, nullable=True),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("delivered_at", Time, nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("outcome_at", Time, nullable=True),
        sa.Column("appointment_at", Time, nullable=True),
        sa.Column("person", sa.JSON(), nullable=False),
        sa.Column("summary", sa.String(), nullable=True),
        sa.Column("peer_error", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["consent_id"],
            ["referral_consents.id"],
            name="fk_referrals_consent_id_referral_consents",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_referrals"),
        sa.UniqueConstraint("ref", name="uq_referrals_ref"),
    )
    op.create_index("ix_referrals_incident_ref", "referrals", ["incident_ref"])
    op.create_index("ix_referrals_state", "referrals", ["state"])
    op.create_table(
        "hl7_inbound",
        sa.Column("id", Id, nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.Column("peer", sa.String(), nullable=True),
        sa.Column("message_type", sa.String(), nullable=True),
        sa.Column("control_id", sa.String(), nullable=True),
        sa.Column("acked_control_id", sa.String(), nullable=True),
        sa.Column("referral_id", Id, nullable=True),
        sa.Column("error_code", sa.String(), nullable=True),
        sa.Column("error_reason", sa.String(), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name="fk_hl7_inbound_referral_id_referrals"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_hl7_inbound"),
    )
    op.create_index("ix_hl7_inbound_received_at", "hl7_inbound", ["received_at"])
    op.create_table(
        "referral_messages",
        sa.Column("id", Id, nullable=False),
        sa.Column("referral_id", Id, nullable=False),
        sa.Column("control_id", sa.String(length=20), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("profile", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_due", Time, nullable=False),
        sa.Column("lease_until", Time, nullable=True),
        sa.Column("claimed_by", sa.String(), nullable=True),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("ack_code", sa.String(length=2), nullable=True),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("acked_at", Time, nullable=True),
        sa.Column("message", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name="fk_referral_messages_referral_id_referrals"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_referral_messages"),
        sa.UniqueConstraint("control_id", name="uq_referral_messages_control_id"),
    )
    op.create_index("ix_referral_messages_referral_id", "referral_messages", ["referral_id"])
    op.create_index(
        "ix_referral_messages_state_next_due", "referral_messages", ["state", "next_due"]
    )
    op.create_table(
        "referral_disclosures",
        sa.Column("id", Id, nullable=False),
        sa.Column("referral_id", Id, nullable=False),
        sa.Column("message_id", Id, nullable=False),
        sa.Column("control_id", sa.String(length=20), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("consent_id", Id, nullable=True),
        sa.Column("what", sa.String(), nullable=False),
        sa.Column("disclosed_at", Time, nullable=False),
        sa.ForeignKeyConstraint(
            ["consent_id"],
            ["referral_consents.id"],
            name="fk_referral_disclosures_consent_id_referral_consents",
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["referral_messages.id"],
            name="fk_referral_disclosures_message_id_referral_messages",
        ),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name="fk_referral_disclosures_referral_id_referrals"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_referral_disclosures"),
    )
    op.create_index("ix_referral_disclosures_referral_id", "referral_disclosures", ["referral_id"])
    op.create_table(
        "referral_outcomes",
        sa.Column("id", Id, nullable=False),
        sa.Column("referral_id", Id, nullable=False),
        sa.Column("inbound_id", Id, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("appointment_at", Time, nullable=True),
        sa.Column("received_at", Time, nullable=False),
        sa.ForeignKeyConstraint(
            ["inbound_id"], ["hl7_inbound.id"], name="fk_referral_outcomes_inbound_id_hl7_inbound"
        ),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name="fk_referral_outcomes_referral_id_referrals"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_referral_outcomes"),
    )
    op.create_index("ix_referral_outcomes_referral_id", "referral_outcomes", ["referral_id"])


def downgrade() -> None:
    op.drop_index("ix_referral_outcomes_referral_id", table_name="referral_outcomes")
    op.drop_table("referral_outcomes")
    op.drop_index("ix_referral_disclosures_referral_id", table_name="referral_disclosures")
    op.drop_table("referral_disclosures")
    op.drop_index("ix_referral_messages_state_next_due", table_name="referral_messages")
    op.drop_index("ix_referral_messages_referral_id", table_name="referral_messages")
    op.drop_table("referral_messages")
    op.drop_index("ix_hl7_inbound_received_at", table_name="hl7_inbound")
    op.drop_table("hl7_inbound")
    op.drop_index("ix_referrals_state", table_name="referrals")
    op.drop_index("ix_referrals_incident_ref", table_name="referrals")
    op.drop_table("referrals")
    op.drop_table("referral_consents")
