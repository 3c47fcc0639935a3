"""Serve the app on its listeners until SIGTERM or SIGINT, then stop within shutdown_timeout:
requests in flight get that long to finish, and those still running are cut off. SIGHUP and
changed secret files reload the configuration meanwhile (see proxy.reload)."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from aiohttp import web

from proxy import __version__
from proxy.app import ProxyApp, create_metrics_app
from proxy.config import Loaded, fingerprint
from proxy.egress import summary as egress_summary
from proxy.log import get_logger
from proxy.reload import SECRET_POLL_INTERVAL, Changes, ConfigSource, Reloader
from proxy.worker import WorkerLink

# The start and stop lines keep the logger name they had when cli.py wrote them.
log = get_logger("proxy.cli")
# aiohttp's own wait for the handlers at shutdown outlasts the cut-off by this much.
CUT_OFF_MARGIN = 1.0


async def serve(loaded: Loaded, source: ConfigSource, worker: WorkerLink | None = None) -> None:
    """Serve until SIGTERM or SIGINT; a worker also stops when its supervisor is gone. A
    single process reloads on SIGHUP and when a secret file changes; a worker when its
    supervisor tells it to, with the group."""
    settings = loaded.settings if worker is None else worker.settings_for(loaded.settings)
    if worker is None:
        app = ProxyApp(settings)
        reuse_port = None
    else:
        await worker.connect()
        app = ProxyApp(
            settings,
            metrics=worker.metrics,
            store_factory=worker.store_for,
            token_metrics=False,
            config_hash=fingerprint(loaded.settings),
        )
        reuse_port = True

    reloader = _reloader(app, loaded, source, worker)
    await app.start()
    runner = web.ServerRunner(app.server(), shutdown_timeout=settings.shutdown_timeout)
    runners: list[web.BaseRunner] = [runner]
    reloading: asyncio.Task[None] | None = None
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port).start()
        if settings.metrics_port is not None:
            metrics_runner = web.AppRunner(create_metrics_app(app.metrics), access_log=None)
            runners.append(metrics_runner)
            await metrics_runner.setup()
            await web.TCPSite(
                metrics_runner, settings.host, settings.metrics_port, reuse_port=reuse_port
            ).start()
        stop = _on_signals(reloader, worker)
        reloading = asyncio.create_task(reloader.run(), name="reloader")
        if worker is not None:
            lost = asyncio.create_task(worker.lost.wait())
            lost.add_done_callback(lambda _: stop.set())
            worker.listening()
        addresses = [f"{host}:{port}" for r in runners for host, port, *_ in r.addresses]
        egress = egress_summary(settings)
        log.info(
            "token-proxy listening",
            version=__version__,
            loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            upstream_client=settings.upstream_client,
            addresses=addresses,
            routes={route.prefix: route.upstream for route in settings.routes},
            config=fingerprint(loaded.settings),
            # Only behind an egress proxy: which one each credential and route goes through.
            **({"egress_proxy": egress} if egress else {}),
        )
        if settings.exposed_anonymously:
            log.warning(
                "listening on a non-loopback address without [[clients]]: anyone who can "
                "reach it can use the credentials (allow_anonymous_remote = true)",
                host=settings.host,
            )
        await stop.wait()
        grace = app.runtime.settings.shutdown_timeout  # as last reloaded
        log.info("shutting down", grace_seconds=grace)
    finally:
        if reloading is not None:
            reloading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloading
        grace = app.runtime.settings.shutdown_timeout
        await _stop(runners, grace=grace, cut_off=app.cut_off)
        await app.close()
        if worker is not None:
            await worker.close()
    log.info("stopped")


def _reloader(
    app: ProxyApp, loaded: Loaded, source: ConfigSource, worker: WorkerLink | None
) -> Reloader:
    """What reloads this process: its own SIGHUP and secret files, or (a worker) its
    supervisor's word; applying a reload is building the next runtime and switching to it."""

    async def apply(new: Loaded, changes: Changes) -> None:
        shaped = new.settings if worker is None else worker.settings_for(new.settings)
        await app.current.replace(shaped, config_hash=fingerprint(new.settings))
        for name in changes.removed_credentials:
            app.metrics.forget_credential(name)
            if worker is not None:
                worker.forget(name)

    return Reloader(
        source,
        loaded,
        apply=apply,
        # A worker's reload metrics are its supervisor's, which reloads for the group.
        reloads=None if worker is not None else app.metrics.reloads,
        poll=None if worker is not None else SECRET_POLL_INTERVAL,
    )


def _on_signals(reloader: Reloader, worker: WorkerLink | None) -> asyncio.Event:
    """SIGTERM and SIGINT set the event returned; SIGHUP reloads a single process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if worker is None:
        loop.add_signal_handler(signal.SIGHUP, reloader.hup)
    else:
        # The supervisor reloads the group: a SIGHUP sent to the whole process group must not
        # end a worker, nor reload it on its own.
        loop.add_signal_handler(signal.SIGHUP, _hup_to_a_worker)
        worker.on_reload(reloader.ask)
    return stop


def _hup_to_a_worker() -> None:
    log.debug("SIGHUP reached a worker: ignored, its supervisor reloads the whole group")


async def _stop(runners: list[web.BaseRunner], *, grace: float, cut_off: asyncio.Event) -> None:
    """Stop accepting, give the requests in flight `grace` seconds, then close the connections
    of those still running, which cancels their handlers.

    aiohttp's own shutdown_timeout is not enough: it waits that long for the handlers, then
    only fails their request bodies and waits as long again, so a request stuck on a silent
    upstream held the process for twice the grace."""
    for runner in runners:
        # aiohttp's own wait at cleanup must end after ours (a reload may have changed
        # shutdown_timeout; aiohttp sets this attribute itself when a site names a timeout):
        # at the same deadline its timeout could cancel its wait just as a handler cut off
        # here reports it is done, which aiohttp logs as an unhandled InvalidStateError.
        runner._shutdown_timeout = grace + CUT_OFF_MARGIN
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
