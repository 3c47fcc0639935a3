"""One upstream connection of the lean client: an asyncio protocol fed to httptools (llhttp),
and the response body buffered between the socket and the consumer with flow control."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import cast

import httptools

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.transport.base import Attempt, ErrorTable
from proxy.transport.wire import Origin

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# The headers that say where a response body ends; anything else ends with the connection.
_FRAMING = frozenset({"content-length", "transfer-encoding"})

# httptools', the socket's and ssl's exceptions and ours; the first match wins, so subclasses
# come before their bases (TimeoutError and SSLError are OSErrors).
ERRORS = ErrorTable(
    (
        httptools.HttpParserUpgrade,
        lambda exc, at: UpstreamError("upstream switched protocols, which the proxy cannot relay"),
    ),
    (
        httptools.HttpParserError,
        lambda exc, at: UpstreamError(f"upstream sent a malformed response ({exc})"),
    ),
    (
        TimeoutError,
        lambda exc, at: UpstreamError(
            f"could not resolve or connect to {at.where} within connect_timeout "
            f"({at.connect_timeout:g} s)"
        ),
    ),
    (
        ssl.SSLCertVerificationError,
        lambda exc, at: UpstreamError(
            f"TLS certificate of {at.host} could not be verified ({exc.verify_message})"
        ),
    ),
    (
        ssl.SSLError,
        lambda exc, at: UpstreamError(f"TLS handshake with {at.where} failed ({exc.reason})"),
    ),
    (
        OSError,
        lambda exc, at: UpstreamError(f"cannot connect to {at.where} ({exc.strerror or exc})"),
    ),
)


class _StrayMessage(Exception):
    """Upstream began a message nobody asked for (after the answer, or while idle)."""


class BodyBuffer:
    """Response body chunks between the socket and the consumer, with flow control."""

    __slots__ = ("_chunks", "_conn", "_done", "_error", "_paused", "_size", "_waiter")

    def __init__(self, conn: Connection) -> None:
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
        if self._size > HIGH_WATER and not self._paused:
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
        if self._paused and self._size < LOW_WATER:
            self._paused = False
            self._conn.resume_reading()
        return chunk


class Connection(asyncio.Protocol):
    """One upstream connection; it serves one exchange at a time."""

    def __init__(self, origin: Origin, attempt: Attempt) -> None:
        self.origin = origin
        self.attempt = attempt  # what this connection's error messages say
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
        self.headers_ready: asyncio.Future[None] = self._loop.create_future()
        self.body = BodyBuffer(self)
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
        except (httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
            error = ERRORS.translate(exc, self.attempt)
            # As `raise ... from exc` would: the exchange raises this error later, not here.
            error.__cause__ = exc
            self._fail(error)

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
            if self._delimited():
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
        self._raw_headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._interim = True
            self._raw_headers = []
            self._reason = b""
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

    def _delimited(self) -> bool:
        """Whether the answer says where its body ends (else the end of the connection does):
        asked only when the connection is lost mid-body."""
        return any(name.lower() in _FRAMING for name, _ in self.header_items)

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
