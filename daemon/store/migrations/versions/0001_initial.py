"""Initial schema: incidents, their snapshots and decisions, and rejected messages.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types in tables.py: a migration must not change when the models do.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", Id, nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("external_id", sa.String(), nullable=False),
        sa.Column("incident_number", sa.String(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("call_type", sa.String(), nullable=True),
        sa.Column("call_type_code", sa.String(), nullable=True),
        sa.Column("apco_type", sa.String(), nullable=True),
        sa.Column("priority", sa.String(), nullable=True),
        sa.Column("agency", sa.String(), nullable=True),
        sa.Column("zone", sa.String(), nullable=True),
        sa.Column("lat", sa.Float(), nullable=True),
        sa.Column("lon", sa.Float(), nullable=True),
        sa.Column("opened_at", Time, nullable=True),
        sa.Column("closed_at", Time, nullable=True),
        sa.Column("updated_at", Time, nullable=False),
        sa.Column("first_received_at", Time, nullable=False),
        sa.Column("last_received_at", Time, nullable=False),
        sa.Column("snapshot_count", sa.Integer(), nullable=False),
        sa.Column("current_snapshot_id", Id, nullable=True),
        sa.Column("current_decision_id", Id, nullable=True),
        sa.Column("behavioral_health", sa.Boolean(), nullable=False),
        sa.Column("category", sa.String(), nullable=True),
        sa.Column("response", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_incidents"),
        sa.UniqueConstraint("source", "external_id", name="uq_incidents_source_external_id"),
    )
    op.create_index("ix_incidents_external_id", "incidents", ["external_id"])
    op.create_index("ix_incidents_updated_at", "incidents", ["updated_at"])

    op.create_table(
        "snapshots",
        sa.Column("id", Id, nullable=False),
        sa.Column("incident_id", Id, nullable=False),
        sa.Column("feed", sa.String(), nullable=False),
        sa.Column("format", sa.String(), nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.Column("source_updated_at", Time, nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("public", sa.JSON(), nullable=False),
        sa.Column("protected", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["incident_id"], ["incidents.id"], name="fk_snapshots_incident_id_incidents"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_snapshots"),
        sa.UniqueConstraint("digest", name="uq_snapshots_digest"),
    )
    op.create_index(
        "ix_snapshots_incident_id_source_updated_at",
        "snapshots",
        ["incident_id", "source_updated_at"],
    )

    op.create_table(
        "decisions",
        sa.Column("id", Id, nullable=False),
        sa.Column("snapshot_id", Id, nullable=False),
        sa.Column("incident_id", Id, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("ruleset", sa.String(), nullable=False),
        sa.Column("behavioral_health", sa.Boolean(), nullable=False),
        sa.Column("category", sa.String(), nullable=True),
        sa.Column("response", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("changed", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["incident_id"], ["incidents.id"], name="fk_decisions_incident_id_incidents"
        ),
        sa.ForeignKeyConstraint(
            ["snapshot_id"], ["snapshots.id"], name="fk_decisions_snapshot_id_snapshots"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_decisions"),
        sa.UniqueConstraint("snapshot_id", name="uq_decisions_snapshot_id"),
    )
    op.create_index("ix_decisions_incident_id", "decisions", ["incident_id"])

    op.create_table(
        "rejected_messages",
        sa.Column("id", Id, nullable=False),
        sa.Column("feed", sa.String(), nullable=False),
        sa.Column("format", sa.String(), nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.Column("code", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("where", sa.String(), nullable=True),
        sa.Column("origin_name", sa.String(), nullable=True),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rejected_messages"),
    )
    op.create_index("ix_rejected_messages_received_at", "rejected_messages", ["received_at"])


def downgrade() -> None:
    op.drop_table("rejected_messages")
    op.drop_table("decisions")
    op.drop_table("snapshots")
    op.drop_table("incidents")
