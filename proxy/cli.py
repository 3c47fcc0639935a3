"""The token-proxy command: parse flags, load settings once, configure logging, run or check.
The only place that exits the process.

The modules that serve, fetch tokens and run workers are imported by the commands that need
them, so that `health`, which a container runtime starts every few seconds, loads only the
settings."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.config import MIN_KEY_LENGTH, Loaded, Settings, load
from proxy.errors import ConfigError, TokenEndpointError

if TYPE_CHECKING:
    from proxy.config.egress import EgressProxy
    from proxy.reload import ConfigSource
    from proxy.worker import WorkerSpec

EXIT_OK = 0
EXIT_TOKEN_FAILED = 1
EXIT_CONFIG = 2
# `health` answers as container health checks expect: 0 healthy, 1 not (Docker reserves 2).
EXIT_UNHEALTHY = 1
_COMMANDS = {"run", "check", "health", "hash-key"}
# The hidden flag by which the supervisor hands each worker its WorkerSpec (WORKER_FLAG in
# proxy.workers, which is not imported for the other commands).
_WORKER_FLAG = "--worker"
_SETTINGS_ORDER = (
    "Settings come from flags, TOKEN_PROXY_* environment variables, the secrets directory "
    "(TOKEN_PROXY_SECRETS_DIR, default /run/secrets) and a TOML file, highest first."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-proxy",
        usage="token-proxy [run] [options]\n       token-proxy {check,health,hash-key} [options]",
        description="Local reverse proxy that adds an OAuth 2.0 client-credentials token "
        f"to every request. {_SETTINGS_ORDER}",
        epilog="Without a command, token-proxy runs: `token-proxy --port 9000` is "
        "`token-proxy run --port 9000`. `token-proxy COMMAND --help` describes a command.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"token-proxy {__version__}",
        help="print the version and exit",
    )
    commands = parser.add_subparsers(
        dest="command", title="commands", metavar="{run,check,health,hash-key}"
    )
    run = commands.add_parser(
        "run",
        prog="token-proxy [run]",
        help="serve the proxy (the default command: `run` may be left out)",
        description="Serve the proxy until SIGTERM or SIGINT, then let requests in flight "
        "finish for up to shutdown_timeout seconds and exit 0. SIGHUP reloads the "
        "configuration file and the secret files (a secret file that changes is read again "
        "by itself); an invalid configuration is logged and the running one stays. The "
        f"command name may be left out: bare `token-proxy` runs. {_SETTINGS_ORDER}",
    )
    check = commands.add_parser(
        "check",
        prog="token-proxy check",
        help="validate the configuration and fetch one token per credential",
        description="Validate the configuration and fetch one token per credential; print "
        "each credential's token URL, auth method, scope and expiry (never the token or the "
        "secret). Exit 0 when every token was obtained, 1 when one was not, 2 for a "
        "configuration error: run it on an edited file before sending SIGHUP. "
        f"{_SETTINGS_ORDER}",
    )
    health = commands.add_parser(
        "health",
        prog="token-proxy health",
        help="ask the running proxy's /-/healthy (or /-/ready) on its configured address",
        description="Load the settings as `run` does, then ask the proxy listening at their "
        "host and port (its loopback when the host is 0.0.0.0 or ::) for /-/healthy, or "
        "/-/ready with --ready. Exit 0 when it answers 200, 1 otherwise (no answer, another "
        "status, or a configuration error). For container health checks and Kubernetes "
        "probes; give it the same --config, --host and --port flags as `run`, if any.",
    )
    commands.add_parser(
        "hash-key",
        prog="token-proxy hash-key",
        help="print the sha256 of a team key read from standard input, for key_sha256",
        description="Read a team key from standard input (its first line) and print its "
        "sha256 in hex,\nfor key_sha256 in a [[clients]] table, so that the configuration "
        "never holds\nthe key itself. For example:\n\n"
        "  openssl rand -hex 32 | tee key.txt | token-proxy hash-key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for sub in (run, check, health):
        sub.add_argument(
            "--config", type=Path, metavar="PATH", help="TOML file (env: TOKEN_PROXY_CONFIG)"
        )
    for sub in (run, check):
        sub.add_argument(
            "--log-level",
            choices=["debug", "info", "warning", "error"],
            default=None,
            help="lowest level logged (env: TOKEN_PROXY_LOG_LEVEL, default info)",
        )
        sub.add_argument(
            "--log-format",
            choices=["auto", "json", "console"],
            default=None,
            help="log line format; auto is console on a terminal, else JSON "
            "(env: TOKEN_PROXY_LOG_FORMAT, default auto)",
        )
    for sub in (run, health):
        sub.add_argument(
            "--host",
            metavar="ADDRESS",
            help="listen address (env: TOKEN_PROXY_HOST, default 127.0.0.1)",
        )
        sub.add_argument(
            "--port",
            type=int,
            metavar="PORT",
            help="listen port (env: TOKEN_PROXY_PORT, default 8080)",
        )
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes serving the port together (env: TOKEN_PROXY_WORKERS, default 1)",
    )
    # Set by the supervisor on the command line of each worker it starts.
    run.add_argument(_WORKER_FLAG, dest="worker", help=argparse.SUPPRESS)
    health.add_argument(
        "--ready",
        action="store_true",
        help="ask /-/ready (every credential holds a usable token) instead of /-/healthy",
    )
    health.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="seconds to wait for the answer (default 3)",
    )
    health.set_defaults(log_level=None, log_format=None)
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    args = list(argv)
    if not args or (args[0] not in _COMMANDS and args[0] not in {"-h", "--help", "--version"}):
        args.insert(0, "run")
    return _parser().parse_args(args)


def _flags(args: argparse.Namespace) -> dict[str, object]:
    return {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "workers": getattr(args, "workers", None),
        "log_level": args.log_level,
        "log_format": args.log_format,
    }


def _load(args: argparse.Namespace) -> Loaded | None:
    try:
        return load(flags=_flags(args), config_file=args.config)
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
    loaded = _load(args)
    if args.command == "health":
        return EXIT_UNHEALTHY if loaded is None else _health(loaded.settings, args)
    if loaded is None:
        return EXIT_CONFIG
    settings = loaded.settings
    from proxy.log import configure_logging  # noqa: PLC0415  (see the module docstring)

    configure_logging(level=settings.log_level, fmt=settings.log_format)
    if args.command == "check":
        return asyncio.run(_check(settings))
    from proxy.reload import ConfigSource  # noqa: PLC0415

    # SIGHUP reads the same sources again: the flags, the file, the environment (unchanged).
    source = ConfigSource(flags=_flags(args), config_file=args.config)
    if args.worker is not None:
        from proxy.worker import WorkerSpec  # noqa: PLC0415

        return _work(loaded, source, WorkerSpec.decode(args.worker))
    if settings.workers > 1:
        return _supervise(loaded, source, arguments)
    from proxy.serve import serve  # noqa: PLC0415

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(loaded, source))
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


def _supervise(loaded: Loaded, source: ConfigSource, arguments: list[str]) -> int:
    """workers > 1: this process holds the port and the tokens, and runs the workers."""
    settings = loaded.settings
    if not hasattr(socket, "SO_REUSEPORT"):
        print(
            "token-proxy: configuration error\n  - workers (TOKEN_PROXY_WORKERS): this "
            "system has no SO_REUSEPORT, which workers need; set workers = 1",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    from proxy.workers import Supervisor  # noqa: PLC0415

    supervisor = Supervisor(
        settings, command=["-m", "proxy", *arguments], reloading=(source, loaded)
    )
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


def _work(loaded: Loaded, source: ConfigSource, spec: WorkerSpec) -> int:
    """One worker of a supervisor: the whole app on the supervisor's port, its tokens."""
    from proxy.log import bind_process  # noqa: PLC0415
    from proxy.serve import serve  # noqa: PLC0415
    from proxy.worker import WorkerLink, worker_settings  # noqa: PLC0415

    bind_process(worker=spec.index)
    mine = worker_settings(loaded.settings, spec)
    link = WorkerLink(spec, mine)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(loaded, source, link))
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


def _health(settings: Settings, args: argparse.Namespace) -> int:
    from proxy.health import probe  # noqa: PLC0415

    healthy, said = probe(
        host=settings.host, port=settings.port, ready=args.ready, timeout=args.timeout
    )
    print(f"token-proxy health: {said}", file=sys.stdout if healthy else sys.stderr)
    return EXIT_OK if healthy else EXIT_UNHEALTHY


async def _check(settings: Settings) -> int:
    from proxy.egress import register_secrets  # noqa: PLC0415
    from proxy.log import redactor  # noqa: PLC0415  (see the module docstring)
    from proxy.metrics import Metrics  # noqa: PLC0415
    from proxy.store import MemoryStore  # noqa: PLC0415
    from proxy.token_sources import build_token_source, token_session  # noqa: PLC0415

    register_secrets(settings)
    rows: list[tuple[str, ...]] = []
    failed = False
    store, metrics = MemoryStore(), Metrics()
    async with token_session() as session:
        for name, credential in settings.credentials.items():
            via = settings.credential_egress(name).proxy_for_url(credential.token_url)
            manager = build_token_source(
                name, credential, settings=settings, store=store, session=session, metrics=metrics
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
                (
                    name,
                    credential.token_url,
                    credential.auth_method,
                    scope,
                    expires,
                    _egress_shown(via),
                    result,
                )
            )
    header = (
        "credential",
        "token_url",
        "auth_method",
        "scope",
        "expires_in",
        "egress_proxy",
        "result",
    )
    _print_table(header, rows)
    print()
    routes = [
        (
            route.prefix,
            route.upstream,
            route.credential,
            _egress_shown(settings.route_egress(route).proxy_for_url(route.upstream)),
        )
        for route in settings.routes_by_length
    ]
    _print_table(("route", "upstream", "credential", "egress_proxy"), routes)
    if settings.redis_url is not None:
        print()
        print(await _check_redis(settings))
    return EXIT_TOKEN_FAILED if failed else EXIT_OK


def _egress_shown(via: EgressProxy | None) -> str:
    """The egress proxy as `check` shows it: its address without user and password."""
    return "direct" if via is None else via.url


def _print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last one, which may hold spaces, as it is."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    for row in (header, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


async def _check_redis(settings: Settings) -> str:
    """Whether Redis answers, in one line that never names it (its URL holds a password).
    Not a failure either way: a proxy whose Redis is away starts, alone."""
    import time  # noqa: PLC0415

    from proxy.store import StoreUnavailable  # noqa: PLC0415
    from proxy.store.redis import RedisStore  # noqa: PLC0415
    from proxy.store.redis_url import parse_redis_url  # noqa: PLC0415

    url = settings.redis_url
    if url is None:
        return "redis: not configured"
    redis = RedisStore(
        parse_redis_url(url), timeout=settings.redis_timeout, prefix=settings.redis_key_prefix
    )
    started = time.perf_counter()
    try:
        await redis.ping()
    except StoreUnavailable as exc:
        return (
            f"redis: FAILED ({exc.kind}): {exc.detail}; the proxy would start all the same, "
            "each replica on its own, and share once Redis answers"
        )
    finally:
        await redis.close()
    return (
        f"redis: ok, answered in {(time.perf_counter() - started) * 1000:.1f} ms; keys under "
        f"{settings.redis_key_prefix!r}"
    )
