"""The lean client's connections through an egress proxy: to the proxy itself for http://
upstreams (whose requests go in absolute form), or a CONNECT tunnel for https:// ones, with TLS
to the real host inside it, so that the proxy never sees what goes through."""

from __future__ import annotations

import asyncio
import ssl

from proxy.config.egress import EgressProxy
from proxy.egress import named, refused, timed_out, unreachable
from proxy.errors import EgressProxyError
from proxy.transport.base import Attempt
from proxy.transport.connection import ERRORS, Connection
from proxy.transport.wire import Origin

# The most a proxy's answer to CONNECT may take before its blank line.
_MAX_ANSWER = 16 * 1024


class _TunnelAnswer(asyncio.Protocol):
    """Reads the egress proxy's answer to CONNECT: its status line and headers. TLS starts on
    the same socket once it is a 2xx."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end == -1:
            if len(self._buffer) > _MAX_ANSWER:
                self.answer.set_exception(ValueError("an answer head of more than 16 KiB"))
            return
        line = bytes(self._buffer[: self._buffer.find(b"\r\n")])
        version, _, rest = line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            self.answer.set_exception(ValueError(f"a status line of {line[:64]!r}"))
            return
        self.answer.set_result((int(code), reason.decode("latin-1")))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionError("it closed the connection"))


def connect_head(target: str, via: EgressProxy) -> bytes:
    """The CONNECT request for `target` (host:port); the only one that carries the proxy's
    credentials for an https:// upstream."""
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    authorization = via.authorization
    if authorization is not None:
        lines.append(f"Proxy-Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def open_through(
    origin: Origin, via: EgressProxy, attempt: Attempt, *, ssl_context: ssl.SSLContext
) -> Connection:
    """A connection to `origin` through `via` within connect_timeout: to the proxy for
    http://, a tunnel with TLS to the real host (its name verified) for https://. Failures of
    the proxy raise EgressProxyError naming it; those of the real host (its certificate, its
    TLS) are told as for a direct connection."""
    loop = asyncio.get_running_loop()
    target = origin.target
    stage = "connect"

    async def tunnel() -> Connection:
        nonlocal stage
        raw, opener = await loop.create_connection(_TunnelAnswer, via.host, via.port)
        try:
            stage = "tunnel"
            raw.write(connect_head(target, via))
            status, reason = await opener.answer
            if not 200 <= status < 300:
                raise refused(via, target, status, reason, tunnel=True)
            stage = "tls"
            conn = Connection(origin, attempt)
            tls = await loop.start_tls(raw, conn, ssl_context, server_hostname=origin.host)
        except BaseException:
            raw.close()
            raise
        if tls is None:  # only for a transport that is closing
            raise ConnectionError("the tunnel closed")
        conn.connection_made(tls)
        return conn

    try:
        async with asyncio.timeout(attempt.connect_timeout):
            if origin.scheme == "https":
                return await tunnel()
            _, conn = await loop.create_connection(
                lambda: Connection(origin, attempt), via.host, via.port
            )
            return conn
    except EgressProxyError:
        raise
    except TimeoutError as exc:
        if stage == "tls":
            raise ERRORS.translate(exc, attempt) from exc
        seconds = attempt.connect_timeout
        raise timed_out(via, target, seconds, tunnel=stage == "tunnel") from exc
    except (OSError, ValueError) as exc:
        if stage == "connect" and isinstance(exc, OSError):
            raise unreachable(via, target, exc) from exc
        if stage == "tls" and isinstance(exc, OSError):
            raise ERRORS.translate(exc, attempt) from exc
        raise EgressProxyError(
            f"{named(via)} did not answer the CONNECT to {target} ({exc})"
        ) from exc
