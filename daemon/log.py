"""Structured logs: one stream (JSON lines, or console text for people), fields by allowlist.

Everything ends up in one stdlib handler on the root logger: our structlog events, stdlib
loggers (alembic, apscheduler, sqlalchemy) and Twisted's own log events, which a bridge turns
into ``twisted.log`` events. So the order of lines is the order things happened, and one
formatter decides what may be written.

The formatter keeps only the fields in :data:`ALLOWED_FIELDS`. Any other field is dropped and
its *name* listed under ``redacted``: a developer sees that ``caller_name=`` was dropped, never
its value. Fields hold identifiers and counts; names, birth dates, phone numbers, narratives and
addresses never reach a log line, whatever a call site passes.
"""

from __future__ import annotations

import json
import keyword
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO, cast

import orjson
import structlog
import structlog._config as structlog_config
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from corespond.daemon.errors import SafeMessage

ALLOWED_FIELDS = frozenset(
    {
        # structlog's own
        "event", "level", "timestamp", "logger",
        # where things come from
        "feed", "source", "format", "transport", "peer", "file", "path", "url", "host", "port",
        "config", "mode", "framing", "subscription_id", "transaction_id", "request_id", "kind",
        # identifiers
        "incident_id", "incident_pk", "snapshot_id", "reject_id", "revision", "version", "pid",
        "control_id", "expected", "provider", "referral_id", "referral_pk", "encounter_id",
        # outcomes and decisions
        "state", "code", "reason", "where", "status", "behavioral_health", "category",
        "response", "old_response", "rules", "ruleset", "old_ruleset", "new_ruleset", "score",
        "changed", "changes", "accepted", "rejected", "clean", "kept_as", "known", "presented",
        "status_text", "renew", "expires",
        # counts and timings
        "count", "incidents", "snapshots", "decisions", "rejects", "messages", "batch", "size",
        "attempt", "in_flight", "framing_errors", "discarded_bytes", "dropped_bytes", "seconds",
        "bytes", "limit",
        "duration_ms",
        # paging: ids, references and codes only (no addresses, names or reply text)
        "page_ref", "pages", "clinician_id", "chain_id", "step", "action", "outcome", "program",
        "gateway", "matched_by", "answer", "via", "system",
        # AVL: a CAD unit id (a vehicle or call sign, not a person)
        "unit",
        # the dashboard: a user's role code (never their name)
        "role",
        # failures
        "error", "errors", "exception", "signal",
    }
)  # fmt: skip
REDACTED_KEY = "redacted"
TWISTED_EVENT = "twisted.log"
# `message` is the formatted text of a Twisted event; we allow it there only.
TWISTED_MESSAGE_KEY = "message"
MAX_EXCEPTION_CHARS = 4096
MAX_MESSAGE_CHARS = 2048
MAX_VALUE_CHARS = 4096

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_FIRST_KEYS = ("timestamp", "level", "event", "logger")
# Chatty at INFO about nothing a sysadmin acts on.
QUIET_LOGGERS = {"alembic.runtime.plugins": logging.WARNING}
_TWISTED_LEVELS = {
    LogLevel.debug: logging.DEBUG,
    LogLevel.info: logging.INFO,
    LogLevel.warn: logging.WARNING,
    LogLevel.error: logging.ERROR,
    LogLevel.critical: logging.CRITICAL,
}

_handler: logging.Handler | None = None
_twisted_bridged = False


def allowlist_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Keep allowed fields (timestamp, level, event, logger first); name the dropped ones."""
    # On the ingest hot path (a line per snapshot): only strings longer than the smallest cap
    # go through _capped, and the allowlist is asked first (most keys are on it). This took
    # the processor from 7 to about 3 us a line, then to about 1.5 us.
    out: dict[str, Any] = {}
    for key in _FIRST_KEYS:
        if key in event_dict:
            value = event_dict[key]
            out[key] = value if type(value) is str and len(value) <= _SHORTEST_CAP else _capped(
                key, value
            )
    redacted = []
    allowed = ALLOWED_FIELDS
    shortest = _SHORTEST_CAP
    for key, value in event_dict.items():
        if key in allowed:
            if key in out:
                continue
            if type(value) is str:
                if len(value) > shortest:
                    value = _capped(key, value)
            elif isinstance(value, str):  # a str subclass (an enum): capped the same way
                value = _capped(key, value)
            out[key] = value
        elif key.startswith("_"):  # structlog's ProcessorFormatter bookkeeping, removed later
            out[key] = value
        elif key == TWISTED_MESSAGE_KEY and event_dict.get("event") == TWISTED_EVENT:
            out[key] = _capped(key, value)
        else:
            redacted.append(key)
    if redacted:
        out[REDACTED_KEY] = sorted(redacted)
    return out


def error_text(error: BaseException | Failure, limit: int = 300) -> str:
    """What a log line may say of an error: its message only when it cannot quote input
    (our :class:`~corespond.daemon.errors.SafeMessage` errors, OS and connection errors),
    otherwise its type alone."""
    exc = error.value if isinstance(error, Failure) else error
    if isinstance(exc, SafeMessage | OSError | ConnectError | ConnectionLost | CancelledError):
        return f"{type(exc).__qualname__}: {exc}"[:limit]
    return f"{type(exc).__qualname__} [message withheld]"


def traceback_without_messages(value: BaseException, tb: Any) -> str:
    """The traceback's frames and exception types, but no exception message.

    A message may quote what was being processed: a KeyError of a caller's name, a database
    error with its parameters, a parser error with a piece of the document. Only the frames
    (file, line, function) and the types are safe to write to a log.
    """
    lines: list[str] = []
    seen: set[int] = set()
    exc: BaseException | None = value
    chain: list[tuple[BaseException, Any]] = []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append((exc, tb if exc is value else exc.__traceback__))
        exc = exc.__cause__ or exc.__context__
    for n, (exc, exc_tb) in enumerate(reversed(chain)):
        if n:
            lines.append("\nDuring handling of the above exception, another one occurred:\n\n")
        lines.append("Traceback (most recent call last):\n")
        lines.extend(traceback.format_tb(exc_tb))
        name = type(exc).__qualname__
        if isinstance(exc, SafeMessage):
            lines.append(f"{name}: {exc}\n")
        else:
            lines.append(f"{name}: [message withheld: it may quote protected information]\n")
    return "".join(lines).rstrip("\n")


def format_exception_without_messages(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog's format_exc_info, but through :func:`traceback_without_messages`."""
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if exc_info[1] is not None:
        event_dict["exception"] = traceback_without_messages(exc_info[1], exc_info[2])
    return event_dict


_CAPS = {"exception": MAX_EXCEPTION_CHARS, TWISTED_MESSAGE_KEY: MAX_MESSAGE_CHARS}
_SHORTEST_CAP = min(MAX_VALUE_CHARS, *_CAPS.values())


def _capped(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    limit = _CAPS.get(key, MAX_VALUE_CHARS)
    if len(value) <= limit:
        return value
    return value[:limit] + f"... [truncated {len(value) - limit} characters]"


_LINE_ENCODER = json.JSONEncoder(default=str)
# orjson writes a line in about a fifth of the stdlib encoder's time (about 8 -> 1.5 us a line,
# once per snapshot). Datetimes and dataclasses pass through to ``default=str`` as they did;
# anything orjson refuses (an integer beyond 64 bits, a key that is not a string) or a line
# with non-ASCII text falls back.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _json_line(event_dict: Any, **_: Any) -> str:
    """structlog's JSONRenderer serializer (it passes ``default``; ours is always ``str``)."""
    try:
        line = orjson.dumps(event_dict, default=str, option=_ORJSON_OPTIONS).decode()
    except (orjson.JSONEncodeError, TypeError):
        return _LINE_ENCODER.encode(event_dict)
    # Lines stay ASCII, non-ASCII text escaped, as the stdlib encoder writes them.
    return line if line.isascii() else _LINE_ENCODER.encode(event_dict)


def utc_timestamp(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``timestamp``: now in UTC, as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes
    it (``2026-11-27T08:30:00.123456Z``; no fraction at a whole second). Its datetime.now and
    isoformat cost 19.2k instructions a line; this, which keeps the current second's text,
    7.0k."""
    event_dict["timestamp"] = _timestamp_text()
    return event_dict


def _timestamp_text() -> str:
    """What :func:`utc_timestamp` writes, for now."""
    second, micros = divmod(time.time_ns() // 1000, 1_000_000)
    global _stamped
    # One tuple, read and replaced whole: the reactor and the store's threads all log, and a
    # second's text must never be paired with another second.
    stamped_second, prefix = _stamped
    if second != stamped_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamped = (second, prefix)
    return f"{prefix}.{micros:06d}Z" if micros else f"{prefix}Z"


_stamped: tuple[int, str] = (-1, "")


def allowlisted_json_line(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
    """:func:`allowlist_fields` and then the JSON line, as one processor (our own events).

    The ingest path writes a line per snapshot, every field of it allowed and short. For such
    a line the allowlist has nothing to drop (a subset test, in C) and nothing to cap: a JSON
    line of at most the shortest cap's length cannot hold a longer string. Any other line goes
    through :func:`allowlist_fields` as before. This took the ingest path's line from 105.7k to
    91.1k instructions (callgrind).
    """
    if event_dict.keys() <= ALLOWED_FIELDS:
        out = {key: event_dict[key] for key in _FIRST_KEYS if key in event_dict}
        out.update(event_dict)  # the keys above keep their places at the front
        line = _json_line(out)
        if len(line) <= _SHORTEST_CAP:
            return line
    return _json_line(allowlist_fields(logger, method, event_dict))


def use_console(fmt: str, stream: TextIO) -> bool:
    """Whether ``fmt`` means console text on ``stream`` (``auto``: on a terminal)."""
    if fmt == "console":
        return True
    if fmt == "json":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    cache_loggers: bool = True,
) -> None:
    """Send every log event of this process to ``stream`` (standard output by default).

    May be called again (tests, a changed format): the previous handler is replaced.
    ``cache_loggers=False`` keeps loggers re-reading the configuration (for tests).
    """
    global _handler
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; expected auto, json or console")
    out = stream if stream is not None else sys.stdout
    console = use_console(fmt, out)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=_isatty(out))
        if console
        # One encoder for every line: json.dumps(default=str) builds a new one per call
        # (about 3 us of the 35 us a line costs). Same output as json.dumps(default=str).
        else structlog.processors.JSONRenderer(_json_line)
    )
    shared: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        utc_timestamp,
        format_exception_without_messages,
    ]
    # Our own events go straight to the stream (structlog's native path: no LogRecord, no
    # frame inspection; it is the dearest stage after parsing on the ingest hot path). The
    # stdlib handler below takes the other libraries' records, through the same processors.
    processors = [
        structlog.contextvars.merge_contextvars,
        _drop_below_level,
        *shared,
        *((allowlist_fields, renderer) if console else (allowlisted_json_line,)),
    ]
    global _direct
    _direct = None if console else _Direct(processors, out)
    structlog.configure(
        processors=processors,
        logger_factory=_NamedWriteLoggerFactory(out),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=cache_loggers,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            allowlist_fields,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet_level)
    set_level(level)
    bridge_twisted_logging()


def set_level(level: str) -> None:
    """Change the least severe level written (a reload may do this)."""
    global _threshold
    _threshold = LEVELS[level]
    logging.getLogger().setLevel(LEVELS[level])


_threshold = logging.INFO
_METHOD_LEVELS = {
    "debug": logging.DEBUG, "info": logging.INFO, "msg": logging.INFO,
    "warning": logging.WARNING, "warn": logging.WARNING, "error": logging.ERROR,
    "exception": logging.ERROR, "critical": logging.CRITICAL, "fatal": logging.CRITICAL,
}  # fmt: skip


def _drop_below_level(
    _logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The level filter for our own events; a module value, so a reload changes it at once."""
    if _METHOD_LEVELS.get(method, logging.INFO) < _threshold:
        raise structlog.DropEvent
    return event_dict


class LineLogger:
    """``info`` for a line written once per snapshot, without structlog's wrapper.

    While the output is our JSON chain (:func:`configure_logging` with JSON, not reconfigured
    since, e.g. by ``structlog.testing.capture_logs``), the line is built by the same steps
    that chain takes, called directly: context variables, level, logger name, timestamp, then
    :func:`allowlisted_json_line`, so it is the same line with the same allowlist. Anything
    else (console output, a level above info, ``exc_info``, another configuration) goes
    through structlog as before. Writing ``cad.snapshot.stored`` this way costs about a third
    less than through the bound logger's processor loop.

    :data:`LINE_STEPS` names the chain :meth:`info` repeats by hand. When the chain that
    :func:`configure_logging` installs is not exactly that one (a processor added, removed or
    moved), every line goes through structlog instead; a test holds the two equal, so that
    the fast path is not lost silently either.
    """

    __slots__ = ("_chain", "_name", "_writer")

    def __init__(self, name: str) -> None:
        self._name = name
        self._chain = structlog.get_logger(name)
        self._writer: _NamedWriteLogger | None = None

    def info(self, event: str, **fields: Any) -> None:
        direct = _direct
        if (
            direct is None
            or _threshold > logging.INFO
            or "exc_info" in fields
            or not direct.installed(structlog_config._CONFIG.default_processors)
        ):
            self._chain.info(event, **fields)
            return
        writer = self._writer_for(direct)
        if fields.keys() <= _LINE_FIELDS and not _context_bound():
            out = {"timestamp": _timestamp_text(), "level": "info", "event": event,
                   "logger": self._name}  # fmt: skip
            out.update(fields)
            if _write_short_line(writer, out):
                return
        fields["event"] = event
        structlog.contextvars.merge_contextvars(writer, "info", fields)
        fields["level"] = "info"
        fields["logger"] = self._name
        utc_timestamp(writer, "info", fields)
        writer.msg(allowlisted_json_line(writer, "info", fields))

    def fixed(self, event: str, *keys: str) -> FixedLine:
        """A line ``event`` with the fields ``keys``, written by calling it with their values
        in that order: ``info(event, **dict(zip(keys, values)))``, for less (_fixed_line)."""
        return _fixed_line(self, event, keys)

    def _writer_for(self, direct: _Direct) -> _NamedWriteLogger:
        writer = self._writer
        if writer is None or writer.stream is not direct.stream:
            writer = self._writer = _NamedWriteLogger(direct.stream, self._name)
        return writer


# A line with fixed fields, called with their values in order (see LineLogger.fixed).
FixedLine = Callable[..., None]


def _fixed_line(logger: LineLogger, event: str, keys: tuple[str, ...]) -> FixedLine:
    """The line of :meth:`LineLogger.fixed`.

    The same line as :meth:`LineLogger.info` with those fields as keywords. The fields are
    known when it is made, so whether they may take the short way (all allowed, none that the
    chain sets itself, none twice) is decided once, and the line's dict is a dict display in
    a function made for these fields (binding keywords, checking them and merging dicts per
    line cost more than the JSON): the per-snapshot line went from 38.5k to 20k instructions
    (callgrind, ``bench/ingest_stages.py --stage feed`` with and without ``--no-line``).
    """

    def keyword_line(*values: Any) -> None:
        logger.info(event, **dict(zip(keys, values, strict=True)))

    short = (
        len(set(keys)) == len(keys)
        and set(keys) <= _LINE_FIELDS
        and all(k.isidentifier() and not keyword.iskeyword(k) for k in keys)
    )
    if not short:
        return keyword_line
    # The names are allowlisted field names (identifiers, checked above); the values are the
    # function's own parameters.
    params = ", ".join(keys)
    items = "".join(f"{k!r}: {k}, " for k in keys)
    source = (
        f"def line({params}):\n"
        "    direct = _LOG._direct\n"
        "    if (direct is not None and _LOG._threshold <= _INFO\n"
        "            and direct.installed(_CONFIG.default_processors)\n"
        "            and not _context_bound()):\n"
        "        out = {'timestamp': _timestamp_text(), 'level': 'info', 'event': _EVENT,\n"
        f"               'logger': _NAME, {items}}}\n"
        "        if _write_short_line(_LOGGER._writer_for(direct), out):\n"
        "            return\n"
        f"    _fallback({params})\n"
    )
    namespace: dict[str, Any] = {
        "_LOG": sys.modules[__name__],
        "_INFO": logging.INFO,
        "_CONFIG": structlog_config._CONFIG,
        "_context_bound": _context_bound,
        "_timestamp_text": _timestamp_text,
        "_EVENT": event,
        "_NAME": logger._name,
        "_LOGGER": logger,
        "_write_short_line": _write_short_line,
        "_fallback": keyword_line,
    }
    exec(source, namespace)
    line: FixedLine = namespace["line"]
    return line


def _write_short_line(writer: _NamedWriteLogger, out: dict[str, Any]) -> bool:
    """Write ``out`` (the chain's first keys, then the fields, all allowed: what
    allowlisted_json_line would keep of it, in its order) when its JSON line is short enough
    that no value needs capping and orjson wrote it as the chain would; False otherwise."""
    try:
        line = orjson.dumps(out, default=str, option=_ORJSON_OPTIONS).decode()
    except (orjson.JSONEncodeError, TypeError):
        return False
    if len(line) > _SHORTEST_CAP or not line.isascii():
        return False
    writer.msg(line)
    return True


# What LineLogger.info does, step by step, for a line at info without exc_info: the context
# variables merged; the level filter (its _threshold test); ``level`` and ``logger`` set as
# add_log_level and add_logger_name set them; the timestamp; no exception to format; then the
# allowlist and the JSON line. The JSON chain configure_logging builds must be exactly these.
LINE_STEPS: tuple[Any, ...] = (
    structlog.contextvars.merge_contextvars,
    _drop_below_level,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    utc_timestamp,
    format_exception_without_messages,
    allowlisted_json_line,
)


class _Direct:
    """The JSON chain :func:`configure_logging` installed, for :class:`LineLogger`."""

    __slots__ = ("chain", "processors", "repeated", "stream")

    def __init__(self, processors: list[Any], stream: TextIO) -> None:
        self.processors = processors
        self.chain = tuple(processors)
        self.repeated = self.chain == LINE_STEPS
        self.stream = stream

    def installed(self, processors: Iterable[Any]) -> bool:
        """Whether structlog still runs this chain (``capture_logs`` changes the list in
        place, ``configure`` replaces it) and it is the one LineLogger repeats."""
        return (
            processors is self.processors
            and self.repeated
            and tuple(processors) == self.chain
        )


_direct: _Direct | None = None
# The fields a line may take its fast way with: allowed, and not set by the chain itself.
_LINE_FIELDS = ALLOWED_FIELDS - set(_FIRST_KEYS)
# structlog's context variables, by key: none bound while it is empty (clearing them leaves
# their keys, so a key once bound always takes merge_contextvars' way). Where structlog no
# longer keeps it, every line asks merge_contextvars.
_STRUCTLOG_CONTEXT_VARS: dict[str, Any] | None = getattr(
    structlog.contextvars, "_CONTEXT_VARS", None
)


def _context_bound() -> bool:
    """Whether merge_contextvars might add a field to a line."""
    known = _STRUCTLOG_CONTEXT_VARS
    if known is None:
        return bool(structlog.contextvars.merge_contextvars(None, "info", {}))
    return bool(known)


class _NamedWriteLogger:
    """Writes each rendered event as one line, with the name ``add_logger_name`` reads.

    Not structlog's WriteLogger: its lock is not reentrant, and a signal handler that logs
    (Twisted's SIGTERM handler does) while the main thread is inside a write deadlocks on it.
    """

    def __init__(self, file: TextIO, name: str) -> None:
        self.name = name
        self.stream = file
        self._write = file.write
        self._flush = file.flush

    def msg(self, message: str) -> None:
        with _WRITE_LOCK:
            self._write(message + "\n")
            if _held:
                _unflushed[id(self.stream)] = self._flush  # one flush a stream
            else:
                self._flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


# Reentrant: a signal handler may log while the main thread holds it (see above).
_WRITE_LOCK = threading.RLock()
# Inside lines_held(): our lines are written but not flushed one by one (see there).
_held = 0
_unflushed: dict[int, Callable[[], None]] = {}


@contextmanager
def lines_held() -> Iterator[None]:
    """Our lines written inside go out together: one flush when the outermost hold ends.

    For the lines of a committed batch, written one per snapshot in one pass on the reactor:
    a flush is a write() to the journal's socket or pipe each. Every line keeps its fields and
    its place in the stream (they all go through the one buffer, in order); they reach it
    microseconds later, when the batch's callbacks are done. Lines of other threads written
    meanwhile wait for the same flush.
    """
    global _held
    with _WRITE_LOCK:  # msg() reads _held under it: no line is left behind unflushed
        _held += 1
    try:
        yield
    finally:
        with _WRITE_LOCK:
            _held -= 1
            if not _held:
                for flush in _unflushed.values():
                    flush()
                _unflushed.clear()


class _NamedWriteLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._stream, str(args[0]) if args else "corespond")


def bridge_twisted_logging() -> None:
    """Route Twisted's log events into the stdlib stream (once per process)."""
    global _twisted_bridged
    if _twisted_bridged:
        return
    # Not redirecting standard I/O: standard output is where the log lines go.
    observer = cast(ILogObserver, TwistedLogBridge())
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    _twisted_bridged = True


@implementer(ILogObserver)
class TwistedLogBridge:
    """A Twisted log observer that writes each event as a structlog ``twisted.log`` event.

    The formatted text goes under ``message`` (truncated), a failure's traceback under
    ``exception``; the logger is the event's namespace.
    """

    def __call__(self, event: dict[str, Any]) -> None:
        level = _TWISTED_LEVELS.get(event.get("log_level", LogLevel.info), logging.INFO)
        if level == logging.INFO and _is_chatter(event):
            level = logging.DEBUG
        namespace = str(event.get("log_namespace") or "twisted")
        if namespace == "log_legacy":  # twisted.python.log.msg callers name no namespace
            namespace = "twisted"
        if not logging.getLogger(namespace).isEnabledFor(level):
            return
        fields: dict[str, Any] = {TWISTED_MESSAGE_KEY: formatEvent(event)}
        failure = event.get("log_failure")
        if failure is not None:
            try:
                fields["exception"] = traceback_without_messages(
                    failure.value, failure.getTracebackObject()
                )
            except Exception:  # a broken failure must not break logging
                fields["exception"] = type(failure.value).__qualname__
        structlog.get_logger(namespace).log(level, TWISTED_EVENT, **fields)


# Twisted says these at INFO for every connection a factory makes; our own connection events
# say what matters, so they go to DEBUG.
_CHATTER = ("Starting factory", "Stopping factory", "Starting protocol", "Stopping protocol")


def _is_chatter(event: dict[str, Any]) -> bool:
    fmt = event.get("log_format")
    if fmt is None and event.get("message"):
        fmt = " ".join(str(m) for m in event["message"])
    return isinstance(fmt, str) and fmt.startswith(_CHATTER)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
