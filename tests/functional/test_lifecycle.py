"""The proxy process: graceful shutdown, a port already taken, and the body size limit."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import FakeUpstream, ProxyFactory, ProxyProcess, StartProcess, wait_for

# The shutdown_timeout of the cut-off tests, and how much longer the process may take to exit.
GRACE = 2.0
EXIT_SLACK = 1.5


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


def log_events(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """The JSON lines of a proxy process's log (its start-up and worker lines included)."""
    events = []
    for line in proxy.log_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


@pytest.mark.parametrize("workers", [1, 2])
async def test_shutdown_cuts_off_a_hung_request_at_shutdown_timeout(
    proxy_process: StartProcess, upstream: FakeUpstream, workers: int
) -> None:
    """A request held by an upstream that never answers does not hold the process beyond
    shutdown_timeout: it exits 0 within about a second of it (not twice it), alone or with
    workers, and the access line says the request was cut off by shutdown, not by its client."""
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({"late": True})

    upstream.handlers["/hang"] = hang
    proxy = await proxy_process(
        {
            "TOKEN_PROXY_SHUTDOWN_TIMEOUT": str(GRACE),
            "TOKEN_PROXY_WORKERS": str(workers),
            "PYTHONDEVMODE": "1",  # so that a task or connection left behind is reported
        }
    )
    if workers > 1:
        await wait_for(
            lambda: any(e["event"] == f"started {workers} workers" for e in log_events(proxy))
        )
    try:
        async with aiohttp.ClientSession() as session:
            pending = asyncio.create_task(session.get(proxy.url + "/hang"))
            await asyncio.wait_for(arrived.wait(), 10)
            proxy.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await wait_for(lambda: proxy.process.poll() is not None, timeout=GRACE + EXIT_SLACK)
            took = time.monotonic() - signalled
            with pytest.raises(aiohttp.ClientError):
                await asyncio.wait_for(pending, 10)
    finally:
        release.set()
    assert proxy.process.returncode == 0, proxy.log_text()
    assert took >= GRACE - 0.1, f"the request was cut off after {took:.2f} s, before the grace"
    events = log_events(proxy)
    (access,) = [e for e in events if e.get("logger") == "proxy.access"]
    assert access["outcome"] == "shutdown"
    assert access["status"] == 503
    assert any(e["event"].startswith("shutdown_timeout has passed") for e in events)
    assert [e for e in events if e["level"] in {"error", "critical"}] == []
    text = proxy.log_text()
    for marker in ("Traceback", "Task was destroyed", "Unclosed"):
        assert marker not in text, marker
    # A worker may report prometheus-client's multiprocess files, which that library never
    # closes, as the interpreter exits; nothing else may be left open.
    left_open = [
        line
        for line in text.splitlines()
        if "ResourceWarning" in line and "/token-proxy-metrics-" not in line
    ]
    assert left_open == []


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
