"""The spool directory transport on a real temporary directory, time driven by task.Clock."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock as TaskClock

from corespond.adapters.spool import SpoolDirectory, free_name, is_eligible
from corespond.daemon.clock import Clock
from corespond.daemon.ingest import Accepted, Origin, Outcome, Rejected, SnapshotState

XML = b'<?xml version="1.0"?><CallExport><Caller>Testy McTestface</Caller></CallExport>'


def inline(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """run_in_thread for tests: run now, on this thread."""
    return maybeDeferred(fn, *args)


def accepted() -> list[Outcome]:
    return [Accepted("inc-1", 1, SnapshotState.NEW)]


class Ingest:
    """Answers each payload with ``verdict(payload)`` (outcomes, a Deferred or an exception)."""

    def __init__(self, verdict: Callable[[bytes], Any] | None = None) -> None:
        self.calls: list[tuple[bytes, Origin]] = []
        self.verdict = verdict or (lambda payload: accepted())

    def __call__(self, payload: bytes, origin: Origin) -> Deferred[Sequence[Outcome]]:
        self.calls.append((payload, origin))
        answer = self.verdict(payload)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    @property
    def names(self) -> list[str | None]:
        return [o.name for _, o in self.calls]


def spool(directory: Path, ingest: Ingest, **kw: Any) -> tuple[SpoolDirectory, TaskClock]:
    time = TaskClock()
    options: dict[str, Any] = {"pattern": "*.xml", "max_message_bytes": 10_000, **kw}
    s = SpoolDirectory(directory, ingest, feed="cad-nw", clock=Clock(time), run_in_thread=inline,
                       **options)  # fmt: skip
    return s, time


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def drop(directory: Path, name: str, data: bytes = XML) -> None:
    (directory / name).write_bytes(data)


def test_pickup_in_name_order_to_done(tmp_path: Path) -> None:
    for name in ["CFS_20260102030405002.xml", "CFS_20260102030405001.xml"]:
        drop(tmp_path, name)
    # Files still being written or renamed, and files that do not match, are left alone.
    for name in [".CFS_3.xml", "CFS_4.xml.tmp", "CFS_5.xml.part", "notes.txt", "CFS_6.XML.PART"]:
        drop(tmp_path, name)
    (tmp_path / "sub.xml").mkdir()
    os.symlink(tmp_path / "notes.txt", tmp_path / "link.xml")
    ingest = Ingest()
    s, _ = spool(tmp_path, ingest)
    assert s.poll().result is False
    assert ingest.names == ["CFS_20260102030405001.xml", "CFS_20260102030405002.xml"]
    assert {o.feed for _, o in ingest.calls} == {"cad-nw"}
    assert ingest.calls[0][0] == XML
    assert listing(tmp_path / "done") == ["CFS_20260102030405001.xml", "CFS_20260102030405002.xml"]
    assert listing(tmp_path / "processing") == []
    left = listing(tmp_path)
    assert "CFS_20260102030405001.xml" not in left and "notes.txt" in left and "link.xml" in left


def test_pattern_matches_case_insensitively(tmp_path: Path) -> None:
    drop(tmp_path, "CFS_1.XML")
    ingest = Ingest()
    spool(tmp_path, ingest)[0].poll()
    assert ingest.names == ["CFS_1.XML"]


def test_subfolders_are_created_private(tmp_path: Path) -> None:
    spool(tmp_path, Ingest())[0].poll()
    umask = os.umask(0)
    os.umask(umask)
    for sub in ["processing", "done", "quarantine"]:
        mode = stat.S_IMODE((tmp_path / sub).stat().st_mode)
        assert mode == 0o750 & ~umask


def test_keep_done_false_deletes(tmp_path: Path) -> None:
    drop(tmp_path, "CFS_1.xml")
    spool(tmp_path, Ingest(), keep_done=False)[0].poll()
    assert listing(tmp_path / "done") == [] and listing(tmp_path / "processing") == []
    assert "CFS_1.xml" not in listing(tmp_path)


def test_rejected_goes_to_quarantine_with_reason(tmp_path: Path) -> None:
    drop(tmp_path, "CFS_1.xml", b"<not-closed")
    drop(tmp_path, "CFS_2.xml")

    def verdict(payload: bytes) -> list[Outcome]:
        if payload == XML:
            return accepted()
        return [Rejected("malformed-xml", "unclosed element", "line 1, column 12", reject_id=7)]

    s, _ = spool(tmp_path, Ingest(verdict))
    s.poll()
    assert listing(tmp_path / "quarantine") == ["CFS_1.xml", "CFS_1.xml.reason"]
    assert (tmp_path / "quarantine" / "CFS_1.xml").read_bytes() == b"<not-closed"
    reason = json.loads((tmp_path / "quarantine" / "CFS_1.xml.reason").read_text())
    assert reason["code"] == "malformed-xml"
    assert reason["reason"] == "unclosed element"
    assert reason["where"] == "line 1, column 12"
    assert reason["feed"] == "cad-nw"
    assert reason["reject_id"] == 7
    assert reason["time"].startswith("1970-01-01T00:00:00")
    assert listing(tmp_path / "done") == ["CFS_2.xml"]
    assert (s.done, s.quarantined) == (1, 1)


def test_internal_failure_stays_in_processing_and_is_retried_first(tmp_path: Path) -> None:
    drop(tmp_path, "CFS_1.xml")
    drop(tmp_path, "CFS_2.xml")
    broken = [True]

    def verdict(payload: bytes) -> Any:
        return RuntimeError("database is locked") if broken[0] else accepted()

    ingest = Ingest(verdict)
    s, time = spool(tmp_path, ingest, poll_interval=2.0)
    s.start()
    time.advance(0)
    # The batch stops at the failure so that CFS_2 does not overtake CFS_1.
    assert ingest.names == ["CFS_1.xml"]
    assert listing(tmp_path / "processing") == ["CFS_1.xml"]
    assert "CFS_2.xml" in listing(tmp_path)
    broken[0] = False
    time.advance(2.0)
    assert ingest.names == ["CFS_1.xml", "CFS_1.xml", "CFS_2.xml"]
    assert listing(tmp_path / "done") == ["CFS_1.xml", "CFS_2.xml"]
    assert s.stop().called


def test_leftovers_in_processing_are_taken_first(tmp_path: Path) -> None:
    (tmp_path / "processing").mkdir()
    (tmp_path / "processing" / "CFS_9.xml").write_bytes(XML)
    drop(tmp_path, "CFS_1.xml")
    ingest = Ingest()
    spool(tmp_path, ingest)[0].poll()
    assert ingest.names == ["CFS_9.xml", "CFS_1.xml"]
    assert listing(tmp_path / "done") == ["CFS_1.xml", "CFS_9.xml"]


def test_oversize_is_quarantined_without_ingest(tmp_path: Path) -> None:
    drop(tmp_path, "CFS_1.xml", b"x" * 101)
    drop(tmp_path, "CFS_2.xml", b"x" * 100)
    ingest = Ingest()
    spool(tmp_path, ingest, max_message_bytes=100)[0].poll()
    assert ingest.names == ["CFS_2.xml"]
    reason = json.loads((tmp_path / "quarantine" / "CFS_1.xml.reason").read_text())
    assert reason["code"] == "oversize"
    assert "101" in reason["reason"] and "100" in reason["reason"]


def test_name_clashes_get_a_suffix(tmp_path: Path) -> None:
    for sub in ["done", "quarantine"]:
        (tmp_path / sub).mkdir()
    (tmp_path / "done" / "CFS_1.xml").write_bytes(b"older")
    (tmp_path / "quarantine" / "CFS_2.xml.reason").write_text("{}")
    drop(tmp_path, "CFS_1.xml")
    drop(tmp_path, "CFS_2.xml", b"bad")

    def verdict(payload: bytes) -> list[Outcome]:
        return accepted() if payload == XML else [Rejected("malformed-xml", "no root element")]

    spool(tmp_path, Ingest(verdict))[0].poll()
    assert (tmp_path / "done" / "CFS_1.xml").read_bytes() == b"older"
    assert (tmp_path / "done" / "CFS_1.1.xml").read_bytes() == XML
    assert listing(tmp_path / "quarantine") == [
        "CFS_2.1.xml",
        "CFS_2.1.xml.reason",
        "CFS_2.xml.reason",
    ]


def test_reused_name_waits_for_the_one_in_processing(tmp_path: Path) -> None:
    # A CAD that always writes "incident.xml": the newer never overwrites the held one.
    drop(tmp_path, "incident.xml", b"first")
    broken = [True]

    def verdict(payload: bytes) -> Any:
        return RuntimeError("store down") if broken[0] else accepted()

    ingest = Ingest(verdict)
    s, _ = spool(tmp_path, ingest)
    s.poll()
    drop(tmp_path, "incident.xml", b"second")
    s.poll()
    assert [p for p, _ in ingest.calls] == [b"first", b"first"]
    assert (tmp_path / "processing" / "incident.xml").read_bytes() == b"first"
    assert (tmp_path / "incident.xml").read_bytes() == b"second"
    broken[0] = False
    s.poll()
    assert [p for p, _ in ingest.calls] == [b"first", b"first", b"first", b"second"]
    assert (tmp_path / "done" / "incident.xml").read_bytes() == b"first"
    assert (tmp_path / "done" / "incident.1.xml").read_bytes() == b"second"


def test_batch_limit(tmp_path: Path) -> None:
    for i in range(5):
        drop(tmp_path, f"CFS_{i}.xml")
    ingest = Ingest()
    s, _ = spool(tmp_path, ingest, batch_limit=2)
    assert s.poll().result is True  # full: the poller goes again at once
    assert ingest.names == ["CFS_0.xml", "CFS_1.xml"]
    assert s.poll().result is True
    assert s.poll().result is False
    assert len(ingest.calls) == 5


def test_polls_on_the_interval_and_at_once_after_a_full_batch(tmp_path: Path) -> None:
    for i in range(5):
        drop(tmp_path, f"CFS_{i}.xml")
    ingest = Ingest()
    s, time = spool(tmp_path, ingest, batch_limit=2, poll_interval=10.0)
    s.start()
    time.advance(0)  # three batches, back to back
    assert len(ingest.calls) == 5
    drop(tmp_path, "CFS_9.xml")
    time.advance(9.9)
    assert len(ingest.calls) == 5
    time.advance(0.1)
    assert ingest.names[-1] == "CFS_9.xml"
    assert s.stop().called
    assert time.getDelayedCalls() == []


def test_stop_waits_for_the_file_in_hand_and_takes_no_more(tmp_path: Path) -> None:
    drop(tmp_path, "CFS_1.xml")
    drop(tmp_path, "CFS_2.xml")
    answer: Deferred[Sequence[Outcome]] = Deferred()
    ingest = Ingest(lambda payload: answer)
    s, time = spool(tmp_path, ingest)
    s.start()
    time.advance(0)
    stopped = s.stop()
    assert not stopped.called
    answer.callback(accepted())
    assert stopped.called
    assert ingest.names == ["CFS_1.xml"]
    assert listing(tmp_path / "done") == ["CFS_1.xml"]
    assert "CFS_2.xml" in listing(tmp_path)
    assert time.getDelayedCalls() == []


def test_two_daemons_never_take_the_same_file(tmp_path: Path) -> None:
    for i in range(4):
        drop(tmp_path, f"CFS_{i}.xml")
    held: list[Deferred[Sequence[Outcome]]] = []

    def slow(payload: bytes) -> Deferred[Sequence[Outcome]]:
        d: Deferred[Sequence[Outcome]] = Deferred()
        held.append(d)
        return d

    first, second = Ingest(slow), Ingest(slow)
    a, _ = spool(tmp_path, first)
    b, _ = spool(tmp_path, second)
    for _ in range(4):
        a.poll()
        b.poll()  # sees a's file in processing/, locked: leaves it alone
        while held:
            held.pop(0).callback(accepted())
    taken = [str(n) for n in first.names + second.names]
    assert sorted(taken) == [f"CFS_{i}.xml" for i in range(4)]
    assert listing(tmp_path / "done") == [f"CFS_{i}.xml" for i in range(4)]


def test_file_locked_by_a_live_daemon_is_left_until_released(tmp_path: Path) -> None:
    (tmp_path / "processing").mkdir()
    path = tmp_path / "processing" / "CFS_1.xml"
    path.write_bytes(XML)
    other = os.open(path, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)  # another daemon is working on it
    ingest = Ingest()
    s, _ = spool(tmp_path, ingest)
    s.poll()
    assert ingest.calls == []
    os.close(other)  # that daemon died: the kernel dropped its lock
    s.poll()
    assert ingest.names == ["CFS_1.xml"]
    assert listing(tmp_path / "done") == ["CFS_1.xml"]


def test_stop_releases_held_files_for_the_next_instance(tmp_path: Path) -> None:
    drop(tmp_path, "CFS_1.xml")
    s, _ = spool(tmp_path, Ingest(lambda payload: RuntimeError("store down")))
    s.poll()
    assert s.stop().called
    ingest = Ingest()
    spool(tmp_path, ingest)[0].poll()  # a reload builds a new instance on the same spool
    assert ingest.names == ["CFS_1.xml"]
    assert listing(tmp_path / "done") == ["CFS_1.xml"]


def test_unreadable_file_does_not_stall_the_others(tmp_path: Path) -> None:
    drop(tmp_path, "CFS_1.xml")
    drop(tmp_path, "CFS_2.xml")
    bad = [True]

    def flaky(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if fn.__name__ == "_read" and bad[0]:
            bad[0] = False
            return fail(OSError(5, "Input/output error"))
        return maybeDeferred(fn, *args)

    ingest = Ingest()
    time = TaskClock()
    s = SpoolDirectory(tmp_path, ingest, feed="cad-nw", clock=Clock(time), run_in_thread=flaky,
                       max_message_bytes=1000)  # fmt: skip
    s.poll()
    assert ingest.names == ["CFS_2.xml"]
    assert listing(tmp_path / "processing") == ["CFS_1.xml"]
    s.poll()
    assert ingest.names == ["CFS_2.xml", "CFS_1.xml"]


def test_unreadable_disk_never_stops_the_poller(tmp_path: Path) -> None:
    missing = tmp_path / "not-there" / "spool"
    (tmp_path / "not-there").write_text("a file where a folder should be")
    s, time = spool(missing, Ingest())
    s.start()
    time.advance(0)  # the poll fails (logged) and the loop goes on
    assert len(time.getDelayedCalls()) == 1
    assert s.stop().called


def test_is_eligible() -> None:
    assert is_eligible("CFS_20260102030405123.xml", "*.xml")
    assert is_eligible("cfs_1.XML", "CFS_*.xml")
    for name in [".CFS_1.xml", "CFS_1.xml.tmp", "CFS_1.xml.part", "CFS_1.PART"]:
        assert not is_eligible(name, "*")
    assert not is_eligible("CFS_1.txt", "*.xml")


@settings(max_examples=60, deadline=None)
@given(
    name=st.text(
        st.characters(codec="ascii", exclude_characters="/\x00"), min_size=1, max_size=12
    ).filter(lambda n: n not in {".", ".."}),
    taken=st.integers(min_value=0, max_value=4),
)
def test_free_name_never_overwrites(tmp_path_factory: pytest.TempPathFactory, name: str,
                                    taken: int) -> None:  # fmt: skip
    folder = tmp_path_factory.mktemp("names")
    existing = {name}
    (folder / name).write_text("")
    for _ in range(taken):
        extra = free_name(folder, name)
        (folder / extra).write_text("")
        existing.add(extra)
    assert free_name(folder, name) not in existing
    assert len(existing) == taken + 1
