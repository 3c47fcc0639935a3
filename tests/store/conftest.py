"""The store tests' helpers: a started RedisStore on a redis-server of the test's own (the
fixtures redis_server and redis_server_with_password, from tests/conftest.py), and a wait."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from proxy.store.redis import RedisStore
from proxy.store.redis_url import parse_redis_url
from tests.redis_server import RedisServer

__all__ = ["RedisServer", "redis_store", "wait_until"]

_prefixes = itertools.count(1)


@contextlib.asynccontextmanager
async def redis_store(
    url: str, *, prefix: str | None = None, timeout: float = 0.25
) -> AsyncIterator[RedisStore]:
    """A started RedisStore on `url`, closed at the end of the block."""
    store = RedisStore(
        parse_redis_url(url),
        timeout=timeout,
        prefix=prefix if prefix is not None else f"test{next(_prefixes)}:",
    )
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], *, timeout: float = 10.0
) -> None:
    """Wait until the condition (sync or async) holds, or fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
