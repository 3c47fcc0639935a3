"""The ceiling for bench/run (case f): token-proxy's own parts with none of its features.

aiohttp's server on uvloop (when installed) and token-proxy's lean upstream client
(proxy.transport.lean.LeanClient), forwarding method, path and query, headers and body with a static
`Authorization: Bearer static`, and the answer streamed back. No token, routes, rate limits,
request ids, logs or metrics: what every feature of token-proxy is measured against.

    .venv/bin/python bench/ceiling_proxy.py --port 8083 --upstream http://127.0.0.1:8082
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.transport.lean import LeanClient
from proxy.transport.slots import ConnectionSlots

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}
CLIENT = web.AppKey("client", LeanClient)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    headers.append(("Authorization", "Bearer static"))
    body = await request.read() if request.body_exists else None
    url = request.app[UPSTREAM] + request.raw_path
    upstream = await request.app[CLIENT].send(request.method, url, headers, body)
    async with upstream:
        out = [(k, v) for k, v in upstream.header_items if k.lower() not in HOP_BY_HOP]
        # As token-proxy does: an answer that came in whole leaves in one write.
        whole = upstream.received_body() if request.method != "HEAD" else None
        if whole is not None:
            return web.Response(
                status=upstream.status, reason=upstream.reason, headers=out, body=whole
            )
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=out)
        await response.prepare(request)
        async for chunk in upstream.chunks():
            await response.write(chunk)
        await response.write_eof()
        return response


async def client(app: web.Application) -> AsyncIterator[None]:
    app[CLIENT] = LeanClient(
        connect_timeout=10, read_timeout=60, slots=ConnectionSlots.for_pool(1000, wait=10)
    )
    await app[CLIENT].start()
    yield
    await app[CLIENT].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8082")
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{tail:.*}", forward)
    try:
        import uvloop  # noqa: PLC0415  (optional, as in token-proxy)
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=None if loop_factory is None else loop_factory(),
    )


if __name__ == "__main__":
    main()
