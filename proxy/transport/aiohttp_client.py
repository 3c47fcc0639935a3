"""The upstream transport on a pooled aiohttp ClientSession (`upstream_client = "aiohttp"`),
for what the lean client does not do."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.transport.base import CHUNK_SIZE, Body, UpstreamResponse

# Headers aiohttp would add on its own; a transparent proxy sends only what the client sent.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class AiohttpResponse:
    """Status, headers and a body stream of one upstream answer; close() releases it."""

    __slots__ = ("_response", "header_items", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status: int = response.status
        self.reason: str | None = response.reason
        self.headers: CIMultiDictProxy[str] = response.headers
        self.header_items: Sequence[tuple[str, str]] = list(response.headers.items())

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_SIZE):
                yield chunk
        except TimeoutError:
            raise UpstreamTimeout("upstream stopped sending the body within read_timeout") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"upstream broke off the response body ({type(exc).__name__})"
            ) from None

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
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamError(
                f"could not resolve or connect to {target.host}:{target.port} within "
                f"connect_timeout ({self._connect_timeout:g} s)"
            ) from None
        except TimeoutError:
            raise UpstreamTimeout(
                f"upstream sent no response within read_timeout ({self._read_timeout:g} s)"
            ) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise UpstreamError(
                f"TLS certificate of {target.host} could not be verified ({exc.certificate_error})"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(
                f"cannot connect to {target.host}:{target.port} ({exc.strerror})"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream exchange failed ({type(exc).__name__})") from None
        return AiohttpResponse(response)
