"""Header hygiene both ways: hop-by-hop headers (and those a Connection header names) dropped,
the client's Authorization replaced by the upstream token, the proxy's X-Request-ID set."""

from __future__ import annotations

from collections.abc import Iterable

# RFC 9110 7.6.1, plus the legacy names still seen in the wild.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: the proxy sets Host, Authorization and X-Request-ID itself, and
# answers Expect: 100-continue on its own side.
_REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "expect", "x-request-id"}
# Never relayed to the client: the proxy sets X-Request-ID itself.
_RESPONSE_DROP = HOP_BY_HOP | {"x-request-id"}
Headers = list[tuple[str, str]]
# Connection options that name no header.
_CONNECTION_OPTIONS = frozenset({"", "close"})


def _end_to_end(items: Iterable[tuple[str, str]], drop: frozenset[str]) -> Headers:
    """The headers of `items` not in `drop`, and none that a Connection header names."""
    out: Headers = []
    connection: list[str] = []
    for name, value in items:
        lower = name.lower()
        if lower in drop:
            if lower == "connection":
                connection.append(value)
            continue
        out.append((name, value))
    if connection:
        named = {part.strip().lower() for value in connection for part in value.split(",")}
        if not named <= drop | _CONNECTION_OPTIONS:  # a header named there goes too
            out = [(name, value) for name, value in out if name.lower() not in named]
    return out


def upstream_headers(
    incoming: Iterable[tuple[str, str]], *, token: str, request_id: str
) -> Headers:
    """The client's end-to-end headers, with Authorization replaced by the upstream token."""
    out = _end_to_end(incoming, _REQUEST_DROP)
    out.append(("Authorization", f"Bearer {token}"))
    out.append(("X-Request-ID", request_id))
    return out


def downstream_headers(incoming: Iterable[tuple[str, str]], *, request_id: str) -> Headers:
    """Upstream's end-to-end response headers, for the client."""
    out = _end_to_end(incoming, _RESPONSE_DROP)
    out.append(("X-Request-ID", request_id))
    return out
