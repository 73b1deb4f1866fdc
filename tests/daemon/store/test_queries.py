"""Reads: listing, finding and detailing incidents, totals, rejects."""

from __future__ import annotations

from sqlalchemy import Engine

from corespond.daemon.decision import Response
from corespond.daemon.snapshot import IncidentStatus
from corespond.daemon.store.queries import (
    DIGEST_PREFIX,
    Totals,
    audit_incidents,
    incident_detail,
    list_incidents,
    totals,
)
from corespond.daemon.store.writer import StoredSnapshot, write_batch
from tests.daemon.store.records import at, decision, record, reject, snapshot

URN = "urn:emergency:uid:incidentid:0001:psap.example"


def fill(engine: Engine) -> list[StoredSnapshot]:
    with engine.begin() as conn:
        results = write_batch(
            conn,
            [
                record(snapshot("A", updated=1), decision(Response.CLINICIAN), received=1),
                record(snapshot("A", updated=5), decision(Response.POLICE), received=2),
                record(snapshot("A", updated=3), decision(Response.NONE), received=3),
                record(snapshot("B", updated=2, status=IncidentStatus.CLOSED), received=4),
                record(snapshot(URN, updated=9), source="eido", received=5),
                record(snapshot("A", updated=0), source="other", received=6),
                reject(received=7),
            ],
        )
    return [r for r in results if isinstance(r, StoredSnapshot)]


def test_list_incidents(engine: Engine) -> None:
    fill(engine)
    with engine.connect() as conn:
        rows = list_incidents(conn)
        assert [(r.source, r.external_id) for r in rows] == [
            ("eido", URN),
            ("test", "A"),
            ("test", "B"),
            ("other", "A"),
        ]
        a = rows[1]
        assert a.updated_at == at(5) and a.snapshot_count == 3 and a.response == "police"
        assert [r.external_id for r in list_incidents(conn, status="closed")] == ["B"]
        assert [r.external_id for r in list_incidents(conn, behavioral_health=True)] == ["A"]
        assert len(list_incidents(conn, limit=2)) == 2


def test_incident_detail_by_each_kind_of_ref(engine: Engine) -> None:
    results = fill(engine)
    a_pk = results[0].incident_pk
    with engine.connect() as conn:
        by_pk = incident_detail(conn, str(a_pk))
        assert by_pk is not None and by_pk.incident.external_id == "A"
        assert incident_detail(conn, "test:A") == by_pk
        other = incident_detail(conn, "other:A")
        assert other is not None and other.incident.source == "other"
        # A bare external id held by two sources: the most recently updated one.
        bare = incident_detail(conn, "A")
        assert bare is not None and bare.incident.id == a_pk
        urn = incident_detail(conn, URN)  # colons in the id itself
        assert urn is not None and urn.incident.source == "eido"
        assert incident_detail(conn, f"eido:{URN}") == urn
        assert incident_detail(conn, "nope") is None
        assert incident_detail(conn, "999999") is None

    assert [s.source_updated_at for s in by_pk.snapshots] == [at(1), at(3), at(5)]
    assert [s.current for s in by_pk.snapshots] == [False, False, True]
    assert all(len(s.digest) == DIGEST_PREFIX for s in by_pk.snapshots)
    assert [d.decision.response for d in by_pk.decisions] == [
        Response.CLINICIAN,
        Response.POLICE,
        Response.NONE,
    ]
    assert [d.changed for d in by_pk.decisions] == [True, True, False]
    assert by_pk.decisions[0].decision == decision(Response.CLINICIAN)


def test_totals_and_audit(engine: Engine) -> None:
    with engine.connect() as conn:
        assert totals(conn) == Totals(0, 0, 0, 0)
    fill(engine)
    with engine.connect() as conn:
        assert totals(conn) == Totals(incidents=4, snapshots=6, decisions=6, rejects=1)
        assert audit_incidents(conn) == []
