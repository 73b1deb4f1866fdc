"""Snapshots are deduplicated per incident: one unique index on ``(incident_id, digest)``
replaces both the unique constraint on ``digest`` and the index on ``(incident_id,
source_updated_at)``. A batch's inserts then touch index leaves near its (few, active)
incidents instead of a random leaf of an index over every snapshot ever stored; reading an
incident's snapshots in source time order sorts its few rows after the same index's seek.

The same bytes from two sources (two incidents, by the store's own key) are now kept once per
incident. The downgrade fails on the unique constraint if any two snapshots share a digest.

SQLite cannot drop a table constraint: the table is made again (Alembic batch mode), which
needs foreign key enforcement off, as ``corespond.daemon.store.migrate`` runs every migration.

Revision ID: 0013_dedupkey
Revises: 0012_reportflags
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_dedupkey"
down_revision: str | None = "0012_reportflags"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the snapshots table as 0001 made it (batch mode copies it on SQLite: the
# columns keep their declared types instead of what reflection reads back).
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)
OLD_INDEX = "ix_snapshots_incident_id_source_updated_at"
OLD_UNIQUE = "uq_snapshots_digest"
NEW_INDEX = "ix_snapshots_incident_id_digest"


def _snapshots(*, old: bool) -> sa.Table:
    table = sa.Table(
        "snapshots",
        sa.MetaData(),
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
    )
    if old:
        table.append_constraint(sa.UniqueConstraint("digest", name=OLD_UNIQUE))
        sa.Index(OLD_INDEX, table.c.incident_id, table.c.source_updated_at)
    else:
        sa.Index(NEW_INDEX, table.c.incident_id, table.c.digest, unique=True)
    return table


def upgrade() -> None:
    with op.batch_alter_table("snapshots", copy_from=_snapshots(old=True)) as batch:
        batch.create_index(NEW_INDEX, ["incident_id", "digest"], unique=True)
        batch.drop_constraint(OLD_UNIQUE, type_="unique")
        batch.drop_index(OLD_INDEX)


def downgrade() -> None:
    with op.batch_alter_table("snapshots", copy_from=_snapshots(old=False)) as batch:
        batch.create_unique_constraint(OLD_UNIQUE, ["digest"])
        batch.create_index(OLD_INDEX, ["incident_id", "source_updated_at"])
        batch.drop_index(NEW_INDEX)
