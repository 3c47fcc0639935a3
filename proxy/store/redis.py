"""The Redis (or Valkey) store: each credential's token state sealed under its secret, its
fetch lock (redis-py's asyncio Lock: SET NX PX, released by a compare-and-delete script), the
change notifications (one pub/sub channel, with polling behind it), and the replicas' presence.

Keys, under the configurable prefix, name a credential by its identity digest, never by its
name: `{prefix}{<digest>}:token` (sealed, PX with the token), `:failure` (sealed), `:lock`,
`:gen` (a counter every change increments), `:refuses:<hash of a path>`; the braces keep one
credential's keys in one hash slot. Every call is bounded by redis_timeout (redis_calls.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.exceptions import LockNotOwnedError

from proxy.log import get_logger, redactor
from proxy.refusals import RefusingPaths
from proxy.store.base import (
    DEFAULT_REDIS_PREFIX,
    DEFAULT_REDIS_TIMEOUT,
    CredentialIdentity,
    FetchFailure,
    SharedToken,
    TokenSnapshot,
)
from proxy.store.crypto import NONCE_BYTES, Sealer, version_of
from proxy.store.memory import FAILURE_MEMORY
from proxy.store.redis_calls import bounded, lean_client
from proxy.store.redis_events import Events
from proxy.store.redis_limits import RedisCounters
from proxy.store.redis_responses import RedisResponses
from proxy.store.redis_url import RedisTarget

log = get_logger("proxy.store")

DEFAULT_PREFIX = DEFAULT_REDIS_PREFIX
DEFAULT_TIMEOUT = DEFAULT_REDIS_TIMEOUT
# A waiter that hears no notification (pub/sub down, a lock that expired) looks this often.
POLL_INTERVAL = 0.5

_PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
local generation = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return generation
"""
_DROP = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 2, 1 + string.len(ARGV[1])) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""
_FAIL = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
_NOTIFY = """
redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""
_PRESENT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"""


def _as_bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


class RedisTokens:
    """One credential's token state in Redis (see TokenStore)."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        events: Events,
        prefix: str,
        identity: CredentialIdentity,
        secret: str,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        digest = identity.digest
        self._client = client
        self._events = events
        self._digest = digest
        self._base = f"{prefix}{{{digest}}}:"
        self._keys = {part: self._base + part for part in ("token", "failure", "lock", "gen")}
        self._sealer = Sealer(identity, secret)
        self._timeout = timeout
        self._clock = clock
        self._message = f"t {digest}".encode()
        self._publish = client.register_script(_PUBLISH)
        self._drop = client.register_script(_DROP)
        self._fail = client.register_script(_FAIL)
        self._notify = client.register_script(_NOTIFY)
        self._unreadable: set[bytes] = set()
        # This replica's own: what others learn reaches it through refuses().
        self.paths = RefusingPaths(clock=clock)

    @property
    def keys(self) -> dict[str, str]:
        return dict(self._keys)

    async def load(self) -> TokenSnapshot:
        keys = self._keys
        raw = await bounded(
            self._client.mget([keys["token"], keys["failure"], keys["gen"]]), self._timeout
        )
        raw_token, raw_failure, raw_generation = (_as_bytes(value) for value in raw)
        return TokenSnapshot(
            token=self._read_token(raw_token),
            failure=self._read_failure(raw_failure),
            generation=int(raw_generation or 0),
        )

    def _open(self, purpose: str, blob: bytes | None) -> dict[str, Any] | None:
        if blob is None:
            return None
        plaintext = self._sealer.open(purpose, blob)
        if plaintext is None:
            marker = blob[: 1 + NONCE_BYTES]
            if marker not in self._unreadable:
                self._unreadable = {marker}
                log.warning(
                    "a value this credential stored in Redis cannot be decrypted with its "
                    "secret (another secret, or a changed value); it is ignored",
                    credential_key=self._digest[:12],
                    kind=purpose,
                )
            return None
        value: object = json.loads(plaintext)
        return value if isinstance(value, dict) else None

    def _read_token(self, blob: bytes | None) -> SharedToken | None:
        data = self._open("token", blob)
        if data is None or blob is None:
            return None
        value = str(data["value"])
        redactor.add_token(value)
        token = SharedToken(
            value=value,
            obtained_at=float(data["obtained_at"]),
            expires_at=float(data["expires_at"]),
            scope=data.get("scope"),
            version=version_of(blob),
        )
        return token if token.expires_at > self._clock() else None

    def _read_failure(self, blob: bytes | None) -> FetchFailure | None:
        data = self._open("failure", blob)
        if data is None:
            return None
        return FetchFailure(
            failures=int(data["failures"]),
            error=str(data["error"]),
            retry_at=float(data["retry_at"]),
            rejected=bool(data["rejected"]),
            detail=data.get("detail"),
        )

    async def publish(
        self, *, value: str, obtained_at: float, expires_at: float, scope: str | None
    ) -> SharedToken:
        plaintext = json.dumps(
            {"value": value, "obtained_at": obtained_at, "expires_at": expires_at, "scope": scope}
        ).encode()
        blob = self._sealer.seal("token", plaintext)
        ttl_ms = max(1, int((expires_at - self._clock()) * 1000))
        keys = self._keys
        await bounded(
            self._publish(
                keys=[keys["token"], keys["failure"], keys["gen"]],
                args=[blob, ttl_ms, self._events.channel, self._message],
            ),
            self._timeout,
        )
        return SharedToken(
            value=value,
            obtained_at=obtained_at,
            expires_at=expires_at,
            scope=scope,
            version=version_of(blob),
        )

    async def drop(self, version: str) -> bool:
        try:
            nonce = bytes.fromhex(version)
        except ValueError:
            return False
        if len(nonce) != NONCE_BYTES:
            return False
        keys = self._keys
        dropped = await bounded(
            self._drop(
                keys=[keys["token"], keys["gen"]],
                args=[nonce, self._events.channel, self._message],
            ),
            self._timeout,
        )
        return bool(dropped)

    async def record_failure(self, failure: FetchFailure) -> None:
        plaintext = json.dumps(
            {
                "failures": failure.failures,
                "error": failure.error,
                "retry_at": failure.retry_at,
                "rejected": failure.rejected,
                "detail": failure.detail,
            }
        ).encode()
        ttl_ms = max(1, int((failure.retry_at + FAILURE_MEMORY - self._clock()) * 1000))
        keys = self._keys
        await bounded(
            self._fail(
                keys=[keys["failure"], keys["gen"]],
                args=[
                    self._sealer.seal("failure", plaintext),
                    ttl_ms,
                    self._events.channel,
                    self._message,
                ],
            ),
            self._timeout,
        )

    def _lock(self, ttl: float) -> Lock:
        return Lock(
            self._client, self._keys["lock"], timeout=ttl, blocking=False, thread_local=False
        )

    async def lock(self, ttl: float) -> str | None:
        owner = secrets.token_hex(16)
        taken = await bounded(self._lock(ttl).acquire(token=owner), self._timeout)
        return owner if taken else None

    async def _release(self, owner: str) -> bool:
        try:
            await self._lock(1.0).do_release(owner.encode())
        except LockNotOwnedError:
            return False
        return True

    async def unlock(self, owner: str) -> bool:
        if not await bounded(self._release(owner), self._timeout):
            return False
        await bounded(
            self._notify(keys=[self._keys["gen"]], args=[self._events.channel, self._message]),
            self._timeout,
        )
        return True

    async def _generation(self) -> int:
        return int(await bounded(self._client.get(self._keys["gen"]), self._timeout) or 0)

    async def wait_changed(self, generation: int) -> None:
        while True:
            event = self._events.waiter(self._digest)  # before the read: no change is missed
            if await self._generation() > generation:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_INTERVAL):
                    await event.wait()

    def _refusal_key(self, path: str) -> str:
        # Paths can name users or objects: Redis holds only a keyed hash of them.
        digest = hashlib.blake2b(path.encode(), key=self._digest.encode(), digest_size=16)
        return self._base + "refuses:" + digest.hexdigest()

    async def remember_refusing(self, path: str, seconds: float) -> None:
        await bounded(
            self._client.set(self._refusal_key(path), b"1", px=max(1, int(seconds * 1000))),
            self._timeout,
        )

    async def refuses(self, path: str) -> bool:
        return bool(await bounded(self._client.exists(self._refusal_key(path)), self._timeout))


class RedisStore:
    """Shared state in one Redis or Valkey database (see Store); wrap it in FallbackStore."""

    backend = "redis"

    def __init__(
        self,
        target: RedisTarget,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not timeout > 0:
            raise ValueError("redis_timeout must be a positive number of seconds")
        self.target = target
        self.timeout = timeout
        self.prefix = prefix
        if target.password is not None:
            redactor.add_secret(target.password.get_secret_value())
        self._clock = clock
        self.client = aioredis.Redis(**target.client_kwargs(timeout=timeout))
        # The rate-limit scripts, two on every request's path, have a pool of their own.
        self.scripts = lean_client(target, timeout=timeout)
        self.events = Events(self.client, prefix + "events", timeout=timeout)
        self._tokens: dict[tuple[str, str], RedisTokens] = {}
        self._responses: dict[tuple[str, str], RedisResponses] = {}
        self._counters = RedisCounters(
            client=self.scripts, events=self.events, prefix=prefix, timeout=timeout
        )
        self._present = self.client.register_script(_PRESENT)

    def __repr__(self) -> str:
        return f"RedisStore({self.target.safe_url!r}, prefix={self.prefix!r})"

    async def start(self) -> None:
        self.events.start()

    async def close(self) -> None:
        await self.events.close()
        for client in (self.scripts, self.client):
            with contextlib.suppress(Exception):
                await bounded(client.aclose(), self.timeout)

    def tokens(self, identity: CredentialIdentity, secret: str) -> RedisTokens:
        slot = (identity.digest, hashlib.sha256(secret.encode()).hexdigest())
        tokens = self._tokens.get(slot)
        if tokens is None:
            tokens = self._tokens[slot] = RedisTokens(
                client=self.client,
                events=self.events,
                prefix=self.prefix,
                identity=identity,
                secret=secret,
                timeout=self.timeout,
                clock=self._clock,
            )
        return tokens

    @property
    def counters(self) -> RedisCounters:
        return self._counters

    def responses(self, identity: CredentialIdentity, secret: str) -> RedisResponses:
        slot = (identity.digest, hashlib.sha256(secret.encode()).hexdigest())
        responses = self._responses.get(slot)
        if responses is None:
            responses = self._responses[slot] = RedisResponses(
                client=self.client,
                prefix=self.prefix,
                identity=identity,
                secret=secret,
                timeout=self.timeout,
            )
        return responses

    def state(self) -> dict[str, Any]:
        return {"backend": self.backend}

    async def ping(self) -> None:
        """Return when Redis answers; StoreUnavailable when it does not within the timeout."""
        await bounded(self.client.ping(), self.timeout)

    async def present(self, member: str, *, within: float) -> int:
        """Say that replica `member` is here, and count the replicas that said so within the
        last `within` seconds (this one included)."""
        count = await bounded(
            self._present(
                keys=[self.prefix + "replicas"], args=[member, max(1, int(within * 1000))]
            ),
            self.timeout,
        )
        return max(1, int(count))
