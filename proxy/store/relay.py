"""The workers' relay, a worker's side: a token store whose changes are messages to the
supervisor, which runs the group's real store (relay_server.py), and whose reads answer from
the supervisor's last word, so that a worker runs the same TokenManager as a single process.

Every state the supervisor tells comes before its reply to the ask that caused it: a worker
that published a token reads it back. What a worker's requests learn of a path reaches the
supervisor as they learn it, ahead of the drop it may cause, and from there every other worker:
none can hold the next token before it knows why the last one was dropped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from proxy.errors import StoreUnavailable
from proxy.log import get_logger
from proxy.metrics import TokenFigures
from proxy.refusals import Refusal, RefusingPaths
from proxy.store import relay_wire as wire
from proxy.store.base import (
    Counters,
    CredentialIdentity,
    FetchFailure,
    ResponseStore,
    SharedToken,
    Store,
    TokenSnapshot,
)
from proxy.store.memory import MemoryStore

log = get_logger("proxy.workers")

# The supervisor answers at once; one that has not within this long is gone or stuck.
ASK_TIMEOUT = 10.0


class Relay:
    """A worker's end of the socketpair to its supervisor: asks go out, the supervisor's word
    on every credential comes in, and what it tells of the group besides (a reload, the reload
    metrics) goes to `on_group`. `lost` is set when the supervisor is gone."""

    def __init__(self, on_group: Callable[[wire.Message], None] | None = None) -> None:
        self._on_group = on_group
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tokens: dict[str, RelayTokens] = {}
        self._figures: dict[str, TokenFigures] = {}
        self._closing = False
        self.lost = asyncio.Event()

    async def connect(self, sock: socket.socket) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=wire.LINE_LIMIT)
        self._reader_task = asyncio.create_task(self._read(reader), name="supervisor-link")

    async def close(self) -> None:
        self._closing = True
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    def send(self, message: wire.Message) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(wire.encode(message))

    async def ask(self, message: wire.Message) -> Any:
        """Send `message` and return the supervisor's reply to it."""
        writer = self._writer
        if self.lost.is_set() or writer is None or writer.is_closing():
            raise StoreUnavailable("the supervisor is gone", kind="connection")
        ask_id = next(self._ids)
        reply = self._pending[ask_id] = asyncio.get_running_loop().create_future()
        self.send({**message, "id": ask_id})
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                return await reply
        except TimeoutError:
            raise StoreUnavailable(
                f"the supervisor gave no answer within {ASK_TIMEOUT:g} s", kind="timeout"
            ) from None
        finally:
            self._pending.pop(ask_id, None)

    def tokens(self, credential: str) -> RelayTokens:
        """The token store of one credential (by its identity's digest)."""
        tokens = self._tokens.get(credential)
        if tokens is None:
            tokens = self._tokens[credential] = RelayTokens(self, credential)
        return tokens

    def figures(self, credential: str) -> TokenFigures | None:
        """The group's token metrics of one credential, as the supervisor last told them."""
        return self._figures.get(credential)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                self._take(wire.decode(line))
        except (ConnectionError, ValueError, KeyError, TypeError) as exc:
            # The text of the exception could hold part of a message, a token: only its type.
            log.error("the link to the supervisor broke", error=type(exc).__name__)
        finally:
            gone = StoreUnavailable("the supervisor is gone", kind="connection")
            for reply in self._pending.values():
                if not reply.done():
                    reply.set_exception(gone)
            if not self._closing:
                log.warning("the supervisor is gone; this worker shuts down")
                self.lost.set()

    def _take(self, message: wire.Message) -> None:
        tell = message["tell"]
        if tell == "reply":
            reply = self._pending.get(int(message["id"]))
            if reply is not None and not reply.done():
                try:
                    reply.set_result(wire.read_reply(message))
                except StoreUnavailable as exc:
                    reply.set_exception(exc)
        elif tell == "state":
            self.tokens(str(message["credential"])).apply(wire.read_state(message))
        elif tell == "path":
            refusal = wire.read_refusal(message["refusal"])
            self.tokens(str(message["credential"])).learn(str(message["path"]), refusal)
        elif tell == "figures":
            self._figures[str(message["credential"])] = wire.read_figures(message)
        elif self._on_group is not None:
            self._on_group(message)


class RelayTokens:
    """One credential's token store in a worker (see TokenStore): the supervisor's state,
    and asks that change it."""

    def __init__(self, relay: Relay, credential: str) -> None:
        self._relay = relay
        self._credential = credential
        self._snapshot = TokenSnapshot(token=None, failure=None, generation=-1)
        self._changed = asyncio.Event()
        self.paths = RefusingPaths(clock=time.time, on_change=self._learnt)

    def apply(self, snapshot: TokenSnapshot) -> None:
        """Take the supervisor's word on this credential, unless a newer one is here."""
        if snapshot.generation <= self._snapshot.generation:
            return
        self._snapshot = snapshot
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def learn(self, path: str, refusal: Refusal | None) -> None:
        """Take in what another worker learnt of `path`."""
        if refusal is None:
            self.paths.forget(path)
        else:
            self.paths.learn(path, refusal)

    def _learnt(self, path: str, refusal: Refusal | None) -> None:
        self._relay.send(wire.path(self._credential, path, refusal))

    def current(self) -> TokenSnapshot:
        """As load(), without a wait."""
        snapshot = self._snapshot
        token = snapshot.token
        if token is not None and token.expires_at <= time.time():
            return replace(snapshot, token=None)
        return snapshot

    async def load(self) -> TokenSnapshot:
        return self.current()

    async def publish(
        self, *, value: str, obtained_at: float, expires_at: float, scope: str | None
    ) -> SharedToken:
        token = SharedToken(
            value=value, obtained_at=obtained_at, expires_at=expires_at, scope=scope
        )
        published = wire.read_token(await self._relay.ask(wire.publish(self._credential, token)))
        if published is None:
            raise StoreUnavailable("the supervisor published no token", kind="response")
        return published

    async def drop(self, version: str) -> bool:
        return bool(await self._relay.ask(wire.drop(self._credential, version)))

    async def record_failure(self, failure: FetchFailure) -> None:
        await self._relay.ask(wire.fail(self._credential, failure))

    async def lock(self, ttl: float) -> str | None:
        owner = await self._relay.ask(wire.lock(self._credential, ttl))
        return None if owner is None else str(owner)

    async def unlock(self, owner: str) -> bool:
        return bool(await self._relay.ask(wire.unlock(self._credential, owner)))

    async def wait_changed(self, generation: int) -> None:
        while self._snapshot.generation <= generation:
            await self._changed.wait()

    async def remember_refusing(self, path: str, seconds: float) -> None:
        """Nothing to send: the path's note went to the supervisor as `paths` learnt it."""

    async def refuses(self, path: str) -> bool:
        return self.paths.refuses(path)


class RelayStore:
    """A worker's store (see Store): token state through the relay; rate-limit counters,
    pauses and cached answers in `local`: this worker's own memory, where each worker applies
    its share of every limit, or Redis, where the workers share each limit whole."""

    backend = "relay"

    def __init__(self, relay: Relay, local: Store | None = None) -> None:
        self.relay = relay
        self._local: Store = local if local is not None else MemoryStore()

    async def start(self) -> None:
        await self._local.start()

    async def close(self) -> None:
        await self._local.close()

    def tokens(self, identity: CredentialIdentity, secret: str) -> RelayTokens:
        return self.relay.tokens(identity.digest)

    @property
    def counters(self) -> Counters:
        return self._local.counters

    def responses(self, identity: CredentialIdentity, secret: str) -> ResponseStore | None:
        """None in memory: each worker's response cache keeps its entries itself."""
        return self._local.responses(identity, secret)

    def state(self) -> dict[str, Any]:
        """Redis's state when the limits go through it (the tokens do too, by the supervisor)."""
        if self._local.backend == "memory":
            return {"backend": self.backend}
        return self._local.state()
