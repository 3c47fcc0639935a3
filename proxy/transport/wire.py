"""The lean client's HTTP/1.1 requests on the wire: where a URL goes, a request's head, and
its body's framing."""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.config.egress import EgressProxy
from proxy.transport.base import Body

if TYPE_CHECKING:
    from proxy.transport.connection import Connection


# eq=False: one Origin per scheme and netloc (LeanClient keeps them), so it is pooled by
# identity, without hashing its fields on each request.
@dataclass(frozen=True, slots=True, eq=False)
class Origin:
    """Where a request goes: scheme, host, port and the Host header that names them, and the
    egress proxy it goes through (connections are pooled by all of it)."""

    scheme: str
    host: str
    port: int
    host_header: str
    via: EgressProxy | None = None
    # What goes before the path of an absolute-form request target, which an egress proxy
    # needs for an http:// URL; None for the origin form (direct, or in a CONNECT tunnel).
    absolute: str | None = None
    proxy_authorization: str | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        """host:port, as a CONNECT names it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, scheme: str, netloc: str, *, via: EgressProxy | None = None) -> Origin:
        host, port = netloc, 443 if scheme == "https" else 80
        if netloc.startswith("["):
            bracket = netloc.index("]")
            host = netloc[1:bracket]
            if netloc[bracket + 1 : bracket + 2] == ":":
                port = int(netloc[bracket + 2 :])
        elif ":" in netloc:
            host, _, port_text = netloc.rpartition(":")
            port = int(port_text)
        forward = via is not None and scheme == "http"
        return cls(
            scheme=scheme,
            host=host,
            port=port,
            host_header=netloc,
            via=via,
            absolute=f"http://{netloc}" if forward else None,
            proxy_authorization=via.authorization if forward and via is not None else None,
        )


def split_url(url: str) -> tuple[str, str, str]:
    """'https://h:1/p?q' -> ('https', 'h:1', '/p?q'), keeping the target's bytes as they are."""
    scheme, _, rest = url.partition("://")
    cut, query = rest.find("/"), rest.find("?")
    if cut == -1 or -1 < query < cut:
        cut = query
    if cut == -1:
        return scheme, rest, "/"
    target = rest[cut:]
    return scheme, rest[:cut], target if target[0] == "/" else "/" + target


def request_head(
    method: str,
    target: str,
    host: str,
    headers: Sequence[tuple[str, str]],
    body: Body,
    *,
    proxy_authorization: str | None = None,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    if proxy_authorization is not None:
        lines.append(f"Proxy-Authorization: {proxy_authorization}")
    has_length = False
    for name, value in headers:
        if len(name) == 14 and name.lower() == "content-length":
            has_length = True
        lines.append(f"{name}: {value}")
    if body is not None and not isinstance(body, bytes):  # a stream (no ABC check: see lean)
        if not has_length:
            lines.append("Transfer-Encoding: chunked")
    elif body and not has_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


async def write_stream(conn: Connection, body: AsyncIterable[bytes], head: bytes) -> None:
    chunked = b"Transfer-Encoding: chunked\r\n" in head
    async for chunk in body:
        if not chunk:
            continue
        if chunked:
            await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            await conn.write(chunk)
    if chunked:
        await conn.write(b"0\r\n\r\n")
