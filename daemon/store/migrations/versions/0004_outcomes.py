"""Outcomes: encounters, pseudonymous persons with blind-indexed identifiers, referrals made.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types in tables.py: a migration must not change when the models do.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def _times(*names: str, nullable: bool = True) -> list[sa.Column[Any]]:
    return [sa.Column(name, Time, nullable=nullable) for name in names]


def upgrade() -> None:
    op.create_table(
        "persons",
        sa.Column("id", Id, nullable=False),
        sa.Column("pseudonym", sa.String(), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_persons"),
        sa.UniqueConstraint("pseudonym", name="uq_persons_pseudonym"),
    )
    op.create_table(
        "person_identifiers",
        sa.Column("id", Id, nullable=False),
        sa.Column("person_id", Id, nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("blind_index", sa.String(), nullable=False),
        sa.Column("key_id", sa.String(), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.ForeignKeyConstraint(
            ["person_id"], ["persons.id"], name="fk_person_identifiers_person_id_persons"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_person_identifiers"),
        sa.UniqueConstraint("kind", "blind_index", name="uq_person_identifiers_kind_blind_index"),
    )
    op.create_index("ix_person_identifiers_person_id", "person_identifiers", ["person_id"])
    op.create_table(
        "encounters",
        sa.Column("id", Id, nullable=False),
        sa.Column("incident_id", Id, nullable=True),
        sa.Column("person_id", Id, nullable=True),
        sa.Column("program", sa.String(), nullable=False),
        sa.Column("team_type", sa.String(), nullable=True),
        sa.Column("clinician", sa.String(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("cad_incident_no", sa.String(), nullable=True),
        sa.Column("agency", sa.String(), nullable=True),
        sa.Column("zone", sa.String(), nullable=True),
        sa.Column("call_type", sa.String(), nullable=True),
        sa.Column("call_source", sa.String(), nullable=True),
        sa.Column("priority", sa.String(), nullable=True),
        sa.Column("classifier_response", sa.String(), nullable=True),
        sa.Column("classifier_category", sa.String(), nullable=True),
        sa.Column("bh_nexus_confirmed", sa.Boolean(), nullable=True),
        *_times("call_received_at", nullable=False),
        *_times(
            "dispatched_at",
            "clinician_paged_at",
            "page_ack_at",
            "en_route_at",
            "on_scene_at",
            "cleared_at",
            "officer_cleared_at",
        ),
        sa.Column("response_mode", sa.String(), nullable=True),
        sa.Column("call_received_epoch", sa.BigInteger(), nullable=False),
        sa.Column("response_seconds", sa.Integer(), nullable=True),
        sa.Column("page_ack_seconds", sa.Integer(), nullable=True),
        sa.Column("on_scene_seconds", sa.Integer(), nullable=True),
        sa.Column("officer_returned_seconds", sa.Integer(), nullable=True),
        sa.Column("presenting_issues", sa.JSON(), nullable=False),
        sa.Column("actions", sa.JSON(), nullable=False),
        sa.Column("service_on_scene", sa.Boolean(), nullable=False),
        sa.Column("disposition", sa.String(), nullable=True),
        sa.Column("destination_type", sa.String(), nullable=True),
        sa.Column("would_have_been_arrest", sa.Boolean(), nullable=True),
        sa.Column("would_have_been_ed", sa.Boolean(), nullable=True),
        sa.Column("use_of_force", sa.Boolean(), nullable=True),
        sa.Column("injury_subject", sa.Boolean(), nullable=True),
        sa.Column("injury_officer", sa.Boolean(), nullable=True),
        sa.Column("weapon_present", sa.Boolean(), nullable=True),
        sa.Column("demographics_source", sa.String(), nullable=True),
        sa.Column("race_ethnicity", sa.JSON(), nullable=False),
        sa.Column("race_group", sa.String(), nullable=True),
        sa.Column("gender", sa.String(), nullable=True),
        sa.Column("age_band", sa.String(), nullable=True),
        sa.Column("veteran", sa.String(), nullable=True),
        sa.Column("housing", sa.String(), nullable=True),
        sa.Column("language", sa.String(), nullable=True),
        sa.Column("custom", sa.JSON(), nullable=False),
        *_times("created_at", "updated_at", nullable=False),
        *_times("completed_at"),
        sa.ForeignKeyConstraint(
            ["incident_id"], ["incidents.id"], name="fk_encounters_incident_id_incidents"
        ),
        sa.ForeignKeyConstraint(
            ["person_id"], ["persons.id"], name="fk_encounters_person_id_persons"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_encounters"),
        sa.UniqueConstraint("incident_id", name="uq_encounters_incident_id"),
    )
    op.create_index("ix_encounters_call_received_at", "encounters", ["call_received_at"])
    op.create_index(
        "ix_encounters_person_id_call_received_at",
        "encounters",
        ["person_id", "call_received_at"],
    )
    op.create_table(
        "encounter_referrals",
        sa.Column("id", Id, nullable=False),
        sa.Column("encounter_id", Id, nullable=False),
        sa.Column("referred_at", Time, nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("appointment_at", Time, nullable=True),
        sa.ForeignKeyConstraint(
            ["encounter_id"],
            ["encounters.id"],
            name="fk_encounter_referrals_encounter_id_encounters",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_encounter_referrals"),
    )
    op.create_index("ix_encounter_referrals_encounter_id", "encounter_referrals", ["encounter_id"])


def downgrade() -> None:
    op.drop_table("encounter_referrals")
    op.drop_table("encounters")
    op.drop_table("person_identifiers")
    op.drop_table("persons")
