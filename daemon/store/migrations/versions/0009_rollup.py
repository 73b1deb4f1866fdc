"""Outcome report rollups: counts and per-second duration counts per month x program x one
reporting dimension, per-person facts of every BH encounter linked to a person, and the
frequent-utilizer threshold those facts hold (backfilled by 0012_reportflags).

Revision ID: 0009_rollup
Revises: 0008_mobile
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_rollup"
down_revision: str | None = "0008_mobile"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types and count names in tables.py: a migration must not change when
# the models do.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
ROLLUP_COUNTS = (
    "encounters", "bh", "documented", "arrested", "enforcement", "no_action", "with_referral",
    "voluntary", "involuntary", "ems", "ed_diverted", "cf_arrest", "jail_diverted", "active",
    "served", "use_of_force", "injury_subject", "injury_officer", "unlinked",
    "voluntary_crisis_center", "voluntary_ed", "voluntary_detox", "voluntary_shelter",
    "voluntary_home_family", "voluntary_other",
)  # fmt: skip
KEY_ORDER = {"sqlite_with_rowid": False}


def upgrade() -> None:
    op.create_table(
        "report_rollup_counts",
        sa.Column("dim", sa.String(), nullable=False),
        sa.Column("recorded", sa.Boolean(), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.Column("month", sa.String(), nullable=False),
        sa.Column("program", sa.String(), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in ROLLUP_COUNTS),
        sa.PrimaryKeyConstraint(
            "dim", "recorded", "value", "month", "program", name="pk_report_rollup_counts"
        ),
        **KEY_ORDER,
    )
    op.create_table(
        "report_rollup_durations",
        sa.Column("measure", sa.String(), nullable=False),
        sa.Column("dim", sa.String(), nullable=False),
        sa.Column("recorded", sa.Boolean(), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.Column("seconds", sa.Integer(), nullable=False),
        sa.Column("month", sa.String(), nullable=False),
        sa.Column("program", sa.String(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint(
            "measure",
            "dim",
            "recorded",
            "value",
            "seconds",
            "month",
            "program",
            name="pk_report_rollup_durations",
        ),
        **KEY_ORDER,
    )
    op.create_table(
        "report_person_facts",
        sa.Column("person_id", Id, nullable=False),
        sa.Column("call_received_epoch", sa.BigInteger(), nullable=False),
        sa.Column("encounter_id", Id, nullable=False),
        sa.Column("program", sa.String(), nullable=False),
        sa.Column("month", sa.String(), nullable=False),
        *(
            sa.Column(name, sa.String(), nullable=True)
            for name in ("agency", "zone", "race_group", "gender", "age_band")
        ),
        *(
            sa.Column(name, sa.BigInteger(), nullable=True)
            for name in ("gap", "gap_program", "span", "span_program")
        ),
        sa.PrimaryKeyConstraint(
            "person_id", "call_received_epoch", "encounter_id", name="pk_report_person_facts"
        ),
        **KEY_ORDER,
    )
    op.create_table(
        "report_rollup_state",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_report_rollup_state"),
    )
    # Backfilled by 0012_reportflags (with the referral flags it adds), with the code that
    # keeps them: that code writes the columns of the head revision, not of this one.


def downgrade() -> None:
    for table in (
        "report_rollup_state",
        "report_person_facts",
        "report_rollup_durations",
        "report_rollup_counts",
    ):
        op.drop_table(table)
