"""The store a replica uses with redis_url set: Redis while it answers ("shared"), this
process's memory store while it does not ("alone"), and the background task that tells
which, so that no request fails because of Redis nor waits on it longer than one timeout.

Alone, a replica keeps the last shared token state it saw (every answer from Redis is mirrored
into memory), and counts each rate limit in memory at its share of it: the limit divided by
the number of replicas that were sharing when Redis was last seen (rounded down, at least 1),
so that together they still keep to the quota. Redis is asked nothing on the request path
then; it is pinged every probe interval, and sharing resumes when it answers. Slots taken in
Redis and finished while it was away are settled there then (fallback_limits.py)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from proxy.errors import StoreUnavailable
from proxy.log import get_logger
from proxy.store.base import (
    ALONE,
    SHARED,
    CredentialIdentity,
    FetchFailure,
    SharedToken,
    TokenSnapshot,
)
from proxy.store.fallback_limits import FallbackCounters
from proxy.store.memory import MemoryStore, MemoryTokens
from proxy.store.redis import RedisStore, RedisTokens
from proxy.store.redis_calls import stop_task
from proxy.store.redis_responses import FallbackResponses

log = get_logger("proxy.store")
T = TypeVar("T")

PROBE_INTERVAL = 1.0
PRESENCE_INTERVAL = 5.0
# Generations of the two stores never meet: the epoch (one per switch) sits above them.
_EPOCH_SHIFT = 40
_INNER = (1 << _EPOCH_SHIFT) - 1


class FallbackStore:
    """Redis behind a fallback to memory (see Store, and this module's docstring)."""

    backend = "redis"

    def __init__(
        self,
        shared: RedisStore,
        local: MemoryStore | None = None,
        *,
        probe_interval: float = PROBE_INTERVAL,
        presence_interval: float = PRESENCE_INTERVAL,
    ) -> None:
        self.shared_store = shared
        self.local_store = local if local is not None else MemoryStore()
        self._probe_interval = probe_interval
        self._presence_interval = presence_interval
        self._state = ALONE
        self._epoch = 0
        self._changed_at = time.time()
        self._switched = asyncio.Event()
        self._wake = asyncio.Event()
        self._errors: Counter[str] = Counter()
        self._last_error: str | None = None
        self._replicas = 1
        self._said_alone = False
        self._member = secrets.token_hex(8)
        self._task: asyncio.Task[None] | None = None
        self._tokens: dict[tuple[str, int], FallbackTokens] = {}
        self._counters = FallbackCounters(self)

    async def start(self) -> None:
        await self.shared_store.start()
        try:
            await self._probe()
        except StoreUnavailable as exc:
            self._count(exc)
            self._said_alone = True
            log.warning(
                "Redis does not answer at start-up; this replica goes on alone (its own token "
                "and its share of each rate limit) until it does",
                error=exc.detail,
                kind=exc.kind,
            )
        self._task = asyncio.create_task(self._monitor(), name="redis-store-monitor")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("a background task of the store had failed", error=repr(task.exception()))
        await self.shared_store.close()
        await self.local_store.close()

    # The state ---------------------------------------------------------------------------------

    @property
    def is_shared(self) -> bool:
        return self._state == SHARED

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def replicas(self) -> int:
        """The replicas that shared this Redis when it last answered (this one included)."""
        return self._replicas

    def store_up(self) -> int:
        """The value of the token_proxy_store_up gauge: 1 while shared, else 0."""
        return 1 if self._state == SHARED else 0

    def errors(self) -> dict[str, int]:
        """Failed Redis calls by kind (timeout, connection, auth, response, other)."""
        return dict(self._errors)

    def state(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "state": self._state,
            "since": datetime.fromtimestamp(self._changed_at, UTC).isoformat(timespec="seconds"),
            "replicas": self._replicas,
            "errors": self.errors(),
            "last_error": self._last_error,
        }

    def _count(self, exc: StoreUnavailable) -> None:
        self._errors[exc.kind] += 1
        self._last_error = exc.kind

    def failed(self, exc: StoreUnavailable) -> None:
        """A Redis call failed: count it, and go on alone if we were sharing."""
        self._count(exc)
        if self._state != SHARED:
            return
        self._switch(ALONE)
        self._said_alone = True
        log.warning(
            "Redis stopped answering; this replica goes on alone (its own token, each rate "
            "limit divided by the replicas last seen) and checks Redis in the background",
            error=exc.detail,
            kind=exc.kind,
            replicas=self._replicas,
        )

    def _switch(self, state: str) -> None:
        self._state = state
        self._epoch += 1
        self._changed_at = time.time()
        switched, self._switched = self._switched, asyncio.Event()
        switched.set()
        self._wake.set()

    async def run(self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> T:
        """Ask Redis while sharing; on its failure, and while alone, ask memory."""
        if self._state == SHARED:
            try:
                return await shared()
            except StoreUnavailable as exc:
                self.failed(exc)
        return await local()

    async def until_switch(self, operation: Coroutine[Any, Any, None]) -> None:
        """Await `operation`, or return as soon as the store switches (whoever waits must
        read again then, from the other store)."""
        switched = self._switched
        task = asyncio.ensure_future(operation)
        waiter = asyncio.ensure_future(switched.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await stop_task(waiter)
            await stop_task(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, StoreUnavailable):
            self.failed(exc)
        elif exc is not None:
            raise exc

    # The background check -----------------------------------------------------------------------

    async def _probe(self) -> None:
        await self.shared_store.ping()
        self._replicas = await self.shared_store.present(
            self._member, within=3 * self._presence_interval
        )
        if self._state != SHARED:
            self._switch(SHARED)
            if self._said_alone:
                self._said_alone = False
                log.info("Redis answers again; sharing resumed", replicas=self._replicas)
            await self._counters.resume()

    async def _monitor(self) -> None:
        while True:
            if self._state == SHARED:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._presence_interval):
                        await self._wake.wait()
                if self._state != SHARED:
                    continue
                try:
                    self._replicas = await self.shared_store.present(
                        self._member, within=3 * self._presence_interval
                    )
                except StoreUnavailable as exc:
                    self.failed(exc)
            else:
                await asyncio.sleep(self._probe_interval)
                try:
                    await self._probe()
                except StoreUnavailable as exc:
                    self._count(exc)

    # The parts -----------------------------------------------------------------------------------

    def tokens(self, identity: CredentialIdentity, secret: str) -> FallbackTokens:
        slot = (identity.digest, hash(secret))
        tokens = self._tokens.get(slot)
        if tokens is None:
            tokens = self._tokens[slot] = FallbackTokens(
                self,
                shared=self.shared_store.tokens(identity, secret),
                local=self.local_store.tokens(identity, secret),
            )
        return tokens

    @property
    def counters(self) -> FallbackCounters:
        return self._counters

    def responses(self, identity: CredentialIdentity, secret: str) -> FallbackResponses:
        return FallbackResponses(self, self.shared_store.responses(identity, secret))


class FallbackTokens:
    """One credential's token state: Redis's, mirrored into memory, or memory's alone."""

    def __init__(self, store: FallbackStore, *, shared: RedisTokens, local: MemoryTokens) -> None:
        self._store = store
        self._shared = shared
        self._local = local
        self.paths = local.paths
        # The token this replica fetched while alone: Redis gets it when it answers again.
        self._alone: SharedToken | None = None

    async def load(self) -> TokenSnapshot:
        store = self._store
        if store.is_shared:
            epoch = store.epoch
            try:
                snapshot = await self._carried(await self._shared.load())
            except StoreUnavailable as exc:
                store.failed(exc)
            else:
                self._local.mirror(snapshot)
                return replace(snapshot, generation=(epoch << _EPOCH_SHIFT) | snapshot.generation)
        epoch = store.epoch
        snapshot = self._local.snapshot()
        return replace(snapshot, generation=(epoch << _EPOCH_SHIFT) | snapshot.generation)

    async def _carried(self, snapshot: TokenSnapshot) -> TokenSnapshot:
        """Redis's state, once it has the token fetched here while it was away, when that one
        outlives what Redis holds (nothing, after a restart without persistence): sharing
        resumes without a token request in each replica. Of replicas that come back together
        the last to publish wins, and the others take its token."""
        alone, self._alone = self._alone, None
        if alone is None:
            return snapshot
        held = self._local.snapshot().token
        if held is None or held.version != alone.version:
            return snapshot  # dropped, or replaced, since
        if snapshot.token is not None and snapshot.token.expires_at >= alone.expires_at:
            return snapshot
        try:
            await self._shared.publish(
                value=alone.value,
                obtained_at=alone.obtained_at,
                expires_at=alone.expires_at,
                scope=alone.scope,
            )
            return await self._shared.load()
        except StoreUnavailable:
            self._alone = alone  # for the next time Redis answers
            raise

    async def publish(
        self, *, value: str, obtained_at: float, expires_at: float, scope: str | None
    ) -> SharedToken:
        async def shared() -> SharedToken:
            token = await self._shared.publish(
                value=value, obtained_at=obtained_at, expires_at=expires_at, scope=scope
            )
            self._local.install(token)
            return token

        async def local() -> SharedToken:
            token = self._alone = await self._local.publish(
                value=value, obtained_at=obtained_at, expires_at=expires_at, scope=scope
            )
            return token

        return await self._store.run(shared, local)

    async def drop(self, version: str) -> bool:
        async def shared() -> bool:
            dropped = await self._shared.drop(version)
            await self._local.drop(version)
            return dropped

        return await self._store.run(shared, lambda: self._local.drop(version))

    async def record_failure(self, failure: FetchFailure) -> None:
        async def shared() -> None:
            await self._shared.record_failure(failure)
            self._local.install_failure(failure)

        await self._store.run(shared, lambda: self._local.record_failure(failure))

    async def lock(self, ttl: float) -> str | None:
        async def shared() -> str | None:
            owner = await self._shared.lock(ttl)
            return None if owner is None else "r:" + owner

        async def local() -> str | None:
            owner = await self._local.lock(ttl)
            return None if owner is None else "m:" + owner

        return await self._store.run(shared, local)

    async def unlock(self, owner: str) -> bool:
        where, _, inner = owner.partition(":")
        if where == "m":
            return await self._local.unlock(inner)
        if not self._store.is_shared:
            return False  # Redis's lock expires by itself
        try:
            return await self._shared.unlock(inner)
        except StoreUnavailable as exc:
            self._store.failed(exc)
            return False

    async def wait_changed(self, generation: int) -> None:
        store = self._store
        if generation >> _EPOCH_SHIFT != store.epoch:
            return
        inner = generation & _INNER
        if store.is_shared:
            await store.until_switch(self._shared.wait_changed(inner))
        else:
            await store.until_switch(self._local.wait_changed(inner))

    async def remember_refusing(self, path: str, seconds: float) -> None:
        await self._local.remember_refusing(path, seconds)
        await self._store.run(lambda: self._shared.remember_refusing(path, seconds), _nothing)

    async def refuses(self, path: str) -> bool:
        return await self._store.run(
            lambda: self._shared.refuses(path), lambda: self._local.refuses(path)
        )


async def _nothing() -> None:
    return None
