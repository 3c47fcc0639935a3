"""Serve the app on its listeners until SIGTERM or SIGINT, then stop within shutdown_timeout:
requests in flight get that long to finish, and those still running are cut off."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from proxy import __version__
from proxy.app import CUT_OFF, METRICS, create_app, create_metrics_app, runner_options
from proxy.config import Settings
from proxy.log import get_logger
from proxy.worker import WorkerLink

# The start and stop lines keep the logger name they had when cli.py wrote them.
log = get_logger("proxy.cli")


async def serve(settings: Settings, worker: WorkerLink | None = None) -> None:
    """Serve until SIGTERM or SIGINT; a worker also stops when its supervisor is gone."""
    if worker is None:
        app = create_app(settings)
        reuse_port = None
    else:
        await worker.connect()
        app = create_app(settings, metrics=worker.metrics, token_sources=worker.token_sources)
        reuse_port = True
    runner = web.AppRunner(app, handle_signals=False, **runner_options(settings))
    runners = [runner]
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port).start()
        if settings.metrics_port is not None:
            metrics_runner = web.AppRunner(create_metrics_app(app[METRICS]), access_log=None)
            runners.append(metrics_runner)
            await metrics_runner.setup()
            await web.TCPSite(
                metrics_runner, settings.host, settings.metrics_port, reuse_port=reuse_port
            ).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if worker is not None:
            lost = asyncio.create_task(worker.lost.wait())
            lost.add_done_callback(lambda _: stop.set())
            worker.listening()
        addresses = [f"{host}:{port}" for r in runners for host, port, *_ in r.addresses]
        log.info(
            "token-proxy listening",
            version=__version__,
            loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            upstream_client=settings.upstream_client,
            addresses=addresses,
            routes={route.prefix: route.upstream for route in settings.routes},
        )
        if settings.exposed_anonymously:
            log.warning(
                "listening on a non-loopback address without [[clients]]: anyone who can "
                "reach it can use the credentials (allow_anonymous_remote = true)",
                host=settings.host,
            )
        await stop.wait()
        log.info("shutting down", grace_seconds=settings.shutdown_timeout)
    finally:
        await _stop(runners, grace=settings.shutdown_timeout, cut_off=app[CUT_OFF])
        if worker is not None:
            await worker.close()
    log.info("stopped")


async def _stop(runners: list[web.AppRunner], *, grace: float, cut_off: asyncio.Event) -> None:
    """Stop accepting, give the requests in flight `grace` seconds, then close the connections
    of those still running, which cancels their handlers.

    aiohttp's own shutdown_timeout is not enough: it waits that long for the handlers, then
    only fails their request bodies and waits as long again, so a request stuck on a silent
    upstream held the process for twice the grace."""
    for runner in runners:
        for site in list(runner.sites):
            await site.stop()
    cleanups = [asyncio.create_task(runner.cleanup()) for runner in runners]
    _, running = await asyncio.wait(cleanups, timeout=grace)
    if running:
        cut_off.set()
        connections = [
            connection
            for runner in runners
            if runner.server is not None
            for connection in runner.server.connections
        ]
        log.warning(
            "shutdown_timeout has passed; cutting off the requests still in flight",
            connections=len(connections),
            grace_seconds=grace,
        )
        for connection in connections:
            connection.force_close()
    await asyncio.gather(*cleanups)
