"""The ceiling for bench/run (case f): token-proxy's own parts with none of its features.

aiohttp's low-level server (web.Server, one handler, as token-proxy serves) on uvloop (when
installed) and token-proxy's lean upstream client (proxy.transport.lean.LeanClient),
forwarding method, path and query, headers and body with a static `Authorization: Bearer
static`, and the answer streamed back. No token, routes, rate limits,
request ids, logs or metrics: what every feature of token-proxy is measured against.

    .venv/bin/python bench/ceiling_proxy.py --port 8083 --upstream http://127.0.0.1:8082
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

from proxy.transport.lean import LeanClient
from proxy.transport.slots import ConnectionSlots

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}


class Ceiling:
    """The one handler, and the lean client it forwards through."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.client = LeanClient(
            connect_timeout=10, read_timeout=60, slots=ConnectionSlots.for_pool(1000, wait=10)
        )

    async def forward(self, request: web.BaseRequest) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        headers.append(("Authorization", "Bearer static"))
        body = await request.read() if request.body_exists else None
        url = self.upstream + request.raw_path
        upstream = await self.client.send(request.method, url, headers, body)
        async with upstream:
            out = [(k, v) for k, v in upstream.header_items if k.lower() not in HOP_BY_HOP]
            # As token-proxy does: an answer that came in whole leaves in one write.
            whole = upstream.received_body() if request.method != "HEAD" else None
            if whole is not None:
                return web.Response(
                    status=upstream.status, reason=upstream.reason, headers=out, body=whole
                )
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=out
            )
            await response.prepare(request)
            async for chunk in upstream.chunks():
                await response.write(chunk)
            await response.write_eof()
            return response


async def serve(port: int, upstream: str) -> None:
    ceiling = Ceiling(upstream)
    await ceiling.client.start()
    runner = web.ServerRunner(web.Server(ceiling.forward, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await ceiling.client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8082")
    args = parser.parse_args()
    try:
        import uvloop  # noqa: PLC0415  (optional, as in token-proxy)
    except ImportError:
        asyncio.run(serve(args.port, args.upstream))
    else:
        uvloop.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
