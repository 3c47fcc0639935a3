"""The workers' relay in one process: a supervisor's RelayServer on a memory store and workers'
Relays over real socketpairs. What one worker publishes, drops, locks or learns of a path is
what every worker reads, in an order that lets none act on a token before knowing why the
last one went."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import socket
import time
from collections.abc import AsyncIterator

import pytest

from proxy.refusals import Evidence
from proxy.store import CredentialIdentity, FetchFailure, MemoryStore, Store, StoreUnavailable
from proxy.store import relay_wire as wire
from proxy.store.relay import Relay, RelayTokens
from proxy.store.relay_server import RelayServer
from tests.conftest import LEAKS
from tests.store.conftest import RedisServer, redis_store, wait_until

SECRET = "Relay-Client-Secret-5be1"
IDENTITY = CredentialIdentity.of(token_url="https://oauth.example.test/token", client_id="rl")
DIGEST = IDENTITY.digest
PATH = "https://api.example.test/profile/user/wow"


class Group:
    """A supervisor's relay server and the relays of its workers, numbered from 1."""

    def __init__(self, store: Store | None = None) -> None:
        self.store = store if store is not None else MemoryStore()
        self.server = RelayServer(self.store, [(IDENTITY, SECRET)])
        self.relays: dict[int, Relay] = {}
        self._serving: dict[int, asyncio.Task[None]] = {}
        self._writers: list[asyncio.StreamWriter] = []

    async def add(self, index: int) -> RelayTokens:
        mine, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=mine, limit=wire.LINE_LIMIT)
        self._writers.append(writer)
        await self.server.attach(index, writer)
        self._serving[index] = asyncio.create_task(
            self.server.serve(index, reader, on_ready=lambda: None)
        )
        relay = self.relays[index] = Relay()
        await relay.connect(theirs)
        return relay.tokens(DIGEST)

    async def kill(self, index: int) -> None:
        """Worker `index` dies: its end of the socketpair closes."""
        await self.relays.pop(index).close()
        await self._serving.pop(index)

    def supervisor_gone(self) -> None:
        """The supervisor's ends of the socketpairs close."""
        for writer in self._writers:
            writer.close()

    async def close(self) -> None:
        for relay in self.relays.values():
            await relay.close()
        for task in self._serving.values():
            task.cancel()
        await asyncio.gather(*self._serving.values(), return_exceptions=True)
        for writer in self._writers:
            writer.close()
        await self.server.close()


@contextlib.asynccontextmanager
async def group(store: Store | None = None) -> AsyncIterator[Group]:
    made = Group(store)
    made.server.start()
    try:
        yield made
    finally:
        await made.close()


async def _publish(tokens: RelayTokens, label: str) -> str:
    value = f"relay-token-{label}-{time.monotonic_ns()}"
    LEAKS.tokens.add(value)
    now = time.time()
    published = await tokens.publish(value=value, obtained_at=now, expires_at=now + 60, scope=None)
    return published.version


async def test_a_published_token_is_read_back_at_once_and_reaches_every_worker() -> None:
    async with group() as workers:
        one, two = await workers.add(1), await workers.add(2)
        version = await _publish(one, "a")
        # The supervisor's state came before its reply: no stale read after a publish.
        token = (await one.load()).token
        assert token is not None
        assert token.version == version
        await wait_until(lambda: two.current().token is not None)
        assert two.current().token == token
        assert (await workers.store.tokens(IDENTITY, SECRET).load()).token == token
        three = await workers.add(3)  # a worker started late learns it on attaching
        await wait_until(lambda: three.current().token == token)


async def test_the_fetch_lock_has_one_owner_and_a_dead_workers_lock_is_freed() -> None:
    async with group() as workers:
        one, two = await workers.add(1), await workers.add(2)
        owner = await one.lock(30)
        assert owner is not None
        assert await two.lock(30) is None
        generation = two.current().generation
        await workers.kill(1)
        async with asyncio.timeout(5):
            await two.wait_changed(generation)  # woken at once, not when the ttl ends
        assert await two.lock(30) is not None


async def test_one_drop_wins_and_a_failure_is_every_workers() -> None:
    async with group() as workers:
        one, two = await workers.add(1), await workers.add(2)
        version = await _publish(one, "b")
        await wait_until(lambda: two.current().token is not None)
        assert await two.drop(version)
        assert not await one.drop(version)
        assert (await one.load()).token is None
        failure = FetchFailure(failures=2, error="temporarily_unavailable", retry_at=time.time())
        await two.record_failure(failure)
        await wait_until(lambda: one.current().failure == failure)


async def test_what_a_worker_learns_of_a_path_reaches_the_others_before_the_drop_it_causes() -> (
    None
):
    async with group() as workers:
        one, two = await workers.add(1), await workers.add(2)
        version = await _publish(one, "c")
        await wait_until(lambda: two.current().token is not None)
        generation = two.current().generation
        one.paths.dropped(PATH, obtained_at=time.time(), replayable=True)
        assert await one.drop(version)
        async with asyncio.timeout(5):
            await two.wait_changed(generation)
        known = two.paths.get(PATH)  # known by the time the drop is
        assert known is not None
        assert known.evidence is Evidence.REPLAYING
        group_memory = workers.store.tokens(IDENTITY, SECRET).paths
        assert group_memory.get(PATH) == known
        one.paths.replayed(PATH, rejected=False)  # the replay succeeded: a revocation
        await wait_until(lambda: two.paths.get(PATH) is None)
        one.paths.replayed(PATH, rejected=True)
        await wait_until(lambda: two.paths.refuses(PATH))
        assert await two.refuses(PATH)


async def test_the_groups_token_metrics_are_counted_once_and_told_to_every_worker() -> None:
    async with group() as workers:
        one = await workers.add(1)
        await workers.add(2)
        await _publish(one, "d")
        await one.record_failure(
            FetchFailure(failures=1, error="invalid_client", retry_at=time.time(), rejected=True)
        )
        for relay in workers.relays.values():
            told = {"success": 1, "rejected": 1}
            await wait_until(functools.partial(_told, relay, told))
            figures = relay.figures(DIGEST)
            assert figures is not None
            assert figures.failures == 1
            assert figures.expiry > time.time()


def _told(relay: Relay, fetches: dict[str, int]) -> bool:
    figures = relay.figures(DIGEST)
    return figures is not None and dict(figures.fetches) == fetches


async def test_an_ask_the_supervisor_cannot_answer_fails_at_once_as_store_unavailable() -> None:
    async with group() as workers:
        await workers.add(1)
        stranger = workers.relays[1].tokens("0" * 32)  # a credential the group does not have
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await stranger.lock(30)
        assert time.monotonic() - started < 1
        assert caught.value.kind == "response"
        workers.supervisor_gone()
        await asyncio.wait_for(workers.relays[1].lost.wait(), timeout=5)
        with pytest.raises(StoreUnavailable):
            await workers.relays[1].tokens(DIGEST).lock(30)


ADDED = CredentialIdentity.of(token_url="https://oauth.example.test/token", client_id="added")


async def test_a_reload_adds_a_credential_to_the_group_and_stops_serving_a_removed_one() -> None:
    """The supervisor's relay takes a reload's credentials: an added one's state reaches
    every worker unasked and it is served; one that stays keeps its token; a removed one is
    no longer served (a worker that still asks is told at once)."""
    async with group() as workers:
        one = await workers.add(1)
        await _publish(one, "e")
        workers.server.use([(IDENTITY, SECRET), (ADDED, SECRET)])
        added = workers.relays[1].tokens(ADDED.digest)
        await wait_until(lambda: added.current().generation >= 0)
        assert await added.lock(30) is not None
        assert (await one.load()).token is not None
        workers.server.use([(ADDED, SECRET)])
        with pytest.raises(StoreUnavailable):
            await one.lock(30)
        late = await workers.add(2)  # a worker started after the reload
        assert late.current().generation == -1  # told nothing of the removed credential
        await wait_until(lambda: workers.relays[2].tokens(ADDED.digest).current().generation >= 0)


async def test_a_reload_and_the_reload_metrics_reach_the_worker_as_told() -> None:
    """What the supervisor tells of the group besides tokens goes to the worker's handler,
    a reload's TOML table included (a date in it is sent as its text)."""
    told: list[wire.Message] = []
    mine, theirs = socket.socketpair()
    _, writer = await asyncio.open_unix_connection(sock=mine)
    relay = Relay(on_group=told.append)
    await relay.connect(theirs)
    try:
        table = {"routes": [{"prefix": "/"}], "since": datetime.date(2024, 5, 1)}
        writer.write(wire.encode(wire.reload("SIGHUP", table)))
        writer.write(wire.encode(wire.reloads({"success": 2.0, "failure": 1.0})))
        await wait_until(lambda: len(told) == 2)
        assert wire.read_reload(told[0]) == (
            "SIGHUP",
            {"routes": [{"prefix": "/"}], "since": "2024-05-01"},
        )
        assert wire.read_reloads(told[1]) == {"success": 2.0, "failure": 1.0}
    finally:
        await relay.close()
        writer.close()


async def test_a_new_secret_takes_the_groups_token_to_what_that_secret_reads_in_redis(
    redis_server: RedisServer,
) -> None:
    """Redis seals a token with a key from the secret: after a reload with a new secret, the
    supervisor's token store is the one that secret keys, holding the token the group had, so
    that a replica started with the new secret reads it instead of fetching its own, and the
    workers keep it."""
    new_secret = SECRET + "-rotated"
    async with redis_store(redis_server.url, prefix="rekey:") as store, group(store) as workers:
        one = await workers.add(1)
        await _publish(one, "before-rotation")
        held = (await one.load()).token
        assert held is not None
        async with redis_store(redis_server.url, prefix="rekey:") as replica:
            assert (await replica.tokens(IDENTITY, new_secret).load()).token is None
            workers.server.use([(IDENTITY, new_secret)])
            await workers.server.rekey([(IDENTITY, new_secret)])
            read = (await replica.tokens(IDENTITY, new_secret).load()).token
            assert read is not None
            assert read.value == held.value

        def moved() -> bool:
            token = one.current().token
            return token is not None and token.version != held.version

        await wait_until(moved)  # the workers are told of the token in its new store
        kept = one.current().token
        assert kept is not None
        assert kept.value == held.value
