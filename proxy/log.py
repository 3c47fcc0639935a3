"""Logging: structlog configured once, the standard library's loggers (aiohttp's among them)
rendered through the same chain, and a processor that redacts secrets and tokens."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import deque
from collections.abc import Callable, MutableMapping
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

    def scrub(self, text: str) -> str:
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
        for key, value in event_dict.items():
            flag = sensitive.get(key)
            if flag is None:
                flag = self._is_sensitive(key)
            if flag and value is not None:
                event_dict[key] = REDACTED
            elif type(value) is str:
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


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def configure_logging(
    *, level: str = "info", fmt: str = "auto", stream: TextIO | None = None, cache: bool = True
) -> None:
    """Configure structlog once: our loggers render straight to the stream (cached, no stdlib
    round trip, it is the hot path of the access line), and the standard library's loggers,
    aiohttp's among them, through the same processors by a stdlib handler. Tests that
    configure more than once pass cache=False (structlog cannot reconfigure cached loggers)."""
    stream = sys.stderr if stream is None else stream
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # Tracebacks become text before redaction, so that they are scrubbed too.
    final: list[Processor] = [structlog.processors.format_exc_info, redactor, renderer]
    structlog.configure(
        processors=[
            _name_key,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            *final,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=cache,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    # aiohttp's access logger is replaced by our own access line; its other loggers stay on.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _QuietBadRequests) for f in server_log.filters):
        server_log.addFilter(_QuietBadRequests())


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger whose lines carry `logger=name`."""
    # "logger" itself cannot be passed: it is get_logger's own parameter name.
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(logger_name=name)
    return logger


def _name_key(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Name the logger under the same key the standard library's lines use."""
    event_dict["logger"] = event_dict.pop("logger_name", None)
    return event_dict
