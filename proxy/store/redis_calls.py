"""The boundary to redis-py: every call bounded by redis_timeout, and its errors translated
through one table into StoreUnavailable with the cause kept; and the client and connections
that the request path's rate-limit scripts go through (`lean_client`, `Connections`)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection

from proxy.errors import StoreUnavailable
from proxy.log import redactor
from proxy.store.redis_url import RedisTarget

try:  # the redis[hiredis] extra; redis-py then reads replies with it too
    import hiredis
except ImportError:  # pragma: no cover - installed with token-proxy
    hiredis = None  # type: ignore[assignment]

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


def lean_client(target: RedisTarget, *, timeout: float) -> aioredis.Redis:
    """redis-py's asyncio client for the calls on every request's path (two rate-limit scripts
    a request), set up to spend the least CPU on each (bench/redis_client_cost.py measures it):

    - no socket_timeout: every call is bounded by `bounded` already, and with one redis-py
      wraps each write in asyncio.wait_for (a new task each on Python 3.11) and each read in
      a timeout of its own, a tenth of a command's cost; connecting keeps its timeout;
    - commands packed by hiredis, as redis-py's sync client does and its asyncio client does
      not yet (redis-py issue #4176): a fifth of a command's cost, in Python;
    - replies read by hiredis, which redis-py picks by itself when it is installed.

    A cancelled command still disconnects its connection (redis-py does that on any
    interruption of a read or write), so none goes back to the pool half-read."""
    client = aioredis.Redis(**{**target.client_kwargs(timeout=timeout), "socket_timeout": None})
    if hiredis is not None:
        pool = client.connection_pool
        # The pool's class is the one for the URL (TCP, TLS or unix): pack with hiredis in it.
        pool.connection_class = _packing_with_hiredis(pool.connection_class)
    return client


def _packing_with_hiredis(base: type[AbstractConnection]) -> type[AbstractConnection]:
    class HiredisPacking(base):  # type: ignore[valid-type,misc]  # a class chosen at run time
        def pack_command(self, *args: Any) -> list[bytes]:
            # Multi-word command names ("SCRIPT LOAD") are sent as words, as redis-py does.
            first = args[0]
            if (isinstance(first, str) and " " in first) or (
                isinstance(first, bytes) and b" " in first
            ):
                args = (*first.split(), *args[1:])
            try:
                return [hiredis.pack_command(args)]
            except TypeError:  # None, a bool: redis-py's own packing says what is wrong
                packed: list[bytes] = super().pack_command(*args)
                return packed

    HiredisPacking.__name__ = HiredisPacking.__qualname__ = f"HiredisPacking{base.__name__}"
    return HiredisPacking


class Connections:
    """The connections of `client`'s pool that the rate-limit scripts run on, kept checked out
    in a list of their own: taking one and giving it back costs a list pop and append, where
    the pool's get_connection and release take its lock, record metrics and dispatch events,
    a third of an EVALSHA's CPU (bench/redis_client_cost.py, pool-get-release).

    What the pool checks is checked here too: a connection is reconnected when it lost its
    socket (redis-py drops it on any interrupted read or write) or has bytes unread. Beyond
    the pool's max_connections a caller waits for one to be given back, first come first
    served, rather than failing. The client's aclose disconnects them all (checked out, they
    are still the pool's)."""

    __slots__ = ("_count", "_idle", "_limit", "_pool", "_waiters")

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._limit = max(1, int(self._pool.max_connections))
        self._idle: list[AbstractConnection] = []
        self._count = 0
        self._waiters: collections.deque[asyncio.Future[AbstractConnection]] = collections.deque()

    async def take(self) -> AbstractConnection:
        """A connected connection of this list's, to `give` back once its reply is read."""
        if self._idle:
            connection = self._idle.pop()
        elif self._count < self._limit:
            self._count += 1
            try:
                # The pool's own way of making and connecting one.
                made: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            except BaseException:
                self._count -= 1
                raise
            return made
        else:
            connection = await self._wait()
        try:
            if connection.is_connected and not await connection.can_read():
                return connection
        except (redis_errors.ConnectionError, OSError):
            pass  # its socket is gone: the pool's check below connects it again
        try:
            await self._pool.ensure_connection(connection)
        except BaseException:
            self.give(connection)
            raise
        return connection

    async def _wait(self) -> AbstractConnection:
        waiter: asyncio.Future[AbstractConnection] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give(waiter.result())  # handed over as this caller gave up
            else:
                self._waiters.remove(waiter)
            raise

    def give(self, connection: AbstractConnection) -> None:
        """Give back a connection that `take` gave, whatever became of its command."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self._idle.append(connection)


class _Bound:
    __slots__ = ("deadline", "expired", "finished", "task")

    def __init__(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.expired = False
        self.finished = False


# A timer that fires this much before a deadline ends the calls due then (asyncio's loop runs
# a timer up to its clock resolution early, uvloop's rounds to milliseconds).
_EARLY = 0.001


class Deadlines:
    """`bounded` for the calls on every request's path, all with the same timeout: one timer
    for every call in flight instead of an asyncio.timeout each (whose timer handle costs a
    fifth of an EVALSHA's CPU on uvloop). The same timeout for all puts their deadlines in the
    order they started, so the timer is armed for the oldest call not yet finished and, when
    it fires, cancels those overdue and arms again; a call never waits past its own deadline.
    A cancellation of its own is told from the caller's as asyncio.timeout tells them."""

    __slots__ = ("_loop", "_queue", "_timer", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._queue: collections.deque[_Bound] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, operation: Awaitable[T]) -> T:
        """Await `operation` for at most `timeout` seconds; StoreUnavailable otherwise."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - redis-py runs in tasks only
            return await bounded(operation, self.timeout)
        cancelling = task.cancelling()
        bound = self._enter(task)
        try:
            result = await operation
        except asyncio.CancelledError:
            if bound.expired and task.uncancel() <= cancelling:
                raise translate(TimeoutError(), self.timeout) from None
            raise
        except (TimeoutError, redis_errors.RedisError, OSError) as exc:
            if bound.expired:
                task.uncancel()  # what its cancellation became is the error here
            raise translate(exc, self.timeout) from exc
        finally:
            bound.finished = True
        if bound.expired:
            task.uncancel()  # the reply came as the deadline did, and was kept
        if task.cancelling():
            # As in `bounded`: a cancellation that redis-py's wait_for swallowed still counts.
            raise asyncio.CancelledError
        return result

    def _enter(self, task: asyncio.Task[Any]) -> _Bound:
        loop = task.get_loop()
        if loop is not self._loop:  # a new event loop (tests run one each): start afresh
            self._loop, self._queue, self._timer = loop, collections.deque(), None
        bound = _Bound(task, loop.time() + self.timeout)
        self._queue.append(bound)
        if self._timer is None:
            self._timer = loop.call_at(bound.deadline - _EARLY, self._fire)
        return bound

    def _fire(self) -> None:
        self._timer = None
        loop, queue = self._loop, self._queue
        if loop is None:  # pragma: no cover - armed only once a loop is known
            return
        now = loop.time() + _EARLY
        while queue:
            head = queue[0]
            if not head.finished:
                if head.deadline > now:
                    self._timer = loop.call_at(head.deadline - _EARLY, self._fire)
                    return
                head.expired = True
                head.task.cancel()
            queue.popleft()
