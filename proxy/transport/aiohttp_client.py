"""AiohttpTransport: the upstream transport on a pooled aiohttp ClientSession
(`upstream_client = "aiohttp"`), for what the lean client does not do."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.transport.base import CHUNK_SIZE, Attempt, Body, ErrorTable, UpstreamResponse
from proxy.transport.slots import ConnectionSlots

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

    __slots__ = (
        "_released",
        "_response",
        "_transport",
        "header_items",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, response: aiohttp.ClientResponse, transport: AiohttpTransport) -> None:
        self._response = response
        self._transport = transport
        self._released = False
        self.status: int = response.status
        self.reason: str | None = response.reason
        self.headers: CIMultiDictProxy[str] = response.headers
        self.header_items: Sequence[tuple[str, str]] = list(response.headers.items())

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_SIZE):
                yield chunk
        except ERRORS.types as exc:
            raise ERRORS.translate(exc, self._transport.attempt(self._response.url, True)) from exc

    def received_body(self) -> bytes | None:
        content = self._response.content
        if not content.is_eof() or content.exception() is not None:
            return None
        return content.read_nowait()

    def close(self) -> None:
        """Release the connection and its slot; a connection whose body was not read to the
        end is never reused."""
        if self._released:
            return
        self._released = True
        self._response.close()
        self._transport.slots.give()


class AiohttpTransport:
    """Sends requests upstream through one pooled aiohttp ClientSession."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        slots: ConnectionSlots,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`slots` bounds the connections in use; `ssl_context` verifies https upstreams
        (None: the system's CAs)."""
        # `connect` bounds name resolution and connecting; a connection of aiohttp's own pool
        # is never waited for, as `slots` is taken first.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout,
            sock_connect=connect_timeout,
            sock_read=read_timeout,
        )
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self.slots = slots
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.slots.limit, ssl=self._ssl, ttl_dns_cache=300)
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
        self.slots.close()

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: Body,
    ) -> UpstreamResponse:
        session = self._session
        if session is None:
            raise RuntimeError("the upstream transport is not started")
        target = URL(url, encoded=True)
        if not self.slots.try_take():
            await self.slots.take()
        try:
            response = await session.request(
                method, target, headers=headers, data=body, allow_redirects=False
            )
        except BaseException as exc:
            self.slots.give()
            if isinstance(exc, ERRORS.types):
                raise ERRORS.translate(exc, self.attempt(target, False)) from exc
            raise
        return AiohttpResponse(response, self)

    def attempt(self, url: URL, reading_body: bool) -> Attempt:
        """What the message of an error on the way to `url` says."""
        return Attempt(url.host, url.port, self._connect_timeout, self._read_timeout, reading_body)
