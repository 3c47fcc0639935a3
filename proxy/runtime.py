"""The Runtime: every long-lived thing that Settings decides (route table, team keys, rate
limits, token sources, upstream transports, response cache, access line, shared store), built
in one place and closed in order. A request takes the current one at entry and keeps it to
its end; a reload builds the next one from the previous, which hands on what did not change."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import aiohttp

from proxy.access import AccessLog
from proxy.config import Credential, Settings, fingerprint
from proxy.egress import register_secrets as register_egress_secrets
from proxy.inbound import Gate
from proxy.log import redactor
from proxy.metrics import Metrics
from proxy.ratelimit import RateLimits
from proxy.routing import RouteTable
from proxy.store.base import Store
from proxy.store.build import build_store, same_store
from proxy.token_sources import build_token_source, identity_of, token_session, token_store
from proxy.tokens import TokenSource
from proxy.transport import Transports

if TYPE_CHECKING:
    from proxy.cache import ResponseCache

# How long a rate-limit slot may stay pending beyond the upstream timeouts before the store
# stops counting it (its holder died).
SLOT_HOLD_MARGIN = 5.0
# Builds the store a configuration asks for, not started.
StoreFactory = Callable[[Settings], Store]


def credential_key(credential: Credential) -> str:
    """The rate-limit key of a credential: its identity, so that every replica naming the same
    credential shares its limits and its 429 pause, whatever its name there."""
    return "credential:" + identity_of(credential).digest


T = TypeVar("T")


class _Shared(Generic[T]):
    """A resource that runtimes hand on across reloads: the old runtime still serves its last
    requests with it while the new one serves the next, and the last to let go closes it."""

    __slots__ = ("_close", "_users", "value")

    def __init__(self, value: T, close: Callable[[], Awaitable[None]]) -> None:
        self.value = value
        self._close = close
        self._users = 1

    def share(self) -> _Shared[T]:
        self._users += 1
        return self

    async def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            await self._close()


def _transport_options(settings: Settings) -> tuple[object, ...]:
    """What the transports are built from: when a reload leaves it as it was, the new runtime
    takes the old one's transports (and their pooled connections) over."""
    return (
        settings.upstream_client,
        settings.connect_timeout,
        settings.read_timeout,
        settings.max_connections,
        tuple(
            (r.prefix, r.ca_bundle, r.max_connections, settings.route_egress(r))
            for r in settings.routes
        ),
    )


class Runtime:
    """What serves requests for one configuration; `open` builds and starts it, `close`
    releases it: token sources, their session, the transport, the cache, the store, each
    closed by the last runtime that uses it."""

    def __init__(
        self,
        *,
        settings: Settings,
        metrics: Metrics,
        store: _Shared[Store],
        sources: Mapping[str, _Shared[TokenSource]],
        token_session: _Shared[aiohttp.ClientSession],
        transports: _Shared[Transports],
        config_hash: str,
        previous: Runtime | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store.value
        self.tokens: Mapping[str, TokenSource] = {
            name: shared.value for name, shared in sources.items()
        }
        # Names this configuration: /-/ready shows it, the reload line compares it.
        self.config_hash = config_hash
        self.routes = RouteTable(settings.routes)
        self.gate = Gate(settings.clients)
        self.limits = RateLimits(
            credentials={
                name: (credential.rate_limits, credential.rate_limit_max_wait)
                for name, credential in settings.credentials.items()
            },
            clients={
                client.name: (client.rate_limit, client.rate_limit_max_wait)
                for client in settings.clients
            },
            counters=self.store.counters,
            hold=settings.connect_timeout + settings.read_timeout + SLOT_HOLD_MARGIN,
            credential_keys={
                name: credential_key(credential)
                for name, credential in settings.credentials.items()
            },
        )
        self.access = AccessLog(
            enabled=settings.access_log,
            sample=settings.access_log_sample,
            debug=settings.log_level == "debug",
        )
        self._store = store
        self._sources = sources
        # None unless a route uses it: the request path's one check of a cache that is off.
        self.cache = cache
        self._token_session = token_session
        self._transports = transports
        self.transports = transports.value
        # Requests running on this runtime; once replaced, it closes when they are done.
        self._active = 0
        self._idle: asyncio.Event | None = None
        self._closed = False
        self._fresh: list[TokenSource] = []  # the token sources this runtime started

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        metrics: Metrics,
        store_factory: StoreFactory | None = None,
        token_metrics: bool = True,
        previous: Runtime | None = None,
        config_hash: str | None = None,
    ) -> Runtime:
        """Build everything Settings describes and start it (the token fetches begin), on
        the store `store_factory` builds from `settings` (None: build_store; a worker's is its
        relay). `token_metrics` False: another process exports the token metrics (a worker's
        supervisor). With `previous`, the runtime serving now, take over from it what did not
        change: the store when its settings are the same, the token session, the transport
        when its settings are the same, and the token source of each credential whose
        identity is the same (its token stays, and goes to a new store; a changed secret is
        used at its next fetch)."""
        for client in settings.clients:
            if client.key is not None:
                redactor.add_secret(client.key.get_secret_value())
        register_egress_secrets(settings)
        taken: list[_Shared[Any]] = []
        try:
            return await cls._open(
                settings,
                metrics=metrics,
                store_factory=store_factory,
                token_metrics=token_metrics,
                previous=previous,
                config_hash=config_hash or fingerprint(settings),
                taken=taken,
            )
        except BaseException:
            for shared in reversed(taken):
                with contextlib.suppress(Exception):
                    await shared.release()
            raise

    @classmethod
    async def _open(
        cls,
        settings: Settings,
        *,
        metrics: Metrics,
        store_factory: StoreFactory | None,
        token_metrics: bool,
        previous: Runtime | None,
        config_hash: str,
        taken: list[_Shared[Any]],
    ) -> Runtime:
        if previous is not None and same_store(previous.settings, settings):
            shared_store = previous._store.share()
        else:
            own_store = (store_factory or build_store)(settings)
            await own_store.start()
            shared_store = _Shared(own_store, own_store.close)
        taken.append(shared_store)
        if previous is not None and _transport_options(previous.settings) == _transport_options(
            settings
        ):
            shared_transports = previous._transports.share()
        else:
            transports = Transports.from_settings(settings)
            await transports.start()
            shared_transports = _Shared(transports, transports.close)
        taken.append(shared_transports)
        if previous is not None:
            shared_session = previous._token_session.share()
        else:
            session = token_session()
            shared_session = _Shared(session, session.close)
        taken.append(shared_session)
        sources: dict[str, _Shared[TokenSource]] = {}
        new: list[TokenSource] = []
        kept: list[tuple[TokenSource, Credential]] = []
        for name, credential in settings.credentials.items():
            shared = previous._kept_source(name, credential) if previous is not None else None
            if shared is not None:
                sources[name] = shared
                kept.append((shared.value, credential))
            else:
                source: TokenSource = build_token_source(
                    name,
                    credential,
                    settings=settings,
                    store=shared_store.value,
                    session=shared_session.value,
                    metrics=metrics if token_metrics else None,
                )
                sources[name] = _Shared(source, source.close)
                new.append(source)
            taken.append(sources[name])
        cache = None
        if any(settings.caches(route) for route in settings.routes):
            # Imported only when used: hishel's import costs a cache that is off nothing.
            from proxy.cache import ResponseCache  # noqa: PLC0415

            cache = ResponseCache.from_settings(settings, metrics=metrics, store=shared_store.value)
        runtime = cls(
            settings=settings,
            metrics=metrics,
            store=shared_store,
            sources=sources,
            token_session=shared_session,
            transports=shared_transports,
            config_hash=config_hash,
            previous=previous,
            cache=cache,
        )
        runtime._fresh = new
        # Only now that nothing can fail: the running runtime shares these sources.
        for source, credential in kept:
            source.use(
                credential,
                request_timeout=settings.token_timeout,
                wait_timeout=settings.token_wait_timeout,
                store=token_store(shared_store.value, credential),
            )
        for source in new:
            source.start()
        return runtime

    async def first_answers(self) -> None:
        """Wait until the token endpoint has answered each credential new in this runtime
        once (a token, or a refusal), for at most token_timeout: a reload that adds one
        switches once it has its token, so that its first requests do not wait for it."""
        if not self._fresh:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.token_timeout):
                await asyncio.gather(*(_first_answer(source) for source in self._fresh))

    def _kept_source(self, name: str, credential: Credential) -> _Shared[TokenSource] | None:
        """This runtime's token source of `name`, shared, when `credential` is the same one."""
        shared = self._sources.get(name)
        held = self.settings.credentials.get(name)
        if shared is None or held is None or identity_of(held) != identity_of(credential):
            return None
        return shared.share()

    def begin(self) -> None:
        """A request starts on this runtime."""
        self._active += 1

    def end(self) -> None:
        """A request that began on this runtime is done."""
        self._active -= 1
        if self._active == 0 and self._idle is not None:
            self._idle.set()

    async def drained(self) -> None:
        """Return once no request runs on this runtime (after it was replaced)."""
        if self._active:
            self._idle = asyncio.Event()
            await self._idle.wait()

    async def close(self) -> None:
        """Let go of the token sources, their session, the transports and the store: each is
        closed unless a newer runtime took it over. Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        for shared in self._sources.values():
            await shared.release()
        await self._token_session.release()
        await self._transports.release()
        if self.cache is not None:
            self.cache.close()
        await self._store.release()


async def _first_answer(source: TokenSource) -> None:
    while (status := source.status()).token is None and not status.failures:
        await source.wait_changed()
