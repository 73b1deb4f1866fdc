"""The path of one CAD payload: split, parse, classify, store, then answer.

:func:`prepare_records` is the synchronous, pure half (bytes in, records to write out); the
daemon's :class:`Pipeline` hands its records to the group-committing store and fires the
transport's Deferred only after the commit; ``corespond replay`` writes the same records with
:func:`corespond.daemon.store.writer.write_batch` directly. Both paths therefore parse, classify
and store exactly alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.python.failure import Failure

from corespond.adapters.formats import MessageFormat
from corespond.daemon.clock import Clock
from corespond.daemon.decision import Classifier, Decision, Response
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.ingest import Accepted, Origin, Outcome, Rejected, SnapshotState
from corespond.daemon.log import LineLogger, error_text
from corespond.daemon.metric_children import MetricChildren
from corespond.daemon.snapshot import Snapshot
from corespond.daemon.store.writer import (
    IncidentStore,
    RejectRecord,
    SnapshotRecord,
    StoredSnapshot,
)

log = structlog.get_logger(__name__)
# The line written for every stored snapshot (the same line, without structlog's wrapper).
stored_log = LineLogger(__name__)
_stored_line = stored_log.fixed(
    "cad.snapshot.stored", "feed", "incident_id", "snapshot_id", "state", "status",
    "behavioral_health", "category", "response", "rules", "ruleset", "changed", "old_response",
)  # fmt: skip
_duplicate_line = stored_log.fixed("cad.snapshot.duplicate", "feed", "incident_id", "snapshot_id")


@dataclass(frozen=True, slots=True)
class FeedContext:
    """What the pipeline needs to know about the feed a payload arrived on."""

    name: str
    source: str
    format: MessageFormat
    max_message_bytes: int


def prepare_records(
    feed: FeedContext,
    payload: bytes,
    origin: Origin,
    received_at: datetime,
    classifier: Classifier,
) -> list[SnapshotRecord | RejectRecord]:
    """Parse and classify every message in ``payload``; never raises for bad input."""
    fmt = feed.format
    if len(payload) > feed.max_message_bytes:
        return [
            _reject(
                feed, origin, received_at, payload[: feed.max_message_bytes],
                RejectedMessage(
                    "oversize",
                    f"payload of {len(payload)} bytes exceeds the feed's limit of "
                    f"{feed.max_message_bytes} bytes (quarantined copy truncated)",
                ),
            )
        ]  # fmt: skip
    try:
        messages = fmt.split(payload)
    except RejectedMessage as err:
        return [_reject(feed, origin, received_at, payload, err)]
    records: list[SnapshotRecord | RejectRecord] = []
    for message in messages:
        try:
            snapshot = fmt.parse(message)
        except RejectedMessage as err:
            records.append(_reject(feed, origin, received_at, message, err))
            continue
        except Exception:
            # A parser bug must not stall the feed: keep the message, say it was our fault.
            log.exception("cad.parser.failed", feed=feed.name, format=fmt.name)
            bug = RejectedMessage("parser-error", f"the {fmt.name} parser failed internally")
            records.append(_reject(feed, origin, received_at, message, bug))
            continue
        records.append(
            SnapshotRecord(  # (feed, source, format, received_at, raw, snapshot, decision)
                feed.name,
                feed.source,
                fmt.name,
                received_at,
                message,
                snapshot,
                classify_safely(classifier, snapshot, feed.name),
            )
        )
    return records


def classify_safely(classifier: Classifier, snapshot: Snapshot, feed: str) -> Decision:
    """The classifier's decision; if it fails, a decision that says so (the snapshot is kept)."""
    try:
        return classifier.classify(snapshot)
    except Exception:
        log.exception("classifier.failed", feed=feed, ruleset=classifier.version)
        return Decision(
            behavioral_health=False,
            category=None,
            response=Response.NONE,
            score=0.0,
            rules=("classifier.error",),
            evidence=(),
            ruleset=classifier.version,
        )


def _reject(
    feed: FeedContext, origin: Origin, received_at: datetime, raw: bytes, err: RejectedMessage
) -> RejectRecord:
    return RejectRecord(
        feed=feed.name,
        format=feed.format.name,
        received_at=received_at,
        raw=raw,
        code=err.code,
        reason=err.reason,
        where=err.where,
        origin_name=origin.name or origin.peer,
    )


class IngestMetrics(MetricChildren):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.messages = Counter(
            "corespond_cad_messages",
            "CAD messages received, by feed and outcome (new, duplicate, rejected)",
            ["feed", "outcome"],
            registry=registry,
        )
        self.rejects = Counter(
            "corespond_cad_rejects",
            "CAD messages rejected and quarantined, by feed and error code",
            ["feed", "code"],
            registry=registry,
        )
        self.decision_changes = Counter(
            "corespond_decision_changes",
            "Snapshots that changed an incident's classification outcome",
            ["feed"],
            registry=registry,
        )
        self.store_failures = Counter(
            "corespond_store_failures",
            "Payloads not acknowledged because the store failed to commit them",
            ["feed"],
            registry=registry,
        )
        self.latency = Histogram(
            "corespond_ingest_seconds",
            "Time from receipt to durable commit of one payload",
            ["feed"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
        )

    def count_snapshots(self, feed: str, new: int, duplicate: int) -> None:
        """The messages metric for ``new`` and ``duplicate`` snapshots of one feed at once."""
        if new:
            self.child(self.messages, feed, SnapshotState.NEW).inc(new)
        if duplicate:
            self.child(self.messages, feed, SnapshotState.DUPLICATE).inc(duplicate)


def observe_many(histogram: Any, amount: float, times: int) -> None:
    """``histogram.observe(amount)`` ``times`` times (a labelled child), in one update of its
    sum and of the one bucket ``amount`` falls in. prometheus_client has no call for it; its
    Histogram keeps ``_sum``, ``_upper_bounds`` and ``_buckets`` (tests/daemon/test_pipeline.py
    holds this to ``observe``); without them, ``observe`` it is."""
    if times <= 0:
        return
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or bounds is None or total is None or times == 1:
        for _ in range(times):
            histogram.observe(amount)
        return
    total.inc(amount * times)
    for i, bound in enumerate(bounds):
        if amount <= bound:
            buckets[i].inc(times)
            break


DecisionObserver = Callable[[SnapshotRecord, StoredSnapshot], None]


@dataclass(slots=True)
class RunCounts:
    """What this process did since it started (the demo's summary uses it)."""

    new: int = 0
    duplicate: int = 0
    rejected: int = 0
    decision_changes: int = 0
    behavioral_health: int = 0


class FeedIngest:
    """One feed's way into a :class:`Pipeline`: called with one payload (an
    :data:`~corespond.daemon.ingest.IngestFn`), or ``many`` with several (an
    :data:`~corespond.daemon.ingest.IngestManyFn`)."""

    __slots__ = ("_feed", "_pipeline")

    def __init__(self, pipeline: Pipeline, feed: FeedContext) -> None:
        self._pipeline = pipeline
        self._feed = feed

    def __call__(self, payload: bytes, origin: Origin) -> Deferred[list[Outcome]]:
        return self._pipeline.ingest(self._feed, payload, origin)

    def many(
        self, payloads: Sequence[bytes], origin: Origin
    ) -> Deferred[list[list[Outcome] | Failure]]:
        return self._pipeline.ingest_many(self._feed, payloads, origin)


class Pipeline:
    """Turns payloads into committed snapshots and decisions, and answers the transport."""

    def __init__(
        self,
        store: IncidentStore,
        classifier: Classifier,
        clock: Clock,
        metrics: IngestMetrics,
    ) -> None:
        self.store = store
        self.classifier = classifier  # swapped whole on reload
        self.clock = clock
        self.metrics = metrics
        self.counts = RunCounts()
        self.observers: list[DecisionObserver] = []
        # Called for every new snapshot (not only decision changes), after its commit.
        self.snapshot_observers: list[DecisionObserver] = []
        # Told of every other new snapshot that became its incident's current state (a location
        # that arrives later, a reopened call: paging may start a chain then).
        self.current_observers: list[DecisionObserver] = []

    def ingest_for(self, feed: FeedContext) -> FeedIngest:
        """The :data:`corespond.daemon.ingest.IngestFn` for one feed (with ``many``)."""
        return FeedIngest(self, feed)

    def ingest(self, feed: FeedContext, payload: bytes, origin: Origin) -> Deferred[list[Outcome]]:
        started = time.perf_counter()
        records = prepare_records(feed, payload, origin, self.clock.now(), self.classifier)
        metrics = self.metrics
        latency = metrics.child(metrics.latency, feed.name)

        def failed(failure: Failure) -> Failure:
            if failure.check(FirstError):  # the same failure whatever the payload held
                failure = failure.value.subFailure
            return self._not_stored(feed, origin, failure)

        if len(records) == 1:
            # Most payloads hold one message: one callback does what the general path below
            # does with a callback per message, two per payload and a DeferredList (gatherResults
            # alone cost about 10 us of the reactor's time per payload).
            record = records[0]

            def one(stored: StoredSnapshot | int) -> list[Outcome]:
                outcome = self._outcome(stored, record)
                latency.observe(time.perf_counter() - started)
                return [outcome]

            stored: Deferred[Any]
            if isinstance(record, RejectRecord):
                stored = self.store.store_reject(record)
            else:
                stored = self.store.store_snapshot(record)
            return stored.addCallback(one).addErrback(failed)

        pending: list[Deferred[Outcome]] = []
        for record in records:
            if isinstance(record, RejectRecord):
                pending.append(self.store.store_reject(record).addCallback(self._rejected, record))
            else:
                pending.append(self.store.store_snapshot(record).addCallback(self._stored, record))

        def finished(outcomes: list[Outcome]) -> list[Outcome]:
            latency.observe(time.perf_counter() - started)
            return outcomes

        done: Deferred[list[Outcome]] = gatherResults(pending, consumeErrors=True)
        return done.addCallbacks(finished, failed)

    def ingest_many(
        self, feed: FeedContext, payloads: Sequence[bytes], origin: Origin
    ) -> Deferred[list[list[Outcome] | Failure]]:
        """:meth:`ingest` for several payloads at once (the frames of one read), with one
        Deferred: it fires once all are committed, with each payload's outcomes, or the
        Failure that kept it from being stored (so a transport answers the payloads before a
        failure and none after). One Deferred instead of one per payload with its callbacks
        (and the transport's): the whole path in one thread went from 1,252k to 1,213k
        instructions a snapshot (``bench/ingest_stages.py --read 16``, callgrind)."""
        started = time.perf_counter()
        received_at = self.clock.now()
        classifier = self.classifier
        prepared = [prepare_records(feed, p, origin, received_at, classifier) for p in payloads]
        metrics = self.metrics
        latency = metrics.child(metrics.latency, feed.name)

        def stored(results: list[StoredSnapshot | int | Failure]) -> list[list[Outcome] | Failure]:
            answers: list[list[Outcome] | Failure] = []
            seconds = time.perf_counter() - started
            counts = self.counts
            new, duplicate = counts.new, counts.duplicate
            answered = 0
            start = 0
            # Looked for once in the group, not per payload (a generator per payload).
            any_failure = any(isinstance(r, Failure) for r in results)
            outcome = self._outcome
            stored_one = self._stored
            for records in prepared:
                if len(records) == 1 and not any_failure:
                    # Most payloads: one snapshot, committed (no slice, zip or comprehension).
                    value, record = results[start], records[0]
                    start += 1
                    try:
                        if type(value) is StoredSnapshot and type(record) is SnapshotRecord:
                            answer = [stored_one(value, record, False)]
                        else:
                            answer = [outcome(value, record, False)]
                    except Exception:
                        answers.append(self._not_stored(feed, origin, Failure()))
                    else:
                        answers.append(answer)
                        answered += 1
                    continue
                mine = results[start : start + len(records)]
                start += len(records)
                failure = None
                if any_failure:
                    failure = next((r for r in mine if isinstance(r, Failure)), None)
                if failure is None:
                    try:
                        pairs = zip(mine, records, strict=True)
                        answers.append([outcome(v, r, False) for v, r in pairs])
                        answered += 1
                        continue
                    except Exception:
                        failure = Failure()
                else:
                    # Part of the payload committed (its records went in two batches, and one
                    # failed): what committed is counted, logged and told to the observers all
                    # the same, as ingest() does. A resend finds it a duplicate: told never.
                    for value, record in zip(mine, records, strict=True):
                        if not isinstance(value, Failure):
                            self._outcome(value, record, False)
                answers.append(self._not_stored(feed, origin, failure))
            # The group's metrics at once: a counter's inc() and a histogram's observe() take a
            # lock and check their arguments (about 2 and 5 us), once per snapshot before.
            metrics.count_snapshots(feed.name, counts.new - new, counts.duplicate - duplicate)
            observe_many(latency, seconds, answered)
            return answers

        def failed(failure: Failure) -> list[list[Outcome] | Failure]:
            return [self._not_stored(feed, origin, failure) for _ in payloads]

        records = [r for records in prepared for r in records]
        return self.store.store_many(records).addCallbacks(stored, failed)

    def _outcome(
        self, stored: StoredSnapshot | int | Failure, record: Any, count: bool = True
    ) -> Outcome:
        if isinstance(record, RejectRecord):
            assert isinstance(stored, int)
            return self._rejected(stored, record)
        assert isinstance(stored, StoredSnapshot)
        return self._stored(stored, record, count)

    def _not_stored(self, feed: FeedContext, origin: Origin, failure: Failure) -> Failure:
        metrics = self.metrics
        metrics.child(metrics.store_failures, feed.name).inc()
        log.error(
            "cad.payload.not_stored",
            feed=feed.name,
            peer=origin.peer,
            file=origin.name,
            error=error_text(failure),
        )
        return failure

    def _rejected(self, reject_id: int, record: RejectRecord) -> Outcome:
        self.counts.rejected += 1
        metrics = self.metrics
        metrics.child(metrics.messages, record.feed, "rejected").inc()
        metrics.child(metrics.rejects, record.feed, record.code).inc()
        log.warning(
            "cad.message.rejected",
            feed=record.feed,
            format=record.format,
            code=record.code,
            reason=record.reason,
            where=record.where,
            file=record.origin_name,
            reject_id=reject_id,
        )
        return Rejected(record.code, record.reason, record.where, reject_id)

    def _stored(
        self, stored: StoredSnapshot, record: SnapshotRecord, count: bool = True
    ) -> Outcome:
        """Count, log and tell about one stored snapshot; ``count=False``: the caller counts
        the messages metric for its group (:meth:`IngestMetrics.count_snapshots`)."""
        decision = record.decision
        metrics = self.metrics
        if count:
            # The StrEnum members themselves, not their .value (a Python-level property, about
            # 0.5 us each): they are str, so labels, log fields and JSON read the same text.
            metrics.child(metrics.messages, record.feed, stored.state).inc()
        if stored.state is SnapshotState.DUPLICATE:
            self.counts.duplicate += 1
            _duplicate_line(record.feed, stored.external_id, stored.snapshot_id)
        else:
            self.counts.new += 1
            previous = stored.previous_decision
            # A new incident that is not behavioral-health is no event for anyone.
            changed = stored.decision_changed and (
                previous is not None or decision.behavioral_health
            )
            # One summary line per decision; a changed outcome is said on the same line.
            _stored_line(
                record.feed,
                stored.external_id,
                stored.snapshot_id,
                "current" if stored.became_current else "late",  # state
                record.snapshot.status,
                decision.behavioral_health,
                decision.category,
                decision.response,
                list(decision.rules),
                decision.ruleset,
                changed,
                previous.response.value if changed and previous else None,  # old_response
            )
            if changed:
                self.counts.decision_changes += 1
                if decision.behavioral_health and not (previous and previous.behavioral_health):
                    self.counts.behavioral_health += 1
                metrics.child(metrics.decision_changes, record.feed).inc()
                self._tell(self.observers, record, stored)
            elif stored.became_current and self.current_observers:
                self._tell(self.current_observers, record, stored)
            if self.snapshot_observers:
                self._tell(self.snapshot_observers, record, stored)
        return Accepted(stored.external_id, stored.snapshot_id, stored.state)

    @staticmethod
    def _tell(
        observers: list[DecisionObserver], record: SnapshotRecord, stored: StoredSnapshot
    ) -> None:
        for observer in observers:
            try:
                observer(record, stored)
            except Exception:
                log.exception("incident.observer.failed", incident_id=stored.external_id)
