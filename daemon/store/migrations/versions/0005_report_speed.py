"""Outcome report speed: indexes the report's queries read instead of the encounters table.

- ``encounters.cad_incident_no``: the HL7 referrals (a few) find their encounter by CAD
  number, instead of a scan of every encounter for each report.
- One covering index per per-second histogram and for the zone counts, on
  (bh_nexus_confirmed, the value, call_received_epoch, program): the report's filter (BH
  nexus, period, program) is answered from the index, and SQLite groups by the value in index
  order instead of sorting up to a million rows.
- (person_id, call_received_epoch, id, bh_nexus_confirmed, program): the per-person pass
  (repeats, frequent utilizers) reads each person's encounters in its window order from the
  index alone.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of tables.REPORT_INDEXED: a migration must not change when the models do.
REPORT_INDEXED = (
    "response_seconds",
    "page_ack_seconds",
    "on_scene_seconds",
    "officer_returned_seconds",
    "zone",
)


def upgrade() -> None:
    op.create_index("ix_encounters_cad_incident_no", "encounters", ["cad_incident_no"])
    for column in REPORT_INDEXED:
        op.create_index(
            f"ix_encounters_report_{column}",
            "encounters",
            ["bh_nexus_confirmed", column, "call_received_epoch", "program"],
        )
    op.create_index(
        "ix_encounters_report_person",
        "encounters",
        ["person_id", "call_received_epoch", "id", "bh_nexus_confirmed", "program"],
    )


def downgrade() -> None:
    op.drop_index("ix_encounters_report_person", table_name="encounters")
    for column in REPORT_INDEXED:
        op.drop_index(f"ix_encounters_report_{column}", table_name="encounters")
    op.drop_index("ix_encounters_cad_incident_no", table_name="encounters")
