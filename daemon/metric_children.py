"""Labelled children of Prometheus metrics, looked up once: for metrics counted on hot paths."""

from __future__ import annotations

from typing import Any

from prometheus_client.metrics import MetricWrapperBase


class MetricChildren:
    """``child(metric, *labels)`` is ``metric.labels(*labels)``, remembered.

    prometheus_client's ``labels()`` takes a lock and checks its arguments on every call
    (about 4 µs): per snapshot on the ingest path, and in the referral callbacks on the
    reactor that a page may wait behind, that adds up. Label values here are feed and
    provider names, outcomes, reasons and codes: a handful, so the cache stays small.
    A metrics class derives from this and calls ``super().__init__()``.
    """

    def __init__(self) -> None:
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}

    def child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
