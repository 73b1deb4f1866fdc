"""Structured logging: one stream, JSON lines or console text, fields by allowlist only."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import Logger
from twisted.python.failure import Failure

from corespond.daemon import log as corespond_log
from corespond.daemon.errors import RejectedMessage
from corespond.daemon.log import (
    ALLOWED_FIELDS,
    MAX_EXCEPTION_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_VALUE_CHARS,
    allowlist_fields,
    configure_logging,
    set_level,
)

PHI = "Testy McTestface"  # an invented name standing in for protected information


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    # Twisted buffers events until logging begins; flush them before a test's stream exists,
    # so that earlier tests' events do not land in it.
    corespond_log.bridge_twisted_logging()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    if corespond_log._handler is not None:
        root.removeHandler(corespond_log._handler)
        corespond_log._handler = None
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def configured(level: str = "info", fmt: str = "json") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, fmt, stream, cache_loggers=False)
    return stream


def test_events_are_json_lines_with_timestamp_level_and_logger() -> None:
    stream = configured()
    log = structlog.get_logger("corespond.test")
    log.info("cad.snapshot.stored", feed="cad-eido", incident_id="inc-1", count=2)
    log.warning("feed.tcp.connection.lost", peer="127.0.0.1:5000")
    first, second = json_lines(stream)
    assert list(first)[:4] == ["timestamp", "level", "event", "logger"]
    assert first["event"] == "cad.snapshot.stored" and first["level"] == "info"
    assert first["logger"] == "corespond.test"
    assert first["timestamp"].endswith("Z")
    assert (first["feed"], first["incident_id"], first["count"]) == ("cad-eido", "inc-1", 2)
    assert second["level"] == "warning" and second["peer"] == "127.0.0.1:5000"


def test_fields_outside_the_allowlist_are_dropped_and_named() -> None:
    stream = configured()
    structlog.get_logger("t").info(
        "cad.snapshot.stored", feed="cad-eido", caller_name=PHI, narrative=PHI, phone="555-0100"
    )
    [line] = json_lines(stream)
    assert line["redacted"] == ["caller_name", "narrative", "phone"]
    assert line["feed"] == "cad-eido"
    assert PHI not in stream.getvalue() and "555-0100" not in stream.getvalue()


def test_bound_and_context_fields_pass_the_same_allowlist() -> None:
    stream = configured()
    structlog.contextvars.bind_contextvars(incident_id="inc-7", person=PHI)
    try:
        structlog.get_logger("t").bind(address="1 Nowhere Lane").info("decision.made")
    finally:
        structlog.contextvars.clear_contextvars()
    [line] = json_lines(stream)
    assert line["incident_id"] == "inc-7"
    assert line["redacted"] == ["address", "person"]
    assert PHI not in stream.getvalue()


def test_long_values_are_capped_and_short_ones_kept_as_they_are() -> None:
    class Kind(StrEnum):
        NEW = "new"

    long = "x" * (MAX_VALUE_CHARS + 10)
    kept = allowlist_fields(None, "info", {"event": "e", "state": Kind.NEW, "reason": long})
    assert kept["state"] is Kind.NEW  # a str subclass passes as it is
    assert kept["reason"] == "x" * MAX_VALUE_CHARS + "... [truncated 10 characters]"
    message = "m" * (MAX_MESSAGE_CHARS + 1)
    twisted = allowlist_fields(None, "info", {"event": "twisted.log", "message": message})
    assert twisted["message"] == "m" * MAX_MESSAGE_CHARS + "... [truncated 1 characters]"
    short = "s" * MAX_MESSAGE_CHARS
    assert allowlist_fields(None, "info", {"event": "twisted.log", "message": short}) == {
        "event": "twisted.log",
        "message": short,
    }


def test_values_json_cannot_encode_are_written_as_text() -> None:
    stream = configured()
    structlog.get_logger("t").info("x", path=Path("/var/lib/corespond"), count=3)
    [line] = json_lines(stream)
    assert (line["path"], line["count"]) == ("/var/lib/corespond", 3)


def test_lines_read_as_the_standard_encoder_writes_them() -> None:
    # The fast encoder (orjson) must give what json.dumps(default=str) gives: ASCII lines with
    # escapes, times as str() writes them, integers of any size, and text for the rest.
    stream = configured()
    when = datetime(2026, 11, 27, 5, 0, tzinfo=UTC)
    logger = structlog.get_logger("t")
    logger.info("x", reason="caf\u00e9 \u2603", count=2**70, expires=when, path=Path("/a"))
    logger.info("y", state=("new", 1), seconds=0.5, changed=None)
    first, second = stream.getvalue().splitlines()
    assert first.isascii() and "\\u00e9" in first
    line = json.loads(first)
    assert (line["reason"], line["count"]) == ("caf\u00e9 \u2603", 2**70)
    assert (line["expires"], line["path"]) == (str(when), "/a")
    assert json.loads(second)["state"] == ["new", 1] and json.loads(second)["changed"] is None


def test_message_is_allowed_only_on_twisted_events() -> None:
    assert "message" not in allowlist_fields(None, "info", {"event": "x", "message": PHI})
    kept = allowlist_fields(None, "info", {"event": "twisted.log", "message": "listening"})
    assert kept["message"] == "listening"


def test_exceptions_keep_their_traceback_truncated() -> None:
    stream = configured()
    try:
        raise RejectedMessage("invalid-field", "x" * 10_000)  # ours: its message is kept
    except RejectedMessage:
        structlog.get_logger("t").exception("cad.parser.failed", feed="cad-eido")
    [line] = json_lines(stream)
    assert line["level"] == "error"
    assert line["exception"].startswith("Traceback")
    assert len(line["exception"]) < MAX_EXCEPTION_CHARS + 100
    assert line["exception"].endswith("characters]")


def test_exception_messages_that_may_quote_input_are_withheld() -> None:
    """A parser bug's KeyError, a database error's parameters: frames and types only."""
    stream = configured()
    name, phone = "Testy McTestface", "+1-303-555-0142"  # tracebacks show source lines
    try:
        try:
            {}[name]
        except KeyError as err:
            raise RuntimeError(f"while reading {phone}") from err
    except RuntimeError:
        structlog.get_logger("t").exception("cad.parser.failed", feed="cad-eido")
    Logger(namespace="corespond.test").failure(
        "Unhandled error", Failure(ValueError(name))
    )
    text = stream.getvalue()
    assert "McTestface" not in text and "555-0142" not in text
    first, twisted = json_lines(stream)
    assert "KeyError: [message withheld" in first["exception"]
    assert "RuntimeError: [message withheld" in first["exception"]
    assert "test_exception_messages_that_may_quote_input_are_withheld" in first["exception"]
    assert "ValueError: [message withheld" in twisted["exception"]


def test_twisted_log_events_come_out_in_the_same_stream() -> None:
    stream = configured()
    structlog.get_logger("t").info("daemon.started")
    Logger(namespace="twisted.web.server").info("Site starting on {port}", port=8931)
    Logger(namespace="corespond.test").failure("Unhandled error", Failure(KeyError("k")))
    Logger(namespace="twisted.test").debug("too quiet to show")
    first, twisted, failure = json_lines(stream)
    assert first["event"] == "daemon.started"
    assert twisted == {
        "timestamp": twisted["timestamp"],
        "level": "info",
        "event": "twisted.log",
        "logger": "twisted.web.server",
        "message": "Site starting on 8931",
    }
    assert failure["level"] == "critical" and failure["message"] == "Unhandled error"
    assert "KeyError" in failure["exception"]


def test_twisted_factory_chatter_is_debug_only() -> None:
    stream = configured()
    Logger(namespace="twisted.web.server.Site").info("Starting factory {factory!r}", factory=1)
    Logger(namespace="twisted").info("Stopping factory {factory!r}", factory=2)
    Logger(namespace="twisted").info("(TCP Port {port} Closed)", port=8931)
    [closed] = json_lines(stream)
    assert closed["message"] == "(TCP Port 8931 Closed)"


def test_stdlib_loggers_come_out_in_the_same_stream() -> None:
    stream = configured()
    logging.getLogger("alembic.runtime.migration").info("Running upgrade  -> 0001, tables")
    logging.getLogger("apscheduler.scheduler").debug("too quiet to show")
    [line] = json_lines(stream)
    assert line["event"] == "Running upgrade  -> 0001, tables"
    assert line["logger"] == "alembic.runtime.migration" and line["level"] == "info"


def test_levels_filter_and_can_change() -> None:
    stream = configured(level="warning")
    log = structlog.get_logger("t")
    log.info("not.shown")
    log.warning("shown.first")
    set_level("debug")
    log.debug("shown.second")
    assert [line["event"] for line in json_lines(stream)] == ["shown.first", "shown.second"]


def test_console_on_a_terminal_json_otherwise() -> None:
    terminal = Terminal()
    configure_logging("info", "auto", terminal, cache_loggers=False)
    structlog.get_logger("t").info("cad.snapshot.stored", feed="cad-eido", narrative=PHI)
    text = terminal.getvalue()
    assert "cad.snapshot.stored" in text and "cad-eido" in text
    assert PHI not in text and "redacted" in text
    with pytest.raises(ValueError):
        json.loads(text)
    pipe = io.StringIO()
    configure_logging("info", "auto", pipe, cache_loggers=False)
    structlog.get_logger("t").info("cad.snapshot.stored")
    assert json_lines(pipe)[0]["event"] == "cad.snapshot.stored"
    assert terminal.getvalue().count("cad.snapshot.stored") == 1  # the old handler is gone


def test_console_when_asked_even_without_a_terminal() -> None:
    stream = configured(fmt="console")
    structlog.get_logger("t").info("daemon.started", version="0.1.0")
    assert "daemon.started" in stream.getvalue() and "\x1b[" not in stream.getvalue()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        configure_logging("loud", "json", io.StringIO())
    with pytest.raises(ValueError):
        configure_logging("info", "xml", io.StringIO())


def test_the_allowlist_holds_what_the_brief_started_with() -> None:
    start = [
        "event",
        "level",
        "timestamp",
        "logger",
        "feed",
        "source",
        "format",
        "transport",
        "peer",
        "file",
        "incident_id",
        "incident_pk",
        "snapshot_id",
        "reject_id",
        "state",
        "code",
        "reason",
        "where",
        "count",
        "incidents",
        "snapshots",
        "decisions",
        "rejects",
        "behavioral_health",
        "category",
        "response",
        "rules",
        "ruleset",
        "old_ruleset",
        "new_ruleset",
        "score",
        "changed",
        "batch",
        "seconds",
        "duration_ms",
        "port",
        "host",
        "path",
        "url",
        "status",
        "config",
        "errors",
        "error",
        "exception",
        "version",
        "pid",
        "signal",
        "mode",
        "subscription_id",
        "transaction_id",
        "framing",
        "in_flight",
        "revision",
    ]
    assert set(start) <= ALLOWED_FIELDS
    for phi in ("name", "caller_name", "dob", "birth_date", "phone", "narrative", "address"):
        assert phi not in ALLOWED_FIELDS


class InterruptingStream(io.StringIO):
    """Logs once from inside a write, as a signal handler that logs does (Twisted's SIGTERM)."""

    interrupted = False

    def write(self, text: str) -> int:
        if not self.interrupted:
            self.interrupted = True
            structlog.get_logger("twisted").info("daemon.stopping")
        return super().write(text)


def test_a_log_call_inside_a_write_does_not_deadlock() -> None:
    import threading

    stream = InterruptingStream()
    configure_logging("info", "json", stream, cache_loggers=False)
    worker = threading.Thread(
        target=lambda: structlog.get_logger("t").info("daemon.started"), daemon=True
    )
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the logger deadlocked on its own lock"
    assert [e["event"] for e in json_lines(stream)] == ["daemon.stopping", "daemon.started"]


def test_error_text_keeps_only_messages_that_cannot_quote_input() -> None:
    from corespond.daemon.log import error_text
    from corespond.daemon.store.writer import StoreError

    assert error_text(KeyError("Testy McTestface")) == "KeyError [message withheld]"
    assert error_text(Failure(ValueError("Testy McTestface"))) == "ValueError [message withheld]"
    assert error_text(StoreError("OperationalError (SQLSTATE 53300)")).startswith("StoreError: ")
    assert error_text(ConnectionRefusedError(111, "Connection refused")).endswith("refused")


# --- the shortcuts of our own JSON lines ---------------------------------------------------------


class _Outcome(StrEnum):
    NEW = "new"


_field_names = st.sampled_from([*sorted(ALLOWED_FIELDS), "name", "_record", "message", "dob"])
_field_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=30)
    | st.text(alphabet="ab", min_size=MAX_MESSAGE_CHARS - 40, max_size=MAX_VALUE_CHARS + 40)
    | st.lists(st.text(max_size=10), max_size=3)
    | st.sampled_from(list(_Outcome))
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(_field_names, _field_values, max_size=12),
    st.sampled_from(["e", "twisted.log"]),
)
def test_allowlisted_json_line_is_the_allowlist_then_the_json_line(
    fields: dict[str, Any], event: str
) -> None:
    event_dict = {**fields, "event": event, "level": "info", "timestamp": "t", "logger": "x"}
    expected = corespond_log._json_line(allowlist_fields(None, "info", dict(event_dict)))
    assert corespond_log.allowlisted_json_line(None, "info", dict(event_dict)) == expected


def test_utc_timestamp_is_what_structlog_wrote() -> None:
    before = datetime.now(UTC)
    stamped = corespond_log.utc_timestamp(None, "info", {})["timestamp"]
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamped)
    assert before.replace(microsecond=0) <= datetime.fromisoformat(stamped) <= after


# --- LineLogger: the per-snapshot line without structlog's wrapper ------------------------------


def _without_timestamp(line: str) -> str:
    return re.sub(r'"timestamp": ?"[^"]*"', '"timestamp":"T"', line)


class Level(StrEnum):
    LOW = "low"


_line_keys = st.sampled_from(
    [
        *sorted(ALLOWED_FIELDS - {"event", "level", "logger", "timestamp"}),
        *("caller_name", "narrative", "phone", "exception"),
    ]
)
_line_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=20)
    | st.text(min_size=MAX_MESSAGE_CHARS - 5, max_size=MAX_MESSAGE_CHARS + 5)
    | st.lists(st.text(max_size=5), max_size=3)
    | st.sampled_from(list(Level))
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_line_keys, _line_values, max_size=8))
def test_line_logger_writes_the_chains_line(fields: dict[str, Any]) -> None:
    stream = configured()
    corespond_log.LineLogger("corespond.daemon.pipeline").info("cad.snapshot.stored", **fields)
    structlog.get_logger("corespond.daemon.pipeline").info("cad.snapshot.stored", **fields)
    fast, chain = stream.getvalue().splitlines()
    assert _without_timestamp(fast) == _without_timestamp(chain)
    assert PHI not in fast


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_line_keys, _line_values), max_size=8))
def test_a_fixed_line_writes_the_chains_line(pairs: list[tuple[str, Any]]) -> None:
    # Keys may repeat here: the fixed line then takes the keyword way, as dict() would.
    stream = configured()
    keys = tuple(k for k, _ in pairs)
    fields = dict(pairs)
    corespond_log.LineLogger("corespond.daemon.pipeline").fixed("cad.snapshot.stored", *keys)(
        *(v for _, v in pairs)
    )
    structlog.get_logger("corespond.daemon.pipeline").info("cad.snapshot.stored", **fields)
    fast, chain = stream.getvalue().splitlines()
    assert _without_timestamp(fast) == _without_timestamp(chain)
    assert PHI not in fast


def test_a_fixed_line_keeps_context_variables_level_and_reconfiguration() -> None:
    stream = configured()
    line = corespond_log.LineLogger("corespond.daemon.pipeline").fixed("cad.x", "feed", "phone")
    line("f", PHI)
    with structlog.contextvars.bound_contextvars(request_id="r-1", caller_name=PHI):
        line("f", None)
    first, second = json_lines(stream)
    assert first["redacted"] == ["phone"] and PHI not in stream.getvalue()
    assert second["request_id"] == "r-1" and second["redacted"] == ["caller_name", "phone"]
    assert list(first)[:5] == ["timestamp", "level", "event", "logger", "feed"]

    set_level("warning")
    line("f", None)
    assert len(stream.getvalue().splitlines()) == 2
    set_level("info")

    with structlog.testing.capture_logs() as captured:
        line("g", None)
    assert captured == [{"event": "cad.x", "feed": "g", "phone": None, "log_level": "info"}]
    with pytest.raises(ValueError):  # a value short: a bug at the call site, said at once
        line("g")
    assert len(stream.getvalue().splitlines()) == 2


def test_line_logger_keeps_context_variables_level_and_reconfiguration() -> None:
    stream = configured()
    line_log = corespond_log.LineLogger("corespond.daemon.pipeline")
    with structlog.contextvars.bound_contextvars(request_id="r-1", caller_name=PHI):
        line_log.info("cad.snapshot.stored", feed="f")
        structlog.get_logger("corespond.daemon.pipeline").info("cad.snapshot.stored", feed="f")
    fast, chain = stream.getvalue().splitlines()
    assert _without_timestamp(fast) == _without_timestamp(chain)
    assert json.loads(fast)["request_id"] == "r-1" and PHI not in fast

    set_level("warning")
    line_log.info("cad.snapshot.stored", feed="f")
    assert len(stream.getvalue().splitlines()) == 2
    set_level("info")

    with structlog.testing.capture_logs() as captured:
        line_log.info("cad.snapshot.stored", feed="f")
    assert captured == [{"event": "cad.snapshot.stored", "feed": "f", "log_level": "info"}]
    assert len(stream.getvalue().splitlines()) == 2

    console = configured(fmt="console")
    line_log.info("cad.snapshot.stored", feed="cad-eido", caller_name=PHI)
    text = console.getvalue()
    assert "cad.snapshot.stored" in text and "cad-eido" in text and PHI not in text
    assert len(stream.getvalue().splitlines()) == 2


def test_line_logger_repeats_exactly_the_configured_chain() -> None:
    # LineLogger.info rebuilds the JSON chain by hand: the chain configure_logging installs
    # must be the one it repeats, step for step (else every line silently takes the slow path).
    configured()
    assert tuple(structlog.get_config()["processors"]) == corespond_log.LINE_STEPS
    assert corespond_log._direct is not None
    assert corespond_log._direct.installed(structlog.get_config()["processors"])


def test_line_logger_falls_back_when_the_chain_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A step of the chain changed (here: the logger name step also sets a field) and not in
    # LineLogger, which sets the name inline: its lines go through structlog, so they still
    # carry what the chain adds.
    name = structlog.stdlib.add_logger_name

    def named(logger: Any, method: str, event_dict: Any) -> Any:
        event_dict["count"] = 7
        return name(logger, method, event_dict)

    monkeypatch.setattr(structlog.stdlib, "add_logger_name", named)
    stream = configured()
    assert tuple(structlog.get_config()["processors"]) != corespond_log.LINE_STEPS
    corespond_log.LineLogger("corespond.daemon.pipeline").info("cad.snapshot.stored", feed="f")
    structlog.get_logger("corespond.daemon.pipeline").info("cad.snapshot.stored", feed="f")
    fast, chain = json_lines(stream)
    assert fast["count"] == chain["count"] == 7
    assert {k: v for k, v in fast.items() if k != "timestamp"} == {
        k: v for k, v in chain.items() if k != "timestamp"
    }


class Flushes(io.StringIO):
    """A stream that counts its flushes and keeps what each one made visible."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())
        super().flush()


def test_lines_held_go_out_with_one_flush_each_in_place() -> None:
    stream = Flushes()
    configure_logging("info", "json", stream, cache_loggers=False)
    line_log = corespond_log.LineLogger("corespond.daemon.pipeline")
    line_log.info("cad.snapshot.stored", feed="f", snapshot_id=0)
    assert len(stream.flushed) == 1
    with corespond_log.lines_held():
        line_log.info("cad.snapshot.stored", feed="f", snapshot_id=1, caller_name=PHI)
        with corespond_log.lines_held():  # nested: only the outermost flushes
            structlog.get_logger("corespond.test").warning("feed.tcp.paused", in_flight=3)
        line_log.info("cad.snapshot.duplicate", feed="f", snapshot_id=2)
        assert len(stream.flushed) == 1
    assert len(stream.flushed) == 2 and stream.flushed[-1] == stream.getvalue()
    lines = json_lines(stream)
    assert [line.get("snapshot_id") for line in lines] == [0, 1, None, 2]
    assert lines[1]["redacted"] == ["caller_name"] and PHI not in stream.getvalue()
    line_log.info("cad.snapshot.stored", feed="f", snapshot_id=3)  # flushed at once again
    assert len(stream.flushed) == 3


def test_a_line_of_another_thread_during_a_hold_is_flushed_with_it() -> None:
    stream = Flushes()
    configure_logging("info", "json", stream, cache_loggers=False)
    with corespond_log.lines_held():
        other = threading.Thread(
            target=lambda: structlog.get_logger("corespond.store").warning(
                "store.batch.retried", attempt=1
            )
        )
        other.start()
        other.join()
        assert stream.flushed == []
    assert len(stream.flushed) == 1 and "store.batch.retried" in stream.flushed[0]


def test_an_error_inside_a_hold_still_flushes() -> None:
    stream = Flushes()
    configure_logging("info", "json", stream, cache_loggers=False)
    with pytest.raises(RuntimeError), corespond_log.lines_held():
        corespond_log.LineLogger("corespond.x").info("cad.snapshot.stored", feed="f")
        raise RuntimeError
    assert len(stream.flushed) == 1 and "cad.snapshot.stored" in stream.flushed[0]
    assert corespond_log._held == 0
