"""The schema's promises: where protected health information may live, and UTC times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import Connection, Engine, String, Text, select

from corespond.daemon.decision import Response
from corespond.daemon.store.tables import (
    Base,
    clean_text,
    incidents,
    phi_columns,
    rejected_messages,
)
from corespond.daemon.store.writer import write_batch
from tests.daemon.store.records import decision, record, reject, snapshot


def test_the_phi_columns() -> None:
    """Adding a PHI column must be a deliberate act: update this list, and retention and
    field encryption with it."""
    assert phi_columns() == [
        "decisions.evidence",
        "hl7_inbound.raw",
        "page_replies.sender",
        "page_replies.text",
        "pages.endpoints",
        "person_identifiers.value",
        "referral_idempotency.digest",
        "referral_messages.message",
        "referrals.peer_error",
        "referrals.person",
        "referrals.summary",
        "rejected_messages.raw",
        "snapshots.protected",
        "snapshots.raw",
    ]


MARKERS = {
    "narrative": "ZQXNARRATIVE",
    "person": "ZQXPERSON",
    "address": "ZQXADDRESS",
}


INGEST_TABLES = {"incidents", "snapshots", "decisions", "rejected_messages"}
OUTCOME_TABLES = {"persons", "person_identifiers", "encounters", "encounter_referrals"}
REFERRAL_TABLES = {
    "referrals", "referral_messages", "referral_consents", "referral_disclosures",
    "hl7_inbound", "referral_outcomes",
}  # fmt: skip


def test_no_phi_outside_the_phi_columns(engine: Engine) -> None:
    snap = snapshot(
        "PHI-1",
        narrative=f"{MARKERS['narrative']} says she hears voices",
        person=f"{MARKERS['person']} McTestface",
        address=f"{MARKERS['address']} 12 Imaginary Lane",
    )
    bad = f"{{{MARKERS['narrative']}".encode()
    with engine.begin() as conn:
        write_batch(
            conn,
            [
                record(snap, decision(Response.CLINICIAN, evidence_text=MARKERS["narrative"])),
                reject(bad),
            ],
        )
    _write_referral_rows(engine)
    with engine.begin() as conn:
        _encounter_with_person(conn, f"{MARKERS['person']} McTestface")
    hits: dict[str, list[str]] = {}
    with engine.connect() as conn:
        # The ingest path's and the referrals' tables; the paging tables are checked after a
        # whole escalation in tests/daemon/test_escalation.py.
        for table in Base.metadata.sorted_tables:
            if table.name not in INGEST_TABLES | REFERRAL_TABLES | OUTCOME_TABLES:
                continue
            rows = conn.execute(select(table)).mappings().all()
            assert rows, table.name
            for column in table.columns:
                text = " ".join(
                    (v.decode("latin-1") if isinstance(v, bytes) else str(v))
                    for v in (row[column.name] for row in rows)
                )
                # Case-blind: a normalized (lowercased) copy of an identifier is still PHI.
                found = [m for m in MARKERS.values() if m.lower() in text.lower()]
                if found:
                    hits[f"{table.name}.{column.name}"] = found
    assert set(hits) <= set(phi_columns())
    # ... and the markers did reach the PHI columns (the test would be vacuous otherwise).
    assert {"snapshots.raw", "snapshots.protected", "decisions.evidence"} <= set(hits)
    assert "rejected_messages.raw" in hits
    assert {"referrals.person", "referrals.summary", "referral_messages.message"} <= set(hits)
    assert "hl7_inbound.raw" in hits
    assert "person_identifiers.value" in hits


def _encounter_with_person(conn: Connection, name: str) -> None:
    """An encounter of the stored incident, completed and linked to a person by name."""
    from corespond.daemon.config import OutcomesConfig
    from corespond.daemon.encounters import add_referral, encounter_from_incident, update_encounter

    incident_id = conn.execute(select(incidents.c.id)).scalars().first()
    assert incident_id is not None
    now = datetime(2031, 3, 4, 6, tzinfo=UTC)
    eid = encounter_from_incident(conn, incident_id, "co-responder", now)
    person = {"name": name, "dob": "1990-01-01", "mrn": "M-1"}
    changes = {
        "bh_nexus_confirmed": True,
        "disposition": "resolved_with_referral",
        "person": person,
    }
    update_encounter(conn, eid, changes, OutcomesConfig(person_key=b"k" * 32), now, complete=True)
    add_referral(conn, eid, "prov-1", now, "enrolled", now + timedelta(days=2))


def _write_referral_rows(engine: Engine) -> None:
    """A Part 2 referral delivered under consent and answered by an RRI^I12 (every table)."""
    from datetime import timedelta

    from corespond.adapters.hl7_referral import Person
    from corespond.daemon.referrals import (
        claim_due,
        create_referral,
        record_consent,
        record_delivered,
        store_inbound,
    )
    from tests.daemon.referral_rig import config, now, request

    with engine.begin() as conn:
        record_consent(conn, "CONS-1", "csu", now())
    person = Person(family=MARKERS["person"], street=MARKERS["address"])
    created = create_referral(
        engine,
        config(),
        request(person=person, summary=MARKERS["narrative"], part2=True, consent_ref="CONS-1"),
        now(),
    )
    with engine.begin() as conn:
        [claimed] = claim_due(conn, now(), "w", lease=timedelta(seconds=30))
        record_delivered(conn, claimed, "AA", now())
    rri = (
        f"MSH|^~\\&|BHRECV|CSU|CORESPOND|COUNTY-BH|20270115090000||RRI^I12^RRI_I12|RRI1|P|2.5.1\r"
        f"MSA|AA|{created.control_id}\rRF1|A|||||{created.ref}^CORESPOND\r"
        f"NTE|1||{MARKERS['narrative']} accepted\r"
    ).encode()
    assert store_inbound(engine, rri, "127.0.0.1:1", now()).outcome == "accepted"


def test_times_come_back_aware_utc(engine: Engine) -> None:
    minus_five = timezone(timedelta(hours=-5))
    local = datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=minus_five)
    with engine.begin() as conn:
        [rid] = write_batch(conn, [reject()])
        conn.execute(
            rejected_messages.update()
            .where(rejected_messages.c.id == rid)
            .values(received_at=local)
        )
    with engine.connect() as conn:
        value = conn.execute(select(rejected_messages.c.received_at)).scalar_one()
    assert value == local and value.tzinfo is UTC
    naive = datetime(2031, 1, 2, 3, 4, 5)  # taken as UTC
    with engine.begin() as conn:
        conn.execute(rejected_messages.update().values(received_at=naive))
    with engine.connect() as conn:
        value = conn.execute(select(rejected_messages.c.received_at)).scalar_one()
    assert value == naive.replace(tzinfo=UTC)


def test_clean_text() -> None:
    assert clean_text(None) is None
    assert clean_text("plain") == "plain"
    assert clean_text("a\x00b") == "a\ufffdb"
    assert clean_text("x\ud800y\udfff") == "x\ufffdy\ufffd"
    assert clean_text("é") == "é"


def test_string_columns_are_unbounded_where_input_lands() -> None:
    """A long value from a feed must not fail a batch (and stall the feed) on PostgreSQL."""
    bounded = [
        f"{t.name}.{c.name}"
        for t in Base.metadata.sorted_tables
        for c in t.columns
        if isinstance(c.type, String | Text) and c.type.length is not None
    ]
    # status and response are written from enums; digests are sha256 hex. Referrals: ids we
    # make (ref, control_id), our states, and peer codes only after checking them against
    # their tables (MSA-1, RF1-1).
    assert sorted(bounded) == [
        "decisions.response",
        "incidents.response",
        "incidents.status",
        "referral_disclosures.control_id",
        "referral_idempotency.digest",
        "referral_messages.ack_code",
        "referral_messages.control_id",
        "referral_messages.profile",
        "referral_messages.state",
        "referral_outcomes.status",
        "referrals.outcome",
        "referrals.ref",
        "referrals.state",
        "referrals.urgency",
        "rejected_messages.digest",
        "snapshots.digest",
    ]
