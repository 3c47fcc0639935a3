"""LeanClient, the default upstream transport: a keep-alive HTTP/1.1 client on httptools, its
pool of connections per origin and the exchanges over them."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.egress import Egress
from proxy.egress import refused
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.transport.base import Attempt, Body
from proxy.transport.connection import ERRORS, Connection
from proxy.transport.slots import ConnectionSlots
from proxy.transport.tunnel import open_through
from proxy.transport.wire import Origin, request_head, split_url, write_stream

_IDLE_TIMEOUT = 15.0
_MAX_IDLE_PER_ORIGIN = 64
# RFC 9110 9.2.2: the methods a client may send again on its own.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class LeanResponse:
    """Status, headers and body stream of one upstream answer; close() releases it."""

    __slots__ = (
        "_client",
        "_conn",
        "_headers",
        "_released",
        "_writer",
        "header_items",
        "reason",
        "status",
    )

    def __init__(
        self,
        client: LeanClient,
        conn: Connection,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self._client = client
        self._conn = conn
        self._writer = writer
        self._released = False
        self._headers: CIMultiDictProxy[str] | None = None
        self.status = conn.status
        self.reason: str | None = conn.reason or None
        self.header_items: list[tuple[str, str]] = conn.header_items

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:  # built on demand: the forwarder reads header_items
            self._headers = CIMultiDictProxy(CIMultiDict(self.header_items))
        return self._headers

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._conn.body.read()
            if chunk is None:
                break
            yield chunk
        self.close()

    def received_body(self) -> bytes | None:
        return self._conn.body.take_all()

    def close(self) -> None:
        """Return the connection to the pool when its exchange ended cleanly, else close it."""
        if self._released:
            return
        self._released = True
        writer = self._writer
        uploaded = True  # the whole request body went out
        if writer is not None:
            if not writer.done():
                writer.cancel()
                uploaded = False
            elif writer.cancelled() or writer.exception() is not None:
                # An upload cut short after an early answer: upstream still waits for the
                # rest of the body, and would read the next request as part of it.
                uploaded = False
        clean = self._conn.body.done and self._conn.reusable and uploaded
        self._client.release(self._conn, reuse=clean and not self._conn.closed)

    async def __aenter__(self) -> LeanResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


# Written by hand because no maintained library offers a small asyncio HTTP/1.1 client with raw
# request targets, and aiohttp's ClientSession costs several times more per request than the
# server side (see ARCHITECTURE.md). It does only what a proxy needs: a per-origin pool, bodies
# streamed both ways (Content-Length or chunked), HEAD, 1xx and 204/304, TLS with verification,
# connect and read timeouts, and never reusing a connection whose response was not read to its
# end; httptools (llhttp, the parser uvicorn uses) does the protocol parsing.
class LeanClient:
    """A pool of keep-alive connections per origin, and the exchanges over them."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        slots: ConnectionSlots,
        ssl_context: ssl.SSLContext | None = None,
        egress: Egress | None = None,
    ) -> None:
        """`slots` bounds the connections in use; `ssl_context` verifies https upstreams
        (None: the system's CAs), through a tunnel too; `egress` says which upstreams are
        reached through an egress proxy (None: all directly)."""
        self._egress = None if egress is None or egress.direct else egress
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._slots = slots
        # The system's CAs are loaded when first needed: an http:// upstream never needs them,
        # and loading them costs 25 ms and most of a MiB at start-up.
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[Connection]] = {}
        self._busy: set[Connection] = set()
        self._origins: dict[tuple[str, str], Origin] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="upstream-read-timeouts")

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        for conn in self._busy:
            conn.close()
        self._busy.clear()
        self._slots.close()

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: Body,
    ) -> LeanResponse:
        scheme, netloc, target = split_url(url)
        origin = self._origins.get((scheme, netloc))
        if origin is None:
            origin = self._origins[(scheme, netloc)] = self._origin(scheme, netloc)
        if origin.absolute is None:
            head = request_head(method, target, origin.host_header, headers, body)
        else:
            head = request_head(
                method,
                origin.absolute + target,
                origin.host_header,
                headers,
                body,
                proxy_authorization=origin.proxy_authorization,
            )
        if self._slots.try_take():
            conn = self._pooled(origin)  # the usual case, without a coroutine of its own
            reused = conn is not None
            if conn is None:
                conn = await self._open(origin)
        else:
            conn, reused = await self._acquire(origin)
        try:
            return await self._exchange(conn, method, head, body)
        except UpstreamTimeout:
            raise
        except UpstreamError:
            # A pooled connection may have been closed by upstream just as it was reused: an
            # idempotent request that got no byte back is tried once more on a fresh one.
            retry = reused and not conn.got_bytes and method in _IDEMPOTENT
            if not retry or isinstance(body, AsyncIterable):
                raise
        conn, _ = await self._acquire(origin, fresh=True)
        return await self._exchange(conn, method, head, body)

    def _origin(self, scheme: str, netloc: str) -> Origin:
        """Where requests to `netloc` go, the egress proxy in between decided once."""
        via = None if self._egress is None else self._egress.proxy_for(scheme, netloc)
        return Origin.parse(scheme, netloc, via=via)

    async def _exchange(
        self, conn: Connection, method: str, head: bytes, body: Body
    ) -> LeanResponse:
        writer: asyncio.Task[None] | None = None
        try:
            conn.start_exchange(head_request=method == "HEAD")
            # Not isinstance(body, AsyncIterable): an ABC's check costs more on every request.
            if body is not None and not isinstance(body, bytes):
                await conn.write(head)
                writer = asyncio.create_task(write_stream(conn, body, head))
                # While the upload makes progress nothing is owed back: read_timeout starts
                # after it.
                await asyncio.wait(
                    (conn.headers_ready, writer), return_when=asyncio.FIRST_COMPLETED
                )
                if writer.done() and not conn.headers_ready.done():
                    failure = writer.exception()
                    if failure is not None:
                        raise failure
            elif conn.send(head + body if body else head):
                await conn.drain()
            conn.last_io = time.monotonic()
            conn.expecting = True
            await conn.headers_ready
            if conn.status == 407 and conn.origin.absolute is not None:
                self._refused(conn)
        except BaseException:
            if writer is not None:
                writer.cancel()
            self.release(conn, reuse=False)
            raise
        return LeanResponse(self, conn, writer)

    def _refused(self, conn: Connection) -> None:
        """An http:// request the egress proxy answered with 407 itself: never upstream's."""
        via = conn.origin.via
        if via is not None:
            raise refused(via, conn.origin.target, conn.status, conn.reason, tunnel=False)

    async def _sweep(self) -> None:
        """One timer for every exchange, rather than one per request: an exchange whose
        upstream sent nothing for read_timeout fails with UpstreamTimeout."""
        interval = min(1.0, self._read_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self._busy):
                stalled = now - conn.last_io > self._read_timeout
                if conn.expecting and stalled and not conn.body.paused:
                    conn.time_out(self._read_timeout)

    async def _acquire(self, origin: Origin, *, fresh: bool = False) -> tuple[Connection, bool]:
        """A connection slot, then an idle pooled connection (reused: True) or a new one."""
        await self._slots.take()
        conn = None if fresh else self._pooled(origin)
        if conn is not None:
            return conn, True
        return await self._open(origin), False

    def _pooled(self, origin: Origin) -> Connection | None:
        """An idle connection to `origin` that is still fresh, now busy (on a slot the
        caller took); None when there is none."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < _IDLE_TIMEOUT:
                self._busy.add(conn)
                return conn
            conn.close()
        return None

    async def _open(self, origin: Origin) -> Connection:
        """A new connection, now busy, on a slot the caller took (given back if it fails)."""
        loop = asyncio.get_running_loop()
        attempt = Attempt(
            origin.host, origin.port, self._connect_timeout, self._read_timeout, via=origin.via
        )
        context = self._tls() if origin.scheme == "https" else None
        try:
            if origin.via is not None:
                conn = await open_through(origin, origin.via, attempt, ssl_context=self._tls())
            else:
                async with asyncio.timeout(self._connect_timeout):
                    _, conn = await loop.create_connection(
                        lambda: Connection(origin, attempt),
                        origin.host,
                        origin.port,
                        ssl=context,
                        server_hostname=origin.host if context is not None else None,
                    )
        except BaseException as exc:
            self._slots.give()
            if isinstance(exc, ERRORS.types):
                raise ERRORS.translate(exc, attempt) from exc
            raise
        conn.idle_since = time.monotonic()
        self._busy.add(conn)
        return conn

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def release(self, conn: Connection, *, reuse: bool) -> None:
        if conn not in self._busy:
            return
        self._busy.discard(conn)
        conn.expecting = False
        self._slots.give()
        if reuse and not conn.closed:
            idle = self._idle.get(conn.origin)
            if idle is None:
                idle = self._idle[conn.origin] = []
            if len(idle) < _MAX_IDLE_PER_ORIGIN:
                conn.idle_since = time.monotonic()
                idle.append(conn)
                return
        conn.close()
