"""The token-proxy command: parse flags, load settings once, configure logging, run or check.
The only place that exits the process."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy import __version__
from proxy.app import METRICS, create_app, create_metrics_app, runner_options
from proxy.config import MIN_KEY_LENGTH, Settings, load_settings
from proxy.credentials import TokenManager
from proxy.errors import ConfigError, TokenEndpointError
from proxy.log import bind_process, configure_logging, get_logger, redactor
from proxy.metrics import Metrics
from proxy.workers import WORKER_FLAG, Supervisor, WorkerLink, WorkerSpec, worker_settings

EXIT_OK = 0
EXIT_TOKEN_FAILED = 1
EXIT_CONFIG = 2
_COMMANDS = {"run", "check", "hash-key"}

log = get_logger("proxy.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-proxy",
        description="Local reverse proxy that adds an OAuth 2.0 client-credentials token "
        "to every request. Settings come from flags, TOKEN_PROXY_* variables, the secrets "
        "directory and a TOML file, in that order.",
    )
    parser.add_argument("--version", action="version", version=f"token-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{run,check,hash-key}")
    run = commands.add_parser("run", help="serve the proxy (the default command)")
    check = commands.add_parser(
        "check", help="validate the configuration and fetch one token per credential"
    )
    commands.add_parser(
        "hash-key",
        help="print the sha256 of a team key read from stdin, for key_sha256 in [[clients]]",
    )
    for sub in (run, check):
        sub.add_argument("--config", type=Path, help="TOML file (env: TOKEN_PROXY_CONFIG)")
        sub.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
        sub.add_argument("--log-format", choices=["auto", "json", "console"], default=None)
    run.add_argument("--host", help="listen address (env: TOKEN_PROXY_HOST, default 127.0.0.1)")
    run.add_argument("--port", type=int, help="listen port (env: TOKEN_PROXY_PORT, default 8080)")
    run.add_argument(
        "--workers",
        type=int,
        help="processes serving the port together (env: TOKEN_PROXY_WORKERS, default 1)",
    )
    # Set by the supervisor on the command line of each worker it starts.
    run.add_argument(WORKER_FLAG, type=WorkerSpec.decode, help=argparse.SUPPRESS)
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    args = list(argv)
    if not args or (args[0] not in _COMMANDS and args[0] not in {"-h", "--help", "--version"}):
        args.insert(0, "run")
    return _parser().parse_args(args)


def _load(args: argparse.Namespace) -> Settings | None:
    flags = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "workers": getattr(args, "workers", None),
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    try:
        return load_settings(flags=flags, config_file=args.config)
    except ConfigError as exc:
        problems = exc.detail.splitlines()
        title = (
            "configuration error" if len(problems) == 1 else f"{len(problems)} configuration errors"
        )
        lines = "\n".join(f"  - {line}" for line in problems)
        print(
            f"token-proxy: {title}\n{lines}\n"
            "See README.md (Configuration) or config.example.toml for every setting.",
            file=sys.stderr,
        )
        return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = _parse(arguments)
    if args.command == "hash-key":
        return _hash_key()
    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    if args.command == "check":
        return asyncio.run(_check(settings))
    if args.worker is not None:
        return _work(settings, args.worker)
    if settings.workers > 1:
        return _supervise(settings, arguments)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(settings))
    except OSError as exc:
        return _cannot_listen(settings, exc)
    return EXIT_OK


def _cannot_listen(settings: Settings, exc: OSError) -> int:
    ports = str(settings.port)
    if settings.metrics_port is not None:
        ports += f" and metrics_port {settings.metrics_port}"
    print(
        f"token-proxy: cannot listen on {settings.host} port {ports} ({exc.strerror}); "
        "choose another address with --host/--port or TOKEN_PROXY_HOST/TOKEN_PROXY_PORT "
        "(TOKEN_PROXY_METRICS_PORT for metrics)",
        file=sys.stderr,
    )
    return EXIT_CONFIG


def _supervise(settings: Settings, arguments: list[str]) -> int:
    """workers > 1: this process holds the port and the tokens, and runs the workers."""
    if not hasattr(socket, "SO_REUSEPORT"):
        print(
            "token-proxy: configuration error\n  - workers (TOKEN_PROXY_WORKERS): this "
            "system has no SO_REUSEPORT, which workers need; set workers = 1",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    supervisor = Supervisor(settings, command=["-m", "proxy", *arguments])
    try:
        supervisor.hold_ports()
    except OSError as exc:
        return _cannot_listen(settings, exc)
    try:
        supervisor.make_metrics_directory()
    except OSError as exc:
        supervisor.release_ports()
        print(
            f"token-proxy: workers need a writable temporary directory for their metrics "
            f"({exc.strerror}: {exc.filename}); set TMPDIR to one, or mount one at /tmp "
            "(in Kubernetes with readOnlyRootFilesystem: an emptyDir volume)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        code = runner.run(supervisor.run())
    if supervisor.failure is not None:
        print(f"token-proxy: {supervisor.failure}", file=sys.stderr)
    return code


def _work(settings: Settings, spec: WorkerSpec) -> int:
    """One worker of a supervisor: the whole app on the supervisor's port, its tokens."""
    bind_process(worker=spec.index)
    mine = worker_settings(settings, spec)
    link = WorkerLink(spec, mine)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(mine, link))
    except OSError as exc:
        return _cannot_listen(mine, exc)
    return EXIT_OK


def _hash_key() -> int:
    if sys.stdin.isatty():
        print("Type the team key, then Enter:", file=sys.stderr)
    key = sys.stdin.readline().rstrip("\r\n")
    if len(key) < MIN_KEY_LENGTH:
        print(
            f"token-proxy: the key must be at least {MIN_KEY_LENGTH} characters; use a random "
            "one, e.g. `openssl rand -hex 32 | tee key.txt | token-proxy hash-key`",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    print(hashlib.sha256(key.encode()).hexdigest())
    return EXIT_OK


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (the `speed` extra), else asyncio's own."""
    try:
        import uvloop  # noqa: PLC0415  (optional dependency)
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(settings: Settings, worker: WorkerLink | None = None) -> None:
    """Serve until SIGTERM or SIGINT; a worker also stops when its supervisor is gone."""
    if worker is None:
        app = create_app(settings)
        reuse_port = None
    else:
        await worker.connect()
        app = create_app(settings, metrics=worker.metrics, token_sources=worker.token_source)
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
        for each in reversed(runners):
            await each.cleanup()
        if worker is not None:
            await worker.close()
    log.info("stopped")


async def _check(settings: Settings) -> int:
    rows: list[tuple[str, ...]] = []
    failed = False
    metrics = Metrics()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for name, credential in settings.credentials.items():
            manager = TokenManager(
                name=name,
                credential=credential,
                session=session,
                metrics=metrics,
                request_timeout=settings.token_timeout,
            )
            try:
                token = await manager.fetch()
            except TokenEndpointError as exc:
                failed = True
                result = f"FAILED: {redactor.scrub(exc.detail)}"
                scope, expires = credential.scope or "-", "-"
            else:
                result, expires = "ok", f"{token.lifetime:.0f} s"
                scope = token.scope or credential.scope or "-"
            rows.append(
                (name, credential.token_url, credential.auth_method, scope, expires, result)
            )
    header = ("credential", "token_url", "auth_method", "scope", "expires_in", "result")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    for row in (header, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
    return EXIT_TOKEN_FAILED if failed else EXIT_OK
