"""The upstream transports against upstreams that misbehave in ways the proxy must survive: for
the lean client, bytes beyond an answer, uploads cut short after an early answer, a full
connection pool, and a body taken whole after reading paused; for both, errors that keep their
cause, slots given back, and a body taken whole only once it has all arrived."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import aiohttp
import httptools
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.errors import UpstreamBusy, UpstreamError
from proxy.transport.aiohttp_client import AiohttpTransport
from proxy.transport.connection import HIGH_WATER, BodyBuffer, Connection
from proxy.transport.lean import LeanClient
from proxy.transport.slots import ConnectionSlots
from tests.conftest import free_port, wait_for

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_upstream(serve: Serve) -> AsyncIterator[tuple[str, list[int]]]:
    """A server answering each request head with serve(reader, writer, n); yields its URL and
    the number of connections accepted so far."""
    accepted = [0]

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        number = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                number += 1
                await serve(reader, writer, number)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/", accepted
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[LeanClient]:
    lean = LeanClient(
        connect_timeout=1.0, read_timeout=2.0, slots=ConnectionSlots.for_pool(4, wait=1.0)
    )
    await lean.start()
    yield lean
    await lean.close()


async def body_of(client: LeanClient, url: str) -> tuple[int, bytes]:
    response = await asyncio.wait_for(client.send("GET", url, [], None), 5)
    async with response:
        return response.status, b"".join([chunk async for chunk in response.chunks()])


@pytest.mark.parametrize(
    "stray",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n", id="half-a-head"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 46\r\n\r\n", id="a-whole-head"),
    ],
)
async def test_bytes_beyond_an_answer_never_reach_the_next_request(
    client: LeanClient, stray: bytes
) -> None:
    """Upstream sends more than its answer in the same packet: the answer is relayed, and
    the connection is not reused, so the next request gets its own answer, not a 502 or a
    hang."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi" + stray)
        else:
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nnew")

    async with raw_upstream(serve) as (url, accepted):
        assert await body_of(client, url) == (200, b"hi")
        assert await body_of(client, url) == (200, b"hi")  # a new connection: its first answer
        assert accepted[0] == 2


async def test_bytes_sent_to_an_idle_connection_retire_it(client: LeanClient) -> None:
    """An answer nobody asked for, arriving while the connection waits in the pool, is not
    taken for the next request's."""
    sent_unasked = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        if n == 1:
            await writer.drain()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
            sent_unasked.set()

    async with raw_upstream(serve) as (url, accepted):
        assert await body_of(client, url) == (200, b"first")
        await sent_unasked.wait()
        assert await body_of(client, url) == (200, b"first")
        assert accepted[0] == 2


async def test_an_upload_cut_short_after_an_early_answer_retires_the_connection(
    client: LeanClient,
) -> None:
    """Upstream answers before reading the whole body, then the upload breaks off: upstream
    still waits for the rest of the body, so that connection must not carry the next request
    (it would be read as body, or worse, as a smuggled request)."""
    cut = asyncio.Event()

    async def early(request: web.Request) -> web.Response:
        return web.Response(status=401, text="no")

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="next")

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 65536
        await cut.wait()
        raise ConnectionResetError("the client went away mid-upload")

    app = web.Application()
    app.router.add_post("/upload", early)
    app.router.add_get("/next", plain)
    async with TestServer(app, host="127.0.0.1") as server:
        headers = [("Content-Length", "2000000")]
        response = await client.send("POST", str(server.make_url("/upload")), headers, body())
        assert response.status == 401
        cut.set()
        writer = response._writer
        assert writer is not None
        await wait_for(writer.done)  # the upload has failed before the answer is released
        response.close()
        assert await body_of(client, str(server.make_url("/next"))) == (200, b"next")


async def test_refused_waits_leave_nothing_behind() -> None:
    """Requests that time out waiting for a connection of a full pool are forgotten at once,
    not kept until a connection frees up; the pool still serves afterwards."""
    release = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    slots = ConnectionSlots.for_pool(1, wait=0.05)
    lean = LeanClient(connect_timeout=0.05, read_timeout=5.0, slots=slots)
    await lean.start()
    try:
        async with raw_upstream(serve) as (url, _):
            held = asyncio.create_task(lean.send("GET", url, [], None))
            await wait_for(lambda: slots.free == 0)
            for _ in range(20):
                with pytest.raises(UpstreamBusy, match="raise max_connections"):
                    await lean.send("GET", url, [], None)
            assert slots.waiting == 0
            release.set()
            (await held).close()
            assert await body_of(lean, url) == (200, b"ok")
    finally:
        await lean.close()


async def test_closing_the_client_fails_waiting_requests_at_once() -> None:
    """At shutdown, requests waiting for a connection fail right away rather than after
    connect_timeout with advice about max_connections."""
    release = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await release.wait()

    slots = ConnectionSlots.for_pool(1, wait=30.0)
    lean = LeanClient(connect_timeout=30.0, read_timeout=30.0, slots=slots)
    await lean.start()
    async with raw_upstream(serve) as (url, _):
        held = asyncio.create_task(lean.send("GET", url, [], None))
        waiting = asyncio.create_task(lean.send("GET", url, [], None))
        await wait_for(lambda: bool(slots.waiting))
        await lean.close()
        with pytest.raises(UpstreamError, match="closing"):
            await asyncio.wait_for(waiting, 2)
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(held, 2)
        release.set()


def test_a_body_taken_whole_resumes_reading() -> None:
    """A body that filled the buffer (reading paused) and is then taken whole lets the
    connection read again, so that a pooled connection is never left deaf."""

    class Reading:
        paused = 0
        resumed = 0

        def pause_reading(self) -> None:
            self.paused += 1

        def resume_reading(self) -> None:
            self.resumed += 1

    connection = Reading()
    buffer = BodyBuffer(cast(Connection, connection))
    buffer.feed(b"x" * (HIGH_WATER + 1))
    buffer.finish()
    assert connection.paused == 1
    assert buffer.take_all() == b"x" * (HIGH_WATER + 1)
    assert connection.resumed == 1


@pytest.mark.parametrize("kind", ["lean", "aiohttp"])
async def test_errors_at_the_boundary_keep_their_cause(kind: str) -> None:
    """A library's exception becomes ours through that library's table, with the original kept
    as its cause: a refused connection, and an answer that is not HTTP. Neither keeps its
    connection slot."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"SPDY/9 banana\r\n\r\n")

    library_error = httptools.HttpParserError if kind == "lean" else aiohttp.ClientError
    transport_class = LeanClient if kind == "lean" else AiohttpTransport
    slots = ConnectionSlots.for_pool(2, wait=1.0)
    transport = transport_class(connect_timeout=1.0, read_timeout=2.0, slots=slots)
    await transport.start()
    try:
        with pytest.raises(UpstreamError, match=r"cannot connect to 127\.0\.0\.1:") as refused:
            await transport.send("GET", f"http://127.0.0.1:{free_port()}/", [], None)
        assert isinstance(refused.value.__cause__, OSError)
        async with raw_upstream(serve) as (url, _):
            with pytest.raises(UpstreamError) as malformed:
                await transport.send("GET", url, [], None)
        assert isinstance(malformed.value.__cause__, library_error)
        assert slots.free == 2
    finally:
        await transport.close()


@pytest.mark.parametrize("kind", ["lean", "aiohttp"])
async def test_a_body_is_taken_whole_only_once_it_has_all_arrived(kind: str) -> None:
    """received_body(): both transports hand over a body that came in with its headers at
    once, and one still coming as None, without waiting, to be read with chunks()."""
    rest = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwhole")
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        await writer.drain()
        await rest.wait()
        writer.write(b"-rest")

    transport_class = LeanClient if kind == "lean" else AiohttpTransport
    slots = ConnectionSlots.for_pool(2, wait=1.0)
    transport = transport_class(connect_timeout=1.0, read_timeout=2.0, slots=slots)
    await transport.start()
    try:
        async with raw_upstream(serve) as (url, _):
            whole = await transport.send("GET", url, [], None)
            assert whole.received_body() == b"whole"
            whole.close()
            coming = await transport.send("GET", url, [], None)
            assert coming.received_body() is None
            rest.set()
            assert b"".join([chunk async for chunk in coming.chunks()]) == b"first-rest"
            coming.close()
            assert slots.free == 2
    finally:
        await transport.close()
