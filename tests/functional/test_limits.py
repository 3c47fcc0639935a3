"""Limits on concurrent upstream connections: per route, and for the whole upstream pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.config import Settings
from tests.conftest import (
    TEST_CLIENT_ID,
    TEST_SECRET,
    FakeTokenServer,
    FakeUpstream,
    ProxyFactory,
    wait_for,
)


class Held:
    """An upstream handler that keeps each request until `release()` returns, counting how
    many are upstream at once (`active`) and the most there ever were (`peak`)."""

    def __init__(self, release: Callable[[], Awaitable[object]]) -> None:
        self._release = release
        self.active = 0
        self.peak = 0

    async def __call__(self, request: web.Request) -> web.Response:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.wait_for(self._release(), 10)
        finally:
            self.active -= 1
        return web.json_response({"ok": True})


def one_route(
    token_server: FakeTokenServer, upstream: FakeUpstream, route: dict[str, Any], **top: Any
) -> Settings:
    """Settings with credential c and one route "/" to `upstream` (plus `route`'s keys)."""
    return Settings.model_validate(
        {
            "credentials": {
                "c": {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "token_url": token_server.url,
                }
            },
            "routes": [{"prefix": "/", "upstream": upstream.url, "credential": "c", **route}],
            **top,
        }
    )


async def test_route_connection_limit(
    start_proxy: ProxyFactory, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """A route with max_connections = 2 never has more than 2 requests upstream at once; a
    request that waits longer than connect_timeout gets 503 problem+json with Retry-After."""
    release = asyncio.Event()
    held = Held(release.wait)
    upstream.handlers["/held"] = held
    settings = one_route(token_server, upstream, {"max_connections": 2}, connect_timeout=0.3)
    client = await start_proxy(settings)
    first = [asyncio.create_task(client.get("/held")) for _ in range(2)]
    await wait_for(lambda: held.active == 2)
    refused = await client.get("/held")
    assert refused.status == 503
    assert refused.content_type == "application/problem+json"
    assert refused.headers["Retry-After"] == "1"
    assert "max_connections" in (await refused.json())["detail"]
    release.set()
    for task in first:
        response = await task
        assert response.status == 200
        response.release()
    burst = await asyncio.gather(*(client.get("/held") for _ in range(6)))
    assert [response.status for response in burst] == [200] * 6
    assert held.peak == 2


async def test_upstream_connection_pool_limit(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    upstream_client: str,
) -> None:
    """max_connections bounds the whole upstream pool: extra requests wait for a connection
    and get the next one freed, one that waits longer than connect_timeout gets 502, and a
    client that gives up while waiting takes no connection with it."""
    releases: asyncio.Queue[None] = asyncio.Queue()
    held = Held(releases.get)
    upstream.handlers["/held"] = held
    settings = one_route(token_server, upstream, {}, max_connections=2, connect_timeout=0.5)
    client = await start_proxy(settings)
    tasks = [asyncio.create_task(client.get("/held")) for _ in range(2)]
    await wait_for(lambda: held.active == 2)
    # A client that gives up while its request waits for a connection.
    with contextlib.suppress(TimeoutError):
        await client.get("/held", timeout=aiohttp.ClientTimeout(total=0.1))
    refused = await client.get("/held")
    assert refused.status == 502
    assert refused.content_type == "application/problem+json"
    if upstream_client == "lean":
        assert "raise max_connections" in (await refused.json())["detail"]
    # One at a time: each freed connection goes to a waiting request, never to two, while
    # newcomers keep arriving.
    tasks += [asyncio.create_task(client.get("/held")) for _ in range(2)]
    for served in range(1, 5):
        releases.put_nowait(None)
        tasks.append(asyncio.create_task(client.get("/held")))
        await wait_for(lambda: held.active == 2 and releases.empty())
        assert sum(task.done() for task in tasks) == served
    for _ in range(4):
        releases.put_nowait(None)
    assert [(await task).status for task in tasks] == [200] * 8
    assert held.peak == 2
