"""create_app(settings): the aiohttp application, its reserved /-/ paths, problem+json errors,
the access line of each request, and the long-lived resources in cleanup_ctx."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import aiohttp.web_response
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import __version__
from proxy.access import AccessLog
from proxy.config import Settings
from proxy.errors import (
    BadRequest,
    ClientRejected,
    MethodNotAllowed,
    NoRoute,
    ProxyError,
    RateLimited,
    TokenUnavailable,
)
from proxy.forward import Exchange, Forwarder
from proxy.inbound import ANONYMOUS, Gate
from proxy.log import (
    bind_request,
    bind_request_more,
    get_logger,
    redactor,
    unbind_request,
)
from proxy.metrics import Metrics
from proxy.ratelimit import RateLimits
from proxy.routing import RouteTable
from proxy.store import MemoryStore
from proxy.token_sources import TokenSources, build_token_sources
from proxy.tokens import TokenSource
from proxy.upstream import make_transport

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
ROUTES = web.AppKey("routes", RouteTable)
TOKENS = web.AppKey("tokens", dict[str, TokenSource])
# Builds every credential's token source; None: on a store of this process's own.
TokenSourcesFactory = Callable[[Settings], TokenSources]
TOKEN_SOURCES: web.AppKey[TokenSourcesFactory] = web.AppKey("token_sources")
FORWARDER = web.AppKey("forwarder", Forwarder)
GATE = web.AppKey("gate", Gate)
LIMITS = web.AppKey("limits", RateLimits)
# Set when shutdown_timeout has run out and the server closes the connections still busy.
CUT_OFF = web.AppKey("cut_off", asyncio.Event)

log = get_logger("proxy.app")

PROBLEM_TYPE = "https://token-proxy.invalid/problems/"
# What the Server header of the proxy's answers says: no library, no version to probe for.
SERVER_NAME = "token-proxy"
# nginx's code for "the client closed the connection before the response was complete".
CLIENT_CLOSED_REQUEST = 499
# Logged for a request cut off at the shutdown deadline: what a draining proxy answers.
CUT_OFF_BY_SHUTDOWN = 503
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def problem_response(
    error: ProxyError, *, request_id: str | None = None, extra: dict[str, object] | None = None
) -> web.Response:
    """An RFC 9457 problem+json answer for an error made by the proxy itself."""
    body: dict[str, object] = {
        "type": PROBLEM_TYPE + error.type_slug,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
    }
    if request_id is not None:
        body["request_id"] = request_id
    if extra:
        body.update(extra)
    headers = dict(error.headers)
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    return web.Response(
        status=error.status,
        text=json.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )


def request_id_of(request: web.Request) -> str:
    """The client's X-Request-ID when it is short and plain, else a new one."""
    given = request.headers.get("X-Request-ID")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    # Unique enough to find a request in the logs; nothing depends on it being unguessable.
    return f"{random.getrandbits(128):032x}"


async def handle(request: web.Request) -> web.StreamResponse:
    """Every request enters here: reserved paths, or routing and forwarding."""
    app = request.app
    metrics = app[METRICS]
    started = time.perf_counter()
    request_id = request_id_of(request)
    raw = request.raw_path
    reserved = raw.startswith("/-/")
    exchange = Exchange(route="-" if reserved else "none")
    status = CLIENT_CLOSED_REQUEST
    metrics.request_started()
    bound = bind_request(request_id=request_id, client=ANONYMOUS)
    try:
        if reserved:
            response = await _reserved(request, raw, request_id)
        else:
            response = await _proxy(request, raw, request_id, exchange)
    except ProxyError as exc:
        response = problem_response(exc, request_id=request_id)
        exchange.bytes_out = response.content_length or 0
        if exc.status in {400, 413}:
            # The rest of an unread or unsafe body must not be taken for the next request.
            response.force_close()
        if exc.status >= 500:
            log.warning("request failed", status=exc.status, detail=exc.detail)
    except asyncio.CancelledError:
        # The client went away; aiohttp cancels the handler and with it the upstream call.
        exchange.outcome = "client_aborted"
        raise
    except Exception:
        log.exception("unexpected error while handling a request")
        error = ProxyError("the proxy failed unexpectedly; see its log for this request id")
        response = problem_response(error, request_id=request_id)
        exchange.bytes_out = response.content_length or 0
    finally:
        metrics.request_finished()
        if exchange.outcome != "client_aborted":
            status = response.status
        elif app[CUT_OFF].is_set():
            # It was the server that closed the connection, at the shutdown deadline.
            exchange.outcome = "shutdown"
            status = CUT_OFF_BY_SHUTDOWN
        duration = time.perf_counter() - started
        metrics.observe_request(
            route=exchange.route,
            method=Metrics.method_label(request.method),
            status=status,
            client=exchange.client,
            seconds=duration,
        )
        if not reserved:
            app[ACCESS_LOG].record(request, status, duration, exchange)
        unbind_request(bound)
    return response


async def _proxy(
    request: web.Request, raw: str, request_id: str, exchange: Exchange
) -> web.StreamResponse:
    """The one-way flow: framing, team key, routing, then the forwarder (rate limit, token,
    upstream exchange)."""
    app = request.app
    metrics = app[METRICS]
    _check_framing(request)
    # The key before the route: without one, every path gets the same 401, so nobody can
    # probe which prefixes exist.
    exchange.client = app[GATE].identify(request.headers)
    if exchange.client != ANONYMOUS:  # bound already by handle
        bind_request_more(client=exchange.client)
    match = app[ROUTES].match(raw)
    exchange.route = match.route.prefix
    exchange.upstream_url = match.target
    credential = match.route.credential
    try:
        response = await app[FORWARDER].forward(
            request,
            route=match.route,
            url=match.target,
            tokens=app[TOKENS][credential],
            request_id=request_id,
            exchange=exchange,
        )
    except RateLimited as exc:
        metrics.rate_limited.labels(credential, exc.limit).inc()
        raise
    if response.status == 429:
        metrics.rate_limited.labels(credential, "upstream").inc()
        paused = app[LIMITS].upstream_said_slow_down(
            credential, response.headers.get("Retry-After")
        )
        if paused is not None:
            log.warning(
                "upstream answered 429; holding the credential's requests back",
                credential=credential,
                seconds=round(paused, 1),
            )
    return response


def _check_framing(request: web.Request) -> None:
    """Refuse what could make the proxy and upstream disagree on where a request ends
    (RFC 9112 6.1-6.3): such a request is never forwarded, and its connection is closed."""
    headers = request.headers
    if "Content-Length" in headers or "Transfer-Encoding" in headers:
        _check_body_framing(headers)
    values = "".join(headers.values())
    if "\r" in values or "\n" in values or "\x00" in values:
        raise BadRequest("a header value holds CR, LF or NUL")


def _check_body_framing(headers: CIMultiDictProxy[str]) -> None:
    lengths = headers.getall("Content-Length", ())
    codings = headers.getall("Transfer-Encoding", ())
    if lengths and codings:
        raise BadRequest("Content-Length together with Transfer-Encoding is refused")
    if len(lengths) > 1 or (lengths and not lengths[0].strip().isdigit()):
        raise BadRequest("a single, plain Content-Length is required")
    if codings:
        named = [part.strip().lower() for value in codings for part in value.split(",")]
        if named != ["chunked"]:
            raise BadRequest(
                f"transfer coding {', '.join(named)!r} is not supported; only chunked is"
            )


ACCESS_LOG = web.AppKey("access_log", AccessLog)


@web.middleware
async def _every_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Send every request to `handle`, whatever the router thinks of its target (CONNECT,
    OPTIONS *, absolute-form): the route table, not aiohttp's router, decides."""
    return await handle(request)


def runner_options(settings: Settings) -> dict[str, Any]:
    """How a server must run this app: our own access line, and handlers cancelled when
    their client disconnects so that the upstream request is cancelled too."""
    return {
        "access_log": None,
        "handler_cancellation": True,
        "shutdown_timeout": settings.shutdown_timeout,
    }


async def _reserved(request: web.Request, raw: str, request_id: str) -> web.StreamResponse:
    path = raw.partition("?")[0]
    if request.method not in {"GET", "HEAD"}:
        raise MethodNotAllowed(f"{path} answers GET and HEAD only", allow="GET, HEAD")
    response: web.Response
    if path == "/-/healthy":
        response = web.json_response({"status": "ok", "version": __version__})
    elif path == "/-/ready":
        response = _ready(request.app, request_id)
    elif path == "/-/metrics" and request.app[SETTINGS].metrics_port is None:
        response = metrics_response(request.app[METRICS])
    else:
        raise NoRoute(
            f"{path} is not an endpoint of the proxy; see /-/healthy, /-/ready, /-/metrics"
        )
    response.headers["X-Request-ID"] = request_id
    return response


def _name_the_server() -> None:
    """Every answer the proxy writes says `Server: token-proxy` unless upstream named itself.
    aiohttp has no setting for it: it sets its own name and version, read from this module
    global, on each answer without a Server header, its parser's bare 400s included, which
    never reach a handler where a header could be set."""
    aiohttp.web_response.SERVER_SOFTWARE = SERVER_NAME  # type: ignore[attr-defined]  # imported there from aiohttp.http


def metrics_response(metrics: Metrics) -> web.Response:
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_metrics_app(metrics: Metrics) -> web.Application:
    """The separate listener of metrics_port: /-/metrics only."""
    _name_the_server()

    async def serve(request: web.Request) -> web.Response:
        return metrics_response(metrics)

    app = web.Application()
    app.router.add_get("/-/metrics", serve)
    return app


def _ready(app: web.Application, request_id: str) -> web.Response:
    """200 when every credential holds a usable token; else a 503 whose title says what is
    wrong, whose detail names each credential, and whose Retry-After is the wait until the
    last of them is retried (their next_retry_in)."""
    sources = app[TOKENS]
    states = {name: source.state() for name, source in sources.items()}
    waiting = sorted(name for name, state in states.items() if not state["ready"])
    if not waiting:
        return web.json_response({"status": "ready", "credentials": states})
    refused = [name for name in waiting if sources[name].status().rejected]
    pending = [name for name in waiting if name not in refused]
    reasons = []
    if refused:
        named = ", ".join(f"{name} ({states[name]['last_error']})" for name in refused)
        reasons.append(
            f"the token endpoint refused the credentials of: {named}; check their client_id "
            "and client_secret"
        )
    if pending:
        reasons.append(f"no usable token yet for: {', '.join(pending)}")
    retries = [
        states[name]["next_retry_in"]
        for name in waiting
        if states[name]["next_retry_in"] is not None
    ]
    retry_after = max(1, math.ceil(max(retries))) if retries else 1
    error_class = ClientRejected if refused else TokenUnavailable
    error = error_class("; ".join(reasons), retry_after=retry_after)
    return problem_response(error, request_id=request_id, extra={"credentials": states})


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    transport = make_transport(
        settings.upstream_client,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_connections=settings.max_connections,
    )
    await transport.start()
    factory = app.get(TOKEN_SOURCES)
    sources = (
        factory(settings)
        if factory is not None
        else build_token_sources(settings, store=MemoryStore(), metrics=app[METRICS])
    )
    tokens: dict[str, TokenSource] = dict(sources)
    app[TOKENS] = tokens
    app[FORWARDER] = Forwarder(
        transport=transport,
        metrics=app[METRICS],
        limits=app[LIMITS],
        routes=settings.routes,
        max_body_size=settings.max_body_size,
        slot_wait=settings.connect_timeout,
    )
    sources.start()
    try:
        yield
    finally:
        await sources.close()
        await transport.close()


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    token_sources: TokenSourcesFactory | None = None,
) -> web.Application:
    """Build the proxy application; long-lived resources open and close in cleanup_ctx.
    `token_sources` builds the token sources instead (a worker's keep their tokens through its
    supervisor)."""
    _name_the_server()
    app = web.Application(
        middlewares=[_every_request],
        # Request bodies are forwarded as they came: never decompressed on the way in.
        handler_args={"max_field_size": 8190, "max_line_size": 8190, "auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics if metrics is not None else Metrics()
    app[CUT_OFF] = asyncio.Event()
    if token_sources is not None:
        app[TOKEN_SOURCES] = token_sources
    app[ROUTES] = RouteTable(settings.routes)
    app[GATE] = Gate(settings.clients)
    app[LIMITS] = RateLimits(
        credentials={
            name: (credential.rate_limits, credential.rate_limit_max_wait)
            for name, credential in settings.credentials.items()
        },
        clients={
            client.name: (client.rate_limit, client.rate_limit_max_wait)
            for client in settings.clients
        },
    )
    for client in settings.clients:
        if client.key is not None:
            redactor.add_secret(client.key.get_secret_value())
    app[ACCESS_LOG] = AccessLog(
        enabled=settings.access_log,
        sample=settings.access_log_sample,
        debug=settings.log_level == "debug",
    )
    app.cleanup_ctx.append(_resources)
    # The middleware sends every request to `handle`; this route only spares the router the
    # cost of building a 404 for targets it cannot match.
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
