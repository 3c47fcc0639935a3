"""A real redis-server that a test starts on a free loopback port in a temporary directory (no
persistence), and may kill (SIGKILL), stop (SIGSTOP), continue and start again on the same port.
The fixtures redis_server and redis_server_with_password (tests/conftest.py) give one per test."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT = 10.0
_MISSING = (
    "redis-server is not on PATH; the Redis tests need a real one. Run "
    "scripts/ensure-redis-server (it installs Debian's package when it can) and try again."
)


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

    def __init__(
        self,
        binary: str,
        directory: Path,
        *,
        password: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.password = password
        self.extra = extra  # more options: a unix socket, TLS
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
        return [*command, *self.extra]

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


def redis_binary() -> str:
    """The redis-server on PATH; fails the test (never skips it) when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(_MISSING, pytrace=False)
    return binary


PASSWORD = "Redis-Pa55word-Never-Shown-91c2"
