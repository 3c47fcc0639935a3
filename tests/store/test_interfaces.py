"""Each store is what the interfaces say (mypy checks these assignments; pytest runs them)."""

from __future__ import annotations

from proxy.store import Counters, CredentialIdentity, Store, TokenStore
from proxy.store.fallback import FallbackStore
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from proxy.store.redis_url import parse_redis_url
from proxy.store.relay import Relay, RelayStore

IDENTITY = CredentialIdentity.of(token_url="https://t.example/token", client_id="c")


async def test_every_store_has_the_interfaces_shape() -> None:
    redis = RedisStore(parse_redis_url("redis://127.0.0.1:1/0"))
    stores: list[Store] = [MemoryStore(), redis, FallbackStore(redis), RelayStore(Relay())]
    for store in stores:
        tokens: TokenStore = store.tokens(IDENTITY, "secret")
        counters: Counters = store.counters
        assert tokens is store.tokens(IDENTITY, "secret")
        assert counters is store.counters
        assert store.state()["backend"] == store.backend
    await redis.close()
