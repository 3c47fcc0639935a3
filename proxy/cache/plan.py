"""The trip upstream of a request on a cached route, as the cache step planned it: the headers
it is sent with (the client's validators left out, a stale entry's put in), and the relay of
its answer: a 304 that refreshes the entry, or an answer relayed with X-Cache and stored once
its body has arrived whole."""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import replace
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.bodies import Relayed, relay
from proxy.cache import policy
from proxy.cache.policy import Asked, Entry, Primary
from proxy.errors import UpstreamError
from proxy.headers import Headers, response_fields
from proxy.routing import Match
from proxy.transport import UpstreamResponse

if TYPE_CHECKING:
    from proxy.cache.step import ResponseCache

HIT, REVALIDATED, MISS, BYPASS = "HIT", "REVALIDATED", "MISS", "BYPASS"
# The client's validators: a look-up asks upstream for the whole answer instead, to store it,
# and evaluates them itself.
_CLIENT_VALIDATORS = frozenset({"if-none-match", "if-modified-since"})


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
        self, request: web.BaseRequest, response: UpstreamResponse, *, request_id: str
    ) -> Relayed:
        """The relay step on a cached route: an entry refreshed by a 304 answers the client;
        anything else is relayed with X-Cache, and stored once it has arrived whole."""
        cache, prefix = self.cache, self.match.route.prefix
        primary = self.primary
        if primary is None:
            cache.metrics.cache_result(prefix, BYPASS)
            changed = self.invalidates and response.status < 400
            relayed = await relay(request, response, request_id=request_id, extra=[_x(BYPASS)])
            if changed:
                credential = cache.credentials[self.match.route.credential]
                await cache.drop(credential, self.match.target)
            return relayed
        response_time = cache.clock()
        fields = response_fields(response.header_items)
        entry = self.entry
        if entry is not None and response.status == 304:
            with contextlib.closing(response):
                return await self._refreshed(request, entry, fields, response_time, request_id)
        # A full answer replaces it (RFC 9111 §4.3.3); a 5xx leaves it to be tried again.
        replaced = entry if entry is not None and response.status < 500 else None
        if replaced is not None:
            cache.entries.remove(replaced)
        pending = self._pending(primary, response, fields, response_time)
        label = MISS if pending is not None else BYPASS
        cache.metrics.cache_result(prefix, label)
        asked = self.asked
        if asked.conditional and response.status == 200 and _matches(fields, asked):
            return await self._not_modified(
                request,
                response,
                fields,
                pending=pending,
                request_id=request_id,
                replaced=replaced,
            )
        collected = Collected(cache.max_entry_bytes) if pending is not None else None
        relayed = await relay(
            request,
            response,
            request_id=request_id,
            extra=[_x(label)],
            keep=None if collected is None else collected.add,
        )
        stored = False
        if pending is not None and collected is not None and relayed.outcome == "complete":
            stored = await self._keep(pending, collected, replaced)
        if replaced is not None and not stored:
            await cache.forget(replaced)
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

    async def _keep(self, pending: Entry, collected: Collected, replaced: Entry | None) -> bool:
        """Store the answer once its body is in whole; False when it is not."""
        body = collected.body()
        if body is None:
            return False
        length = policy.first(pending.headers, "content-length")
        if pending.primary[1] == "GET" and length is not None and length != str(len(body)):
            return False  # not the body its headers announced: never stored
        await self.cache.store(replace(pending, body=body), replacing=replaced)
        return True

    async def _refreshed(
        self,
        request: web.BaseRequest,
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
        request: web.BaseRequest,
        response: UpstreamResponse,
        fields: Headers,
        *,
        pending: Entry | None,
        request_id: str,
        replaced: Entry | None,
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
                    await self.cache.store(pending, replacing=replaced)
                elif replaced is not None:
                    await self.cache.forget(replaced)
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
                collected.chunks = None
            if not await self._keep(pending, collected, replaced) and replaced is not None:
                await self.cache.forget(replaced)
            return Relayed(response=out, bytes_out=0, outcome="complete")


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
