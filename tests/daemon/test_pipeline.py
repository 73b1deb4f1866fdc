"""The pipeline over the real store (SQLite and PostgreSQL), with writes run inline."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, func, select
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock as TaskClock
from twisted.python.failure import Failure

from corespond.adapters.corespond_json import CorespondJsonFormat
from corespond.adapters.eido import EidoFormat, eido_document
from corespond.daemon import log as corespond_log
from corespond.daemon.clock import Clock
from corespond.daemon.decision import Response
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.ingest import Accepted, Origin, Rejected, SnapshotState
from corespond.daemon.log import configure_logging
from corespond.daemon.pipeline import FeedContext, IngestMetrics, Pipeline, observe_many
from corespond.daemon.snapshot import Note, Snapshot, snapshot_to_json
from corespond.daemon.store.queries import totals
from corespond.daemon.store.tables import RejectedMessageRow
from corespond.daemon.store.writer import IncidentStore, StoreError
from corespond.rules.engine import RuleClassifier
from corespond.rules.loader import load_ruleset

T0 = datetime(2026, 11, 26, 20, 0, tzinfo=UTC)
RULES = load_ruleset()


def classifier() -> RuleClassifier:
    return RuleClassifier(RULES)
ORIGIN = Origin(feed="cad", peer="127.0.0.1:5000")


def inline(fn: Callable[[], Any]) -> Deferred[Any]:
    return maybeDeferred(fn)


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    return out[0]


@pytest.fixture
def store(engine: Engine) -> IncidentStore:
    store = IncidentStore(engine, TaskClock(), run_in_thread=inline, run_read_in_thread=inline)
    store.start()
    return store


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def pipeline(store: IncidentStore, registry: CollectorRegistry) -> Pipeline:
    clock = TaskClock()
    clock.advance(T0.timestamp())
    return Pipeline(store, classifier(), Clock(clock), IngestMetrics(registry))


def feed(fmt: Any = None, max_bytes: int = 1 << 20) -> FeedContext:
    return FeedContext("cad", "cad-a", fmt or EidoFormat(), max_bytes)


def snap(n: int = 1, text: str = "RP states brother hearing voices", minutes: int = 0) -> Snapshot:
    return Snapshot(
        incident_id=f"urn:emergency:uid:incidentid:pipe{n}:psap.test.invalid",
        updated_at=T0 + timedelta(minutes=minutes),
        apco_type="EDP",
        call_type="EMOTIONALLY DISTURBED PERSON",
        notes=(Note(text, T0),),
    )


def eido(s: Snapshot) -> bytes:
    return json.dumps(eido_document(s)).encode()


def test_new_then_duplicate(pipeline: Pipeline, store: IncidentStore) -> None:
    [first] = result(pipeline.ingest(feed(), eido(snap()), ORIGIN))
    assert isinstance(first, Accepted) and first.snapshot is SnapshotState.NEW
    assert first.incident_id == snap().incident_id
    [again] = result(pipeline.ingest(feed(), eido(snap()), ORIGIN))
    assert again == Accepted(first.incident_id, first.snapshot_id, SnapshotState.DUPLICATE)
    t = result(store.run_read(totals))
    assert (t.incidents, t.snapshots, t.decisions, t.rejects) == (1, 1, 1, 0)
    assert (pipeline.counts.new, pipeline.counts.duplicate) == (1, 1)


def test_message_counts_by_outcome_add_up(
    pipeline: Pipeline, registry: CollectorRegistry
) -> None:
    for n in (1, 2, 1):
        result(pipeline.ingest(feed(), eido(snap(n)), ORIGIN))
    result(pipeline.ingest(feed(), b"{", ORIGIN))
    counts = {
        outcome: registry.get_sample_value(
            "corespond_cad_messages_total", {"feed": "cad", "outcome": outcome}
        )
        for outcome in ("new", "duplicate", "rejected")
    }
    assert counts == {"new": 2, "duplicate": 1, "rejected": 1}
    latency = registry.get_sample_value("corespond_ingest_seconds_count", {"feed": "cad"})
    assert latency == 4


def test_rejects_are_quarantined_with_the_reason(
    pipeline: Pipeline, engine: Engine, registry: CollectorRegistry
) -> None:
    [bad] = result(pipeline.ingest(feed(), b'{"$id": ', Origin("cad", name="x.json")))
    assert isinstance(bad, Rejected) and bad.code == "malformed-json" and bad.reject_id
    with engine.connect() as conn:
        row = conn.execute(select(RejectedMessageRow)).one()
    assert (row.raw, row.code, row.origin_name, row.feed) == (
        b'{"$id": ',
        "malformed-json",
        "x.json",
        "cad",
    )
    assert (
        registry.get_sample_value(
            "corespond_cad_rejects_total", {"feed": "cad", "code": "malformed-json"}
        )
        == 1
    )


def test_oversize_payload_keeps_a_truncated_copy(pipeline: Pipeline, engine: Engine) -> None:
    payload = eido(snap())
    [out] = result(pipeline.ingest(feed(max_bytes=100), payload, ORIGIN))
    assert isinstance(out, Rejected) and out.code == "oversize"
    assert "100 bytes" in out.reason
    with engine.connect() as conn:
        assert conn.execute(select(RejectedMessageRow.raw)).scalar_one() == payload[:100]


def test_each_line_of_a_jsonl_payload_stands_alone(pipeline: Pipeline) -> None:
    good = json.dumps(snapshot_to_json(snap(2))).encode()
    outcomes = result(pipeline.ingest(feed(CorespondJsonFormat()), good + b"\n{}\n", ORIGIN))
    assert [type(o) for o in outcomes] == [Accepted, Rejected]
    assert outcomes[1].code == "missing-field"


def test_a_weapon_changes_the_decision_and_observers_hear_of_it(pipeline: Pipeline) -> None:
    heard: list[tuple[str, Response]] = []
    pipeline.observers.append(
        lambda rec, stored: heard.append((stored.external_id, rec.decision.response))
    )
    result(pipeline.ingest(feed(), eido(snap()), ORIGIN))
    result(
        pipeline.ingest(feed(), eido(snap(text="SUBJ states he has a knife", minutes=2)), ORIGIN)
    )
    # An older snapshot arriving late is stored but changes nothing.
    result(pipeline.ingest(feed(), eido(snap(text="calm now", minutes=1)), ORIGIN))
    assert heard == [
        (snap().incident_id, Response.CLINICIAN),
        (snap().incident_id, Response.POLICE),
    ]
    assert pipeline.counts.decision_changes == 2 and pipeline.counts.behavioral_health == 1


def test_current_observers_hear_of_every_other_new_current_snapshot(pipeline: Pipeline) -> None:
    """A snapshot that does not change the decision but becomes the incident's current state
    (its location arrived, the call reopened) goes to the current observers; a decision
    change goes to the decision observers only; a late or repeated snapshot to neither."""
    changed: list[int] = []
    current: list[int] = []
    pipeline.observers.append(lambda rec, stored: changed.append(stored.snapshot_id))
    pipeline.current_observers.append(lambda rec, stored: current.append(stored.snapshot_id))
    [first] = result(pipeline.ingest(feed(), eido(snap()), ORIGIN))
    [second] = result(pipeline.ingest(feed(), eido(snap(minutes=2)), ORIGIN))
    result(pipeline.ingest(feed(), eido(snap(minutes=1)), ORIGIN))  # late
    result(pipeline.ingest(feed(), eido(snap(minutes=2)), ORIGIN))  # duplicate
    assert isinstance(first, Accepted) and isinstance(second, Accepted)
    assert changed == [first.snapshot_id] and current == [second.snapshot_id]


class Exploding:
    name = "exploding"

    def split(self, payload: bytes) -> list[bytes]:
        return [payload]

    def parse(self, message: bytes) -> Snapshot:
        raise KeyError("a parser bug")


def test_a_parser_bug_rejects_the_message_and_the_feed_goes_on(pipeline: Pipeline) -> None:
    [out] = result(pipeline.ingest(feed(Exploding()), b"anything", ORIGIN))
    assert isinstance(out, Rejected) and out.code == "parser-error"
    [ok] = result(pipeline.ingest(feed(), eido(snap()), ORIGIN))
    assert isinstance(ok, Accepted)


class BrokenClassifier(RuleClassifier):
    def classify(self, snapshot: Snapshot) -> Any:
        raise RuntimeError("a classifier bug")


def test_a_classifier_bug_still_stores_the_snapshot(pipeline: Pipeline) -> None:
    pipeline.classifier = BrokenClassifier(RULES)
    [out] = result(pipeline.ingest(feed(), eido(snap()), ORIGIN))
    assert isinstance(out, Accepted)


def broken_store(engine: Engine, registry: CollectorRegistry) -> tuple[IncidentStore, Pipeline]:
    """A store whose every write fails, and a pipeline over it."""

    def broken(fn: Callable[[], Any]) -> Deferred[Any]:
        return fail(RuntimeError("disk full"))

    store = IncidentStore(engine, TaskClock(), run_in_thread=broken, attempts=1)
    store.start()
    return store, Pipeline(store, classifier(), Clock(TaskClock()), IngestMetrics(registry))


def test_a_store_failure_is_not_acknowledged(engine: Engine, registry: CollectorRegistry) -> None:
    _, pipeline = broken_store(engine, registry)
    failure = result(pipeline.ingest(feed(), eido(snap()), ORIGIN))
    assert isinstance(failure, Failure)  # the transport must not ack
    assert failure.check(StoreError)
    two = json.dumps(snapshot_to_json(snap(1))) + "\n" + json.dumps(snapshot_to_json(snap(2)))
    failure = result(pipeline.ingest(feed(CorespondJsonFormat()), two.encode(), ORIGIN))
    assert isinstance(failure, Failure) and failure.check(StoreError)  # the same, unwrapped
    assert registry.get_sample_value("corespond_store_failures_total", {"feed": "cad"}) == 2


def test_a_payload_committed_in_part_still_reports_what_committed(
    engine: Engine, registry: CollectorRegistry
) -> None:
    """A payload's two snapshots go in two batches and the second fails: the payload is not
    acknowledged, and the first, committed, is counted (and told to observers) all the same,
    since a resend would only find it a duplicate."""
    writes: list[Any] = []

    def second_fails(fn: Callable[[], Any]) -> Deferred[Any]:
        writes.append(fn)
        return fail(RuntimeError("disk full")) if len(writes) == 2 else maybeDeferred(fn)

    store = IncidentStore(
        engine, TaskClock(), run_in_thread=second_fails, run_read_in_thread=inline, attempts=1,
        batch_max=1,  # one snapshot a batch: the payload spans two
    )
    store.start()
    pipeline = Pipeline(store, classifier(), Clock(TaskClock()), IngestMetrics(registry))
    two = json.dumps(snapshot_to_json(snap(1))) + "\n" + json.dumps(snapshot_to_json(snap(2)))
    [answer] = result(pipeline.ingest_for(feed(CorespondJsonFormat())).many([two.encode()], ORIGIN))
    assert isinstance(answer, Failure) and answer.check(StoreError)
    assert len(writes) == 2 and pipeline.counts.new == 1
    assert result(store.run_read(totals)).snapshots == 1


def test_a_split_that_refuses_rejects_the_payload(pipeline: Pipeline) -> None:
    class Refusing(Exploding):
        def split(self, payload: bytes) -> list[bytes]:
            raise RejectedMessage("bad-encoding", "not UTF-8")

    [out] = result(pipeline.ingest(feed(Refusing()), b"\xff", ORIGIN))
    assert isinstance(out, Rejected) and out.code == "bad-encoding"


def test_totals_count_everything(pipeline: Pipeline, store: IncidentStore, engine: Engine) -> None:
    for n in range(3):
        result(pipeline.ingest(feed(), eido(snap(n)), ORIGIN))
    result(pipeline.ingest(feed(), b"nope", ORIGIN))
    t = result(store.run_read(totals))
    assert (t.incidents, t.snapshots, t.decisions, t.rejects) == (3, 3, 3, 1)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(RejectedMessageRow)).scalar() == 1


def test_many_payloads_with_one_deferred_answer_each_in_order(
    pipeline: Pipeline, store: IncidentStore, registry: CollectorRegistry
) -> None:
    ingest = pipeline.ingest_for(feed())
    answers = result(ingest.many([eido(snap(1)), b"{", eido(snap(2))], ORIGIN))
    assert [[type(o) for o in a] for a in answers] == [[Accepted], [Rejected], [Accepted]]
    assert answers[1][0].code == "malformed-json"
    again = result(ingest.many([eido(snap(2)), eido(snap(1))], ORIGIN))
    assert [a[0] for a in again] == [
        Accepted(answers[2][0].incident_id, answers[2][0].snapshot_id, SnapshotState.DUPLICATE),
        Accepted(answers[0][0].incident_id, answers[0][0].snapshot_id, SnapshotState.DUPLICATE),
    ]
    t = result(store.run_read(totals))
    assert (t.incidents, t.snapshots, t.rejects) == (2, 2, 1)
    assert registry.get_sample_value("corespond_ingest_seconds_count", {"feed": "cad"}) == 5
    jsonl = pipeline.ingest_for(feed(CorespondJsonFormat()))
    good = json.dumps(snapshot_to_json(snap(3))).encode()
    [one, two] = result(jsonl.many([good + b"\n{}\n", b"\n"], ORIGIN))
    assert [type(o) for o in one] == [Accepted, Rejected] and two == []


def test_many_payloads_not_stored_are_failures(engine: Engine, registry: CollectorRegistry) -> None:
    store, pipeline = broken_store(engine, registry)
    answers = result(pipeline.ingest_for(feed()).many([eido(snap(1)), b"{"], ORIGIN))
    assert [a.check(StoreError) for a in answers] == [StoreError, StoreError]
    assert registry.get_sample_value("corespond_store_failures_total", {"feed": "cad"}) == 2
    assert result(store.store_many([])) == []
    result(store.stop())
    closed = result(pipeline.ingest_for(feed()).many([eido(snap(2))], ORIGIN))
    assert [type(a) for a in closed] == [Failure]


class _Flushes(io.StringIO):
    """A log stream that counts its flushes."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
def log_stream() -> Iterator[_Flushes]:
    stream = _Flushes()
    configure_logging("info", "json", stream, cache_loggers=False)
    yield stream
    if corespond_log._handler is not None:
        logging.getLogger().removeHandler(corespond_log._handler)
        corespond_log._handler = None
    structlog.reset_defaults()


def test_a_batchs_lines_go_out_with_one_flush(engine: Engine, log_stream: _Flushes) -> None:
    writes: list[Callable[[], None]] = []

    def writer_thread(fn: Callable[[], Any]) -> Deferred[Any]:
        # The batch is written when the test says, as the writer thread would do it later.
        d: Deferred[Any] = Deferred()
        writes.append(lambda: d.callback(fn()))
        return d

    store = IncidentStore(engine, TaskClock(), run_in_thread=writer_thread)
    store.start()
    pipeline = Pipeline(store, classifier(), Clock(TaskClock()), IngestMetrics(CollectorRegistry()))
    ingest = pipeline.ingest_for(feed())
    answered = ingest.many([eido(snap(n)) for n in range(1, 6)], ORIGIN)
    before = log_stream.flushes  # (earlier tests' Twisted events may be written first)
    writes.pop()()
    assert all(isinstance(a[0], Accepted) for a in result(answered))
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    stored = [line for line in lines if line["event"] == "cad.snapshot.stored"]
    # One line per snapshot, every field kept, in order; one flush for the batch's five.
    assert [line["incident_id"] for line in stored] == [snap(n).incident_id for n in range(1, 6)]
    assert all(line["snapshot_id"] and line["rules"] and line["ruleset"] for line in stored)
    assert log_stream.flushes == before + 1
    one = ingest(eido(snap(7)), ORIGIN)
    writes.pop()()
    assert isinstance(result(one)[0], Accepted)
    assert log_stream.flushes == before + 2
    assert log_stream.getvalue().count("cad.snapshot.stored") == 6
    assert not writes


def test_a_groups_metrics_are_counted_at_once(
    pipeline: Pipeline, registry: CollectorRegistry
) -> None:
    """ingest_many counts a group's snapshots and observes its latency in one update each:
    the same figures as one payload at a time."""
    ingest = pipeline.ingest_for(feed())
    result(ingest.many([eido(snap(1)), eido(snap(2)), b"{", eido(snap(1))], ORIGIN))
    result(ingest.many([eido(snap(3))], ORIGIN))
    counts = {
        outcome: registry.get_sample_value(
            "corespond_cad_messages_total", {"feed": "cad", "outcome": outcome}
        )
        for outcome in ("new", "duplicate", "rejected")
    }
    assert counts == {"new": 3, "duplicate": 1, "rejected": 1}
    assert (pipeline.counts.new, pipeline.counts.duplicate) == (3, 1)
    assert registry.get_sample_value("corespond_ingest_seconds_count", {"feed": "cad"}) == 5


@pytest.mark.parametrize("amount", [0.0, 0.0004, 0.0005, 0.003, 1.0, 4.99, 5.0, 7.5])
@pytest.mark.parametrize("times", [0, 1, 2, 17])
def test_observe_many_is_observe_that_many_times(amount: float, times: int) -> None:
    metrics_one = IngestMetrics(CollectorRegistry())
    metrics_many = IngestMetrics(CollectorRegistry())
    child_one, child_many = metrics_one.latency.labels("cad"), metrics_many.latency.labels("cad")
    for _ in range(times):
        child_one.observe(amount)
    observe_many(child_many, amount, times)

    def samples(metrics: IngestMetrics) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name, s.labels, round(s.value, 9))
            for family in metrics.latency.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        ]

    assert samples(metrics_many) == samples(metrics_one)
