"""`token-proxy health`, the command behind the image's HEALTHCHECK and the Kubernetes probes:
it finds a real proxy wherever its address was configured (TOML, environment, flag), exits 0
or 1, and never hangs."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.health import probe_host
from tests.conftest import (
    LEAKS,
    FakeTokenServer,
    FakeUpstream,
    free_port,
    process_env,
    proxy_command,
    wait_for,
)


@dataclass
class Finished:
    """How one `token-proxy health` run ended."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float


async def health(*args: str, env: dict[str, str]) -> Finished:
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *proxy_command(),
        "health",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    result = Finished(
        process.returncode, stdout.decode(), stderr.decode(), time.monotonic() - started
    )
    LEAKS.add("the output of token-proxy health", result.stdout + result.stderr)
    assert "Traceback" not in result.stderr
    return result


@dataclass
class Running:
    """A proxy process, and the environment its health command shares with it."""

    process: subprocess.Popen[bytes]
    env: dict[str, str]
    url: str


StartRunning = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_running(
    token_server: FakeTokenServer, upstream: FakeUpstream, tmp_path: Path, upstream_client: str
) -> AsyncIterator[StartRunning]:
    """Start `token-proxy run ARGS` with the given environment changes (TOKEN_PROXY_PORT is
    not set unless given) and wait until /-/healthy answers at `port`."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    async def start(port: int, *args: str, env: dict[str, str] | None = None) -> Running:
        full = process_env(
            token_server=token_server,
            upstream=upstream,
            port=0,
            upstream_client=upstream_client,
            secrets_dir=tmp_path,
        )
        del full["TOKEN_PROXY_PORT"]
        full.update(env or {})
        log_path = tmp_path / f"proxy-{port}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [*proxy_command(), "run", *args],
                env=full,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        started.append((process, log_path))
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:

            async def serving() -> bool:
                try:
                    async with session.get(url + "/-/healthy") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            deadline = time.monotonic() + 15
            while not await serving():
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.05)
        return Running(process, full, url)

    yield start
    for process, log_path in started:
        if process.poll() is None:
            process.terminate()
            await asyncio.to_thread(process.wait, 20)
        LEAKS.add("the log of a proxy probed by health", log_path.read_text(errors="replace"))


@pytest.mark.parametrize("where", ["toml", "environment", "flag"])
async def test_health_finds_the_port_wherever_it_was_configured(
    start_running: StartRunning, tmp_path: Path, where: str
) -> None:
    """The proxy listens on a port that is not 8080, set in a TOML file (on 0.0.0.0, which
    health reaches on loopback), in TOKEN_PROXY_PORT or with --port; `health` given the same
    environment and flags finds it: 0 for /-/healthy and, once the token is held, for
    --ready; 1 once the proxy has stopped."""
    port = free_port()
    flags: list[str] = []
    env: dict[str, str] = {}
    if where == "toml":
        config = tmp_path / "proxy.toml"
        config.write_text(
            f'host = "0.0.0.0"\nport = {port}\nallow_anonymous_remote = true\n',
            encoding="utf-8",
        )
        env["TOKEN_PROXY_CONFIG"] = str(config)
    elif where == "environment":
        env["TOKEN_PROXY_PORT"] = str(port)
    else:
        flags = ["--port", str(port)]
    running = await start_running(port, *flags, env=env)

    alive = await health(*flags, env=running.env)
    assert alive.returncode == 0, alive.stderr
    assert f":{port}/-/healthy answered 200" in alive.stdout

    async def ready() -> bool:
        return (await health("--ready", *flags, env=running.env)).returncode == 0

    deadline = time.monotonic() + 15
    while not await ready():
        assert time.monotonic() < deadline, "health --ready never passed"

    running.process.terminate()
    assert await asyncio.to_thread(running.process.wait, 20) == 0
    gone = await health(*flags, env=running.env)
    assert gone.returncode == 1
    assert f":{port}/-/healthy failed" in gone.stderr
    assert gone.stdout == ""


async def test_ready_fails_while_the_credential_is_refused(
    start_running: StartRunning, token_server: FakeTokenServer
) -> None:
    """While the token endpoint refuses the credential, `health --ready` exits 1 and says why
    (the problem's title and detail, never the secret), and plain `health` still exits 0."""
    token_server.script.extend(
        web.json_response({"error": "invalid_client"}, status=401) for _ in range(5)
    )
    port = free_port()
    running = await start_running(port, env={"TOKEN_PROXY_PORT": str(port)})
    await wait_for(lambda: bool(token_server.requests))
    refused = await health("--ready", env=running.env)
    assert refused.returncode == 1
    assert f":{port}/-/ready answered 503: " in refused.stderr
    assert (await health(env=running.env)).returncode == 0


async def test_health_gives_up_after_its_timeout(tmp_path: Path) -> None:
    """A listener that accepts and never answers makes `health` exit 1 once --timeout has
    passed, not hang; nothing listening at all is 1 at once."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        env = process_env(
            token_server=FakeTokenServer(url="http://127.0.0.1:9/token"),
            upstream=FakeUpstream(url="http://127.0.0.1:9"),
            port=port,
            upstream_client="lean",
            secrets_dir=tmp_path,
        )
        stuck = await health("--timeout", "0.5", env=env)
    assert stuck.returncode == 1
    assert "failed: timed out" in stuck.stderr
    assert stuck.seconds < 5
    refused = await health(env=env)
    assert refused.returncode == 1
    assert "failed: Connection refused" in refused.stderr


async def test_health_reports_a_configuration_error_with_exit_1(tmp_path: Path) -> None:
    """A configuration `run` would refuse makes `health` exit 1 (container health checks
    reserve 2) with the same message naming the setting."""
    env = process_env(
        token_server=FakeTokenServer(url="http://127.0.0.1:9/token"),
        upstream=FakeUpstream(url="http://127.0.0.1:9"),
        port=8080,
        upstream_client="lean",
        secrets_dir=tmp_path,
    )
    env["TOKEN_PROXY_PORT"] = "abc"
    result = await health(env=env)
    assert result.returncode == 1
    assert "configuration error" in result.stderr
    assert "TOKEN_PROXY_PORT" in result.stderr


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("0.0.0.0", "127.0.0.1"),  # noqa: S104  (the wildcard is the input under test)
        ("::", "::1"),
        ("", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.2"),
        ("::1", "::1"),
        ("localhost", "localhost"),
    ],
)
def test_probe_goes_to_loopback_for_a_wildcard_host(host: str, expected: str) -> None:
    """A proxy listening on every interface is asked on loopback; any other host as is."""
    assert probe_host(host) == expected
