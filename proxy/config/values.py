"""Checks of a single value that several settings share: listen hosts, URLs, rate limits."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(value: str, *, what: str, allow_path: bool = True) -> str:
    """Validate an upstream or token URL: https, or http on a loopback host only."""
    parts = urlsplit(value)
    if "@" in parts.netloc or (not parts.netloc and "@" in value):
        raise ValueError(
            f"{shown_url(value)}: credentials in the URL are not allowed; use "
            "client_id/client_secret"
        )
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL; write it as https://host[/path]")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            f"{value!r} uses plain http to a host that is not loopback, which would send "
            "the token in clear text; use https://"
        )
    if parts.fragment or (not allow_path and parts.query):
        raise ValueError(f"{value!r} must not carry a query or fragment")
    return value


def shown_url(value: str) -> str:
    """`value` quoted for a message, with whatever precedes an `@` (a user and password, in
    any scheme, parsed or not) replaced by `***`."""
    if "@" not in value:
        return repr(value)
    scheme, sep, rest = value.partition("://")
    host = rest.rpartition("@")[2] if sep else value.rpartition("@")[2]
    return repr(f"{scheme}{sep}***@{host}" if sep else f"***@{host}")


def check_rate_limits(values: tuple[str, ...]) -> tuple[str, ...]:
    """Validate limits such as "100/second" or "36000/hour" with the `limits` library's parser."""
    import limits  # noqa: PLC0415  (only with a rate limit set: 2 MiB, 80 ms at start-up)

    for value in values:
        try:
            limits.parse(value)
        except ValueError as exc:
            raise ValueError(
                f'rate limit {value!r} is not understood; write it like "100/second", '
                '"20/minute" or "36000/hour"'
            ) from exc
    return values


def split_rate_limits(values: tuple[str, ...], ways: int) -> tuple[str, ...]:
    """Each limit divided `ways` ways, rounded down: "100/second" in 3 is "33 per 1 second"."""
    import limits  # noqa: PLC0415  (only with a rate limit set: 2 MiB, 80 ms at start-up)

    items = (limits.parse(value) for value in values)
    return tuple(
        f"{item.amount // ways} per {item.multiples} {item.GRANULARITY.name}" for item in items
    )


def check_key_prefix(value: str) -> str:
    """A prefix for Redis keys: printable ASCII without blanks or braces (braces would choose
    the hash slot of every key), up to 64 characters."""
    if not value:
        raise ValueError(
            'is empty; give every key a prefix of its own, e.g. "token-proxy:" or "team-a:"'
        )
    if len(value) > 64 or not all(33 <= ord(c) <= 126 and c not in "{}" for c in value):
        raise ValueError(
            "must be up to 64 printable ASCII characters without blanks, { or }; "
            'e.g. "token-proxy:" or "team-a:"'
        )
    return value
