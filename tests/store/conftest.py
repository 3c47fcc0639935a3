"""A real redis-server per test, started on a free loopback port in a temporary directory (no
persistence), which a test may kill, stop, continue and start again on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from proxy.store.redis import RedisStore
from proxy.store.redis_url import parse_redis_url

START_TIMEOUT = 10.0
_MISSING = (
    "redis-server is not on PATH; the store tests need a real one. Run "
    "scripts/ensure-redis-server (it installs Debian's package when it can) and try again."
)
_prefixes = itertools.count(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pings(port: int, password: str | None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if password is not None:
                sock.sendall(f"AUTH {password}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process that a test controls."""

    def __init__(self, binary: str, directory: Path, *, password: str | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.password = password
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        login = f":{self.password}@" if self.password is not None else ""
        return f"redis://{login}127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        if self.password is not None:
            command += ["--requirepass", self.password]
        return command

    def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers PING."""
        with (self.directory / "redis.log").open("ab") as output:
            self.process = subprocess.Popen(
                self._command(), stdout=output, stderr=subprocess.STDOUT, cwd=self.directory
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not _pings(self.port, self.password):
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT} s")
            time.sleep(0.01)

    async def restart(self) -> None:
        await asyncio.to_thread(self.start)

    def kill(self) -> None:
        """SIGKILL: gone at once, connections reset, nothing written."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait(timeout=10)

    def stop(self) -> None:
        """SIGSTOP: still accepting connections (the kernel does), answering nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(_MISSING, pytrace=False)
    return binary


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server of this test's own; fails (never skips) when there is none."""
    server = RedisServer(_binary(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_server_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    """As redis_server, with `requirepass` set."""
    server = RedisServer(_binary(), tmp_path, password="Redis-Pa55word-Never-Shown-91c2")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.asynccontextmanager
async def redis_store(
    url: str, *, prefix: str | None = None, timeout: float = 0.25
) -> AsyncIterator[RedisStore]:
    """A started RedisStore on `url`, closed at the end of the block."""
    store = RedisStore(
        parse_redis_url(url),
        timeout=timeout,
        prefix=prefix if prefix is not None else f"test{next(_prefixes)}:",
    )
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], *, timeout: float = 10.0
) -> None:
    """Wait until the condition (sync or async) holds, or fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
