"""What a page costs (issue 4): the latest position of each clinician, and the pages indexes
a page step reads by.

- ``clinician_positions``: one row per clinician, its latest fix, kept by ``write_fix`` in the
  transaction that records the fix; a step (and the positions kept in memory) read 500 rows
  instead of grouping the whole fix history. Filled here from ``location_fixes``.
- ``pages.state``: who is busy (a page accepted, en route or on scene) is read by state.
- ``pages.created_at``: the pages of the recent window, by time.

Revision ID: 0010_pagecost
Revises: 0009_rollup
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_pagecost"
down_revision: str | None = "0009_rollup"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A frozen copy of the time type in tables.py: a migration must not change when the models do.
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "clinician_positions",
        sa.Column("clinician_id", sa.String(), nullable=False),
        sa.Column("lat", sa.Float(), nullable=False),
        sa.Column("lon", sa.Float(), nullable=False),
        sa.Column("fixed_at", Time, nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("accuracy_m", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("clinician_id", name="pk_clinician_positions"),
    )
    # Each clinician's latest fix (the highest id among equal times).
    op.execute(
        "INSERT INTO clinician_positions"
        " (clinician_id, lat, lon, fixed_at, received_at, source, accuracy_m)"
        " SELECT f.clinician_id, f.lat, f.lon, f.fixed_at, f.received_at, f.source, f.accuracy_m"
        " FROM location_fixes f WHERE f.id = (SELECT g.id FROM location_fixes g"
        " WHERE g.clinician_id = f.clinician_id ORDER BY g.fixed_at DESC, g.id DESC LIMIT 1)"
    )
    op.create_index("ix_pages_state", "pages", ["state"])
    op.create_index("ix_pages_created_at", "pages", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_pages_created_at", table_name="pages")
    op.drop_index("ix_pages_state", table_name="pages")
    op.drop_table("clinician_positions")
