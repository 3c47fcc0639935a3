"""Logging: structlog configured once, the standard library's loggers (aiohttp's among them)
rendered through the same chain, and a processor that redacts secrets and tokens."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[redacted]"
_SENSITIVE_KEY = re.compile(
    r"secret|token|authorization|password|passwd|(^|_)(api_?)?key($|_)", re.I
)
# Keys that match the pattern above but carry no secret: the names of what we log on purpose.
_SAFE_KEYS = frozenset({"token_url", "token_age_s", "token_type", "token_fetches"})
# A secret shorter than this is not scrubbed by value: it would shred ordinary words.
_MIN_SCRUB_LENGTH = 6
# Tokens live one after another; the last few cover any still in use.
_REMEMBERED_TOKENS = 16


class Redactor:
    """A structlog processor that hides sensitive keys and every live secret or token value.
    It runs on every log line, the access line included: plain values take a short path, and
    which keys are sensitive is remembered. (Not a compiled alternation of the values: every
    new token would leave one more pattern in the re module's cache, which the soak showed.)"""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._tokens: deque[str] = deque(maxlen=_REMEMBERED_TOKENS)
        self._values: tuple[str, ...] = ()
        self._shortest = 0  # a text shorter than every value holds none of them
        self._forms: tuple[str, ...] = ()  # each value as is and as JSON writes it
        self._sensitive: dict[str, bool] = {}

    def add_secret(self, value: str) -> None:
        if len(value) >= _MIN_SCRUB_LENGTH and value not in self._secrets:
            self._secrets.add(value)
            self._compile()

    def add_token(self, value: str) -> None:
        if len(value) >= _MIN_SCRUB_LENGTH and value not in self._tokens:
            self._tokens.append(value)
            self._compile()

    def clear(self) -> None:
        self._secrets.clear()
        self._tokens.clear()
        self._compile()

    def _compile(self) -> None:
        # Longest first, so that a secret inside a longer one (its encoded forms) goes with it.
        self._values = tuple(sorted({*self._secrets, *self._tokens}, key=len, reverse=True))
        self._shortest = len(self._values[-1]) if self._values else 1 << 30
        forms = set(self._values)
        for value in self._values:
            forms.add(json.dumps(value)[1:-1])
            forms.add(json.dumps(value, ensure_ascii=False)[1:-1])
        self._forms = tuple(forms)

    def mentions_secret(self, rendered: str) -> bool:
        """Whether a rendered line holds a secret or token, as is or JSON-escaped."""
        return any(form in rendered for form in self._forms)

    def any_sensitive_key(self, event_dict: EventDict) -> bool:
        sensitive = self._sensitive
        for key in event_dict:
            flag = sensitive.get(key)
            if flag or (flag is None and self._is_sensitive(key)):
                return True
        return False

    def scrub(self, text: str) -> str:
        if len(text) < self._shortest:
            return text
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, int | float | bool) or value is None:
            return value
        if isinstance(value, bytes):
            return self.scrub(value.decode("utf-8", "replace"))
        if isinstance(value, MutableMapping):
            return {key: self._clean_item(str(key), item) for key, item in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._clean(item) for item in value]
        return self.scrub(str(value))

    def _is_sensitive(self, key: str) -> bool:
        known = self._sensitive.get(key)
        if known is None:
            known = key not in _SAFE_KEYS and _SENSITIVE_KEY.search(key) is not None
            if len(self._sensitive) < 4096:  # keys come from code, but never grow unbounded
                self._sensitive[key] = known
        return known

    def _clean_item(self, key: str, value: Any) -> Any:
        if value is not None and self._is_sensitive(key):
            return REDACTED
        return self._clean(value)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        # The loop of _clean_item, inlined for the plain values every line is made of.
        scrub = self.scrub
        sensitive = self._sensitive
        shortest = self._shortest
        for key, value in event_dict.items():
            flag = sensitive.get(key)
            if flag is None:
                flag = self._is_sensitive(key)
            if flag and value is not None:
                event_dict[key] = REDACTED
            elif type(value) is str:
                if len(value) >= shortest:
                    event_dict[key] = scrub(value)
            elif type(value) not in _PLAIN and value is not None:
                event_dict[key] = self._clean(value)
        return event_dict


_PLAIN = frozenset({int, float, bool})


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

redactor = Redactor()


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
                with contextlib.suppress(RuntimeError):
                    loop = asyncio.get_running_loop()
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


class _FastLines:
    """JSON lines rendered without structlog's generic chain, for the access line written on
    every request: the same keys in the same order, merged with the bound context, redacted,
    stamped and written through the same LineWriter as every other line."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer
        self._second = -1
        self._stamp = ""

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._stamp}.{int((now - second) * 1_000_000):06d}Z"

    def info(self, logger: str, event: str, fields: dict[str, Any]) -> None:
        if _live.level > logging.INFO:
            return
        fields["event"] = event
        fields["logger"] = logger
        _merge_context(None, "info", fields)
        fields["level"] = "info"
        fields["timestamp"] = self._timestamp()
        line = _dumps(fields)
        # One search of the rendered line for every live secret and token replaces the walk
        # over each value; the redactor itself runs only on a hit or a sensitive key.
        if redactor.any_sensitive_key(fields) or redactor.mentions_secret(line):
            line = _dumps(redactor(None, "info", fields))
        self._writer.write(line + "\n")


_fast: _FastLines | None = None


def log_info_fast(logger: str, event: str, fields: dict[str, Any]) -> None:
    """Log `event` at info level with `fields` (a dict this call may change), as
    get_logger(logger).info(event, **fields) would; in JSON mode without structlog's chain."""
    if _fast is not None:
        _fast.info(logger, event, fields)
    else:
        get_logger(logger).info(event, **fields)


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
    global _fast  # noqa: PLW0603  (the access line's renderer follows the format)
    stream = _live.stream
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    if use_json:
        _live.renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        _live.renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    _fast = _FastLines(_writer) if use_json and _writer is not None else None
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
