"""The cache step of the request path: a fresh stored answer is given here, before the rate
limit and the token step; otherwise a Plan says how to ask upstream (plainly, or to revalidate
a stale entry) and relays the answer, storing it once its body has arrived whole."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.bodies import Relayed, relay
from proxy.cache import policy
from proxy.cache.policy import Asked, Entry, Primary
from proxy.cache.shared import pack, primary_name, shared_ttl, unpack, variant_name
from proxy.cache.storage import MemoryEntries
from proxy.config import Settings
from proxy.errors import NotCached, UpstreamError
from proxy.headers import Headers, response_fields
from proxy.log import get_logger
from proxy.metrics import Metrics
from proxy.routing import Match
from proxy.store.base import CredentialIdentity, ResponseStore, Store
from proxy.transport import UpstreamResponse

log = get_logger("proxy.cache")

HIT, REVALIDATED, MISS, BYPASS = "HIT", "REVALIDATED", "MISS", "BYPASS"
_CACHED_METHODS = frozenset({"GET", "HEAD"})
_GET_ONLY = ("GET",)
_GET_THEN_HEAD = ("GET", "HEAD")
_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# The client's validators: a look-up asks upstream for the whole answer instead, to store it,
# and evaluates them itself.
_CLIENT_VALIDATORS = frozenset({"if-none-match", "if-modified-since"})


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

    async def look_up(self, request: web.Request, match: Match, *, request_id: str) -> Looked:
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
        for looked_for in primaries:
            found = self.entries.find((credential, looked_for, url), headers)
            if found is not None and asked.accepts(found, now):
                self.entries.touch(found)
                return self._hit(
                    request, found, asked, now, route=route.prefix, request_id=request_id
                )
            if looked_for == method:
                entry = found
        shared = self.shared.get(route.credential)
        if shared is not None:
            for looked_for in primaries:
                primary = (credential, looked_for, url)
                found = await self._shared_find(shared, primary, headers, now)
                if found is None:
                    continue
                self.entries.put(found)
                self._sizes()
                if asked.accepts(found, now):
                    return self._hit(
                        request, found, asked, now, route=route.prefix, request_id=request_id
                    )
                if looked_for == method and (entry is None or found.age(now) < entry.age(now)):
                    entry = found
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

    def _hit(
        self,
        request: web.Request,
        entry: Entry,
        asked: Asked,
        now: float,
        *,
        route: str,
        request_id: str,
    ) -> web.Response:
        self.metrics.cache_result(route, HIT)
        return self.answer(request, entry, asked, HIT, age=entry.age(now), request_id=request_id)

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
        request: web.Request,
        entry: Entry,
        asked: Asked,
        label: str,
        *,
        age: float,
        request_id: str,
    ) -> web.Response:
        """An answer from `entry`: 304 when the client's own validators match it."""
        status = entry.status
        if asked.conditional and policy.not_modified(
            asked, status=status, etag=entry.etag, last_modified=entry.last_modified
        ):
            status = 304
            headers = policy.not_modified_fields(entry.headers)
        else:
            headers = list(entry.headers)
        headers += (("Age", str(int(age))), ("X-Cache", label), ("X-Request-ID", request_id))
        if status == 304 or request.method == "HEAD":
            response = web.Response(status=status, reason=entry.reason, headers=headers)
            if status != 304 and policy.first(entry.headers, "content-length") is None:
                response.headers["Content-Length"] = str(len(entry.body))
            return response
        return web.Response(status=status, reason=entry.reason, headers=headers, body=entry.body)

    async def store(self, entry: Entry, *, replacing: Entry | None = None) -> None:
        """Keep `entry` in memory and share it with the replicas."""
        if replacing is not None:
            self.entries.remove(replacing)
        self.entries.put(entry)
        self._sizes()
        shared = self._shared_by_key.get(entry.primary[0])
        if shared is not None:
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


class Collected:
    """The body of an answer being stored, gathered as it is relayed; given up once it
    exceeds the largest entry."""

    __slots__ = ("chunks", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] | None = []
        self.limit = limit
        self.size = 0

    def add(self, chunk: bytes) -> None:
        if self.chunks is None:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.chunks = None
        else:
            self.chunks.append(chunk)

    def body(self) -> bytes | None:
        return None if self.chunks is None else b"".join(self.chunks)


class Plan:
    """How one request on a cached route goes upstream and how its answer comes back: BYPASS
    (relayed as it is, with an unsafe method's success forgetting the URL), or MISS with the
    entry to revalidate, if any."""

    __slots__ = (
        "asked",
        "cache",
        "entry",
        "headers",
        "invalidates",
        "label",
        "match",
        "primary",
        "request_time",
    )

    def __init__(
        self,
        cache: ResponseCache,
        match: Match,
        label: str,
        headers: CIMultiDictProxy[str],
        *,
        primary: Primary | None = None,
        entry: Entry | None = None,
        asked: Asked = policy.PLAIN,
        invalidates: bool = False,
    ) -> None:
        self.cache = cache
        self.match = match
        self.label = label
        self.headers = headers
        self.primary = primary
        self.entry = entry
        self.asked = asked
        self.invalidates = invalidates
        self.request_time = cache.clock()

    def upstream_items(self) -> Collection[tuple[str, str]]:
        """The client's headers as the send step takes them: for a look-up, without the
        client's validators and with the stale entry's."""
        if self.primary is None:
            return self.headers.items()
        items = [(k, v) for k, v in self.headers.items() if k.lower() not in _CLIENT_VALIDATORS]
        if self.entry is not None:
            items += policy.validators(self.entry)
        return items

    async def relay(
        self, request: web.Request, response: UpstreamResponse, *, request_id: str
    ) -> Relayed:
        """The relay step on a cached route: an entry refreshed by a 304 answers the client;
        anything else is relayed with X-Cache, and stored once it has arrived whole."""
        cache, prefix = self.cache, self.match.route.prefix
        primary = self.primary
        if primary is None:
            if self.invalidates and response.status < 400:
                await cache.drop(cache.credentials[self.match.route.credential], self.match.target)
            cache.metrics.cache_result(prefix, BYPASS)
            return await relay(request, response, request_id=request_id, extra=[_x(BYPASS)])
        response_time = cache.clock()
        fields = response_fields(response.header_items)
        entry = self.entry
        if entry is not None and response.status == 304:
            with contextlib.closing(response):
                return await self._refreshed(request, entry, fields, response_time, request_id)
        if entry is not None and response.status < 500:
            await cache.forget(entry)  # a full answer replaces it (RFC 9111 §4.3.3)
        pending = self._pending(primary, response, fields, response_time)
        label = MISS if pending is not None else BYPASS
        cache.metrics.cache_result(prefix, label)
        asked = self.asked
        if asked.conditional and response.status == 200 and _matches(fields, asked):
            return await self._not_modified(request, response, fields, pending, request_id)
        collected = Collected(cache.max_entry_bytes) if pending is not None else None
        relayed = await relay(
            request,
            response,
            request_id=request_id,
            extra=[_x(label)],
            keep=None if collected is None else collected.add,
        )
        if pending is not None and collected is not None and relayed.outcome == "complete":
            await self._keep(pending, collected)
        return relayed

    def _pending(
        self, primary: Primary, response: UpstreamResponse, fields: Headers, response_time: float
    ) -> Entry | None:
        """The entry this answer becomes once its body is in, or None when it is not kept."""
        length = policy.first(fields, "content-length")
        if length is not None and length.isdigit() and int(length) > self.cache.max_entry_bytes:
            return None
        kept = policy.storable(primary[1], primary[2], response.status, fields)
        if kept is None:
            return None
        return policy.entry_of(
            primary=primary,
            request_headers=self.headers,
            status=response.status,
            reason=response.reason,
            fields=kept,
            body=b"",
            request_time=self.request_time,
            response_time=response_time,
        )

    async def _keep(self, pending: Entry, collected: Collected) -> None:
        body = collected.body()
        if body is None:
            return
        length = policy.first(pending.headers, "content-length")
        if pending.primary[1] == "GET" and length is not None and length != str(len(body)):
            return  # not the body its headers announced: never stored
        await self.cache.store(replace(pending, body=body))

    async def _refreshed(
        self,
        request: web.Request,
        entry: Entry,
        fields: Headers,
        response_time: float,
        request_id: str,
    ) -> Relayed:
        cache = self.cache
        fresh = policy.refreshed(
            entry,
            fields,
            request_headers=self.headers,
            request_time=self.request_time,
            response_time=response_time,
        )
        if fresh is None:
            await cache.forget(entry)
            raise UpstreamError(
                "upstream answered 304 Not Modified with validators that match no stored "
                "answer; the entry is dropped, and the next request asks for the whole answer"
            )
        await cache.store(fresh, replacing=entry)
        cache.metrics.cache_result(self.match.route.prefix, REVALIDATED)
        out = cache.answer(request, fresh, self.asked, REVALIDATED, age=0, request_id=request_id)
        sent = 0 if out.status == 304 or request.method == "HEAD" else len(fresh.body)
        return Relayed(response=out, bytes_out=sent, outcome="complete")

    async def _not_modified(
        self,
        request: web.Request,
        response: UpstreamResponse,
        fields: Headers,
        pending: Entry | None,
        request_id: str,
    ) -> Relayed:
        """The client's validators match upstream's new answer: 304 to the client, and the
        body read on to be stored (it was asked for in full for that)."""
        with contextlib.closing(response):
            headers = policy.not_modified_fields(fields)
            headers += (_x(MISS if pending is not None else BYPASS), ("X-Request-ID", request_id))
            out = web.Response(status=304, headers=headers)
            await out.prepare(request)
            await out.write_eof()
            if pending is None or request.method == "HEAD":
                if pending is not None:
                    await self.cache.store(pending)
                return Relayed(response=out, bytes_out=0, outcome="complete")
            collected = Collected(self.cache.max_entry_bytes)
            whole = response.received_body()
            try:
                if whole is not None:
                    collected.add(whole)
                else:
                    async for chunk in response.chunks():
                        collected.add(chunk)
                        if collected.chunks is None:
                            break
            except UpstreamError:
                return Relayed(response=out, bytes_out=0, outcome="complete")
            await self._keep(pending, collected)
            return Relayed(response=out, bytes_out=0, outcome="complete")


Looked = web.Response | Plan | None


def _x(label: str) -> tuple[str, str]:
    return ("X-Cache", label)


def _matches(fields: Headers, asked: Asked) -> bool:
    """Whether the client's validators match an answer upstream has just given."""
    return policy.not_modified(
        asked,
        status=200,
        etag=policy.first(fields, "etag"),
        last_modified=policy.first(fields, "last-modified"),
    )
