"""One upstream exchange: header hygiene, the token attached, bodies streamed both ways, and a
single replay with a fresh token when upstream answers 401."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

from aiohttp import web

from proxy.config import Route
from proxy.errors import PayloadTooLarge, UpstreamBusy, UpstreamError
from proxy.log import get_logger
from proxy.metrics import Metrics
from proxy.ratelimit import RateLimits
from proxy.tokens import Token, TokenSource
from proxy.upstream import CHUNK_SIZE, Body, Transport, UpstreamResponse

log = get_logger("proxy.forward")

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
REPLAYABLE_BODY_LIMIT = 1024 * 1024
# Answers that never carry a body (RFC 9110 6.4.1): always relayed on the streaming path.
_NO_BODY_STATUS = frozenset({204, 304})

Headers = list[tuple[str, str]]
# Connection options that name no header.
_CONNECTION_OPTIONS = frozenset({"", "close"})


@dataclass(slots=True)
class Exchange:
    """What the access log reports of one forwarded request."""

    route: str = "none"
    upstream_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    replayed: bool = False
    outcome: str = "complete"
    token_age: float | None = None
    client: str = "-"
    body_too_large: bool = False
    upstream_url: str | None = None  # where the route sends it, query and all


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


class Forwarder:
    """Forwards requests for every route through one transport."""

    def __init__(
        self,
        *,
        transport: Transport,
        metrics: Metrics,
        limits: RateLimits,
        routes: Sequence[Route],
        max_body_size: int | None,
        slot_wait: float,
    ) -> None:
        self._transport = transport
        self._metrics = metrics
        self._limits = limits
        self._max_body_size = max_body_size
        self._slot_wait = slot_wait
        # Certificate verification is always on; a route may name its own CA bundle.
        self._ssl = {
            route.prefix: ssl.create_default_context(cafile=str(route.ca_bundle))
            for route in routes
            if route.ca_bundle is not None
        }
        self._slots = {
            route.prefix: asyncio.Semaphore(route.max_connections)
            for route in routes
            if route.max_connections is not None
        }

    async def forward(
        self,
        request: web.Request,
        *,
        route: Route,
        url: str,
        tokens: TokenSource,
        request_id: str,
        exchange: Exchange,
    ) -> web.StreamResponse:
        body: Body = None
        replayable = True
        if request.body_exists:
            body, replayable = await self._request_body(request, exchange)
        route_label = route.prefix
        slots = self._slots.get(route_label)
        if slots is not None:
            await self._hold_slot(route, slots)
        try:
            replay = True  # once, with a new token, when upstream answers 401
            path = ""
            while True:
                response, token = await self._send(
                    request,
                    url=url,
                    tokens=tokens,
                    request_id=request_id,
                    body=body,
                    route_label=route_label,
                    exchange=exchange,
                )
                if not replay:  # its answer shows whether a new token helps at that path
                    tokens.replayed(path, rejected=response.status == 401)
                    break
                if response.status != 401:
                    break
                replay = False
                path = url.partition("?")[0]
                if not tokens.invalidate(token, path=path, replayable=replayable) or not replayable:
                    break
                response.close()
                self._metrics.replays.labels(route_label).inc()
                exchange.replayed = True
                log.info("upstream answered 401; replaying once with a new token")
            return await self._respond(request, response, request_id, exchange)
        finally:
            if slots is not None:
                slots.release()

    async def _hold_slot(self, route: Route, slots: asyncio.Semaphore) -> None:
        """Take one of the route's upstream connections, held for the whole exchange."""
        try:
            async with asyncio.timeout(self._slot_wait):
                await slots.acquire()
        except TimeoutError:
            raise UpstreamBusy(
                f"all {route.max_connections} upstream connections of route {route.prefix!r} "
                f"stayed busy for {self._slot_wait:g} s; raise max_connections of that route "
                "if upstream can take more"
            ) from None

    async def _send(
        self,
        request: web.Request,
        *,
        url: str,
        tokens: TokenSource,
        request_id: str,
        body: Body,
        route_label: str,
        exchange: Exchange,
    ) -> tuple[UpstreamResponse, Token]:
        """One trip upstream: a rate-limit slot, the current token, then the request."""
        limits, client = self._limits, exchange.client
        settle = None
        if not limits.unlimited(credential=tokens.name, client=client):
            settle = await limits.acquire(credential=tokens.name, client=client)
        try:
            token = tokens.usable_token() or await tokens.token()
            headers = upstream_headers(
                request.headers.items(), token=token.value, request_id=request_id
            )
            exchange.token_age = tokens.age(token)
            started = time.perf_counter()
            try:
                response = await self._transport.send(
                    request.method, url, headers, body, ssl_context=self._ssl.get(route_label)
                )
            finally:
                # Only the trip upstream is timed: waiting for a token is not upstream's time.
                exchange.upstream_seconds = time.perf_counter() - started
                self._metrics.observe_upstream(route_label, exchange.upstream_seconds)
        except UpstreamError:
            if exchange.body_too_large:
                raise self._too_large() from None
            raise
        finally:
            if settle is not None:
                await settle()
        return response, token

    async def _request_body(self, request: web.Request, exchange: Exchange) -> tuple[Body, bool]:
        """The body of a request that has one: buffered bytes (replayable) or a stream (sent
        once)."""
        length = request.content_length
        limit = self._max_body_size
        if length is not None and limit is not None and length > limit:
            # Refused before a slot, a token or a byte upstream is spent on it.
            raise self._too_large()
        if length is not None and length <= REPLAYABLE_BODY_LIMIT:
            data = await request.content.readexactly(length) if length else b""
            exchange.bytes_in = len(data)
            return data, True
        return self._stream_body(request, exchange, limit), False

    async def _stream_body(
        self, request: web.Request, exchange: Exchange, limit: int | None
    ) -> AsyncIterator[bytes]:
        async for chunk in request.content.iter_chunked(CHUNK_SIZE):
            exchange.bytes_in += len(chunk)
            if limit is not None and exchange.bytes_in > limit:
                # The transport may hand this on as a failed upload: _send turns it back
                # into 413 by this flag.
                exchange.body_too_large = True
                raise self._too_large()
            yield chunk

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body exceeds {self._max_body_size} bytes; raise max_body_size "
            "(TOKEN_PROXY_MAX_BODY_SIZE) if it should pass"
        )

    async def _respond(
        self,
        request: web.Request,
        response: UpstreamResponse,
        request_id: str,
        exchange: Exchange,
    ) -> web.StreamResponse:
        with contextlib.closing(response):
            headers = downstream_headers(response.header_items, request_id=request_id)
            whole = None
            if request.method != "HEAD" and response.status not in _NO_BODY_STATUS:
                whole = response.complete_body()
            out: web.StreamResponse
            if whole is not None:
                # A small answer that came in whole leaves in one write, headers and body
                # together (a StreamResponse sends its headers on their own first).
                out = web.Response(
                    status=response.status, reason=response.reason, headers=headers, body=whole
                )
                exchange.bytes_out = len(whole)
            else:
                out = web.StreamResponse(
                    status=response.status, reason=response.reason, headers=headers
                )
            try:
                await out.prepare(request)
                if whole is None and request.method != "HEAD":
                    async for chunk in response.chunks():
                        exchange.bytes_out += len(chunk)
                        await out.write(chunk)
                await out.write_eof()
            except UpstreamError as exc:
                # Headers are sent: closing the connection is the only honest way to say the
                # body is incomplete; ending it normally would pass a truncated body as whole.
                exchange.outcome = "upstream_aborted"
                log.warning(
                    "upstream broke off the response; closing the client connection",
                    detail=exc.detail,
                )
                _close_client(request)
            except ConnectionError:
                exchange.outcome = "client_aborted"
                _close_client(request)
            return out


def _close_client(request: web.Request) -> None:
    """Close the client connection; aiohttp's own write_eof then fails quietly."""
    if request.transport is not None:
        request.transport.close()
