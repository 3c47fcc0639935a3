"""Two real token-proxy processes sharing the response cache through a real redis-server: what
one fetched the other answers as a HIT, upstream sees one request, and what Redis holds of the
answer is sealed (no body, URL or ETag in clear)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from tests.conftest import FakeTokenServer, FakeUpstream
from tests.redis_server import RedisServer
from tests.replicas.conftest import Arrivals, StartReplicas
from tests.replicas.test_redis_storage import dump
from tests.store.conftest import wait_until

ITEM = "/data/wow/item/19019"
TARGET = f"{ITEM}?namespace=static-us&locale=en_US"
NAME = "Thunderfury, Blessed Blade of the Windseeker"
ETAG = '"item-19019-v7"'


async def test_a_second_replica_answers_as_hit_what_the_first_fetched(
    redis_server: RedisServer,
    start_replicas: StartReplicas,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
) -> None:
    arrivals = Arrivals()
    upstream.handlers[ITEM] = arrivals
    arrivals.answer = lambda request: web.json_response(
        {"id": 19019, "name": NAME, "quality": "LEGENDARY"},
        headers={"Cache-Control": "max-age=600", "ETag": ETAG},
    )
    one, two = await start_replicas(2, redis_url=redis_server.url, top={"cache": True})
    async with aiohttp.ClientSession() as session:
        async with session.get(one.url + TARGET) as response:
            assert (response.status, response.headers["X-Cache"]) == (200, "MISS")
            body = await response.read()
        assert NAME.encode() in body

        # The first replica shares the answer once it has relayed it whole.
        async def shared() -> bool:
            keys, _ = await dump(redis_server.url)
            return any(b":response:" in key for key in keys)

        await wait_until(shared)
        for _ in range(2):  # from Redis, then from the second replica's own memory
            async with session.get(two.url + TARGET) as response:
                assert (response.status, response.headers["X-Cache"]) == (200, "HIT")
                assert int(response.headers["Age"]) >= 0
                assert response.headers["ETag"] == ETAG
                assert await response.read() == body
        # A client's own conditional request is answered from the shared entry too.
        async with session.get(two.url + TARGET, headers={"If-None-Match": ETAG}) as response:
            assert (response.status, response.headers["X-Cache"]) == (304, "HIT")
        for replica in (one, two):
            ready = await replica.ready(session)
            assert ready["cache"]["entries"] == 1
            assert ready["cache"]["shared"] is True
        metrics = await two.metrics(session)
    assert len(arrivals.seen) == 1, "upstream was asked again for an answer Redis shares"
    hits = [
        line
        for line in metrics.splitlines()
        if line.startswith("token_proxy_cache_requests_total{") and 'result="HIT"' in line
    ]
    assert len(hits) == 1, metrics
    assert float(hits[0].rsplit(" ", 1)[1]) == 3.0, metrics

    keys, values = await dump(redis_server.url)
    entries = [key for key in keys if b":response:" in key]
    print(f"\n{len(keys)} keys in Redis, {len(entries)} cache entry: {[k.decode() for k in keys]}")
    assert len(entries) == 1
    stored = b"\n".join(keys) + values
    needles = {
        "the body": body,
        "the item's name": NAME.encode(),
        "the URL's path": b"wow/item",
        "the URL's query": b"namespace=static-us",
        "the ETag": ETAG.encode(),
        **{f"token {token[:6]}": token.encode() for token in token_server.issued},
    }
    found = [name for name, needle in needles.items() if needle in stored]
    assert not found, f"stored in Redis in clear: {found}"
