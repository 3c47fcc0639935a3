"""The upstream transport on a pooled aiohttp ClientSession (`upstream_client = "aiohttp"`),
for what the lean client does not do."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.transport.base import CHUNK_SIZE, Attempt, Body, ErrorTable, UpstreamResponse

# Headers aiohttp would add on its own; a transparent proxy sends only what the client sent.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

# aiohttp's exceptions and ours; the first match wins, so subclasses come before their bases.
ERRORS = ErrorTable(
    (
        aiohttp.ConnectionTimeoutError,
        lambda exc, at: UpstreamError(
            f"could not resolve or connect to {at.where} within connect_timeout "
            f"({at.connect_timeout:g} s)"
        ),
    ),
    (
        TimeoutError,
        lambda exc, at: UpstreamTimeout(
            "upstream stopped sending the body within read_timeout"
            if at.reading_body
            else f"upstream sent no response within read_timeout ({at.read_timeout:g} s)"
        ),
    ),
    (
        aiohttp.ClientConnectorCertificateError,
        lambda exc, at: UpstreamError(
            f"TLS certificate of {at.host} could not be verified ({exc.certificate_error})"
        ),
    ),
    (
        aiohttp.ClientConnectorError,
        lambda exc, at: UpstreamError(f"cannot connect to {at.where} ({exc.strerror})"),
    ),
    (
        aiohttp.ClientError,
        lambda exc, at: UpstreamError(
            f"upstream broke off the response body ({type(exc).__name__})"
            if at.reading_body
            else f"upstream exchange failed ({type(exc).__name__})"
        ),
    ),
)


class AiohttpResponse:
    """Status, headers and a body stream of one upstream answer; close() releases it."""

    __slots__ = ("_response", "_timeouts", "header_items", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse, timeouts: tuple[float, float]) -> None:
        self._response = response
        self._timeouts = timeouts  # connect and read, for the messages of errors mid-body
        self.status: int = response.status
        self.reason: str | None = response.reason
        self.headers: CIMultiDictProxy[str] = response.headers
        self.header_items: Sequence[tuple[str, str]] = list(response.headers.items())

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_SIZE):
                yield chunk
        except ERRORS.types as exc:
            url = self._response.url
            attempt = Attempt(url.host, url.port, *self._timeouts, reading_body=True)
            raise ERRORS.translate(exc, attempt) from exc

    def complete_body(self) -> bytes | None:
        return None  # aiohttp's body stream is always streamed through

    def close(self) -> None:
        """Release the connection; one whose body was not read to the end is never reused."""
        self._response.close()


class AiohttpTransport:
    """Sends requests upstream through one pooled aiohttp ClientSession."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
    ) -> None:
        # `connect` bounds name resolution and the wait for a pooled connection too.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout,
            sock_connect=connect_timeout,
            sock_read=read_timeout,
        )
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._timeouts = (connect_timeout, read_timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_NO_AUTO_HEADERS,
            trust_env=False,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: Body,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> UpstreamResponse:
        session = self._session
        if session is None:
            raise RuntimeError("the upstream transport is not started")
        target = URL(url, encoded=True)
        try:
            response = await session.request(
                method,
                target,
                headers=headers,
                data=body,
                allow_redirects=False,
                ssl=ssl_context if ssl_context is not None else True,
            )
        except ERRORS.types as exc:
            attempt = Attempt(target.host, target.port, self._connect_timeout, self._read_timeout)
            raise ERRORS.translate(exc, attempt) from exc
        return AiohttpResponse(response, self._timeouts)
