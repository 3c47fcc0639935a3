"""The response cache (SPEC §10) through the whole proxy, against a loopback upstream that
counts what reaches it: hits, misses, RFC 9111's directives, validation, variants, credentials,
HEAD, the quota and the token it spares, bodies cut short, and the bound in bytes."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from proxy.app import runtime_of
from proxy.cache import ResponseCache
from proxy.config import Settings
from tests.conftest import (
    TEST_CLIENT_ID,
    TEST_SECRET,
    Client,
    FakeTokenServer,
    FakeUpstream,
    ProxyFactory,
    app_of,
)

TEAM_KEY_A = "team-key-alpha-5c1d9e7f3a2b4c6d"
TEAM_KEY_B = "team-key-bravo-8e2f4a6c0b1d3e5f"


class Clock:
    """The cache's clock, moved by the test: epoch seconds, starting now."""

    def __init__(self) -> None:
        self.now = float(int(__import__("time").time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Answers:
    """An upstream path whose answer a test sets (status, headers, body), counting requests;
    each body names the request that got it (`n`), so a stored one is known by it."""

    def __init__(self, upstream: FakeUpstream, path: str) -> None:
        self.path = path
        self.status = 200
        self.headers: dict[str, str] = {"Cache-Control": "max-age=60"}
        self.not_modified_if: Callable[[web.Request], bool] | None = None
        self.seen: list[web.Request] = []
        upstream.handlers[path] = self.handle

    @property
    def count(self) -> int:
        return len(self.seen)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request)
        if self.not_modified_if is not None and self.not_modified_if(request):
            return web.Response(status=304, headers=self.headers)
        body = json.dumps({"n": self.count, "target": request.raw_path})
        return web.Response(
            status=self.status, text=body, content_type="application/json", headers=self.headers
        )


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def cached_proxy(
    start_proxy: ProxyFactory, clock: Clock, settings: Settings | None = None, **overrides: Any
) -> Client:
    """A proxy with the cache on (unless told otherwise), whose cache runs on `clock`."""
    if settings is None:
        overrides.setdefault("cache", True)
    client = await start_proxy(settings, **overrides)
    cache = runtime_of(app_of(client)).cache
    if cache is not None:
        cache.clock = clock
    return client


def cache_of(client: Client) -> ResponseCache:
    cache = runtime_of(app_of(client)).cache
    assert cache is not None
    return cache


async def get(
    client: Client, path: str, headers: Mapping[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    # Encoded as written: yarl would otherwise turn %7E into ~.
    url = URL(str(client.make_url("/")).rstrip("/") + path, encoded=True)
    async with client.session.request(method, url, headers=headers) as response:
        body = await response.read()
        return response.status, dict(response.headers), body


def served(body: bytes) -> int:
    """Which upstream request produced this body."""
    number: int = json.loads(body)["n"]
    return number


def http_date(epoch: float) -> str:
    return formatdate(epoch, usegmt=True)


# --- hits and misses -----------------------------------------------------------------------------


async def test_a_fresh_answer_is_served_from_the_cache(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item")
    client = await cached_proxy(start_proxy, clock)
    status, headers, body = await get(client, "/item?id=1")
    assert (status, headers["X-Cache"], served(body)) == (200, "MISS", 1)
    clock.advance(7)
    status, headers, again = await get(client, "/item?id=1")
    assert (status, headers["X-Cache"], again) == (200, "HIT", body)
    assert headers["Age"] == "7"
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Request-ID"]
    assert answers.count == 1


async def test_the_cache_is_off_by_default(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    answers = Answers(upstream, "/item")
    client = await start_proxy()
    assert runtime_of(app_of(client)).cache is None
    for _ in range(2):
        _, headers, _ = await get(client, "/item")
        assert "X-Cache" not in headers
    assert answers.count == 2


async def test_a_miss_is_keyed_by_the_url_byte_for_byte(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: Clock
) -> None:
    answers = Answers(upstream, "/item")
    client = await cached_proxy(start_proxy, clock)
    targets = ["/item?a=1&b=2", "/item?b=2&a=1", "/item?a=%7E", "/item?a=~", "/item"]
    for target in targets:
        _, headers, _ = await get(client, target)
        assert headers["X-Cache"] == "MISS"
    assert answers.count == len(targets)
    for target in targets:
        _, headers, body = await get(client, target)
        assert headers["X-Cache"] == "HIT"
        assert json.loads(body)["target"] == target
    assert answers.count == len(targets)


async def test_a_route_overrides_the_global_cache_setting(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    clock: Clock,
) -> None:
    answers = Answers(upstream, "/item")
    settings = Settings.model_validate(
        {
            "port": 0,
            "cache": True,
            "credentials": {
                "c": {
                    "client_id": TEST_CLIENT_ID,
                    "client_secret": TEST_SECRET,
                    "token_url": token_server.url,
                }
            },
            "routes": [
                {"prefix": "/on/", "upstream": upstream.url, "credential": "c"},
                {"prefix": "/off/", "upstream": upstream.url, "credential": "c", "cache": False},
            ],
        }
    )
    client = await cached_proxy(start_proxy, clock, settings)
    for _ in range(2):
        _, off, _ = await get(client, "/off/item")
        assert "X-Cache" not in off
    assert answers.count == 2
    for _ in range(2):
        await get(client, "/on/item")
    assert answers.count == 3
