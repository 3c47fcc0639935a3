"""Reading `redis_url` (redis://, rediss:// with verified TLS, unix://) into the keyword
arguments of redis-py's asyncio client, with the password kept secret: it is never in a
repr, a message or a log line, and no message quotes any other part of the URL either,
since a password with an unescaped `/`, `?` or `#` spills into the host, path or query."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import SecretStr
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

try:  # redis-py 7 and later
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py has no such handshake
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

DEFAULT_PORT = 6379
_EXAMPLES = (
    "redis://[:password@]host[:6379][/db], rediss://[:password@]host[:6380][/db] (TLS, "
    "verified) or unix://[:password@]/path/to/redis.sock[?db=0]"
)
_ESCAPE_HINT = "; percent-encode any of / ? # @ : in the password (as %2F %3F %23 %40 %3A)"
_QUERY = {"redis": {"db"}, "rediss": {"db", "ssl_ca_certs"}, "unix": {"db"}}


def _problem(what: str, *, hint: bool = False) -> ValueError:
    return ValueError(
        f"redis_url (TOKEN_PROXY_REDIS_URL): {what}; write it as {_EXAMPLES}"
        + (_ESCAPE_HINT if hint else "")
    )


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where the Redis (or Valkey) server is and how to log in to it."""

    scheme: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    ca_file: str | None = None

    def __str__(self) -> str:
        return self.safe_url

    @property
    def safe_url(self) -> str:
        """The URL with the password masked, fit for a log line."""
        login = ""
        if self.username or self.password is not None:
            login = (self.username or "") + (":***" if self.password is not None else "") + "@"
        if self.scheme == "unix":
            return f"unix://{login}{self.path}?db={self.db}"
        return f"{self.scheme}://{login}{self.host}:{self.port}/{self.db}"

    def client_kwargs(self, *, timeout: float) -> dict[str, Any]:
        """Keyword arguments for redis.asyncio.Redis: every socket operation bounded by
        `timeout`, and no retries (the fallback store decides what a failure means)."""
        kwargs: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password.get_secret_value() if self.password is not None else None,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": False,
        }
        if MaintNotificationsConfig is not None:
            # Off: its handshake costs a round trip per connection, and during a cluster's
            # maintenance it would stretch socket timeouts to 10 s.
            kwargs["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        if self.scheme == "unix":
            kwargs["unix_socket_path"] = self.path
            return kwargs
        kwargs.update(host=self.host, port=self.port)
        if self.scheme == "rediss":
            kwargs.update(
                ssl=True,
                ssl_cert_reqs="required",
                ssl_check_hostname=True,
                ssl_ca_certs=self.ca_file,
            )
        return kwargs


def parse_redis_url(url: str | SecretStr) -> RedisTarget:
    """Read and check a redis_url; a ValueError names the setting and the fix."""
    text = (url.get_secret_value() if isinstance(url, SecretStr) else url).strip()
    if not text:
        raise _problem("it is empty")
    scheme, separator, _ = text.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in _QUERY:
        readable = separator and re.fullmatch(r"[a-z][a-z0-9+.-]{0,15}", scheme)
        shown = f"{scheme!r}" if readable else "no"
        raise _problem(f"it has {shown} scheme; only redis, rediss and unix are understood")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise _problem("its host or port cannot be read", hint=True) from None
    if parts.fragment:
        raise _problem("it has a #fragment", hint=True)
    username = unquote(parts.username) if parts.username else None
    password = SecretStr(unquote(parts.password)) if parts.password is not None else None
    query = _query(parts.query, scheme)
    db = _db(query.get("db"), parts.path if scheme != "unix" else "")
    if scheme == "unix":
        if parts.hostname:
            raise _problem("a unix:// URL names no host: it is unix:///absolute/path", hint=True)
        if not parts.path.startswith("/") or parts.path == "/":
            raise _problem("a unix:// URL needs the socket's absolute path", hint=True)
        return RedisTarget(
            scheme=scheme, path=unquote(parts.path), db=db, username=username, password=password
        )
    if not parts.hostname:
        raise _problem("it names no host", hint=True)
    if port == 0:
        raise _problem("its port is not a number from 1 to 65535")
    return RedisTarget(
        scheme=scheme,
        host=parts.hostname,
        port=port or DEFAULT_PORT,
        db=db,
        username=username,
        password=password,
        ca_file=query.get("ssl_ca_certs"),
    )


def _query(raw: str, scheme: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=bool(raw))
    except ValueError:
        raise _problem("its query string cannot be read", hint=True) from None
    allowed = _QUERY[scheme]
    query: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            # Names are not quoted: with an unescaped `?` in a password, one would be part of it.
            known = ", ".join(sorted(allowed))
            extra = " (TLS is always verified)" if name.startswith("ssl") else ""
            raise _problem(
                f"it has a query parameter that a {scheme}:// URL does not take{extra}; "
                f"it takes {known}",
                hint=True,
            )
        query[name] = value
    return query


def _db(from_query: str | None, path: str) -> int:
    raw = from_query if from_query is not None else path.strip("/")
    if raw == "":
        return 0
    if not raw.isascii() or not raw.isdigit() or int(raw) > 10_000:
        raise _problem("its database (the /N path, or ?db=N) is not a small number", hint=True)
    return int(raw)
