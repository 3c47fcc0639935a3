"""What every token-proxy feature costs: requests/s, latency and memory against three baselines.

Run it as `bench/run` (or `make bench`); bench/README.md explains what it measures and how to
read the table. Everything listens on 127.0.0.1, every load is bounded in time, and every
process started here is stopped on exit, also on Ctrl-C or SIGTERM.

Cases, each measured with wrk at 8 and 64 connections after a warm-up:
  a  direct to the upstream (nginx `return 200`, or an aiohttp app when nginx is missing)
  b  through token-proxy (`python -m proxy`, default settings: access log and metrics on)
  c  through bench/reference_proxy.py (plain aiohttp, static token: the baseline)
  d  through nginx as a reverse proxy with a keepalive upstream pool (when nginx is installed)
  e  through token-proxy with --workers N (only with `--workers N`), measured in the same run
  f  through bench/ceiling_proxy.py: aiohttp's server and token-proxy's lean client on uvloop
     with no feature at all, the most token-proxy could do on this machine
  g  through token-proxy with a rate limit too high to hold anything back, counted in memory
     (only with `--redis`)
  h  the same, counted in a redis-server on loopback: two Redis round trips per request
     (only with `--redis`)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOOPBACK = "127.0.0.1"
PATH = "/data/wow/token/index?namespace=dynamic-us&locale=en_US"
BIG_PATH = "/big"
SMALL_BODY = (
    '{"_links":{"self":{"href":"https://us.api.blizzard.com/data/wow/token/'
    '?namespace=dynamic-us"}},"last_updated_timestamp":1700000000000,"price":2712340000}'
)
CONNECTIONS = (8, 64)
WRK_THREADS = 2
MIB = 1024 * 1024
CHUNK = MIB
START_TIMEOUT = 20.0  # seconds for a server to accept connections (token-proxy: to be ready)
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
STREAM_TIMEOUT = 300.0  # seconds for the whole streaming download
SAMPLE_INTERVAL = 0.05  # seconds between two VmRSS readings
READY_POLL = 0.01  # seconds between two /-/ready probes: the start-up time's resolution
IDLE_SETTLE = 1.0  # seconds after ready before the idle VmRSS is read
LOG_TAIL_LINES = 20
ICOUNT_TIMEOUT = 900.0  # seconds for bench/icount.py's whole table

TARGET_VS_REFERENCE = 2.0  # b/c requests/s at 64 connections, at least
TARGET_VS_NGINX = 0.40  # b/d requests/s at 64 connections, at least
TARGET_P99_ADDED_MS = 1.0  # b.p99 - a.p99 at 8 connections, at most
TARGET_RSS_MIB = 80.0  # token-proxy peak RSS under load, at most
TARGET_STREAM_GROWTH_MIB = 32.0  # token-proxy RSS growth while streaming 1 GiB, at most
TARGET_IDLE_RSS_MIB = 45.0  # token-proxy VmRSS idle after start, at most
TARGET_STARTUP_S = 0.5  # token-proxy from exec to its first 200 on /-/ready, less than

INSTALL_HINT = {
    "wrk": "install it with `sudo apt-get install wrk` (Debian/Ubuntu)",
    "nginx": "install it with `sudo apt-get install nginx-light` (Debian/Ubuntu) to add the "
    "nginx upstream and case d",
    "redis-server": "install it with `sudo apt-get install redis-server` (Debian/Ubuntu)",
}


class BenchError(Exception):
    """The benchmark cannot go on (a tool is missing, a server did not start)."""


def note(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- processes -------------------------------------------------------------------------------


class Processes:
    """The servers started by this run; `stop_all` ends each one and its process group."""

    def __init__(self) -> None:
        self._started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            # Fixed argument lists, no shell; a session of its own so that Ctrl-C reaches this
            # script only, which then stops the servers in order.
            process = subprocess.Popen(  # noqa: S603
                list(argv),
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self._started.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """End one process started here (SIGTERM, then SIGKILL), and its group."""
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
        self._started = [(name, each) for name, each in self._started if each is not process]

    def stop_all(self) -> None:
        for _, process in reversed(self._started):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, process in reversed(self._started):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                note(f"{name} did not exit within {STOP_TIMEOUT:g} s of SIGTERM; killing it")
                _signal_group(process, signal.SIGKILL)
                process.wait()
            # Workers left behind in the group by a parent that exited first.
            _signal_group(process, signal.SIGKILL)
        self._started.clear()


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    # start_new_session=True made the process the leader of a group numbered by its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def wait_listening(name: str, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise BenchError(
                f"{name} exited with status {process.returncode} at start; "
                f"the end of its log ({log}):\n{log_tail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{name} did not listen on port {port} within {START_TIMEOUT:g} s")
        time.sleep(0.05)


def http_status(port: int, path: str) -> int | None:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def wait_ready(name: str, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    status: int | None = None
    while True:
        if process.poll() is not None:
            raise BenchError(
                f"{name} exited with status {process.returncode} at start; "
                f"the end of its log ({log}):\n{log_tail(log)}"
            )
        status = http_status(port, "/-/ready")
        if status == 200:
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"{name} was not ready within {START_TIMEOUT:g} s (last /-/ready: {status}); "
                f"the end of its log ({log}):\n{log_tail(log)}"
            )
        time.sleep(READY_POLL)


# --- --redis: cases g and h ------------------------------------------------------------------
# What sharing a rate limit through Redis costs: one credential whose rate limit is too high to
# hold anything back, so that only the bookkeeping is measured; g counts it in memory, h in a
# redis-server this run starts on loopback (no persistence): two Redis round trips a request.

# Far above what one machine can send: never waits, always counts.
REDIS_CASE_RATE_LIMIT = "1000000/second"
# Keys the shorthand sets, which the TOML credential replaces.
_SHORTHAND = ("CLIENT_ID", "CLIENT_SECRET", "TOKEN_URL", "UPSTREAM")


def redis_pings(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    start: Callable[..., subprocess.Popen[bytes]], directory: Path, port: int
) -> subprocess.Popen[bytes]:
    """redis-server on loopback `port`, without persistence, started by `start` (the run's
    Processes.start, so that it is stopped with everything else); BenchError when there is none
    on PATH or it does not answer."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError(f"--redis needs redis-server; {INSTALL_HINT['redis-server']}")
    directory.mkdir(exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
    process = start("redis-server", [*argv, "--dir", str(directory)], log=directory / "redis.log")
    deadline = time.monotonic() + START_TIMEOUT
    while not redis_pings(port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"redis-server did not answer PING on port {port}")
        time.sleep(0.05)
    return process


def limited_env(
    env: Mapping[str, str], *, config: Path, token_port: int, upstream_port: int, redis: int | None
) -> dict[str, str]:
    """`env` (case b's) with one credential limited to REDIS_CASE_RATE_LIMIT, written to
    `config`, and with redis_url set when `redis` names a port."""
    lines = [
        "[credentials.bench]",
        'client_id = "bench"',
        'client_secret = "bench-secret"',
        f'token_url = "http://{LOOPBACK}:{token_port}/token"',
        f"rate_limit = {json.dumps([REDIS_CASE_RATE_LIMIT])}",
        "[[routes]]",
        'prefix = "/"',
        f'upstream = "http://{LOOPBACK}:{upstream_port}"',
        'credential = "bench"',
    ]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dropped = {f"TOKEN_PROXY_{name}" for name in _SHORTHAND}
    limited = {k: v for k, v in env.items() if k not in dropped}
    limited["TOKEN_PROXY_CONFIG"] = str(config)
    if redis is not None:
        limited["TOKEN_PROXY_REDIS_URL"] = f"redis://{LOOPBACK}:{redis}/0"
    return limited


# --- memory ----------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (token-proxy may run worker processes)."""
    found = [pid]
    for each in found:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{each}/task").iterdir():
                children = (task / "children").read_text().split()
                found.extend(int(child) for child in children if int(child) not in found)
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of `pid` and its descendants so far."""
    ticks = 0
    for each in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB, summed over `pid` and its descendants."""
    rss = hwm = 0
    for each in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "VmRSS":
                    rss += int(value.split()[0])
                elif key == "VmHWM":
                    hwm += int(value.split()[0])
    return rss, hwm


class RssSampler:
    """The highest VmRSS of a process tree, read every SAMPLE_INTERVAL in a thread."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, memory_kib(self._pid)[0])
            self._stop.wait(SAMPLE_INTERVAL)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, memory_kib(self._pid)[0])


def mib(kib: float) -> float:
    return kib / 1024


# --- wrk -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx/3xx answers and socket errors
    # CPU time of the processes measured (a proxy, and for case h redis-server too) per
    # request, in microseconds: what a case costs, whatever else the machine runs.
    cpu_us: tuple[float, ...] = ()


_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(output: str) -> WrkResult:
    """Read requests/s, p50 and p99 (in ms) and the error counts from `wrk --latency` output."""
    percentiles = {
        match[1]: float(match[2]) * _TIME_UNITS_MS[match[3]]
        for match in _PERCENTILE.finditer(output)
    }
    rate = _RATE.search(output)
    total = _TOTAL.search(output)
    if rate is None or total is None or set(percentiles) != {"50", "99"}:
        raise BenchError(f"cannot read wrk's output:\n{output}")
    non_2xx = _NON_2XX.search(output)
    socket_errors = _SOCKET_ERRORS.search(output)
    errors = int(non_2xx[1]) if non_2xx else 0
    errors += sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    return WrkResult(
        requests_per_s=float(rate[1]),
        p50_ms=percentiles["50"],
        p99_ms=percentiles["99"],
        requests=int(total[1]),
        errors=errors,
    )


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    """`argv` run on the CPUs `cpus` names (taskset's list syntax), or as it is."""
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


def run_wrk(
    wrk: str, url: str, connections: int, seconds: int, cpus: str | None = None
) -> WrkResult:
    argv = pinned(
        [wrk, f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency", url], cpus
    )
    # A fixed argument list, no shell; wrk stops itself after `seconds`.
    done = subprocess.run(  # noqa: S603
        argv, capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return parse_wrk(done.stdout)


# --- servers ---------------------------------------------------------------------------------


def nginx_prelude(directory: Path) -> str:
    """The part every nginx.conf here shares: one worker, everything inside `directory`."""
    return f"""
daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
"""


def nginx_http_common(directory: Path) -> str:
    return f"""
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    keepalive_requests 1000000;
    sendfile on;
    tcp_nopush on;
"""


def upstream_nginx_conf(directory: Path, port: int, webroot: Path) -> str:
    return (
        nginx_prelude(directory)
        + f"""
http {{
{nginx_http_common(directory)}
    access_log off;
    server {{
        listen {LOOPBACK}:{port};
        location = {BIG_PATH} {{
            root {webroot};
            default_type application/octet-stream;
        }}
        location / {{
            default_type application/json;
            return 200 '{SMALL_BODY}';
        }}
    }}
}}
"""
    )


def proxy_nginx_conf(directory: Path, port: int, upstream_port: int) -> str:
    return (
        nginx_prelude(directory)
        + f"""
http {{
{nginx_http_common(directory)}
    access_log {directory}/access.log;
    upstream up {{
        server {LOOPBACK}:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {LOOPBACK}:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer static";
        }}
    }}
}}
"""
    )


def start_nginx(
    processes: Processes, nginx: str, directory: Path, conf: str, port: int, *, cpus: str | None
) -> None:
    name = directory.name
    directory.mkdir(mode=0o755)
    conf_path = directory / "nginx.conf"
    conf_path.write_text(conf)
    log = directory / "stderr.log"
    argv = pinned(
        [nginx, "-p", str(directory), "-c", str(conf_path), "-e", str(directory / "error.log")],
        cpus,
    )
    process = processes.start(name, argv, log=log)
    wait_listening(name, process, port, directory / "error.log")


def serve_upstream(port: int, big_size: int) -> None:
    """The upstream when nginx is missing: the small JSON everywhere, zeros at BIG_PATH."""
    zeros = bytes(CHUNK)

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = big_size
        await response.prepare(request)
        left = big_size
        while left > 0:
            await response.write(zeros[: min(left, CHUNK)])
            left -= CHUNK
        await response.write_eof()
        return response

    async def small(request: web.Request) -> web.Response:
        return web.Response(text=SMALL_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_get(BIG_PATH, big)
    app.router.add_route("*", "/{tail:.*}", small)
    web.run_app(app, host=LOOPBACK, port=port, access_log=None, print=None)


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str
    name: str
    port: int
    pids: tuple[int, ...] = ()  # whose CPU time to count per request


@dataclass
class StreamResult:
    size: int
    seconds: float
    hwm_before_kib: int
    hwm_after_kib: int
    rss_before_kib: int
    rss_peak_kib: int

    @property
    def growth_mib(self) -> float:
        return mib(
            max(self.hwm_after_kib - self.hwm_before_kib, self.rss_peak_kib - self.rss_before_kib)
        )


@dataclass
class Report:
    upstream: str
    # The median run of each case (by requests/s), or "failed"; every run is in `runs`.
    results: dict[tuple[str, int], WrkResult | str]
    runs: dict[tuple[str, int], list[WrkResult]] = field(default_factory=dict)
    idle_kib: tuple[int, int] = (0, 0)
    load_before: float = 0.0
    load_rss_kib: int | None = None
    load_hwm_kib: int | None = None
    stream: StreamResult | str | None = None
    loop: str = "unknown"
    startup_s: float | None = None  # token-proxy's exec to its first 200 on /-/ready
    # bench/icount.py's table of instructions per request, or why it is missing.
    counts: list[str] = field(default_factory=list)


async def download(url: str) -> int:
    size = 0
    timeout = aiohttp.ClientTimeout(total=STREAM_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session,
        session.get(url) as response,
    ):
        if response.status != 200:
            raise BenchError(f"GET {url} answered {response.status}")
        async for chunk in response.content.iter_chunked(CHUNK):
            size += len(chunk)
    return size


def measure_stream(pid: int, port: int, expected: int) -> StreamResult:
    rss_before, hwm_before = memory_kib(pid)
    started = time.perf_counter()
    with RssSampler(pid) as sampler:
        size = asyncio.run(download(f"http://{LOOPBACK}:{port}{BIG_PATH}"))
    seconds = time.perf_counter() - started
    if size != expected:
        raise BenchError(f"streamed {size} bytes through token-proxy, expected {expected}")
    return StreamResult(
        size=size,
        seconds=seconds,
        hwm_before_kib=hwm_before,
        hwm_after_kib=memory_kib(pid)[1],
        rss_before_kib=rss_before,
        rss_peak_kib=sampler.peak_kib,
    )


def loop_from_log(log: Path) -> str:
    """The event loop token-proxy says it runs (`loop=...` in its startup line), or unknown."""
    with contextlib.suppress(OSError), log.open(errors="replace") as lines:
        for number, line in enumerate(lines):
            if number > 200:
                break
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and "loop" in entry:
                    return str(entry["loop"])
            match = re.search(r"\bloop=\"?([\w.:<>-]+)", line)
            if match:
                return match[1]
    return "unknown"


@dataclass(frozen=True)
class Options:
    seconds: int
    warmup: int
    stream_size: int
    use_nginx: bool
    proxy_env: dict[str, str]
    workers: int | None
    keep: bool
    rounds: int = 1
    pin: bool = False
    instructions: int = 0  # requests per case for bench/icount.py; 0: not counted
    redis: bool = False


def proxy_env(
    *,
    port: int,
    token_port: int,
    upstream_port: int,
    secrets_dir: Path,
    options: Options,
    workers: int | None = None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TOKEN_PROXY_")}
    env.update(
        {
            "TOKEN_PROXY_HOST": LOOPBACK,
            "TOKEN_PROXY_PORT": str(port),
            "TOKEN_PROXY_CLIENT_ID": "bench",
            "TOKEN_PROXY_CLIENT_SECRET": "bench-secret",
            "TOKEN_PROXY_TOKEN_URL": f"http://{LOOPBACK}:{token_port}/token",
            "TOKEN_PROXY_UPSTREAM": f"http://{LOOPBACK}:{upstream_port}",
            "TOKEN_PROXY_LOG_FORMAT": "json",
            "TOKEN_PROXY_SECRETS_DIR": str(secrets_dir),
        }
    )
    env.update(options.proxy_env)
    if workers is not None:
        env["TOKEN_PROXY_WORKERS"] = str(workers)
    return env


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/sbin/nginx") if Path(path).exists()), None
    )


class Bench:
    """One run: the servers, then wrk against each case, then the streaming test."""

    def __init__(self, options: Options, processes: Processes, tmp: Path) -> None:
        self.options = options
        self.processes = processes
        self.tmp = tmp
        venv_python = REPO / ".venv" / "bin" / "python"
        self.python = str(venv_python) if venv_python.exists() else sys.executable
        self.upstream_port = free_port()
        self.proxy_log = tmp / "token-proxy.log"
        self.token_port: int | None = None
        self.startup_s: float | None = None  # the last single-process token-proxy's start-up
        self.redis_port: int | None = None
        # --pin: the proxy under test alone on the first CPU, the rest for wrk and upstream.
        self.proxy_cpus: str | None = None
        self.load_cpus: str | None = None
        if options.pin:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2 or shutil.which("taskset") is None:
                raise BenchError("--pin needs two CPUs or more and taskset (util-linux)")
            self.proxy_cpus = str(cpus[0])
            self.load_cpus = ",".join(str(cpu) for cpu in cpus[1:])

    def start(
        self, name: str, argv: Sequence[str], port: int, cpus: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a Python server from bench/ and wait until it listens."""
        log = self.tmp / f"{name.replace(' ', '-')}.log"
        process = self.processes.start(name, pinned([self.python, *argv], cpus), log=log)
        wait_listening(name, process, port, log)
        return process

    def start_upstream(self, nginx: str | None) -> str:
        size = self.options.stream_size
        if nginx is None:
            port = str(self.upstream_port)
            self.start(
                "aiohttp upstream",
                [str(HERE / "bench.py"), "serve-upstream", "--port", port, "--big-size", str(size)],
                self.upstream_port,
                self.load_cpus,
            )
            return "aiohttp app (bench.py serve-upstream), 1 process"
        webroot = self.tmp / "www"
        webroot.mkdir(mode=0o755)
        big = webroot / BIG_PATH.lstrip("/")
        with big.open("wb") as handle:
            handle.truncate(size)  # sparse: no disk used
        big.chmod(0o644)
        directory = self.tmp / "nginx-upstream"
        conf = upstream_nginx_conf(directory, self.upstream_port, webroot)
        start_nginx(self.processes, nginx, directory, conf, self.upstream_port, cpus=self.load_cpus)
        return f"nginx, 1 worker, `return 200` of a {len(SMALL_BODY)}-byte JSON"

    def start_token_server(self) -> int:
        """The fake token endpoint, started once; its port."""
        if self.token_port is None:
            self.token_port = free_port()
            token_server = [str(HERE / "fake_token_server.py"), "--port", str(self.token_port)]
            self.start("fake token server", token_server, self.token_port, self.load_cpus)
        return self.token_port

    def start_proxy(
        self, workers: int | None = None, *, limit: str | None = None
    ) -> tuple[subprocess.Popen[bytes], int]:
        """token-proxy with default settings (case b), with `workers` (case e), or with a rate
        limit counted in `limit`, "memory" (case g) or "redis" (case h)."""
        token_port = self.start_token_server()
        proxy_port = free_port()
        name = "token-proxy" if workers is None else f"token-proxy-{workers}-workers"
        if limit is not None:
            name = f"token-proxy-limit-in-{limit}"
        secrets_dir = self.tmp / f"{name}-secrets"
        secrets_dir.mkdir(exist_ok=True)
        env = proxy_env(
            port=proxy_port,
            token_port=token_port,
            upstream_port=self.upstream_port,
            secrets_dir=secrets_dir,
            options=self.options,
            workers=workers,
        )
        if limit is not None:
            env = limited_env(
                env,
                config=self.tmp / f"{name}.toml",
                token_port=token_port,
                upstream_port=self.upstream_port,
                redis=self.redis_port if limit == "redis" else None,
            )
        log = self.proxy_log if workers is None and limit is None else self.tmp / f"{name}.log"
        # Workers are never pinned: they are there to use more than one CPU.
        cpus = self.proxy_cpus if workers is None else None
        argv = pinned([self.python, "-m", "proxy"], cpus)
        started = time.monotonic()
        proxy = self.processes.start(name, argv, log=log, env=env)
        wait_ready(name, proxy, proxy_port, log)
        if workers is None and limit is None:
            self.startup_s = time.monotonic() - started
        return proxy, proxy_port

    def start_references(self, nginx: str | None) -> list[Case]:
        reference_port = free_port()
        upstream = f"http://{LOOPBACK}:{self.upstream_port}"
        argv = [str(HERE / "reference_proxy.py"), "--port", str(reference_port)]
        self.start(
            "reference proxy", [*argv, "--upstream", upstream], reference_port, self.proxy_cpus
        )
        cases = [Case("c", "reference proxy", reference_port)]
        if nginx is not None:
            nginx_port = free_port()
            directory = self.tmp / "nginx-proxy"
            conf = proxy_nginx_conf(directory, nginx_port, self.upstream_port)
            start_nginx(self.processes, nginx, directory, conf, nginx_port, cpus=self.proxy_cpus)
            cases.append(Case("d", "nginx proxy", nginx_port))
        ceiling_port = free_port()
        argv = [str(HERE / "ceiling_proxy.py"), "--port", str(ceiling_port)]
        self.start("ceiling proxy", [*argv, "--upstream", upstream], ceiling_port, self.proxy_cpus)
        cases.append(Case("f", "ceiling, no features", ceiling_port))
        return cases

    def count_instructions(self, requests: int) -> list[str]:
        """bench/icount.py's table, against the same upstream and token server; its lines."""
        argv = [
            self.python,
            str(HERE / "icount.py"),
            f"--requests={requests}",
            f"--upstream-port={self.upstream_port}",
            f"--token-port={self.start_token_server()}",
        ]
        note(f"counting instructions under callgrind, {requests:,} requests per case")
        try:
            # A fixed argument list, no shell; icount.py stops what it started.
            done = subprocess.run(  # noqa: S603
                argv, capture_output=True, text=True, timeout=ICOUNT_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            return [f"instructions per request: not counted within {ICOUNT_TIMEOUT:g} s"]
        if done.returncode != 0 and not done.stdout:
            return [f"instructions per request: not counted ({done.stderr.strip()})"]
        return done.stdout.splitlines()

    def measure(self, wrk: str, case: Case, connections: int, report: Report, pid: int) -> None:
        url = f"http://{LOOPBACK}:{case.port}{PATH}"
        label = f"{case.key} {case.name}, {connections} connections"
        note(f"{label}: {self.options.warmup:g} s warm-up, {self.options.seconds:g} s measured")
        try:
            if self.options.warmup:
                run_wrk(wrk, url, connections, self.options.warmup, self.load_cpus)
            before = [cpu_seconds(pid) for pid in case.pids]
            if case.key == "b" and connections == max(CONNECTIONS):
                with RssSampler(pid) as sampler:
                    result = run_wrk(wrk, url, connections, self.options.seconds, self.load_cpus)
                report.load_rss_kib = max(report.load_rss_kib or 0, sampler.peak_kib)
                report.load_hwm_kib = memory_kib(pid)[1]
            else:
                result = run_wrk(wrk, url, connections, self.options.seconds)
            if case.pids and result.requests:
                spent = [
                    cpu_seconds(each) - was for each, was in zip(case.pids, before, strict=True)
                ]
                result = replace(result, cpu_us=tuple(t * 1e6 / result.requests for t in spent))
        except (BenchError, subprocess.TimeoutExpired) as exc:
            note(f"{label}: {exc}")
            report.runs.setdefault((case.key, connections), [])
        else:
            report.runs.setdefault((case.key, connections), []).append(result)

    def run(self) -> Report:
        load_before = os.getloadavg()[0]
        wrk = shutil.which("wrk")
        if wrk is None:
            raise BenchError(f"wrk is not installed; {INSTALL_HINT['wrk']}")
        nginx = find_nginx() if self.options.use_nginx else None
        if nginx is None and self.options.use_nginx:
            note(
                "nginx is not installed, so the upstream is an aiohttp app and case d is "
                f"skipped; {INSTALL_HINT['nginx']}"
            )
        upstream = self.start_upstream(nginx)
        proxy, proxy_port = self.start_proxy()
        cases = [
            Case("a", "direct to upstream", self.upstream_port),
            Case("b", "token-proxy", proxy_port, (proxy.pid,)),
            *self.start_references(nginx),
        ]
        if self.options.workers is not None:
            _, workers_port = self.start_proxy(self.options.workers)
            cases.append(Case("e", f"token-proxy {self.options.workers} workers", workers_port))
        if self.options.redis:
            self.redis_port = free_port()
            redis = start_redis(self.processes.start, self.tmp / "redis", self.redis_port)
            for key, limit in (("g", "memory"), ("h", "redis")):
                limited, port = self.start_proxy(limit=limit)
                pids = (limited.pid,) if limit == "memory" else (limited.pid, redis.pid)
                cases.append(Case(key, f"token-proxy, rate limit in {limit}", port, pids))
        time.sleep(IDLE_SETTLE)
        report = Report(
            upstream=upstream,
            results={},
            idle_kib=memory_kib(proxy.pid),
            load_before=load_before,
            startup_s=self.startup_s,
        )
        rounds = self.options.rounds
        for number in range(1, rounds + 1):
            if rounds > 1:
                note(f"round {number} of {rounds}")
            for case in cases:
                for connections in CONNECTIONS:
                    self.measure(wrk, case, connections, report, proxy.pid)
                if proxy.poll() is not None:
                    raise BenchError(
                        f"token-proxy exited with status {proxy.returncode}; the end of its log "
                        f"({self.proxy_log}):\n{log_tail(self.proxy_log)}"
                    )
        report.results = {key: median_run(runs) for key, runs in report.runs.items()}
        note(f"streaming {self.options.stream_size / MIB:g} MiB through token-proxy")
        try:
            report.stream = measure_stream(proxy.pid, proxy_port, self.options.stream_size)
        except (BenchError, aiohttp.ClientError, TimeoutError) as exc:
            note(f"streaming failed: {exc!r}")
            report.stream = "failed"
        report.loop = loop_from_log(self.proxy_log)
        if self.options.instructions:
            report.counts = self.count_instructions(self.options.instructions)
        return report


def footprint(options: Options, processes: Processes, tmp: Path, rounds: int) -> Iterator[str]:
    """`bench/run footprint`: token-proxy's start-up to ready and idle VmRSS, `rounds` times
    (medians), beside the idle VmRSS of the reference proxy on uvloop, the least an aiohttp
    proxy on uvloop weighs."""
    bench = Bench(options, processes, tmp)
    bench.start_upstream(None)
    startups, idles = [], []
    for number in range(1, rounds + 1):
        note(f"footprint round {number} of {rounds}")
        proxy, _ = bench.start_proxy()
        time.sleep(IDLE_SETTLE)
        idles.append(mib(memory_kib(proxy.pid)[0]))
        startups.append(bench.startup_s or 0.0)  # set by every start_proxy()
        processes.stop(proxy)
    port = free_port()
    reference = [str(HERE / "reference_proxy.py"), "--port", str(port), "--loop", "uvloop"]
    upstream = ["--upstream", f"http://{LOOPBACK}:{bench.upstream_port}"]
    process = bench.start("reference proxy uvloop", [*reference, *upstream], port)
    time.sleep(IDLE_SETTLE)
    floor = mib(memory_kib(process.pid)[0])
    startup, idle = sorted(startups)[(rounds - 1) // 2], sorted(idles)[(rounds - 1) // 2]
    extra = [f"{k}={v}" for k, v in options.proxy_env.items()]
    yield (
        f"token-proxy footprint: settings defaults{' + ' + ' '.join(extra) if extra else ''}, "
        f"{rounds} round{'s' if rounds > 1 else ''} (median)"
    )
    every = " ".join(f"{value:.3f}" for value in startups)
    yield f"  {'start-up to ready':<30}{startup:.3f} s   ({every})"
    every = " ".join(f"{value:.1f}" for value in idles)
    yield f"  {'idle VmRSS':<30}{idle:.1f} MiB  ({every})"
    yield f"  {'reference proxy, uvloop, idle':<30}{floor:.1f} MiB  (aiohttp and uvloop alone)"
    yield "targets"
    for target in footprint_targets(idle, startup):
        yield target.line()


# --- the report ------------------------------------------------------------------------------


def median_run(runs: Sequence[WrkResult]) -> WrkResult | str:
    """The run with the median requests/s (the lower middle one of an even count), so that its
    latencies come from the same run; "failed" when no run completed."""
    if not runs:
        return "failed"
    ordered = sorted(runs, key=lambda run: run.requests_per_s)
    return ordered[(len(ordered) - 1) // 2]


def _ratio(report: Report, top: str, bottom: str) -> float | None:
    a = report.results.get((top, max(CONNECTIONS)))
    b = report.results.get((bottom, max(CONNECTIONS)))
    if isinstance(a, WrkResult) and isinstance(b, WrkResult) and b.requests_per_s > 0:
        return a.requests_per_s / b.requests_per_s
    return None


def _p99_added(report: Report) -> float | None:
    proxied = report.results.get(("b", min(CONNECTIONS)))
    direct = report.results.get(("a", min(CONNECTIONS)))
    if isinstance(proxied, WrkResult) and isinstance(direct, WrkResult):
        return proxied.p99_ms - direct.p99_ms
    return None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


CASE_NAMES = {
    "a": "a direct to upstream",
    "b": "b token-proxy",
    "c": "c reference proxy",
    "d": "d nginx proxy",
    "f": "f no-feature ceiling",
    "g": "g limit in memory",
    "h": "h limit in Redis",
}


@dataclass(frozen=True)
class Target:
    label: str
    value: float | None
    met: Callable[[float], bool]
    spec: str
    unit: str = ""

    def line(self) -> str:
        verdict = "n/a " if self.value is None else "PASS" if self.met(self.value) else "MISS"
        return f"  {verdict}  {self.label:<38} {_fmt(self.value, self.spec, self.unit)}"


def render(report: Report, options: Options) -> Iterator[str]:
    extra = [f"{k}={v}" for k, v in options.proxy_env.items()]
    yield (
        f"token-proxy benchmark: {os.cpu_count()} cores, load average {report.load_before:.2f} "
        f"before and {os.getloadavg()[0]:.2f} after; wrk -t{WRK_THREADS}, "
        f"{options.seconds:g} s per case after a {options.warmup:g} s warm-up"
        + (f", {options.rounds} rounds (medians)" if options.rounds > 1 else "")
    )
    yield f"upstream: {report.upstream}"
    yield f"token-proxy settings: defaults{' + ' + ' '.join(extra) if extra else ''}"
    if options.pin:
        yield (
            "pinned (--pin): each proxy under test alone on the first CPU; wrk, the upstream "
            "and the token server on the others; case e not pinned"
        )
    if options.workers is not None:
        yield f"case e: the same settings + TOKEN_PROXY_WORKERS={options.workers}"
    if options.redis:
        yield (
            f"cases g, h: the same settings with one credential limited to "
            f"{REDIS_CASE_RATE_LIMIT}, counted in memory (g) and in a local redis-server (h); "
            "cpu us/req: token-proxy's CPU time per request (+ redis-server's for h)"
        )
    yield ""
    spread = "  requests/s of every round" if options.rounds > 1 else ""
    yield (
        f"{'case':<22} {'conns':>5} {'requests/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
        + (f" {'cpu us/req':>11}" if options.redis else "")
        + spread
    )
    for (key, connections), result in report.results.items():
        name = CASE_NAMES[key] if key != "e" else f"e {options.workers} workers"
        if isinstance(result, WrkResult):
            runs = report.runs.get((key, connections), [])
            every = "  " + " ".join(f"{run.requests_per_s:,.0f}" for run in runs) if spread else ""
            cpu = ""
            if options.redis:
                cpu = " " + f"{'+'.join(f'{us:.0f}' for us in result.cpu_us) or '-':>11}"
            yield (
                f"{name:<22} {connections:>5} {result.requests_per_s:>12,.0f} "
                f"{result.p50_ms:>8.3f} {result.p99_ms:>8.3f} {result.errors:>7}{cpu}{every}"
            )
        else:
            yield f"{name:<22} {connections:>5} {result:>12}"
    yield ""
    high, low = max(CONNECTIONS), min(CONNECTIONS)
    vs_reference, vs_nginx = _ratio(report, "b", "c"), _ratio(report, "b", "d")
    p99_added = _p99_added(report)
    yield from _ratio_lines(report, options)
    yield ""
    yield from report.counts or ["instructions per request: not counted (--instructions 0)"]
    yield ""
    yield from _memory_lines(report, high)
    idle_rss = report.idle_kib[0]
    growth = report.stream.growth_mib if isinstance(report.stream, StreamResult) else None
    yield ""
    yield "targets"
    load_peak = max(report.load_hwm_kib or 0, report.load_rss_kib or 0) or None
    targets = (
        Target(
            f"b/c >= {TARGET_VS_REFERENCE:.1f} at {high} connections",
            vs_reference,
            lambda v: v >= TARGET_VS_REFERENCE,
            ".2f",
        ),
        Target(
            f"b/d >= {TARGET_VS_NGINX:.2f} at {high} connections",
            vs_nginx,
            lambda v: v >= TARGET_VS_NGINX,
            ".2f",
        ),
        Target(
            f"p99 added at {low} connections <= {TARGET_P99_ADDED_MS:g} ms",
            p99_added,
            lambda v: v <= TARGET_P99_ADDED_MS,
            ".3f",
            " ms",
        ),
        Target(
            f"RSS under load <= {TARGET_RSS_MIB:g} MiB",
            _mib(load_peak),
            lambda v: v <= TARGET_RSS_MIB,
            ".1f",
            " MiB",
        ),
        *footprint_targets(_mib(idle_rss) if idle_rss else None, report.startup_s),
        Target(
            f"streaming growth <= {TARGET_STREAM_GROWTH_MIB:g} MiB",
            growth,
            lambda v: v <= TARGET_STREAM_GROWTH_MIB,
            ".1f",
            " MiB",
        ),
    )
    for target in targets:
        yield target.line()
    if report.loop == "unknown":
        uvloop = "unknown (token-proxy logs no loop=... at start)"
    else:
        uvloop = f"{'yes' if 'uvloop' in report.loop.lower() else 'no'} (loop={report.loop})"
    yield f"  uvloop in use: {uvloop}"


def _memory_lines(report: Report, high: int) -> Iterator[str]:
    yield "token-proxy memory (MiB; VmRSS and VmHWM from /proc/PID/status)"
    idle_rss, idle_hwm = report.idle_kib
    yield f"  {'idle after start':<24}VmRSS {mib(idle_rss):.1f}, VmHWM {mib(idle_hwm):.1f}"
    yield f"  {'start-up to ready':<24}{_fmt(report.startup_s, '.3f', ' s')}"
    yield (
        f"  {f'under load ({high} conns)':<24}VmRSS peak sampled "
        f"{_fmt(_mib(report.load_rss_kib), '.1f')}"
        f", VmHWM {_fmt(_mib(report.load_hwm_kib), '.1f')}"
    )
    stream = report.stream
    if isinstance(stream, StreamResult):
        growth = stream.growth_mib
        yield (
            f"  {f'streaming {stream.size / MIB:g} MiB':<24}growth {growth:.1f} (VmHWM "
            f"{mib(stream.hwm_before_kib):.1f} -> {mib(stream.hwm_after_kib):.1f}, VmRSS "
            f"{mib(stream.rss_before_kib):.1f} -> peak {mib(stream.rss_peak_kib):.1f}); "
            f"{stream.seconds:.1f} s, {stream.size / MIB / stream.seconds:,.0f} MiB/s"
        )
    else:
        yield f"  {'streaming':<24}{stream or 'not run'}"


def footprint_targets(idle_mib: float | None, startup_s: float | None) -> tuple[Target, Target]:
    return (
        Target(
            f"idle RSS <= {TARGET_IDLE_RSS_MIB:g} MiB",
            idle_mib,
            lambda v: v <= TARGET_IDLE_RSS_MIB,
            ".1f",
            " MiB",
        ),
        Target(
            f"start-up to ready < {TARGET_STARTUP_S:g} s",
            startup_s,
            lambda v: v < TARGET_STARTUP_S,
            ".3f",
            " s",
        ),
    )


def _ratio_lines(report: Report, options: Options) -> Iterator[str]:
    high, low = max(CONNECTIONS), min(CONNECTIONS)
    yield f"throughput ratios at {high} connections"
    for top, bottom, label in (
        ("b", "c", "token-proxy / reference proxy"),
        ("b", "d", "token-proxy / nginx proxy"),
        ("b", "a", "token-proxy / direct"),
        ("f", "c", "ceiling / reference proxy"),
        ("b", "f", "token-proxy / ceiling"),
    ):
        yield f"  {top}/{bottom} {label:<31} {_fmt(_ratio(report, top, bottom), '.2f')}"
    if options.workers is not None:
        n = options.workers
        for other, label in (("b", "1 worker"), ("c", "reference proxy"), ("d", "nginx proxy")):
            ratio = _fmt(_ratio(report, "e", other), ".2f")
            yield f"  e/{other} {f'{n} workers / {label}':<31} {ratio}"
    if options.redis:
        for top, bottom, label in (
            ("g", "b", "limit in memory / no limit"),
            ("h", "b", "limit in Redis / no limit"),
            ("h", "g", "limit in Redis / in memory"),
        ):
            yield f"  {top}/{bottom} {label:<31} {_fmt(_ratio(report, top, bottom), '.2f')}"
    p99_added = _p99_added(report)
    yield f"p99 added over direct at {low} connections (b.p99 - a.p99): {_fmt(p99_added, '.3f')} ms"
    if p99_added is not None and p99_added < 0:
        yield (
            "  (below zero: the direct case's p99 is wrk's own saturation at that rate, so read "
            "b's p50 and p99 against a's instead)"
        )


def _mib(kib: int | None) -> float | None:
    return None if kib is None else mib(kib)


# --- command line ----------------------------------------------------------------------------


def _seconds(least: int) -> Callable[[str], int]:
    """wrk takes whole seconds."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected whole seconds, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected at least {least}, got {value}")
        return value

    return parse


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Measure token-proxy against a direct upstream, a plain aiohttp proxy and "
        "nginx (see bench/README.md).",
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve-upstream", help="(internal) the aiohttp upstream")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--big-size", type=int, required=True)
    weigh = sub.add_parser(
        "footprint", help="token-proxy's start-up to ready and idle VmRSS only (a few seconds)"
    )
    weigh.add_argument(
        "--rounds",
        dest="footprint_rounds",
        type=_at_least_one,
        default=3,
        help="default 3 (medians)",
    )
    weigh.add_argument(
        "--proxy-env",
        dest="footprint_env",
        metavar="KEY=VALUE",
        type=_env_pair,
        action="append",
        default=[],
        help="extra environment for token-proxy (repeatable)",
    )
    parser.add_argument(
        "--duration",
        type=_seconds(1),
        default=10,
        help="whole seconds measured per case (default 10)",
    )
    parser.add_argument(
        "--warmup",
        type=_seconds(0),
        default=2,
        help="whole seconds of warm-up per case, 0 for none (default 2)",
    )
    parser.add_argument("--quick", action="store_true", help="3 s per case: a smoke test")
    parser.add_argument(
        "--rounds",
        type=_at_least_one,
        default=1,
        help="measure every case this many times, in turns, and report the median (default 1)",
    )
    parser.add_argument(
        "--proxy-env",
        metavar="KEY=VALUE",
        type=_env_pair,
        action="append",
        default=[],
        help="extra environment for token-proxy (repeatable)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="also measure token-proxy with TOKEN_PROXY_WORKERS=N, as case e of the same run",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="also measure token-proxy with a rate limit counted in memory (case g) and in a "
        "redis-server started on loopback (case h)",
    )
    parser.add_argument(
        "--stream-mib", type=int, default=1024, help="size of the streaming test (default 1024)"
    )
    parser.add_argument(
        "--no-nginx",
        action="store_true",
        help="use the aiohttp upstream and skip case d even when nginx is installed",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory with every log"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run each proxy under test alone on the first CPU, and wrk, the upstream and the "
        "token server on the others (taskset); workers (case e) are not pinned",
    )
    parser.add_argument(
        "--instructions",
        type=_whole,
        default=2000,
        metavar="N",
        help="count instructions per request under callgrind over N sequential requests per "
        "case with bench/icount.py (default 2000, 0 for none; needs valgrind)",
    )
    return parser.parse_args(argv)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "serve-upstream":
        serve_upstream(args.port, args.big_size)
        return 0
    options = Options(
        seconds=3 if args.quick else args.duration,
        warmup=args.warmup,
        stream_size=args.stream_mib * MIB,
        use_nginx=not args.no_nginx,
        proxy_env=dict(args.footprint_env if args.command == "footprint" else args.proxy_env),
        workers=args.workers,
        keep=args.keep,
        rounds=args.rounds,
        pin=args.pin,
        instructions=args.instructions,
        redis=args.redis,
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with `&`
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="token-proxy-bench-"))
    tmp.chmod(0o755)  # nginx workers run as another user when started by root
    try:
        if args.command == "footprint":
            lines = list(footprint(options, processes, tmp, args.footprint_rounds))
        else:
            lines = list(render(Bench(options, processes, tmp).run(), options))
    except BenchError as exc:
        note(str(exc))
        return 1
    except KeyboardInterrupt:
        note("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
        processes.stop_all()
        if options.keep:
            note(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
