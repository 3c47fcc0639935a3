"""One credential's shared response-cache entries in Redis, and behind the fallback: a hash
per primary key (method and URL), one field per variant, each value sealed like the token, the
hash expiring with its longest-lived variant.

Keys, under the prefix: `{prefix}{<digest>}:response:<keyed hash of method and URL>`; fields
are keyed hashes of the variant's request-header values: URLs and header values can name users
or objects, so Redis holds neither. A primary key keeps at most MAX_VARIANTS variants (the
write that would add one more starts the hash afresh), so one read (HGETALL) returns them all.
Every call is bounded by redis_timeout (redis_calls.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import redis.asyncio as aioredis

from proxy.store.base import CredentialIdentity
from proxy.store.crypto import Sealer
from proxy.store.redis_calls import bounded

T = TypeVar("T")
MAX_VARIANTS = 16
_PUT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('HLEN', KEYS[1]) > tonumber(ARGV[4]) then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""


class RedisResponses:
    """One credential's cache entries in Redis (see ResponseStore)."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        prefix: str,
        identity: CredentialIdentity,
        secret: str,
        timeout: float,
    ) -> None:
        self._client = client
        self._digest = identity.digest.encode()
        self._base = f"{prefix}{{{identity.digest}}}:response:"
        self._sealer = Sealer(identity, secret)
        self._timeout = timeout
        self._put = client.register_script(_PUT)

    def _hash(self, name: bytes) -> str:
        return hashlib.blake2b(name, key=self._digest, digest_size=16).hexdigest()

    def _key(self, primary: bytes) -> str:
        return self._base + self._hash(primary)

    async def variants(self, primary: bytes) -> list[bytes]:
        key = self._key(primary)
        found = await bounded(self._client.hgetall(key), self._timeout)
        # The key is sealed with each value: one moved under another URL does not open.
        opened = (self._sealer.open("response " + key, _as_bytes(v)) for v in found.values())
        return [value for value in opened if value is not None]

    async def put(self, primary: bytes, variant: bytes, value: bytes, *, ttl: float) -> None:
        key = self._key(primary)
        sealed = self._sealer.seal("response " + key, value)
        await bounded(
            self._put(
                keys=[key],
                args=[self._hash(variant), sealed, max(1, int(ttl * 1000)), MAX_VARIANTS],
            ),
            self._timeout,
        )

    async def forget(self, primary: bytes, variant: bytes | None = None) -> None:
        key = self._key(primary)
        if variant is None:
            await bounded(self._client.delete(key), self._timeout)
        else:
            await bounded(self._client.hdel(key, self._hash(variant)), self._timeout)


class _Runner(Protocol):
    async def run(
        self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]
    ) -> T: ...


class FallbackResponses:
    """The entries in Redis while it answers; while it does not, none (each replica's cache
    then answers from its own memory alone)."""

    def __init__(self, store: _Runner, shared: RedisResponses) -> None:
        self._store = store
        self._shared = shared

    async def variants(self, primary: bytes) -> list[bytes]:
        async def none() -> list[bytes]:
            return []

        return await self._store.run(lambda: self._shared.variants(primary), none)

    async def put(self, primary: bytes, variant: bytes, value: bytes, *, ttl: float) -> None:
        await self._store.run(lambda: self._shared.put(primary, variant, value, ttl=ttl), _none)

    async def forget(self, primary: bytes, variant: bytes | None = None) -> None:
        await self._store.run(lambda: self._shared.forget(primary, variant), _none)


async def _none() -> None:
    return None


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value
