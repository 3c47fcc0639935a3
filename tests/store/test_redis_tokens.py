"""The token store in a real Redis: sealed values, compare-and-delete, the fetch lock, change
notifications, the shared failure state and the memory of refusing paths."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable

import redis.asyncio as aioredis

from proxy.store.base import CredentialIdentity, FetchFailure
from proxy.store.redis import RedisStore, RedisTokens
from tests.conftest import LEAKS, CapturedLog
from tests.store.conftest import RedisServer, redis_store, wait_until

SECRET = "Client-S3cret-For-The-Store-Tests-4be1"
IDENTITY = CredentialIdentity.of(
    token_url="https://oauth.example.test/token",
    client_id="store-client",
    scope="read write",
    extra_params={"audience": "api"},
)


def _token(label: str) -> str:
    value = f"store-token-{label}-{time.monotonic_ns()}"
    LEAKS.tokens.add(value)
    return value


async def _publish(store: RedisStore, value: str, lifetime: float = 60.0) -> str:
    now = time.time()
    shared = await store.tokens(IDENTITY, SECRET).publish(
        value=value, obtained_at=now, expires_at=now + lifetime, scope="read write"
    )
    return shared.version


def _raw(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


async def dump_everything(url: str) -> list[bytes]:
    """Every key and every value in the database, as raw bytes, DUMP included."""
    client = aioredis.Redis.from_url(url)
    found: list[bytes] = []
    try:
        async for key in client.scan_iter(count=1000):
            found.append(_raw(key))
            found.append(_raw(await client.dump(key) or b""))
            kind = _raw(await client.type(key)).decode()
            if kind == "string":
                found.append(_raw(await client.get(key) or b""))
            elif kind == "zset":
                found += [_raw(member) for member in await client.zrange(key, 0, -1)]
            elif kind == "hash":
                for field, value in (await client.hgetall(key)).items():
                    found += [_raw(field), _raw(value)]
    finally:
        await client.aclose()
    return found


async def test_a_published_token_is_loaded_by_another_replica(redis_server: RedisServer) -> None:
    async with (
        redis_store(redis_server.url, prefix="p:") as one,
        redis_store(redis_server.url, prefix="p:") as two,
    ):
        value = _token("roundtrip")
        version = await _publish(one, value)
        snapshot = await two.tokens(IDENTITY, SECRET).load()
        assert snapshot.token is not None
        assert snapshot.token.value == value
        assert snapshot.token.version == version
        assert snapshot.token.scope == "read write"
        assert snapshot.failure is None
        # The same credential, however its scope words are ordered: the same token.
        same = CredentialIdentity.of(
            token_url=IDENTITY.token_url,
            client_id=IDENTITY.client_id,
            scope="write read",
            extra_params={"audience": "api"},
        )
        loaded = await two.tokens(same, SECRET).load()
        assert loaded.token is not None
        assert loaded.token.value == value
        other = CredentialIdentity.of(token_url=IDENTITY.token_url, client_id="someone-else")
        assert (await two.tokens(other, SECRET).load()).token is None


async def test_nothing_in_redis_holds_the_token_or_the_secret(redis_server: RedisServer) -> None:
    value = _token("dump")
    async with redis_store(redis_server.url) as store:
        tokens = store.tokens(IDENTITY, SECRET)
        await _publish(store, value)
        await tokens.record_failure(
            FetchFailure(failures=2, error="temporarily_unavailable", retry_at=time.time() + 5)
        )
        assert await tokens.lock(5.0) is not None
        await tokens.remember_refusing("/profile/user/12345", 10.0)
        dumped = await dump_everything(redis_server.url)
    assert len(dumped) >= 8
    needles = [
        value.encode(),
        SECRET.encode(),
        base64.b64encode(value.encode()),
        base64.b64encode(SECRET.encode()),
        value.encode().hex().encode(),
        b"12345",
        IDENTITY.client_id.encode(),
        b"temporarily_unavailable",
    ]
    for blob in dumped:
        for needle in needles:
            assert needle not in blob, f"{needle[:12]!r}... found in Redis"


async def test_a_replica_with_another_secret_cannot_use_the_token(
    redis_server: RedisServer, proxy_log: CapturedLog
) -> None:
    async with (
        redis_store(redis_server.url, prefix="s:") as one,
        redis_store(redis_server.url, prefix="s:") as two,
    ):
        value = _token("secret")
        await _publish(one, value)
        await one.tokens(IDENTITY, SECRET).record_failure(
            FetchFailure(failures=1, error="invalid_client", retry_at=time.time(), rejected=True)
        )
        wrong = two.tokens(IDENTITY, "another-secret-altogether")
        snapshot = await wrong.load()
        assert snapshot.token is None
        assert snapshot.failure is None
        # A changed byte is no token either.
        client = aioredis.Redis.from_url(redis_server.url)
        key = one.tokens(IDENTITY, SECRET).keys["token"]
        blob = bytearray(_raw(await client.get(key)))
        blob[-1] ^= 1
        await client.set(key, bytes(blob), px=60_000)
        await client.aclose()
        assert (await one.tokens(IDENTITY, SECRET).load()).token is None
    text = proxy_log.text()
    assert "cannot be decrypted" in text
    assert value not in text
    assert SECRET not in text


async def test_the_token_expires_with_its_lifetime(redis_server: RedisServer) -> None:
    async with redis_store(redis_server.url) as store:
        tokens = store.tokens(IDENTITY, SECRET)
        await _publish(store, _token("short"), lifetime=0.3)
        client = aioredis.Redis.from_url(redis_server.url)
        ttl = await client.pttl(tokens.keys["token"])
        await client.aclose()
        assert 0 < ttl <= 300
        await wait_until(lambda: _absent(tokens), timeout=5)


async def _absent(tokens: RedisTokens) -> bool:
    return (await tokens.load()).token is None


async def test_of_two_concurrent_drops_of_a_token_exactly_one_wins(
    redis_server: RedisServer,
) -> None:
    async with (
        redis_store(redis_server.url, prefix="d:") as one,
        redis_store(redis_server.url, prefix="d:") as two,
    ):
        for round_ in range(20):
            version = await _publish(one, _token(f"drop{round_}"))
            results = await asyncio.gather(
                one.tokens(IDENTITY, SECRET).drop(version),
                two.tokens(IDENTITY, SECRET).drop(version),
            )
            assert sorted(results) == [False, True]
            assert (await two.tokens(IDENTITY, SECRET).load()).token is None
        # A drop of a token that has since been replaced drops nothing.
        old = await _publish(one, _token("old"))
        new = await _publish(two, _token("new"))
        assert not await one.tokens(IDENTITY, SECRET).drop(old)
        snapshot = await one.tokens(IDENTITY, SECRET).load()
        assert snapshot.token is not None
        assert snapshot.token.version == new
        assert not await one.tokens(IDENTITY, SECRET).drop("")


async def test_the_fetch_lock_has_one_owner_and_only_the_owner_releases_it(
    redis_server: RedisServer,
) -> None:
    stores = [redis_store(redis_server.url, prefix="l:") for _ in range(3)]
    async with stores[0] as a, stores[1] as b, stores[2] as c:
        parts = [s.tokens(IDENTITY, SECRET) for s in (a, b, c)]
        owners = await asyncio.gather(*(parts[i % 3].lock(5.0) for i in range(30)))
        held = [owner for owner in owners if owner is not None]
        assert len(held) == 1
        assert not await parts[1].unlock("not-the-owner")
        assert await parts[2].lock(5.0) is None
        assert await parts[2].unlock(held[0])
        assert not await parts[0].unlock(held[0])
        assert await parts[0].lock(5.0) is not None


async def test_the_lock_of_a_holder_that_died_frees_itself(redis_server: RedisServer) -> None:
    async with (
        redis_store(redis_server.url, prefix="x:") as one,
        redis_store(redis_server.url, prefix="x:") as two,
    ):
        taken_at = time.monotonic()
        assert await one.tokens(IDENTITY, SECRET).lock(0.3) is not None
        await one.close()  # the holder is gone without releasing
        assert await two.tokens(IDENTITY, SECRET).lock(0.3) is None
        owner: list[str] = []

        async def took_it() -> bool:
            got = await two.tokens(IDENTITY, SECRET).lock(5.0)
            if got is not None:
                owner.append(got)
            return got is not None

        await wait_until(took_it, timeout=5)
        assert time.monotonic() - taken_at >= 0.29


async def test_a_waiter_wakes_when_another_replica_publishes(redis_server: RedisServer) -> None:
    async with (
        redis_store(redis_server.url, prefix="w:") as one,
        redis_store(redis_server.url, prefix="w:") as two,
    ):
        await wait_until(two.events.subscribed.is_set)
        waiting = two.tokens(IDENTITY, SECRET)
        before = await waiting.load()
        waiter = asyncio.create_task(waiting.wait_changed(before.generation))
        await asyncio.sleep(0)
        assert not waiter.done()
        published_at = time.monotonic()
        value = _token("wake")
        await _publish(one, value)
        async with asyncio.timeout(5):
            await waiter
        # Pub/sub, not the half-second poll, woke it.
        assert time.monotonic() - published_at < 0.3
        after = await waiting.load()
        assert after.generation > before.generation
        assert after.token is not None
        assert after.token.value == value
        # A change before the wait began is not missed.
        await one.tokens(IDENTITY, SECRET).unlock("nobody")  # no change
        await one.tokens(IDENTITY, SECRET).record_failure(
            FetchFailure(failures=1, error="timeout", retry_at=time.time() + 1)
        )
        async with asyncio.timeout(1):
            await waiting.wait_changed(after.generation)


async def test_the_failure_state_is_shared_and_cleared_by_a_new_token(
    redis_server: RedisServer,
) -> None:
    async with (
        redis_store(redis_server.url, prefix="f:") as one,
        redis_store(redis_server.url, prefix="f:") as two,
    ):
        retry_at = time.time() + 30
        failure = FetchFailure(
            failures=3,
            error="invalid_client",
            retry_at=retry_at,
            rejected=True,
            detail="token endpoint answered HTTP 401: invalid_client ('bad secret')",
        )
        await one.tokens(IDENTITY, SECRET).record_failure(failure)
        assert (await two.tokens(IDENTITY, SECRET).load()).failure == failure
        await _publish(two, _token("recovered"))
        snapshot = await one.tokens(IDENTITY, SECRET).load()
        assert snapshot.failure is None
        assert snapshot.token is not None


async def test_a_refusing_path_is_remembered_by_every_replica_for_a_while(
    redis_server: RedisServer,
) -> None:
    async with (
        redis_store(redis_server.url, prefix="r:") as one,
        redis_store(redis_server.url, prefix="r:") as two,
    ):
        await one.tokens(IDENTITY, SECRET).remember_refusing("/profile/user/wow", 0.3)
        assert await two.tokens(IDENTITY, SECRET).refuses("/profile/user/wow")
        assert not await two.tokens(IDENTITY, SECRET).refuses("/data/wow/item/1")
        await wait_until(
            lambda: _not(two.tokens(IDENTITY, SECRET).refuses("/profile/user/wow")), timeout=5
        )


async def _not(answer: Awaitable[bool]) -> bool:
    return not await answer


async def test_a_password_in_the_url_logs_in_and_never_shows(
    redis_server_with_password: RedisServer, proxy_log: CapturedLog
) -> None:
    server = redis_server_with_password
    assert server.password is not None
    async with redis_store(server.url) as store:
        await store.ping()
        await _publish(store, _token("password"))
        assert server.password not in repr(store)
        assert server.password not in str(store.target)
        assert server.password not in repr(store.target)
    assert server.password not in proxy_log.text()
