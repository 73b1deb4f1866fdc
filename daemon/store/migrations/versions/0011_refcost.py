"""Referral idempotency keys (a second submit with the same key answers with the first
referral) and an index on decisions.created_at (the automatic referrals' start-up look-back).

Revision ID: 0011_refcost
Revises: 0010_pagecost
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_refcost"
down_revision: str | None = "0010_pagecost"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types in tables.py: a migration must not change when the models do.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "referral_idempotency",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("referral_id", Id, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name="fk_referral_idempotency_referral_id_referrals"
        ),
        sa.PrimaryKeyConstraint("key", name="pk_referral_idempotency"),
        sa.UniqueConstraint("referral_id", name="uq_referral_idempotency_referral_id"),
    )
    op.create_index("ix_decisions_created_at", "decisions", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_decisions_created_at", table_name="decisions")
    op.drop_table("referral_idempotency")
