"""Ops: dashboard sessions in the database (a restart keeps users signed in; daemons behind one
balancer share them). Only a hash of each session id is stored.

Revision ID: 0006_ops
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_ops"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the type in tables.py: a migration must not change when the models do.
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "dashboard_sessions",
        sa.Column("id_hash", sa.String(), nullable=False),
        sa.Column("user_name", sa.String(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("clinician", sa.String(), nullable=True),
        sa.Column("csrf", sa.String(), nullable=False),
        sa.Column("started_at", Time, nullable=False),
        sa.Column("last_seen_at", Time, nullable=False),
        sa.Column("expires_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id_hash", name="pk_dashboard_sessions"),
    )
    for column in ("user_name", "expires_at", "last_seen_at"):
        op.create_index(f"ix_dashboard_sessions_{column}", "dashboard_sessions", [column])


def downgrade() -> None:
    op.drop_table("dashboard_sessions")
