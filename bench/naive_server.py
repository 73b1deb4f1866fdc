"""The baseline for bench/ingest.py: what a straightforward implementation would do.

Same framing (STX/ETX, ACK after commit), same EIDO parser and rule classifier, same tables and
SQLite settings (WAL, synchronous=FULL) as the daemon, but each snapshot is its own ORM session
and its own commit, in a worker thread. Not part of the product.

    python bench/naive_server.py PORT DB_PATH READY_FILE
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session
from twisted.internet import reactor, threads
from twisted.internet.protocol import Factory, Protocol

from corespond.adapters.eido import EidoFormat
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.snapshot import snapshot_protected_json, snapshot_public_json
from corespond.daemon.store import migrate
from corespond.daemon.store.engine import create_store_engine
from corespond.daemon.store.tables import DecisionRow, Incident, SnapshotRow
from corespond.rules.engine import RuleClassifier
from corespond.rules.loader import load_ruleset

FORMAT = EidoFormat()
CLASSIFIER = RuleClassifier(load_ruleset())


def store(engine, raw: bytes) -> bool:  # type: ignore[no-untyped-def]
    """Parse, classify and commit one snapshot in its own session."""
    snap = FORMAT.parse(raw)
    decision = CLASSIFIER.classify(snap)
    digest = hashlib.sha256(raw).hexdigest()
    with Session(engine) as session, session.begin():
        if session.scalar(select(SnapshotRow.id).where(SnapshotRow.digest == digest)):
            return True
        incident = session.scalar(
            select(Incident).where(
                Incident.source == "bench", Incident.external_id == snap.incident_id
            )
        )
        now = snap.updated_at
        if incident is None:
            incident = Incident(
                source="bench", external_id=snap.incident_id, status=snap.status.value,
                updated_at=now, first_received_at=now, last_received_at=now,
                snapshot_count=0, behavioral_health=False, response="none",
            )  # fmt: skip
            session.add(incident)
            session.flush()
        row = SnapshotRow(
            incident_id=incident.id, feed="bench", format="eido", received_at=now,
            source_updated_at=snap.updated_at, digest=digest, raw=raw,
            public=snapshot_public_json(snap), protected=snapshot_protected_json(snap),
        )  # fmt: skip
        session.add(row)
        session.flush()
        d = DecisionRow(
            snapshot_id=row.id, incident_id=incident.id, created_at=now,
            ruleset=decision.ruleset, behavioral_health=decision.behavioral_health,
            category=decision.category, response=decision.response.value, score=decision.score,
            rules=list(decision.rules), evidence=decision.evidence_json(), changed=False,
        )  # fmt: skip
        session.add(d)
        session.flush()
        if snap.updated_at >= incident.updated_at:
            incident.status = snap.status.value
            incident.call_type = snap.call_type
            incident.apco_type = snap.apco_type
            incident.updated_at = snap.updated_at
            incident.current_snapshot_id = row.id
            incident.current_decision_id = d.id
            incident.behavioral_health = decision.behavioral_health
            incident.response = decision.response.value
        incident.snapshot_count += 1
        incident.last_received_at = now
    return True


class NaiveFeed(Protocol):
    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self.buffer = b""
        self.chain = threads.deferToThread(lambda: None)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\x03" in self.buffer:
            frame, _, self.buffer = self.buffer.partition(b"\x03")
            raw = frame[frame.find(b"\x02") + 1 :]
            # One at a time, in order: each waits for the previous commit.
            self.chain.addCallback(
                lambda _, raw=raw: threads.deferToThread(store, self.engine, raw)
            )
            self.chain.addCallbacks(self._ack, self._nak)

    def _ack(self, _: object) -> None:
        assert self.transport is not None
        self.transport.write(b"\x06")

    def _nak(self, failure) -> None:  # type: ignore[no-untyped-def]
        failure.trap(RejectedMessage)
        assert self.transport is not None
        self.transport.write(b"\x15")


def main() -> None:
    port, db_path, ready = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    engine = create_store_engine(f"sqlite:///{db_path}", sqlite_synchronous="full")
    migrate.upgrade(engine)
    reactor.suggestThreadPoolSize(1)  # type: ignore[attr-defined]
    factory = Factory.forProtocol(lambda: NaiveFeed(engine))  # type: ignore[arg-type]
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    ready.write_text("ready")
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
