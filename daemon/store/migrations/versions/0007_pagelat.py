"""Paging latency and incidents that become eligible later (issue 4).

- ``chain_waits``: an incident whose decision calls for a chain that could not start (no
  location yet, or outside every program's zones); a later snapshot that gives it a covered
  location starts the chain.
- ``pages.incident_pk``: every step reads its incident's pages (attempts, who was paged or
  declined); without the index each step scans every page ever sent.

Revision ID: 0007_pagelat
Revises: 0006_ops
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_pagelat"
down_revision: str | None = "0006_ops"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types in tables.py: a migration must not change when the models do.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "chain_waits",
        sa.Column("incident_pk", Id, nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("response", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("since", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
        sa.ForeignKeyConstraint(
            ["incident_pk"], ["incidents.id"], name="fk_chain_waits_incident_pk_incidents"
        ),
        sa.PrimaryKeyConstraint("incident_pk", name="pk_chain_waits"),
    )
    op.create_index("ix_pages_incident_pk", "pages", ["incident_pk"])


def downgrade() -> None:
    op.drop_index("ix_pages_incident_pk", table_name="pages")
    op.drop_table("chain_waits")
