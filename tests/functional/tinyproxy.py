"""A real egress proxy for the tests: Debian's tinyproxy, started on a free loopback port with a
generated configuration, its log read back to see what went through it; and a TCP relay in
front of it that keeps every byte sent to the proxy, to show what the proxy could see."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port

START_TIMEOUT = 10.0
_MISSING = (
    "tinyproxy is not installed; the egress proxy tests need a real one. Run "
    "scripts/ensure-tinyproxy (it installs Debian's package when it can) and try again."
)
# tinyproxy's log line of each request it reads: "Request (file descriptor 5): GET http://..."
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/1\.\d")


def tinyproxy_binary() -> str:
    """tinyproxy's path; fails the test (never skips it) when it is not installed."""
    binary = shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/sbin:/sbin")
    if binary is None:
        pytest.fail(_MISSING, pytrace=False)
    return binary


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Tinyproxy:
    """One tinyproxy process on loopback, with Basic authentication and the ports CONNECT
    may reach when a test asks for them."""

    directory: Path
    user: str | None = None
    password: str | None = None
    # None: CONNECT to any port (tinyproxy's default, with no ConnectPort line).
    connect_ports: tuple[int, ...] | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its address, without credentials."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url_with_credentials(self) -> str:
        assert self.user is not None
        assert self.password is not None
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / f"tinyproxy-{self.port}.log"

    def config(self) -> str:
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 60",
            "MaxClients 64",
            "LogLevel Info",
            f'LogFile "{self.log_path}"',
            f'PidFile "{self.directory / f"tinyproxy-{self.port}.pid"}"',
            "Allow 127.0.0.1",
        ]
        if self.user is not None and self.password is not None:
            lines.append(f"BasicAuth {self.user} {self.password}")
        for port in self.connect_ports or ():
            lines.append(f"ConnectPort {port}")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        path = self.directory / f"tinyproxy-{self.port}.conf"
        path.write_text(self.config(), encoding="utf-8")
        output = (self.directory / f"tinyproxy-{self.port}.out").open("wb")
        with output:
            self.process = subprocess.Popen(
                [tinyproxy_binary(), "-d", "-c", str(path)],
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"tinyproxy exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tinyproxy did not listen within {START_TIMEOUT} s")
            time.sleep(0.01)

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request tinyproxy read, in order."""
        return [(m.group(1), m.group(2)) for m in _REQUEST.finditer(self.log())]

    def connects(self) -> list[str]:
        """The host:port of every CONNECT it was asked for."""
        return [target for method, target in self.requests() if method == "CONNECT"]


@dataclass
class Relay:
    """A TCP relay on loopback in front of `port`: what a network tap on the way to the egress
    proxy would see (every byte clients sent, kept in `sent`)."""

    port: int
    sent: bytearray = field(default_factory=bytearray)
    listen_port: int = 0
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, keep: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if keep:
                    self.sent += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return
        self.writers.append(up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer, keep=True),
            self._pump(up_reader, writer, keep=False),
        )


@contextlib.asynccontextmanager
async def relay_to(port: int) -> AsyncIterator[Relay]:
    relay = Relay(port)
    server = await asyncio.start_server(relay._serve, "127.0.0.1", 0)
    relay.listen_port = server.sockets[0].getsockname()[1]
    try:
        yield relay
    finally:
        server.close()
        for writer in relay.writers:
            writer.close()
        await server.wait_closed()
