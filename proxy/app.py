"""ProxyApp: the one handler aiohttp's low-level server runs for every request (its reserved /-/
paths, problem+json errors, the access line of each request) and what it answers from."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from typing import Any

import aiohttp
import aiohttp.web_response
from aiohttp import web
from aiohttp.web_protocol import _RequestHandler
from multidict import CIMultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import __version__
from proxy.access import Exchange
from proxy.config import Settings
from proxy.current import Current
from proxy.errors import (
    BadRequest,
    ClientRejected,
    ExpectationFailed,
    MethodNotAllowed,
    NoRoute,
    ProxyError,
    TokenUnavailable,
)
from proxy.flow import forward
from proxy.inbound import ANONYMOUS
from proxy.log import bind_request, get_logger, unbind_request
from proxy.metrics import Metrics, StoreMetrics
from proxy.runtime import Runtime, StoreFactory

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


def request_id_of(request: web.BaseRequest) -> str:
    """The client's X-Request-ID when it is short and plain, else a new one."""
    given = request.headers.get("X-Request-ID")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    # Unique enough to find a request in the logs; nothing depends on it being unguessable.
    return "%032x" % random.getrandbits(128)  # noqa: UP031  (cheaper than an f-string spec)


def _check_framing(request: web.BaseRequest) -> None:
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


# How aiohttp's server must run the handler: our own access line, the request bodies forwarded as
# they came (never decompressed on the way in), and handlers cancelled when their client
# disconnects so that the upstream request is cancelled too.
SERVER_OPTIONS: dict[str, Any] = {
    "access_log": None,
    "handler_cancellation": True,
    "max_field_size": 8190,
    "max_line_size": 8190,
    "auto_decompress": False,
}


async def _expect(request: web.BaseRequest) -> None:
    """What aiohttp's Application did for a request with an Expect header, before its handler:
    `100 Continue` so that the client sends the body, else 417."""
    expect = request.headers.get("Expect", "")
    if expect.lower() == "100-continue" and request.version == aiohttp.HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer itself has not started
    elif expect:
        raise ExpectationFailed(f"Expect: {expect!r} is not supported; only 100-continue is")


async def _reserved(
    request: web.BaseRequest, metrics: Metrics, runtime: Runtime, raw: str, request_id: str
) -> web.StreamResponse:
    path = raw.partition("?")[0]
    if request.method not in {"GET", "HEAD"}:
        raise MethodNotAllowed(f"{path} answers GET and HEAD only", allow="GET, HEAD")
    response: web.Response
    if path == "/-/healthy":
        response = web.json_response({"status": "ok", "version": __version__})
    elif path == "/-/ready":
        response = _ready(runtime, request_id)
    elif path == "/-/metrics" and runtime.settings.metrics_port is None:
        response = metrics_response(metrics)
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


def _ready(runtime: Runtime, request_id: str) -> web.Response:
    """200 when every credential holds a usable token; else a 503 whose title says what is
    wrong, whose detail names each credential, and whose Retry-After is the wait until the
    last of them is retried (their next_retry_in)."""
    sources = runtime.tokens
    states = {name: source.state() for name, source in sources.items()}
    waiting = sorted(name for name, state in states.items() if not state["ready"])
    shown: dict[str, object] = {"config_hash": runtime.config_hash, "credentials": states}
    # Shown, never judged: a replica alone serves as well as one sharing.
    shown["store"] = runtime.store.state()
    if runtime.cache is not None:
        shown["cache"] = runtime.cache.state()
    if not waiting:
        return web.json_response({"status": "ready", **shown})
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
    return problem_response(error, request_id=request_id, extra=shown)


def _store_state(current: Current) -> dict[str, Any] | None:
    """What the store of the current runtime says of itself, for the metrics at a scrape."""
    try:
        return current.runtime.store.state()
    except RuntimeError:
        return None  # not started yet


class ProxyApp:
    """What every request is answered from: the metrics, the current runtime (a reload
    replaces it), and the cut-off at the shutdown deadline; `handle` is the one handler of
    aiohttp's low-level server (`server()`), which spares each request a router and
    middleware: the route table, not aiohttp's, decides, CONNECT and `OPTIONS *` included."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        store_factory: StoreFactory | None = None,
        token_metrics: bool = True,
        config_hash: str | None = None,
    ) -> None:
        """`store_factory` builds the store of the tokens, limits and cache from the settings
        (None: Redis when redis_url is set, else memory; a worker's is the relay to its
        supervisor, which counts the token metrics: `token_metrics` False); `config_hash`
        names the configuration for /-/ready (a worker's is its group's, before it took its
        share). start() builds the runtime, close() closes it."""
        _name_the_server()
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.current = Current(
            metrics=self.metrics, store_factory=store_factory, token_metrics=token_metrics
        )
        self.metrics.include(StoreMetrics(lambda: _store_state(self.current)))
        # Set when shutdown_timeout has run out and the server closes the connections still busy.
        self.cut_off = asyncio.Event()
        self._config_hash = config_hash
        self._started = False

    @property
    def runtime(self) -> Runtime:
        """The runtime requests start on now."""
        return self.current.runtime

    async def start(self) -> None:
        await self.current.start(self.settings, config_hash=self._config_hash)
        self._started = True

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self.current.close()

    def server(self, handler: _RequestHandler | None = None) -> web.Server:
        """aiohttp's low-level server running `handler` (`handle`; a test may wrap it)."""
        return web.Server(handler or self.handle, **SERVER_OPTIONS)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request enters here: reserved paths, or routing and forwarding."""
        metrics = self.metrics
        runtime = self.current.runtime  # kept to the end of this request, whatever replaces it
        started = time.perf_counter()
        request_id = request_id_of(request)
        raw = request.raw_path
        reserved = raw.startswith("/-/")
        exchange = Exchange(route="-" if reserved else "none")
        status = CLIENT_CLOSED_REQUEST
        metrics.request_started()
        bound = bind_request(request_id=request_id, client=ANONYMOUS)
        runtime.begin()  # a replaced runtime closes once every request it began has ended
        try:
            if "Expect" in request.headers:
                await _expect(request)
            if reserved:
                response = await _reserved(request, metrics, runtime, raw, request_id)
            else:
                _check_framing(request)
                response = await forward(
                    request, runtime, raw, request_id=request_id, record=exchange
                )
        except ProxyError as exc:
            response = problem_response(exc, request_id=request_id)
            exchange.bytes_out = response.content_length or 0
            if exc.status in {400, 413, 417}:
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
            runtime.end()  # its close, once replaced, waits for the loop: the lines below still run
            if exchange.outcome != "client_aborted":
                status = response.status
            elif self.cut_off.is_set():
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
                runtime.access.record(request, status, duration, exchange)
            unbind_request(bound)
        return response
