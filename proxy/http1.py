"""A lean keep-alive HTTP/1.1 client on httptools (llhttp), the upstream transport of the hot
path. aiohttp's ClientSession costs several times more per request than the server side (see
ARCHITECTURE.md); this client does only what a proxy needs: a per-origin pool, bodies streamed
both ways (Content-Length or chunked), HEAD, 1xx and 204/304, TLS with verification, connect and
read timeouts, and never reusing a connection whose response was not read to its end.

Written by hand because no maintained library offers a small asyncio HTTP/1.1 client with raw
request targets; httptools, the parser uvicorn uses, does the protocol parsing."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import UpstreamError, UpstreamTimeout

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_IDLE_TIMEOUT = 15.0
_MAX_IDLE_PER_ORIGIN = 64
# RFC 9110 9.2.2: the methods a client may send again on its own.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# The headers that say where a response body ends; anything else ends with the connection.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_FRAMING_LENGTHS = frozenset(len(name) for name in _FRAMING)

Body = bytes | AsyncIterable[bytes] | None


class _StrayMessage(Exception):
    """Upstream began a message nobody asked for (after the answer, or while idle)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request goes: scheme, host, port and the Host header that names them."""

    scheme: str
    host: str
    port: int
    host_header: str

    @classmethod
    def parse(cls, scheme: str, netloc: str) -> Origin:
        host, port = netloc, 443 if scheme == "https" else 80
        if netloc.startswith("["):
            bracket = netloc.index("]")
            host = netloc[1:bracket]
            if netloc[bracket + 1 : bracket + 2] == ":":
                port = int(netloc[bracket + 2 :])
        elif ":" in netloc:
            host, _, port_text = netloc.rpartition(":")
            port = int(port_text)
        return cls(scheme=scheme, host=host, port=port, host_header=netloc)


def split_url(url: str) -> tuple[str, str, str]:
    """'https://h:1/p?q' -> ('https', 'h:1', '/p?q'), keeping the target's bytes as they are."""
    scheme, _, rest = url.partition("://")
    cut = len(rest)
    for mark in ("/", "?"):
        at = rest.find(mark)
        if at != -1:
            cut = min(cut, at)
    netloc, target = rest[:cut], rest[cut:]
    if not target.startswith("/"):
        target = "/" + target
    return scheme, netloc, target


class _BodyBuffer:
    """Response body chunks between the socket and the consumer, with flow control."""

    __slots__ = ("_chunks", "_conn", "_done", "_error", "_paused", "_size", "_waiter")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > _HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self._done:
            self._error = error
        self._wake()

    @property
    def done(self) -> bool:
        return self._done

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def paused(self) -> bool:
        return self._paused

    def take_all(self) -> bytes | None:
        """Every chunk at once when the body is complete and fine, else None (nothing taken)."""
        if not self._done or self._error is not None:
            return None
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self._paused:  # the body filled the buffer before it was taken: read on again
            self._paused = False
            self._conn.resume_reading()
        return data

    async def read(self) -> bytes | None:
        """The next chunk, or None once the body is complete (read_timeout: LeanClient._sweep)."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._paused and self._size < _LOW_WATER:
            self._paused = False
            self._conn.resume_reading()
        return chunk


class _Connection(asyncio.Protocol):
    """One upstream connection; it serves one exchange at a time."""

    def __init__(self, pool_key: tuple[Origin, int]) -> None:
        self.pool_key = pool_key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # One parser for the connection's life: llhttp starts on the next message by itself
        # once one is complete (a connection is reused only then).
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self.start_exchange(head_request=False)

    def start_exchange(self, *, head_request: bool) -> None:
        self._answered = False  # the final answer of this exchange is complete
        self._head_request = head_request
        self._reason = b""
        self._raw_headers: list[tuple[str, str]] = []
        self.header_items: list[tuple[str, str]] = []  # the final answer's, once it has them all
        self._interim = False
        self._delimited = False
        self.headers_ready: asyncio.Future[None] = self._loop.create_future()
        self.body = _BodyBuffer(self)
        self.status = 0
        self.reusable = False
        self.got_bytes = False
        # Whether upstream owes bytes now, and when it last sent some: for the read timeout.
        self.expecting = False
        self.last_io = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_connection gives a read-write transport (uvloop's are not asyncio subclasses).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_io = time.monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _StrayMessage):
                raise
            # Bytes beyond the answer would be read as the next exchange's: never reuse this.
            self.reusable = False
            self.close()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("upstream switched protocols, which the proxy cannot relay"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"upstream sent a malformed response ({exc})"))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.headers_ready.done():
            self.headers_ready.set_exception(
                UpstreamError("upstream closed the connection before answering")
            )
            self.headers_ready.exception()  # retrieved here, or by the waiting exchange
        elif not self.body.done:
            if self._delimited:
                self.body.fail(UpstreamError("upstream closed the connection mid-body"))
            else:
                self.body.finish()  # a body delimited by the end of the connection
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamError("upstream closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._answered:
            raise _StrayMessage

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        text = name.decode("latin-1")
        if len(text) in _FRAMING_LENGTHS and text.lower() in _FRAMING:
            self._delimited = True
        self._raw_headers.append((text, value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._interim = True
            self._raw_headers = []
            self._reason = b""
            self._delimited = False
            return
        self.status = status
        self.header_items = self._raw_headers
        self._raw_headers = []  # trailers, if any, go here and are dropped
        if not self.headers_ready.done():
            self.headers_ready.set_result(None)
        if self._head_request:
            # llhttp cannot be told that a HEAD answer has no body: end it here, and do not
            # reuse the connection, whose parser still expects one.
            self.body.finish()

    def on_body(self, body: bytes) -> None:
        if not self._head_request:
            self.body.feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._answered = True
        self.expecting = False
        self.reusable = self._parser.should_keep_alive() and not self._head_request
        self.body.finish()

    # for the exchange
    @property
    def reason(self) -> str:
        return self._reason.decode("latin-1")

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.last_io = time.monotonic()  # the wait was ours (a slow client), not upstream's
            self.transport.resume_reading()

    def time_out(self, read_timeout: float) -> None:
        what = "no byte of the body" if self.headers_ready.done() else "no response"
        self._fail(
            UpstreamTimeout(f"upstream sent {what} within read_timeout ({read_timeout:g} s)")
        )

    def send(self, data: bytes) -> bool:
        """Write `data`; True when the transport's buffer is full and drain() must be awaited
        before more is written."""
        if self.transport is None or self.closed:
            raise UpstreamError("upstream closed the connection while the request was sent")
        self.transport.write(data)
        return self._write_paused

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    async def write(self, data: bytes) -> None:
        if self.send(data):
            await self.drain()

    def _fail(self, error: UpstreamError) -> None:
        self.expecting = False
        if not self.headers_ready.done():
            self.headers_ready.set_exception(error)
        self.body.fail(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


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
        conn: _Connection,
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

    def complete_body(self) -> bytes | None:
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


class LeanClient:
    """A pool of keep-alive connections per origin, and the exchanges over them."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, max_connections: int):
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        # Connection slots: a count, and the exchanges waiting for one in arrival order.
        self._free_slots = max_connections
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle: dict[tuple[Origin, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._origins: dict[tuple[str, str], Origin] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._default_ssl = ssl.create_default_context()

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
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamError("the upstream client is closing"))

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: Body,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> LeanResponse:
        scheme, netloc, target = split_url(url)
        origin = self._origins.get((scheme, netloc))
        if origin is None:
            origin = self._origins[(scheme, netloc)] = Origin.parse(scheme, netloc)
        context = (ssl_context or self._default_ssl) if scheme == "https" else None
        head = _request_head(method, target, origin.host_header, headers, body)
        key = (origin, id(context))
        conn = self._pooled(key) if self._free_slots > 0 else None
        if conn is not None:  # the usual case, without a coroutine of its own
            self._free_slots -= 1
            reused = True
        else:
            conn, reused = await self._acquire(origin, context, key)
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
        conn, _ = await self._acquire(origin, context, key, fresh=True)
        return await self._exchange(conn, method, head, body)

    async def _exchange(
        self, conn: _Connection, method: str, head: bytes, body: Body
    ) -> LeanResponse:
        writer: asyncio.Task[None] | None = None
        try:
            conn.start_exchange(head_request=method == "HEAD")
            if isinstance(body, AsyncIterable):
                await conn.write(head)
                writer = asyncio.create_task(_write_stream(conn, body, head))
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
        except BaseException:
            if writer is not None:
                writer.cancel()
            self.release(conn, reuse=False)
            raise
        return LeanResponse(self, conn, writer)

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

    async def _acquire(
        self,
        origin: Origin,
        context: ssl.SSLContext | None,
        key: tuple[Origin, int],
        *,
        fresh: bool = False,
    ) -> tuple[_Connection, bool]:
        """A connection slot, then an idle pooled connection (reused: True) or a new one."""
        if self._free_slots > 0:
            self._free_slots -= 1
        else:
            await self._wait_for_slot()
        conn = None if fresh else self._pooled(key)
        if conn is not None:
            return conn, True
        try:
            conn = await self._connect(origin, context, key)
        except BaseException:
            self._give_slot()
            raise
        self._busy.add(conn)
        return conn, False

    def _pooled(self, key: tuple[Origin, int]) -> _Connection | None:
        """An idle connection to `key` that is still fresh, now busy (its slot is the
        caller's to take); None when there is none."""
        idle = self._idle.get(key)
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

    async def _wait_for_slot(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await waiter
        except BaseException as exc:
            if not waiter.done() or waiter.cancelled():
                with contextlib.suppress(ValueError):  # never left behind in the queue
                    self._slot_waiters.remove(waiter)
            elif waiter.exception() is None:
                self._give_slot()  # handed over just as the wait ended: pass it on
            if isinstance(exc, TimeoutError):
                raise UpstreamError(
                    f"all upstream connections stayed busy for connect_timeout "
                    f"({self._connect_timeout:g} s); raise max_connections"
                ) from None
            raise

    def _give_slot(self) -> None:
        """A slot is free again: to the longest waiting exchange, else back to the count."""
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free_slots += 1

    async def _connect(
        self, origin: Origin, context: ssl.SSLContext | None, key: tuple[Origin, int]
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        where = f"{origin.host}:{origin.port}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(key),
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context is not None else None,
                )
        except TimeoutError:
            raise UpstreamError(
                f"could not resolve or connect to {where} within connect_timeout "
                f"({self._connect_timeout:g} s)"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamError(
                f"TLS certificate of {origin.host} could not be verified ({exc.verify_message})"
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamError(f"TLS handshake with {where} failed ({exc.reason})") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {where} ({exc.strerror or exc})") from None
        conn.idle_since = time.monotonic()
        return conn

    def release(self, conn: _Connection, *, reuse: bool) -> None:
        if conn not in self._busy:
            return
        self._busy.discard(conn)
        conn.expecting = False
        self._give_slot()
        idle = self._idle.setdefault(conn.pool_key, [])
        if reuse and not conn.closed and len(idle) < _MAX_IDLE_PER_ORIGIN:
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()


def _request_head(
    method: str, target: str, host: str, headers: Sequence[tuple[str, str]], body: Body
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    has_length = False
    for name, value in headers:
        if len(name) == 14 and name.lower() == "content-length":
            has_length = True
        lines.append(f"{name}: {value}")
    if isinstance(body, AsyncIterable):
        if not has_length:
            lines.append("Transfer-Encoding: chunked")
    elif body and not has_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


async def _write_stream(conn: _Connection, body: AsyncIterable[bytes], head: bytes) -> None:
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
