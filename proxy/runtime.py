"""The Runtime: every long-lived thing that Settings decides (route table, team keys, rate
limits, token sources, upstream transports, response cache, access line, shared store), built
in one place and closed in order. A request takes the current one at entry and keeps it to
its end."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import aiohttp

from proxy.access import AccessLog
from proxy.config import Credential, Settings
from proxy.credentials import TokenManager, TokenSource
from proxy.inbound import Gate
from proxy.log import redactor
from proxy.metrics import Metrics
from proxy.ratelimit import RateLimits
from proxy.routing import RouteTable
from proxy.store.base import Store
from proxy.store.memory import MemoryStore
from proxy.transport import Transports

if TYPE_CHECKING:
    from proxy.cache import ResponseCache

# Builds the token source of one credential; None: a TokenManager fetching tokens itself.
TokenSourceFactory = Callable[[str, Credential], TokenSource]
# How long a rate-limit slot may stay pending beyond the upstream timeouts before the store
# stops counting it (its holder died).
SLOT_HOLD_MARGIN = 5.0


class Runtime:
    """What serves requests for one configuration; `open` builds and starts it, `close`
    releases it: token sources, their session, the transport, the cache, the store."""

    def __init__(
        self,
        *,
        settings: Settings,
        metrics: Metrics,
        store: Store,
        tokens: Mapping[str, TokenSource],
        token_session: aiohttp.ClientSession | None,
        transports: Transports,
        cache: ResponseCache | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.tokens = tokens
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
            counters=store.counters,
            hold=settings.connect_timeout + settings.read_timeout + SLOT_HOLD_MARGIN,
        )
        self.access = AccessLog(
            enabled=settings.access_log,
            sample=settings.access_log_sample,
            debug=settings.log_level == "debug",
        )
        self.transports = transports
        # None unless a route uses it: the request path's one check of a cache that is off.
        self.cache = cache
        self._token_session = token_session

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        metrics: Metrics,
        token_sources: TokenSourceFactory | None = None,
        store: Store | None = None,
    ) -> Runtime:
        """Build everything Settings describes and start it (the token fetches begin)."""
        for client in settings.clients:
            if client.key is not None:
                redactor.add_secret(client.key.get_secret_value())
        store = store if store is not None else MemoryStore()
        await store.start()
        transports = Transports.from_settings(settings)
        await transports.start()
        session = None
        if token_sources is None:
            # Token traffic has a session of its own so it never queues behind upstream
            # connections.
            session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, raise_for_status=False
            )
            own_session = session

            def token_sources(name: str, credential: Credential) -> TokenSource:
                return TokenManager(
                    name=name,
                    credential=credential,
                    session=own_session,
                    metrics=metrics,
                    request_timeout=settings.token_timeout,
                    wait_timeout=settings.token_wait_timeout,
                )

        tokens = {
            name: token_sources(name, credential)
            for name, credential in settings.credentials.items()
        }
        cache = None
        if any(settings.caches(route) for route in settings.routes):
            # Imported only when used: hishel's import costs a cache that is off nothing.
            from proxy.cache import ResponseCache  # noqa: PLC0415

            cache = ResponseCache.from_settings(settings, metrics=metrics, store=store)
        runtime = cls(
            settings=settings,
            metrics=metrics,
            store=store,
            tokens=tokens,
            token_session=session,
            transports=transports,
            cache=cache,
        )
        for source in tokens.values():
            source.start()
        return runtime

    async def close(self) -> None:
        """Stop the token sources, then close their session, the transports, the cache and
        the store."""
        for source in self.tokens.values():
            await source.close()
        if self._token_session is not None:
            await self._token_session.close()
        await self.transports.close()
        if self.cache is not None:
            self.cache.close()
        await self.store.close()


class Current:
    """The runtime that new requests start on; a reload replaces it with one assignment, and
    requests already running keep the one they took."""

    __slots__ = ("_runtime",)

    def __init__(self) -> None:
        self._runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        runtime = self._runtime
        if runtime is None:
            raise RuntimeError("the application has not started: it has no runtime yet")
        return runtime

    @runtime.setter
    def runtime(self, runtime: Runtime) -> None:
        self._runtime = runtime
