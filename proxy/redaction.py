"""Redaction: which keys and values of a log line are secrets, and the redactor that hides them.

One Redactor serves every line: as structlog's processor, and as the search of a line the
access line's fast path rendered."""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import MutableMapping
from typing import Any

from structlog.typing import EventDict, WrappedLogger

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
        self._plain_keys: set[str] = set()  # the keys _sensitive knows to be harmless

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
        raw = {*self._secrets, *self._tokens}
        values = set(raw)
        # A traceback writes some messages through repr() (a KeyError's, a task's exception):
        # a value with a quote, a backslash or an unprintable character is then written
        # escaped, within either quote. A plain value is its own repr and costs nothing more.
        for value in raw:
            values.add(repr(value)[1:-1])
            values.add(repr(value + "'\"")[1:-4])
        # Longest first, so that a secret inside a longer one (its encoded forms) goes with it.
        self._values = tuple(sorted(values, key=len, reverse=True))
        self._shortest = len(self._values[-1]) if self._values else 1 << 30
        forms = set(self._values)
        for value in self._values:
            forms.add(json.dumps(value)[1:-1])
            forms.add(json.dumps(value, ensure_ascii=False)[1:-1])
        self._forms = tuple(forms)

    def mentions_secret(self, rendered: str) -> bool:
        """Whether a rendered line holds a secret or token, as is or JSON-escaped."""
        return any(map(rendered.__contains__, self._forms))

    def needs_walk(self, event_dict: EventDict) -> bool:
        """Whether this processor could change `event_dict` other than by scrubbing a secret
        that a search of the rendered line finds: a key is sensitive, or a value is not a
        plain str, int, float, bool or None (nested, bytes, ... which the walk converts)."""
        # Both checks loop in C: a line of known plain keys and plain values costs two.
        if not event_dict.keys() <= self._plain_keys and any(map(self._is_sensitive, event_dict)):
            return True
        return not _FLAT.issuperset(map(type, event_dict.values()))

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
                if not known:
                    self._plain_keys.add(key)
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
_FLAT = frozenset({str, int, float, bool, type(None)})


redactor = Redactor()
