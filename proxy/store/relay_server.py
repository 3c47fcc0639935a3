"""The workers' relay, the supervisor's side: runs the group's real token store on behalf of
every worker (relay.py), tells each the state of every credential and what the others learnt of
paths, frees the fetch lock of a worker that died, and counts the group's token metrics (the
workers' own prometheus-client files would give each its own gauge)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from proxy.errors import StoreUnavailable
from proxy.log import get_logger, redactor
from proxy.metrics import TokenFigures
from proxy.store import relay_wire as wire
from proxy.store.base import CredentialIdentity, Store, TokenStore

log = get_logger("proxy.workers")


@dataclass
class _Figures:
    """The group's token metrics of one credential."""

    fetches: Counter[str] = field(default_factory=Counter)
    expiry: float = 0.0
    failures: float = 0.0

    def told(self) -> TokenFigures:
        return TokenFigures(fetches=dict(self.fetches), expiry=self.expiry, failures=self.failures)


@dataclass
class _Worker:
    writer: asyncio.StreamWriter
    # The fetch locks it holds: (credential, owner).
    owners: set[tuple[str, str]] = field(default_factory=set)


class RelayServer:
    """The group's token store of every credential (identity and secret), served to the
    workers over their socketpairs; `use` changes the credentials when the group reloads."""

    def __init__(self, store: Store, credentials: Iterable[tuple[CredentialIdentity, str]]) -> None:
        self._store = store
        self._tokens: dict[str, TokenStore] = {}
        self._figures: dict[str, _Figures] = {}
        self._workers: dict[int, _Worker] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._stopped: set[asyncio.Task[None]] = set()
        self._started = False
        self.use(credentials)

    def start(self) -> None:
        """Watch every credential's state, for changes that did not come through a worker."""
        self._started = True
        for digest in self._tokens:
            self._start_watching(digest)

    async def rekey(self, credentials: Iterable[tuple[CredentialIdentity, str]]) -> None:
        """After a reload: a credential that stays with a new secret gets the token store that
        secret keys (a shared store seals its token with it; memory's is the same one), and
        the token in hand goes there, unless that store holds one already, so that the
        group's token stays readable to replicas that have the new secret too."""
        for identity, secret in credentials:
            digest = identity.digest
            known = self._tokens.get(digest)
            tokens = self._store.tokens(identity, secret)
            if known is None or known is tokens:
                continue
            with contextlib.suppress(StoreUnavailable):
                held = (await known.load()).token
                if held is not None and (await tokens.load()).token is None:
                    await tokens.publish(
                        value=held.value,
                        obtained_at=held.obtained_at,
                        expires_at=held.expires_at,
                        scope=held.scope,
                    )
            self._tokens[digest] = tokens
            self._stop_watching(digest)
            if self._started:
                self._start_watching(digest)

    def use(self, credentials: Iterable[tuple[CredentialIdentity, str]]) -> None:
        """The group's credentials from now on (a reload): a new one is served, and its state
        told to every worker; one no longer configured is no longer watched, nor served to
        a worker that still asks (its reload is on its way). One that stays keeps its state
        (see rekey for a new secret)."""
        wanted = {identity.digest: (identity, secret) for identity, secret in credentials}
        for digest in [digest for digest in self._tokens if digest not in wanted]:
            del self._tokens[digest], self._figures[digest]
            self._stop_watching(digest)
        for digest, (identity, secret) in wanted.items():
            if digest not in self._tokens:
                self._tokens[digest] = self._store.tokens(identity, secret)
                self._figures[digest] = _Figures()
                if self._started:
                    self._start_watching(digest)

    def _stop_watching(self, digest: str) -> None:
        watcher = self._watchers.pop(digest, None)
        if watcher is not None:
            watcher.cancel()
            self._stopped.add(watcher)
            watcher.add_done_callback(self._stopped.discard)

    def _start_watching(self, digest: str) -> None:
        self._watchers[digest] = asyncio.create_task(
            self._watch(digest), name=f"relay-watch:{digest[:8]}"
        )

    async def close(self) -> None:
        watchers = [*self._watchers.values(), *self._stopped]
        self._watchers.clear()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    async def attach(self, index: int, writer: asyncio.StreamWriter) -> None:
        """Worker `index` is connected on `writer`: tell it everything it needs to start."""
        self._workers[index] = _Worker(writer)
        for digest, tokens in list(self._tokens.items()):
            figures = self._figures[digest].told()
            writer.write(wire.encode(wire.state(digest, await tokens.load())))
            for path, refusal in tokens.paths.items():
                writer.write(wire.encode(wire.path_known(digest, path, refusal)))
            writer.write(wire.encode(wire.figures(digest, figures)))

    async def serve(
        self, index: int, reader: asyncio.StreamReader, *, on_ready: Callable[[], None]
    ) -> None:
        """Answer worker `index` until its end closes; then free the locks it held."""
        try:
            with contextlib.suppress(ConnectionError):
                while line := await reader.readline():
                    try:
                        message = wire.decode(line)
                        if message.get("ask") == "ready":
                            on_ready()
                        else:
                            await self._answer(index, message)
                    except (ValueError, KeyError, TypeError) as exc:
                        log.error(
                            "worker sent a message not understood",
                            worker=index,
                            error=type(exc).__name__,
                        )
        finally:
            worker = self._workers.pop(index, None)
            for digest, owner in worker.owners if worker is not None else ():
                tokens = self._tokens.get(digest)
                with contextlib.suppress(StoreUnavailable):
                    if tokens is not None and await tokens.unlock(owner):
                        await self._broadcast(digest, tokens)

    async def _answer(self, index: int, message: wire.Message) -> None:
        ask, digest = message["ask"], str(message["credential"])
        tokens, worker = self._tokens.get(digest), self._workers.get(index)
        if worker is None:
            return
        try:
            if tokens is None:
                raise StoreUnavailable("no such credential in the group", kind="response")
            if ask == "path":
                await self._path(index, digest, tokens, message)
            else:
                await self._change(worker, digest, tokens, message)
        except StoreUnavailable as exc:
            if "id" in message:
                worker.writer.write(wire.encode(wire.unavailable(int(message["id"]), exc)))

    async def _change(
        self, worker: _Worker, digest: str, tokens: TokenStore, message: wire.Message
    ) -> None:
        """An ask that may change the credential's state, answered once every worker has
        been told the new state."""
        ask = message["ask"]
        value: object = None
        if ask == "lock":
            value = await tokens.lock(float(message["ttl"]))
            if value is not None:
                worker.owners.add((digest, str(value)))
        elif ask == "unlock":
            owner = str(message["owner"])
            worker.owners.discard((digest, owner))
            value = await tokens.unlock(owner)
        elif ask == "publish":
            sent = wire.read_token(message["token"])
            if sent is None:
                raise TypeError("a publish without a token")
            redactor.add_token(sent.value)
            published = await tokens.publish(
                value=sent.value,
                obtained_at=sent.obtained_at,
                expires_at=sent.expires_at,
                scope=sent.scope,
            )
            value = wire.token_value(published)
            self._count(digest, "success", expiry=published.expires_at, failures=0)
        elif ask == "drop":
            value = await tokens.drop(str(message["version"]))
        elif ask == "fail":
            failure = wire.read_failure(message["failure"])
            if failure is None:
                raise TypeError("a failure report without a failure")
            await tokens.record_failure(failure)
            outcome = "rejected" if failure.rejected else "error"
            self._count(digest, outcome, failures=failure.failures)
        else:
            raise KeyError(ask)
        # The new state goes out before the reply, so the asking worker reads it back.
        await self._broadcast(digest, tokens)
        worker.writer.write(wire.encode(wire.reply(int(message["id"]), value)))

    async def _path(
        self, index: int, digest: str, tokens: TokenStore, message: wire.Message
    ) -> None:
        """What worker `index` learnt of a path: the group's memory takes it in, and every
        other worker hears of it."""
        path, refusal = str(message["path"]), wire.read_refusal(message["refusal"])
        line = wire.encode(wire.path_known(digest, path, refusal))
        for other, worker in self._workers.items():
            if other != index and not worker.writer.is_closing():
                worker.writer.write(line)
        if refusal is None:
            tokens.paths.forget(path)
            return
        tokens.paths.learn(path, refusal)
        if tokens.paths.refuses(path):
            await tokens.remember_refusing(path, refusal.until - time.time())

    def _count(
        self, digest: str, outcome: str, *, failures: int, expiry: float | None = None
    ) -> None:
        figures = self._figures.get(digest)
        if figures is None:
            return  # a reload removed it meanwhile
        figures.fetches[outcome] += 1
        figures.failures = failures
        if expiry is not None:
            figures.expiry = expiry
        line = wire.encode(wire.figures(digest, figures.told()))
        for worker in self._workers.values():
            if not worker.writer.is_closing():
                worker.writer.write(line)

    async def _broadcast(self, digest: str, tokens: TokenStore) -> int:
        """Tell every worker the state of `digest` (in `tokens`) now; returns its generation."""
        snapshot = await tokens.load()
        line = wire.encode(wire.state(digest, snapshot))
        for worker in self._workers.values():
            if not worker.writer.is_closing():
                worker.writer.write(line)
        return snapshot.generation

    async def _watch(self, digest: str) -> None:
        tokens = self._tokens[digest]
        while True:
            generation = await self._broadcast(digest, tokens)
            await tokens.wait_changed(generation)
