"""The response cache shared through a real redis-server: entries sealed and named by keyed
hashes, bounded by TTL and by variants, two replicas answering from one another's entries, and
a replica that goes on alone from its own memory while Redis is gone."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.app import ProxyApp
from proxy.cache import policy
from proxy.cache.shared import pack, unpack
from proxy.config import Settings
from proxy.store.base import CredentialIdentity
from proxy.store.fallback import FallbackStore
from proxy.store.redis import RedisStore
from proxy.store.redis_responses import MAX_VARIANTS
from proxy.store.redis_url import parse_redis_url
from tests.conftest import (
    LEAKS,
    TEST_CLIENT_ID,
    TEST_SECRET,
    Client,
    FakeTokenServer,
    FakeUpstream,
    ProxyTestServer,
    app_of,
)
from tests.store.conftest import RedisServer, redis_store, wait_until

IDENTITY = CredentialIdentity.of(token_url="https://oauth.example.test/token", client_id="c1")
SECRET = "Cache-Client-Secret-3e9d"
URL = b"GET https://api.example.test/data/wow/item/19019?namespace=static-us"
BODY = b'{"name": "Thunderfury, Blessed Blade of the Windseeker"}'


async def raw_contents(url: str) -> dict[str, dict[bytes, bytes]]:
    """Every hash in the database, as Redis holds it."""
    client = aioredis.Redis.from_url(url)
    try:
        found: dict[str, dict[bytes, bytes]] = {}
        async for key in client.scan_iter():
            if await client.type(key) == b"hash":
                fields = await client.hgetall(key)
                found[key.decode()] = {_raw(k): _raw(v) for k, v in fields.items()}
        return found
    finally:
        await client.aclose()


async def test_entries_are_sealed_named_by_hashes_and_expire(redis_server: RedisServer) -> None:
    async with redis_store(redis_server.url) as store:
        responses = store.responses(IDENTITY, SECRET)
        await responses.put(URL, b"[]", BODY, ttl=30)
        assert await responses.variants(URL) == [BODY]
        contents = await raw_contents(redis_server.url)
        assert len(contents) == 1
        ((key, fields),) = contents.items()
        assert IDENTITY.digest in key
        for text in (key.encode(), *fields, *fields.values()):
            assert b"item/19019" not in text
            assert b"Thunderfury" not in text
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            assert 0 < await client.pttl(key) <= 30_000
        finally:
            await client.aclose()
        # Another secret reads nothing; another URL is another key.
        assert await store.responses(IDENTITY, SECRET + "-other").variants(URL) == []
        assert await responses.variants(URL + b"&x") == []
        await responses.put(URL, b'[["accept","text/xml"]]', b"<xml/>", ttl=30)
        assert sorted(await responses.variants(URL)) == [b"<xml/>", BODY]
        await responses.forget(URL, b"[]")
        assert await responses.variants(URL) == [b"<xml/>"]
        await responses.forget(URL)
        assert await responses.variants(URL) == []


async def test_a_url_keeps_a_bounded_number_of_variants(redis_server: RedisServer) -> None:
    async with redis_store(redis_server.url) as store:
        responses = store.responses(IDENTITY, SECRET)
        for number in range(MAX_VARIANTS + 1):
            await responses.put(URL, f"[{number}]".encode(), str(number).encode(), ttl=30)
        assert await responses.variants(URL) == [str(MAX_VARIANTS).encode()]


def _raw(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


# --- two replicas --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def replica(settings: Settings, redis_url: str, prefix: str) -> AsyncIterator[Client]:
    """An in-process proxy whose store is Redis behind the fallback."""
    store = FallbackStore(
        RedisStore(parse_redis_url(redis_url), timeout=0.25, prefix=prefix),
        probe_interval=0.1,
        presence_interval=0.2,
    )
    client: Client = TestClient(
        ProxyTestServer(ProxyApp(settings, store_factory=lambda _: store)),
        connector=aiohttp.TCPConnector(limit=0),
    )
    await client.start_server()
    try:
        yield client
    finally:
        async with client.get("/-/metrics") as metrics:
            LEAKS.add("/-/metrics", await metrics.text())
        await client.close()


def cached_settings(token_server: FakeTokenServer, upstream: FakeUpstream, kind: str) -> Settings:
    values: dict[str, Any] = {
        "client_id": TEST_CLIENT_ID,
        "client_secret": TEST_SECRET,
        "token_url": token_server.url,
        "upstream": upstream.url,
        "port": 0,
        "cache": True,
        "upstream_client": kind,
    }
    return Settings.model_validate(values)


async def test_two_replicas_share_the_cache_through_redis(
    redis_server: RedisServer,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
    upstream_client: str,
) -> None:
    count = 0

    async def item(request: web.Request) -> web.Response:
        nonlocal count
        count += 1
        return web.json_response({"n": count}, headers={"Cache-Control": "max-age=600"})

    upstream.handlers["/item"] = item
    upstream.handlers["/other"] = item
    upstream.handlers["/third"] = item
    settings = cached_settings(token_server, upstream, upstream_client)
    async with (
        replica(settings, redis_server.url, "shared:") as one,
        replica(settings, redis_server.url, "shared:") as two,
    ):
        async with one.get("/item") as response:
            assert response.headers["X-Cache"] == "MISS"
            body = await response.read()
        # Shared once the answer is out: the client does not wait for Redis.
        await wait_until(lambda: _entries_in(redis_server.url, 1))
        async with two.get("/item") as response:
            assert response.headers["X-Cache"] == "HIT"
            assert int(response.headers["Age"]) >= 0
            assert await response.read() == body
        assert count == 1
        contents = await raw_contents(redis_server.url)
        stored = b"".join(b"".join(fields.values()) for fields in contents.values())
        assert body not in stored
        for token in token_server.issued:
            assert token.encode() not in stored
        async with two.get("/-/ready") as response:
            assert (await response.json())["cache"]["entries"] == 1

        # Redis gone: nothing fails, and each replica goes on with its own memory.
        redis_server.kill()
        async with one.get("/other") as response:
            assert (response.status, response.headers["X-Cache"]) == (200, "MISS")
        async with one.get("/other") as response:
            assert response.headers["X-Cache"] == "HIT"
        async with two.get("/other") as response:
            assert (response.status, response.headers["X-Cache"]) == (200, "MISS")
        assert count == 3

        # Back: sharing resumes.
        await redis_server.restart()
        await wait_until(lambda: all(_shared(client) for client in (one, two)))
        async with two.get("/third") as response:
            assert response.headers["X-Cache"] == "MISS"
        await wait_until(lambda: _entries_in(redis_server.url, 1))
        async with one.get("/third") as response:
            assert response.headers["X-Cache"] == "HIT"


async def _entries_in(url: str, count: int) -> bool:
    return len(await raw_contents(url)) == count


def _shared(client: Client) -> bool:
    store = app_of(client).runtime.store
    assert isinstance(store, FallbackStore)
    return store.is_shared


def test_pack_and_unpack_keep_an_entry() -> None:
    request = CIMultiDictProxy(CIMultiDict({"Accept": "text/xml"}))
    entry = policy.entry_of(
        primary=("digest", "GET", "https://api.test/a"),
        request_headers=request,
        status=200,
        reason="OK",
        fields=(("Cache-Control", "max-age=60"), ("Vary", "Accept"), ("ETag", '"v"')),
        body=b"\x00\xffbody\n",
        request_time=1000.0,
        response_time=1000.0,
    )
    assert entry is not None
    packed = pack(entry, now=1010.0)
    again = unpack(entry.primary, packed, now=5000.0)
    assert again is not None
    assert (again.key, again.headers, again.body, again.etag) == (
        entry.key,
        entry.headers,
        entry.body,
        entry.etag,
    )
    assert again.age(5000.0) == 10.0
    assert unpack(("digest", "GET", "https://api.test/b"), packed, now=0) is None
    assert unpack(entry.primary, b"not json\n", now=0) is None
    assert json.loads(packed.partition(b"\n")[0])["url"] == "https://api.test/a"
