"""The proxy process: graceful shutdown, a port already taken, and the body size limit."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import FakeUpstream, ProxyFactory, StartProcess


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_shutdown_finishes_in_flight_requests(
    proxy_process: StartProcess, upstream: FakeUpstream, sig: signal.Signals
) -> None:
    """SIGTERM or SIGINT lets a slow in-flight request finish, then the process exits 0."""
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.sleep(1.0)
        return web.json_response({"slow": True})

    upstream.handlers["/slow"] = slow
    proxy = await proxy_process()
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.get(proxy.url + "/slow"))
        await asyncio.wait_for(arrived.wait(), 10)
        proxy.process.send_signal(sig)
        response = await asyncio.wait_for(pending, 10)
        assert response.status == 200
        assert await response.json() == {"slow": True}
        response.release()
    code = await asyncio.to_thread(proxy.process.wait, 20)
    assert code == 0
    assert "Traceback" not in proxy.log_text()


async def test_port_in_use_exits_2(proxy_process: StartProcess) -> None:
    """A port that is already taken gives exit 2 and a message naming the setting to change."""
    proxy = await proxy_process()
    port = proxy.url.rsplit(":", 1)[1]
    second = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--port",
        port,
        env=proxy.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(second.communicate(), 20)
    assert second.returncode == 2
    assert b"TOKEN_PROXY_PORT" in stderr
    assert b"Traceback" not in stderr
    assert stdout == b""


async def test_body_over_limit_gets_413(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    """A body over max_body_size gets 413 problem+json, declared or streamed, and never arrives."""
    client = await start_proxy(max_body_size=1000)
    response = await client.post("/upload", data=b"x" * 2000)
    assert response.status == 413
    assert response.content_type == "application/problem+json"
    assert "max_body_size" in (await response.json())["detail"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 500

    response = await client.post("/upload", data=chunks())
    assert response.status == 413
    response = await client.post("/upload", data=b"z" * 1000)
    assert response.status == 200
    assert [request.body_length for request in upstream.requests] == [1000]
