"""What Redis holds and what the proxies say about it: every key and value dumped after real
traffic (rate limits, a client's limit, a 429 pause, the replicas' presence) holds no secret,
no token, no team key and no credential's name or client id; the Redis password is in no log,
/-/ready, /-/metrics or `check` output; `check` says whether Redis answers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import cast

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from proxy.store.redis_url import parse_redis_url
from tests.conftest import TEST_CLIENT_ID, TEST_SECRET, FakeTokenServer, FakeUpstream
from tests.functional.test_cli import check_env, clean_env, run_cli_async
from tests.redis_server import RedisServer
from tests.replicas.conftest import Arrivals, StartReplicas

__all__ = ["clean_env"]  # the fixture, used by the check test

TEAM_KEY = "Team-Key-Stored-Nowhere-3f9a0c21"


async def dump(url: str) -> tuple[list[bytes], bytes]:
    """Every key of the database, and every value of every key, in one blob."""
    client = aioredis.Redis(**parse_redis_url(url).client_kwargs(timeout=2.0))
    keys: list[bytes] = []
    blob = bytearray()
    try:
        async for key in client.scan_iter(count=100):
            keys.append(key)
            kind = cast(bytes, await client.type(key)).decode()
            if kind == "string":
                blob += cast(bytes, await client.get(key) or b"")
            elif kind == "zset":
                pairs = await client.zrange(key, 0, -1, withscores=True)
                for member, score in cast(list[tuple[bytes, float]], pairs):
                    blob += member + str(score).encode()
            elif kind == "hash":
                for field, value in cast(dict[bytes, bytes], await client.hgetall(key)).items():
                    blob += field + value
            elif kind == "list":
                blob += b"".join(cast(list[bytes], await client.lrange(key, 0, -1)))
            elif kind == "set":
                blob += b"".join(cast(set[bytes], await client.smembers(key)))
            else:
                raise AssertionError(f"a key of an unexpected type: {kind}")
            blob += b"\n"
    finally:
        await client.aclose()
    return keys, bytes(blob)


async def test_nothing_stored_in_redis_holds_a_secret_a_token_or_a_name(
    redis_server_with_password: RedisServer,
    start_replicas: StartReplicas,
    token_server: FakeTokenServer,
    upstream: FakeUpstream,
) -> None:
    server = redis_server_with_password
    arrivals = Arrivals()
    upstream.handlers["/api"] = arrivals
    arrivals.answer = lambda request: (
        web.json_response({}, status=429, headers={"Retry-After": "1"})
        if request.query_string == "slow"
        else None
    )
    key_sha256 = hashlib.sha256(TEAM_KEY.encode()).hexdigest()
    dashboard = {"name": "dashboard", "key_sha256": key_sha256, "rate_limit": ["9/second"]}
    replicas = await start_replicas(
        2,
        redis_url=server.url,
        table={"rate_limit": ["50/second", "1000/hour"], "rate_limit_max_wait": 3.0},
        top={"clients": [dashboard]},
        names=("bnet-credential-name", "other-credential-name"),
    )
    headers = {"Authorization": f"Bearer {TEAM_KEY}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for replica in replicas:
            for query in ("a", "b", "slow", "c"):
                async with session.get(f"{replica.url}/api?{query}") as response:
                    await response.read()
        seen: list[int] = []
        for replica in replicas:
            ready = await replica.ready(session)
            assert ready["status_code"] == 200
            assert ready["store"]["backend"] == "redis"
            assert ready["store"]["state"] == "shared"
            seen.append(ready["store"]["replicas"])
            text = str(ready) + await replica.metrics(session)
            assert server.password is not None
            assert server.password not in text
            assert str(server.port) not in str(ready)
    # The later to start saw both; the other sees it at its next round of presence.
    assert sorted(seen) in ([1, 2], [2, 2])
    keys, values = await dump(server.url)
    print(f"\n{len(keys)} keys in Redis after the traffic: {sorted(k.decode() for k in keys)}")
    assert len(arrivals.seen) == 8
    assert any(b":hits" in key for key in keys)
    assert any(b"client:dashboard" in key for key in keys)
    stored = b"\n".join(keys) + values
    needles = {
        "the client secret": TEST_SECRET,
        "the team key": TEAM_KEY,
        "the team key's hash": key_sha256,
        "the client id": TEST_CLIENT_ID,
        "a credential's name": "credential-name",
        "the Redis password": str(server.password),
        **{f"token {token[:6]}": token for token in token_server.issued},
    }
    found = [name for name, needle in needles.items() if needle.encode() in stored]
    assert not found, f"stored in Redis: {found}"
    for replica in replicas:
        assert str(server.password) not in replica.log_path.read_text()


async def test_check_says_whether_redis_answers_and_never_names_it(
    redis_server_with_password: RedisServer,
    token_server: FakeTokenServer,
    clean_env: dict[str, str],
    tmp_path: Path,
) -> None:
    server = redis_server_with_password
    cwd = tmp_path
    env = check_env(clean_env, token_server.url, TOKEN_PROXY_REDIS_URL=server.url)
    result = await run_cli_async(["check"], env, cwd)
    assert result.returncode == 0, result
    assert "redis: ok, answered in " in result.stdout
    assert "keys under 'token-proxy:'" in result.stdout
    server.kill()
    result = await run_cli_async(["check"], env, cwd)
    # Redis away is no failure of the configuration: the proxy would start, alone.
    assert result.returncode == 0, result
    assert "redis: FAILED (connection)" in result.stdout
    assert "would start all the same" in result.stdout
    for output in (result.stdout, result.stderr):
        assert str(server.password) not in output
        assert TEST_SECRET not in output
