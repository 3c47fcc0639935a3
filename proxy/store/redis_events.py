"""The Redis store's one pub/sub subscription: it wakes the token waiters of this process when
another replica changes a credential's state, and keeps the local copy of the 429 pauses that
requests read without a wait."""

from __future__ import annotations

import asyncio
import contextlib
import time

import redis.asyncio as aioredis

from proxy.errors import StoreUnavailable
from proxy.log import get_logger
from proxy.store.redis_calls import bounded, stop_task

log = get_logger("proxy.store")

# The listener's pause between attempts to subscribe again.
RESUBSCRIBE_DELAY = 1.0


class Events:
    """The store's one pub/sub subscription: wakes token waiters and keeps the local copy of
    pauses current. Messages: `t <digest>` (a credential's state changed) and
    `p <milliseconds left> <key>` (a pause)."""

    def __init__(self, client: aioredis.Redis, channel: str, *, timeout: float) -> None:
        self.channel = channel
        self._client = client
        self._timeout = timeout
        self._waiters: dict[str, asyncio.Event] = {}
        self.pauses: dict[str, float] = {}  # key -> monotonic end
        self.known: set[str] = set()  # pause keys read since the last (re)subscription
        # Pause keys kept current (name -> Redis key), and those to read (again) because they
        # are new or the subscription was lost, which is when a pause may have been missed.
        self._watched: dict[str, str] = {}
        self._unread: set[str] = set()
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="redis-store-events")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("a background task of the store had failed", error=repr(task.exception()))

    def watch(self, name: str, redis_key: str) -> None:
        """Keep the pause of `name` (stored at `redis_key`) in `pauses`: read once after each
        subscription, then from what is announced."""
        if name not in self._watched:
            self._watched[name] = redis_key
            self._unread.add(name)

    async def _read_pauses(self) -> None:
        names = sorted(self._unread)
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.pttl(self._watched[name])
        try:
            lefts = await bounded(pipe.execute(), self._timeout)
        except StoreUnavailable:
            return  # read on the next round
        now = time.monotonic()
        for name, left in zip(names, lefts, strict=True):
            if int(left) > 0:
                self.pauses[name] = max(now + int(left) / 1000, self.pauses.get(name, 0.0))
            self.known.add(name)
            self._unread.discard(name)

    def waiter(self, digest: str) -> asyncio.Event:
        event = self._waiters.get(digest)
        if event is None:
            event = self._waiters[digest] = asyncio.Event()
        return event

    def _wake(self, digest: str) -> None:
        event = self._waiters.pop(digest, None)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for event in waiters.values():
            event.set()

    def _apply(self, data: bytes) -> None:
        kind, _, rest = data.partition(b" ")
        if kind == b"t":
            self._wake(rest.decode())
        elif kind == b"p":
            left, _, key = rest.partition(b" ")
            if not left.isdigit():
                return
            name = key.decode()
            until = time.monotonic() + int(left) / 1000
            self.pauses[name] = max(until, self.pauses.get(name, 0.0))
            self.known.add(name)

    async def _listen(self) -> None:
        while True:
            pubsub = self._client.pubsub()
            try:
                await bounded(pubsub.subscribe(self.channel), self._timeout)
                # Whatever was said while we were not listening is lost: read again.
                self.known.clear()
                self._unread.update(self._watched)
                self.subscribed.set()
                self._wake_all()
                while True:
                    if self._unread:
                        await self._read_pauses()
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._apply(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the listener must outlive any error of Redis
                log.debug("redis store: subscription lost", error=type(exc).__name__)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(Exception):
                    await bounded(pubsub.aclose(), self._timeout)  # type: ignore[no-untyped-call]  # unannotated upstream
            self._wake_all()
            await asyncio.sleep(RESUBSCRIBE_DELAY)
