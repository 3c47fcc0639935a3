"""The cache step of the request path and the cache it works on: a fresh stored answer (this
process's, else one the replicas share) is given here, before the rate limit and the token
step; otherwise a Plan (plan.py) says how to ask upstream and relays the answer."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import hdrs, web
from multidict import CIMultiDictProxy, istr

from proxy.cache import policy
from proxy.cache.plan import BYPASS, HIT, MISS, Plan
from proxy.cache.policy import Asked, Entry, Primary
from proxy.cache.shared import pack, primary_name, shared_ttl, unpack, variant_name
from proxy.cache.storage import MemoryEntries
from proxy.config import Settings
from proxy.errors import NotCached
from proxy.metrics import Metrics
from proxy.routing import Match
from proxy.store.base import CredentialIdentity, ResponseStore, Store

_CACHED_METHODS = frozenset({"GET", "HEAD"})
_GET_ONLY = ("GET",)
_GET_THEN_HEAD = ("GET", "HEAD")
_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# The fields a stored answer gets (istr: added without folding their case each time).
_AGE, _X_CACHE, _X_REQUEST_ID = hdrs.AGE, istr("X-Cache"), istr("X-Request-ID")


class ResponseCache:
    """The response cache of one Runtime: which routes use it, each credential's key, the
    entries in memory and, with Redis, those the replicas share (`shared`, by credential),
    and the clock that ages them (epoch seconds, injectable)."""

    def __init__(
        self,
        *,
        routes: Iterable[str],
        credentials: Mapping[str, str],
        max_bytes: int,
        max_entry_bytes: int,
        metrics: Metrics,
        shared: Mapping[str, ResponseStore] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.routes = frozenset(routes)
        self.credentials = dict(credentials)
        self.shared = dict(shared or {})
        self._shared_by_key = {self.credentials[name]: s for name, s in self.shared.items()}
        self.max_entry_bytes = max_entry_bytes
        self.metrics = metrics
        self.clock = clock
        self.entries = MemoryEntries(max_bytes=max_bytes, on_evict=metrics.cache_evicted)
        self._sizes()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, metrics: Metrics, store: Store
    ) -> ResponseCache | None:
        """The cache that Settings describe, sharing its entries through `store` when that
        is Redis; None when no route uses it (the request path then checks one attribute and
        nothing more)."""
        routes = [route.prefix for route in settings.routes if settings.caches(route)]
        if not routes:
            return None
        credentials, shared = {}, {}
        for name, credential in settings.credentials.items():
            identity = CredentialIdentity.of(
                token_url=credential.token_url,
                client_id=credential.client_id,
                scope=credential.scope,
                extra_params=credential.extra_params,
                auth_method=credential.auth_method,
            )
            credentials[name] = identity.digest
            responses = store.responses(identity, credential.client_secret.get_secret_value())
            if responses is not None:
                shared[name] = responses
        return cls(
            routes=routes,
            credentials=credentials,
            max_bytes=settings.cache_max_bytes,
            max_entry_bytes=settings.cache_entry_limit,
            metrics=metrics,
            shared=shared,
        )

    async def look_up(self, request: web.BaseRequest, match: Match, *, request_id: str) -> Looked:
        """The cache step: the answer from the cache (this process's, else the replicas'
        shared one), a Plan for asking upstream, or None when the route does not use the
        cache."""
        route = match.route
        if route.prefix not in self.routes:
            return None
        method = request.method
        if method not in _CACHED_METHODS or request.body_exists:
            return Plan(self, match, BYPASS, request.headers, invalidates=method not in _SAFE)
        headers = request.headers
        asked = policy.asked(headers)
        if asked.no_store or not asked.evaluates:
            return Plan(self, match, BYPASS, headers)
        credential = self.credentials[route.credential]
        url = match.target
        now = self.clock()
        # A GET's answer answers a HEAD too (RFC 9110 §9.3.2), when it is fresh.
        primaries = _GET_ONLY if method == "GET" else _GET_THEN_HEAD
        entry = None
        entries = self.entries
        for looked_for in primaries:
            found = entries.find((credential, looked_for, url), headers)
            if found is not None:
                age = found.age(now)
                if asked.accepts_aged(found, age):
                    entries.touch(found)
                    self.metrics.cache_result(route.prefix, HIT)
                    return self.answer(request, found, asked, HIT, age=age, request_id=request_id)
            if looked_for == method:
                entry = found
        shared = self.shared.get(route.credential)
        # A request that asks for revalidation gets none from the replicas' copies either.
        if shared is not None and not asked.no_cache:
            for looked_for in primaries:
                primary = (credential, looked_for, url)
                found = await self._shared_find(shared, primary, headers, now)
                if found is None:
                    continue
                age = found.age(now)
                if asked.accepts_aged(found, age):
                    self.entries.put(found)
                    self._sizes()
                    self.metrics.cache_result(route.prefix, HIT)
                    return self.answer(request, found, asked, HIT, age=age, request_id=request_id)
                if looked_for == method and (entry is None or found.age(now) < entry.age(now)):
                    entry = found  # the one to revalidate: another replica's is younger
        if asked.only_if_cached:
            raise NotCached(
                "the request says only-if-cached and no fresh stored answer fits it; send it "
                "without that directive to ask upstream"
            )
        stale = entry
        if entry is not None and not entry.validated:
            # Without a validator it can never be used again: the answer will replace it.
            await self.forget(entry)
            stale = None
        return Plan(
            self, match, MISS, headers, primary=(credential, method, url), entry=stale, asked=asked
        )

    async def _shared_find(
        self, shared: ResponseStore, primary: Primary, headers: CIMultiDictProxy[str], now: float
    ) -> Entry | None:
        """The youngest variant the replicas share of `primary` that this request selects."""
        best = None
        for value in await shared.variants(primary_name(primary)):
            entry = unpack(primary, value, now=now)
            if entry is None or (entry.key and not entry.matches(headers)):
                continue
            if best is None or entry.age(now) < best.age(now):
                best = entry
        return best

    def answer(
        self,
        request: web.BaseRequest,
        entry: Entry,
        asked: Asked,
        label: str,
        *,
        age: float,
        request_id: str,
    ) -> web.Response:
        """An answer from `entry`: 304 when the client's own validators match it."""
        if asked.conditional and policy.not_modified(
            asked, status=entry.status, etag=entry.etag, last_modified=entry.last_modified
        ):
            fields = policy.not_modified_fields(entry.headers)
            fields += ((_AGE, str(int(age))), (_X_CACHE, label), (_X_REQUEST_ID, request_id))
            return web.Response(status=304, reason=entry.reason, headers=fields)
        head = request.method == "HEAD"
        response = web.Response(
            status=entry.status,
            reason=entry.reason,
            headers=entry.answer_fields,
            body=None if head else entry.body,
        )
        headers = response.headers
        headers.add(_AGE, str(int(age)))
        headers.add(_X_CACHE, label)
        headers.add(_X_REQUEST_ID, request_id)
        if head and policy.first(entry.headers, "content-length") is None:
            headers[hdrs.CONTENT_LENGTH] = str(len(entry.body))
        return response

    async def store(self, entry: Entry, *, replacing: Entry | None = None) -> None:
        """Keep `entry` in memory, in place of `replacing`, and share it with the replicas."""
        if replacing is not None:
            self.entries.remove(replacing)
        self.entries.put(entry)
        self._sizes()
        shared = self._shared_by_key.get(entry.primary[0])
        if shared is not None:
            if replacing is not None and replacing.key != entry.key:
                await shared.forget(primary_name(replacing.primary), variant_name(replacing))
            now = self.clock()
            ttl = shared_ttl(entry, now)
            if ttl > 0:
                name = primary_name(entry.primary)
                await shared.put(name, variant_name(entry), pack(entry, now=now), ttl=ttl)

    async def forget(self, entry: Entry) -> None:
        self.entries.remove(entry)
        self._sizes()
        shared = self._shared_by_key.get(entry.primary[0])
        if shared is not None:
            await shared.forget(primary_name(entry.primary), variant_name(entry))

    async def drop(self, credential: str, url: str) -> None:
        """Forget what is stored for `url` (an unsafe method succeeded there, RFC 9111 §4.4);
        other replicas' memory keeps its copies until they are stale."""
        primaries = [(credential, method, url) for method in _GET_THEN_HEAD]
        if sum(self.entries.drop(primary) for primary in primaries):
            self._sizes()
        shared = self._shared_by_key.get(credential)
        if shared is not None:
            for primary in primaries:
                await shared.forget(primary_name(primary))

    def state(self) -> dict[str, Any]:
        """What /-/ready shows of the cache."""
        return {
            "entries": len(self.entries),
            "bytes": self.entries.bytes,
            "max_bytes": self.entries.max_bytes,
            "shared": bool(self.shared),
        }

    def close(self) -> None:
        self.entries.clear()
        self._sizes()

    def _sizes(self) -> None:
        self.metrics.cache_size(entries=len(self.entries), held=self.entries.bytes)


Looked = web.Response | Plan | None
