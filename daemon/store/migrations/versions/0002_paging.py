"""Paging: clinician availability, location fixes, escalation chains and steps, pages, replies.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types in tables.py: a migration must not change when the models do.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "clinician_states",
        sa.Column("clinician_id", sa.String(), nullable=False),
        sa.Column("availability", sa.String(), nullable=False),
        sa.Column("changed_at", Time, nullable=False),
        sa.Column("via", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("clinician_id", name="pk_clinician_states"),
    )
    op.create_table(
        "location_fixes",
        sa.Column("id", Id, nullable=False),
        sa.Column("clinician_id", sa.String(), nullable=False),
        sa.Column("lat", sa.Float(), nullable=False),
        sa.Column("lon", sa.Float(), nullable=False),
        sa.Column("fixed_at", Time, nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("accuracy_m", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_location_fixes"),
    )
    op.create_index(
        "ix_location_fixes_clinician_id_fixed_at", "location_fixes", ["clinician_id", "fixed_at"]
    )
    op.create_table(
        "escalation_chains",
        sa.Column("id", Id, nullable=False),
        sa.Column("incident_pk", Id, nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("program", sa.String(), nullable=False),
        sa.Column("response", sa.String(), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("closed_at", Time, nullable=True),
        sa.Column("accepted_by", sa.String(), nullable=True),
        sa.Column("pages_sent", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["incident_pk"], ["incidents.id"], name="fk_escalation_chains_incident_pk_incidents"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_escalation_chains"),
    )
    op.create_index("ix_escalation_chains_incident_pk", "escalation_chains", ["incident_pk"])
    op.create_index("ix_escalation_chains_state", "escalation_chains", ["state"])
    op.create_table(
        "escalation_steps",
        sa.Column("id", Id, nullable=False),
        sa.Column("chain_id", Id, nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("due_at", Time, nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("claimed_by", sa.String(), nullable=True),
        sa.Column("lease_until", Time, nullable=True),
        sa.Column("done_at", Time, nullable=True),
        sa.Column("outcome", sa.String(), nullable=True),
        sa.Column("dispatch", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["chain_id"], ["escalation_chains.id"],
            name="fk_escalation_steps_chain_id_escalation_chains",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_escalation_steps"),
        sa.UniqueConstraint("chain_id", "step", name="uq_escalation_steps_chain_id_step"),
    )  # fmt: skip
    op.create_index("ix_escalation_steps_state_due_at", "escalation_steps", ["state", "due_at"])
    op.create_table(
        "pages",
        sa.Column("id", Id, nullable=False),
        sa.Column("page_ref", sa.String(), nullable=False),
        sa.Column("chain_id", Id, nullable=False),
        sa.Column("step_id", Id, nullable=False),
        sa.Column("incident_pk", Id, nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("clinician_id", sa.String(), nullable=True),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("text", sa.String(), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("answered_at", Time, nullable=True),
        sa.Column("answered_via", sa.String(), nullable=True),
        sa.Column("endpoints", sa.JSON(), nullable=False),
        sa.Column("endpoint_index", sa.Integer(), nullable=False),
        sa.Column("delivery", sa.String(), nullable=False),
        sa.Column("next_try_at", Time, nullable=True),
        sa.Column("lease_until", Time, nullable=True),
        sa.Column("gateway", sa.String(), nullable=True),
        sa.Column("gateway_id", sa.String(), nullable=True),
        sa.Column("submitted_at", Time, nullable=True),
        sa.Column("receipt", sa.String(), nullable=True),
        sa.Column("receipt_at", Time, nullable=True),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["chain_id"], ["escalation_chains.id"], name="fk_pages_chain_id_escalation_chains"
        ),
        sa.ForeignKeyConstraint(
            ["step_id"], ["escalation_steps.id"], name="fk_pages_step_id_escalation_steps"
        ),
        sa.ForeignKeyConstraint(
            ["incident_pk"], ["incidents.id"], name="fk_pages_incident_pk_incidents"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_pages"),
        sa.UniqueConstraint("page_ref", name="uq_pages_page_ref"),
    )
    op.create_index("ix_pages_delivery_next_try_at", "pages", ["delivery", "next_try_at"])
    op.create_index("ix_pages_clinician_id_created_at", "pages", ["clinician_id", "created_at"])
    op.create_index("ix_pages_gateway_gateway_id", "pages", ["gateway", "gateway_id"])
    op.create_index("ix_pages_chain_id", "pages", ["chain_id"])
    op.create_table(
        "page_replies",
        sa.Column("id", Id, nullable=False),
        sa.Column("page_id", Id, nullable=True),
        sa.Column("gateway", sa.String(), nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.Column("answer", sa.String(), nullable=True),
        sa.Column("matched_by", sa.String(), nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("sender", sa.String(), nullable=True),
        sa.Column("text", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["page_id"], ["pages.id"], name="fk_page_replies_page_id_pages"),
        sa.PrimaryKeyConstraint("id", name="pk_page_replies"),
    )
    op.create_index("ix_page_replies_page_id", "page_replies", ["page_id"])


def downgrade() -> None:
    for table in (
        "page_replies",
        "pages",
        "escalation_steps",
        "escalation_chains",
        "location_fixes",
        "clinician_states",
    ):
        op.drop_table(table)
