"""Referral flags in the outcome report rollups: a ``referred`` count per rollup cell, and per
person fact the encounter's referrals (referred, enrolled, when, linked within 30 / 90 days),
so that the report joins no referrals for whole months; an index on the facts in the order
the report by month groups them. Both tables are made again with the new columns and every
rollup is rebuilt from the encounters (this is also the backfill of 0009_rollup's tables).

Revision ID: 0012_reportflags
Revises: 0011_refcost
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_reportflags"
down_revision: str | None = "0011_refcost"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types and count names in tables.py: a migration must not change when
# the models do.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
ROLLUP_COUNTS_0009 = (
    "encounters", "bh", "documented", "arrested", "enforcement", "no_action", "with_referral",
    "voluntary", "involuntary", "ems", "ed_diverted", "cf_arrest", "jail_diverted", "active",
    "served", "use_of_force", "injury_subject", "injury_officer", "unlinked",
    "voluntary_crisis_center", "voluntary_ed", "voluntary_detox", "voluntary_shelter",
    "voluntary_home_family", "voluntary_other",
)  # fmt: skip
KEY_ORDER = {"sqlite_with_rowid": False}


def _counts(names: Sequence[str]) -> None:
    op.create_table(
        "report_rollup_counts",
        sa.Column("dim", sa.String(), nullable=False),
        sa.Column("recorded", sa.Boolean(), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.Column("month", sa.String(), nullable=False),
        sa.Column("program", sa.String(), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in names),
        sa.PrimaryKeyConstraint(
            "dim", "recorded", "value", "month", "program", name="pk_report_rollup_counts"
        ),
        **KEY_ORDER,
    )


def _facts(flags: bool) -> None:
    extra = []
    if flags:
        extra = [
            sa.Column("referred", sa.Integer(), nullable=False),
            sa.Column("enrolled", sa.Integer(), nullable=False),
            sa.Column("enrolled_at", sa.BigInteger(), nullable=True),
            sa.Column("linked_30", sa.Integer(), nullable=False),
            sa.Column("linked_90", sa.Integer(), nullable=False),
        ]
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
        *extra,
        sa.PrimaryKeyConstraint(
            "person_id", "call_received_epoch", "encounter_id", name="pk_report_person_facts"
        ),
        **KEY_ORDER,
    )


FACTS_BY_MONTH = (
    "month", "person_id", "call_received_epoch", "program", "gap", "span", "gap_program",
    "span_program", "referred", "enrolled", "enrolled_at", "linked_30", "linked_90",
)  # fmt: skip


def upgrade() -> None:
    op.drop_table("report_rollup_counts")
    op.drop_table("report_person_facts")
    _counts((*ROLLUP_COUNTS_0009, "referred"))
    _facts(flags=True)
    # The report by month groups the facts by (month, person): read in this order.
    op.create_index("ix_report_person_facts_month", "report_person_facts", list(FACTS_BY_MONTH))
    # Rebuilt with the code that keeps them, for the threshold they held (else the default, 3;
    # a configuration with another one is used with `corespond report rebuild-rollups`).
    from corespond.daemon.rollups import rebuild_rollups

    rebuild_rollups(op.get_bind())


def downgrade() -> None:
    op.drop_table("report_rollup_counts")
    op.drop_table("report_person_facts")
    _counts(ROLLUP_COUNTS_0009)
    _facts(flags=False)
    # Empty tables: the report computes from the encounters until they are rebuilt.
    op.execute(sa.text("DELETE FROM report_rollup_durations"))
    op.execute(sa.text("DELETE FROM report_rollup_state WHERE name = 'fu_threshold'"))
