"""The boundary to redis-py: every call bounded by redis_timeout, and its errors translated
through one table into StoreUnavailable with the cause kept."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.exceptions as redis_errors

from proxy.errors import StoreUnavailable
from proxy.log import redactor

T = TypeVar("T")

# Most specific first: AuthenticationError is a ConnectionError, for one.
_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (redis_errors.TimeoutError, "timeout"),
    (redis_errors.AuthenticationError, "auth"),
    (redis_errors.AuthorizationError, "auth"),
    (redis_errors.NoPermissionError, "auth"),
    (redis_errors.ConnectionError, "connection"),
    (redis_errors.ResponseError, "response"),
    (redis_errors.RedisError, "other"),
    (OSError, "connection"),
)


def translate(exc: BaseException, timeout: float) -> StoreUnavailable:
    """The StoreUnavailable an error of a Redis call becomes (raise it `from exc`)."""
    if isinstance(exc, TimeoutError):
        return StoreUnavailable(
            f"Redis gave no answer within {timeout:g} s (redis_timeout)", kind="timeout"
        )
    kind = next((kind for cls, kind in _KINDS if isinstance(exc, cls)), "other")
    # redis-py's messages name host and port, never the password; scrub all the same.
    return StoreUnavailable(redactor.scrub(f"{type(exc).__name__}: {exc}")[:300], kind=kind)


async def stop_task(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended (its outcome stays on it). Cancel again until
    it ends: on Python 3.11, asyncio.wait_for (which redis-py uses to send) loses a
    cancellation that arrives as its operation completes, and the task would go on."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)


# ASYNC109: this is where the bound is set; callers cannot tell its timeout from their own.
async def bounded(operation: Awaitable[T], timeout: float) -> T:  # noqa: ASYNC109
    """Await one Redis operation for at most `timeout` seconds; StoreUnavailable otherwise.
    A cancelled redis-py command disconnects its connection, so none is left half-read."""
    try:
        async with asyncio.timeout(timeout):
            result = await operation
    except (TimeoutError, redis_errors.RedisError, OSError) as exc:
        raise translate(exc, timeout) from exc
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        # Python 3.11's asyncio.wait_for, inside redis-py, can swallow a cancellation that
        # came as the reply did: the caller was cancelled, so it must not go on as if not.
        raise asyncio.CancelledError
    return result
