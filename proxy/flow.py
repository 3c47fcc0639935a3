"""The request path as named steps, each taking and returning values: key check, route, cache,
body, rate limit, token, send, replay once on 401, relay. The access line's record of a forwarded
request is filled here and nowhere else (the server only notes a request cut short)."""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.access import Exchange
from proxy.bodies import NO_BODY, RequestBody, relay, request_body
from proxy.errors import RateLimited, UpstreamError
from proxy.headers import client_headers, upstream_headers
from proxy.log import bind_request_more, get_logger
from proxy.routing import Match
from proxy.runtime import Runtime
from proxy.tokens import Token, TokenSource
from proxy.transport import UpstreamResponse

if TYPE_CHECKING:
    from proxy.cache import Plan

log = get_logger("proxy.flow")


@dataclass(slots=True)
class Sent:
    """One trip upstream: its answer, the token it carried, and how long upstream took."""

    response: UpstreamResponse
    token: Token
    seconds: float


async def forward(
    request: web.BaseRequest, runtime: Runtime, raw: str, *, request_id: str, record: Exchange
) -> web.StreamResponse:
    """Key check, route, then the exchange with upstream, answering the client."""
    # The key before the route: without one, every path gets the same 401, so nobody can
    # probe which prefixes exist.
    record.client = client = runtime.gate.identify(request.headers)
    if client != "-":  # bound already by the server
        bind_request_more(client=client)
    match = runtime.routes.match(raw)
    record.route = match.route.prefix
    record.upstream_url = match.target
    plan: Plan | None = None
    cache = runtime.cache
    if cache is not None:
        looked = await cache.look_up(request, match, request_id=request_id)
        if isinstance(looked, web.Response):
            # A fresh hit: no rate-limit budget, no token, no trip upstream.
            record.cache = looked.headers["X-Cache"]
            record.bytes_out = looked.content_length or 0
            return looked
        plan = looked
    # The body and the 429 steps are awaited only when there is something to do: a coroutine
    # on every request costs more than the test.
    body = (
        await request_body(request, limit=runtime.settings.max_body_size)
        if request.body_exists
        else NO_BODY
    )
    try:
        sent = await send_replaying_once(
            request,
            runtime,
            match,
            client=client,
            body=body,
            request_id=request_id,
            record=record,
            incoming=None if plan is None else plan.upstream_items(),
        )
        if sent.response.status == 429:
            await upstream_said(runtime, match, sent.response)
        if plan is None:
            relayed = await relay(request, sent.response, request_id=request_id)
        else:
            relayed = await plan.relay(request, sent.response, request_id=request_id)
            record.cache = relayed.response.headers.get("X-Cache")
    finally:
        record.bytes_in = body.bytes_in
    record.bytes_out = relayed.bytes_out
    record.outcome = relayed.outcome
    return relayed.response


async def send_replaying_once(
    request: web.BaseRequest,
    runtime: Runtime,
    match: Match,
    *,
    client: str,
    body: RequestBody,
    request_id: str,
    record: Exchange,
    incoming: Collection[tuple[str, str]] | None = None,
) -> Sent:
    """Send, and when upstream answers 401 to the current token, replay once with a new one
    (SPEC §3: the token source decides whether a new token can help at that path)."""
    tokens = runtime.tokens[match.route.credential]
    sent = await send_once(
        request,
        runtime,
        match,
        client=client,
        body=body,
        request_id=request_id,
        record=record,
        incoming=incoming,
    )
    if sent.response.status != 401:
        return sent
    path = match.target.partition("?")[0]
    if not tokens.invalidate(sent.token, path=path, replayable=body.replayable):
        return sent
    if not body.replayable:
        return sent
    sent.response.close()
    runtime.metrics.replays.labels(match.route.prefix).inc()
    record.replayed = True
    log.info("upstream answered 401; replaying once with a new token")
    sent = await send_once(
        request,
        runtime,
        match,
        client=client,
        body=body,
        request_id=request_id,
        record=record,
        incoming=incoming,
    )
    # Its answer shows whether a new token helps at that path.
    tokens.replayed(path, rejected=sent.response.status == 401)
    return sent


async def send_once(
    request: web.BaseRequest,
    runtime: Runtime,
    match: Match,
    *,
    client: str,
    body: RequestBody,
    request_id: str,
    record: Exchange,
    incoming: Collection[tuple[str, str]] | None = None,
) -> Sent:
    """One trip upstream: a rate-limit slot, the current token, then the request with the
    client's headers (or those the cache step gave: `incoming`)."""
    route = match.route
    credential = route.credential
    limits = runtime.limits
    settle = None
    if not limits.unlimited(credential=credential, client=client):
        try:
            settle = await limits.acquire(credential=credential, client=client)
        except RateLimited as exc:
            runtime.metrics.rate_limited.labels(credential, exc.limit).inc()
            raise
    try:
        tokens = runtime.tokens[credential]
        token = current_token(tokens) or await tokens.token()
        headers = upstream_headers(
            client_headers(request.raw_headers) if incoming is None else incoming,
            token=token.value,
            request_id=request_id,
        )
        record.token_age = tokens.age(token)
        started = time.perf_counter()
        try:
            transport = runtime.transports.for_route(route)
            response = await transport.send(request.method, match.target, headers, body.data)
        finally:
            # Only the trip upstream is timed: waiting for a token is not upstream's time.
            record.upstream_seconds = seconds = time.perf_counter() - started
            runtime.metrics.observe_upstream(route.prefix, seconds)
    except UpstreamError as exc:
        if body.overflow is not None:
            # The upload broke off for max_body_size: that, not upstream, is the answer.
            raise body.overflow from exc
        raise
    finally:
        if settle is not None:
            await settle()
    return Sent(response=response, token=token, seconds=seconds)


def current_token(tokens: TokenSource) -> Token | None:
    """The token step's fast path: the usable token in memory, without a wait."""
    return tokens.usable_token()


async def upstream_said(runtime: Runtime, match: Match, response: UpstreamResponse) -> None:
    """The rate-limit step's second half: an upstream 429 pauses the credential for its
    Retry-After."""
    credential = match.route.credential
    runtime.metrics.rate_limited.labels(credential, "upstream").inc()
    paused = await runtime.limits.upstream_said_slow_down(
        credential, response.headers.get("Retry-After")
    )
    if paused is not None:
        log.warning(
            "upstream answered 429; holding the credential's requests back",
            credential=credential,
            seconds=round(paused, 1),
        )
