"""The referral side's reactor spans (daemon/referral_trace.py): off without the store's trace,
and with it, every callback stretch timed once, nested ones inside it, failures relayed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from corespond.daemon.referral_trace import SUFFIX, ReactorSpans
from corespond.daemon.store.writer import TRACE_ENV


def test_without_the_trace_nothing_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACE_ENV, raising=False)
    spans = ReactorSpans.from_environment()
    d: Deferred[int] = Deferred()
    assert not spans.enabled and spans.relay(d, "x") is d
    fn = len
    assert spans.timed(fn) is fn
    spans.close()  # writes nothing, anywhere


def test_callbacks_are_timed_once_and_written_beside_the_trace(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace.jsonl"))
    spans = ReactorSpans.from_environment()
    seen: list[Any] = []
    source: Deferred[int] = Deferred()
    relayed = spans.relay(source, "commit")
    # A callback that itself fires relayed work (a commit's result starting the next send).
    relayed.addCallback(lambda v: spans.relay(succeed(v + 1), "inner").addCallback(seen.append))
    assert spans.spans == []  # nothing ran yet
    source.callback(1)
    assert seen == [2] and len(spans.spans) == 1
    (start, end, cpu, what) = spans.spans[0]
    assert end >= start and cpu >= 0 and what == "commit"  # the nested one counts in the outer
    # A timer's callable, and a failure (relayed as one, timed too).
    assert spans.timed(lambda x: x * 2)(21) == 42
    failures: list[Any] = []
    spans.relay(fail(ValueError("x")), "ACK").addErrback(failures.append)
    assert failures and failures[0].check(ValueError)
    assert len(spans.spans) == 3
    spans.close()
    lines = (tmp_path / ("trace.jsonl" + SUFFIX)).read_text().splitlines()
    assert [sorted(json.loads(line)) for line in lines] == [["cpu", "end", "start", "what"]] * 3
    whats = [json.loads(line)["what"] for line in lines]
    assert whats[1].endswith(".<lambda>") and whats[2] == "ACK"
    assert spans.spans == []
