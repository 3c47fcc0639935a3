"""Logging: structlog's chain configured once, for our loggers and the standard library's.

aiohttp's loggers are rendered through the same chain, which proxy.redaction's processor
redacts; the access line takes a fast path beside it that writes the same text."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError
from structlog.typing import EventDict, Processor, WrappedLogger

from proxy.redaction import REDACTED, Redactor, redactor

# What the modules that log import from here; the redactor lives in proxy.redaction.
__all__ = [
    "REDACTED",
    "LineWriter",
    "Redactor",
    "bind_process",
    "bind_request",
    "bind_request_more",
    "configure_logging",
    "flush_logs",
    "get_logger",
    "log_info_fast",
    "redactor",
    "unbind_request",
]


def _json_dumps(obj: Any, **options: Any) -> str:
    return json.dumps(obj, **options)


def _orjson_dumps(obj: Any, *, default: Callable[[Any], Any] | None = None, **_: Any) -> str:
    return orjson.dumps(obj, default=default or repr).decode()


try:  # orjson comes with the `speed` extra: ten times faster on the access line
    import orjson
except ImportError:  # pragma: no cover - depends on the installation
    _dumps: Callable[..., str] = _json_dumps
else:
    _dumps = _orjson_dumps


class _QuietBadRequests(logging.Filter):
    """aiohttp logs every request its parser rejects at error level with a traceback, which
    lets any client flood the log: keep one plain info line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = f"refused a malformed request: {type(exc).__name__}: {exc.message}"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class LineWriter:
    """Log lines to a stream with one write per turn of the event loop, not one per line: under
    load the access lines of many requests leave in one system call. A line waits at most for
    the end of the current loop iteration; without a running loop (startup, threads, exit) it
    is written at once, and whatever is left is written at interpreter exit."""

    def __init__(self, stream: TextIO, *, buffered: bool = True) -> None:
        self.stream = stream
        self._buffered = buffered
        self._pending: list[str] = []
        self._scheduled = False
        self._lock = threading.Lock()
        atexit.register(self.flush)

    def write(self, text: str) -> None:
        with self._lock:
            self._pending.append(text)
            if self._scheduled:
                return
            loop = None
            if self._buffered:
                # try, not contextlib.suppress: this runs for every line, the access line's too.
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop in this thread: written at once below
                    loop = None
            if loop is not None:
                self._scheduled = True
                loop.call_soon(self.flush)
                return
        self.flush()

    def flush(self) -> None:
        with self._lock:
            self._scheduled = False
            if not self._pending:
                return
            text = "".join(self._pending)
            self._pending.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: nothing left to tell
                pass

    def close(self) -> None:
        self.flush()
        atexit.unregister(self.flush)


class _LineLogger:
    """structlog's wrapped logger: each rendered line goes to the LineWriter."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.write(message + "\n")

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


# What every line carries: the process's fields (a worker's number), then the current
# request's (request id, team client). One context variable holds a request's fields, set once
# per request: cheaper than one variable per key as structlog.contextvars keeps them.
_process_context: dict[str, Any] = {}
_request_context: ContextVar[dict[str, Any] | None] = ContextVar("request_context", default=None)


def bind_process(**fields: Any) -> None:
    """Fields for every line this process writes from now on."""
    _process_context.update(fields)


def bind_request(**fields: Any) -> Token[dict[str, Any] | None]:
    """Fields for every line written in this context (a request's task), until unbind_request
    with the token returned."""
    return _request_context.set(fields)


def bind_request_more(**fields: Any) -> None:
    """Add to the fields bound by bind_request in this context (a copy: tasks started from
    it keep what they saw)."""
    context = _request_context.get()
    if context is not None:
        _request_context.set({**context, **fields})


def unbind_request(token: Token[dict[str, Any] | None]) -> None:
    _request_context.reset(token)


def _merge_context(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    for key, value in _process_context.items():
        event_dict.setdefault(key, value)
    request = _request_context.get()
    if request is not None:
        for key, value in request.items():
            event_dict.setdefault(key, value)
    return event_dict


_writer: LineWriter | None = None


class InfoLines(Protocol):
    """How log_info_fast writes a line: _FastLines in JSON mode, else structlog's chain. A
    test renders the same events both ways and compares the text (tests/test_log.py)."""

    def info(
        self, logger: str, event: str, fields: dict[str, Any], *, plain: bool = False
    ) -> None: ...


class _ChainLines:
    """structlog's own chain: the console renderer's way, and the reference of _FastLines."""

    def info(self, logger: str, event: str, fields: dict[str, Any], *, plain: bool = False) -> None:
        get_logger(logger).info(event, **fields)


class _FastLines:
    """JSON lines rendered without structlog's generic chain, for the access line written on
    every request: the text the chain writes (same keys in the same order, merged with the
    bound context, redacted, stamped), through the same LineWriter as every other line."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer
        self._second = -1
        self._stamp = ""

    def _timestamp(self) -> str:
        """What TimeStamper(fmt="iso", utc=True) writes, with strftime once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        micro = int((now - second) * 1_000_000)
        # isoformat() leaves out a fraction of zero microseconds. (zfill: cheaper than :06d.)
        return f"{self._stamp}.{str(micro).zfill(6)}Z" if micro else self._stamp + "Z"

    def info(self, logger: str, event: str, fields: dict[str, Any], *, plain: bool = False) -> None:
        if _live.level > logging.INFO:
            return
        fields["event"] = event
        fields["logger"] = logger
        _merge_context(None, "info", fields)
        fields["level"] = "info"
        fields["timestamp"] = self._timestamp()
        # One search of the rendered line for every live secret and token replaces the walk
        # over each value; the redactor itself runs only on a hit, or first when it could
        # change more than a secret (a sensitive key, a value other than a plain one).
        if not plain and redactor.needs_walk(fields):
            line = _dumps(redactor(None, "info", fields))
        else:
            line = _dumps(fields)
            if redactor.mentions_secret(line):
                line = _dumps(redactor(None, "info", fields))
        self._writer.write(line + "\n")


_lines: InfoLines = _ChainLines()


def log_info_fast(logger: str, event: str, fields: dict[str, Any], *, plain: bool = False) -> None:
    """Log `event` at info level with `fields` (a dict this call may change): the line that
    get_logger(logger).info(event, **fields) writes, in JSON mode without structlog's chain.
    `plain`: the caller vouches that no key of `fields` is sensitive and that every value is a
    str, int, float, bool or None, so that the redactor could change nothing but a live secret
    inside a value, which the search of the rendered line finds (the access line's)."""
    _lines.info(logger, event, fields, plain=plain)


def flush_logs() -> None:
    """Write out the log lines still waiting for the end of the loop iteration."""
    if _writer is not None:
        _writer.flush()


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR
# The level of each structlog method; one not named here is always written.
_METHOD_LEVELS = {**_LEVELS, "warn": logging.WARNING, "err": logging.ERROR}
_METHOD_LEVELS.update(exception=logging.ERROR, critical=logging.CRITICAL, fatal=logging.CRITICAL)


class _Live:
    """What a reload changes in the configured chain without building it again: structlog
    caches each logger with its processors and wrapper class on first use, so the level is
    checked by the first processor and the renderer is looked up by the last."""

    level = logging.INFO
    stream: TextIO = sys.stderr
    renderer: Processor = structlog.processors.JSONRenderer()


_live = _Live()


def _render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> Any:
    return _live.renderer(logger, method_name, event_dict)


def configure_logging(
    *,
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    cache: bool = True,
    buffered: bool = True,
) -> None:
    """Configure structlog once: our loggers render straight to the stream (cached, no stdlib
    round trip, it is the hot path of the access line), and the standard library's loggers,
    aiohttp's among them, through the same processors by a stdlib handler. Tests that
    configure more than once pass cache=False (structlog cannot reconfigure cached loggers);
    tests that read the stream right after logging pass buffered=False (see LineWriter).
    set_logging changes the level and format afterwards."""
    global _writer  # noqa: PLW0603  (one writer per configuration, flushed at exit)
    stream = sys.stderr if stream is None else stream
    if _writer is not None:
        _writer.close()
    writer = _writer = LineWriter(stream, buffered=buffered)
    _live.stream = stream
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # Tracebacks become text before redaction, so that they are scrubbed too.
    final: list[Processor] = [structlog.processors.format_exc_info, redactor, _render]
    structlog.configure(
        processors=[
            _name_key,
            _merge_context,
            structlog.processors.add_log_level,
            timestamper,
            *final,
        ],
        # Every level passes the wrapper: _name_key filters by the live level.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=lambda *_: _LineLogger(writer),
        cache_logger_on_first_use=cache,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            _merge_context,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(writer)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    set_logging(level=level, fmt=fmt)
    # aiohttp's access logger is replaced by our own access line; its other loggers stay on.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _QuietBadRequests) for f in server_log.filters):
        server_log.addFilter(_QuietBadRequests())


def set_logging(*, level: str, fmt: str) -> None:
    """Change the level and format of the configured logging, for every logger at once (a
    reload): the lines after this call follow them."""
    global _lines  # noqa: PLW0603  (the access line's renderer follows the format)
    stream = _live.stream
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    if use_json:
        _live.renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        _live.renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    _lines = _FastLines(_writer) if use_json and _writer is not None else _ChainLines()
    _live.level = _LEVELS[level]
    logging.getLogger().setLevel(_LEVELS[level])


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger whose lines carry `logger=name`."""
    # "logger" itself cannot be passed: it is get_logger's own parameter name.
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(logger_name=name)
    return logger


def _name_key(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Drop a line below the live level; name the logger under the same key the standard
    library's lines use."""
    if _METHOD_LEVELS.get(method_name, logging.CRITICAL) < _live.level:
        raise structlog.DropEvent
    event_dict["logger"] = event_dict.pop("logger_name", None)
    return event_dict
