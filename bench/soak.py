"""Soak test: token-proxy keeps serving, with no failed request and no memory growth, while its
access token is replaced every second.

What it proves: under a steady open-loop load, a real `python -m proxy` process never forwards
a stale token, never makes a client wait into an error while it refreshes, and does not leak
memory (its RSS grows by no more than 10 % between the end of the warm-up and the end of the
run).

How: everything runs on 127.0.0.1. A fake OAuth token server issues a unique token on every
request, with `expires_in` set to --token-lifetime. A fake upstream answers 200 only to
`Authorization: Bearer <a token that server issued and that has not expired yet>`, and 401
otherwise. The proxy is started as a subprocess pointed at both (its log goes to a temporary
file), and requests are sent through it on an open-loop schedule: request i starts at
t0 + i/rate, whether or not earlier ones have finished. Latency is measured from each request's
scheduled start, so a stalled proxy cannot hide behind a slowed-down client.

The proxy replays a request once with a new token when upstream answers 401, so a stale token
may not reach the client as a failure; the upstream's own count of rejected tokens is reported
as well, and is 0 for a proxy that refreshes in time.

Run it from the repository root:

    .venv/bin/python bench/soak.py                      # 5 minutes, 50 requests/s, 1 s tokens
    .venv/bin/python bench/soak.py --duration 20        # a quick check
    make soak

It prints a report on stdout whose last line is PASS or FAIL, and exits 0 on PASS, 1 on FAIL.
FAIL means at least one request failed (a status other than 200, or an exception) or the
proxy's RSS grew by more than 10 %. Progress goes to stderr every 30 s. The proxy is always
stopped (SIGTERM, then SIGKILL after 20 s), also on Ctrl-C or an error; its log is kept when the
run fails and its path is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

LOOPBACK = "127.0.0.1"
CLIENT_ID = "soak-client"
READY_TIMEOUT = 20.0  # seconds for the proxy to answer 200 on /-/ready after it starts
STRAGGLER_TIMEOUT = 30.0  # seconds to wait for requests still running at the end
REQUEST_TIMEOUT = 30.0  # seconds one request may take before it counts as failed
STOP_TIMEOUT = 20.0  # seconds between SIGTERM and SIGKILL
PROGRESS_INTERVAL = 30.0
WARMUP = 5.0  # seconds before the first RSS reading (or 10 % of the duration if shorter)
RSS_GROWTH_LIMIT = 10.0  # percent
CLIENT_CONNECTIONS = 1000  # requests beyond this wait for a connection; latency includes it
SAMPLE_LENGTH = 200
LOG_TAIL_LINES = 30
REPO = Path(__file__).resolve().parent.parent


class SoakError(Exception):
    """The soak could not run (the proxy did not start, a server could not bind)."""


class TokenServer:
    """An OAuth 2.0 client-credentials token endpoint that issues a unique token each time."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self.requests = 0
        self._expiry: dict[str, float] = {}

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = f"soak{self.requests}-{secrets.token_hex(16)}"
        self._expiry[token] = time.monotonic() + self.lifetime
        expires_in = int(self.lifetime) if self.lifetime.is_integer() else self.lifetime
        return web.json_response(
            {"access_token": token, "token_type": "bearer", "expires_in": expires_in}
        )

    def rejects(self, token: str) -> str | None:
        """Why `token` must be refused now, or None when it is valid."""
        expires_at = self._expiry.get(token)
        if expires_at is None:
            return "unknown token"
        if time.monotonic() >= expires_at:
            return "expired token"
        return None


class Upstream:
    """An API that answers 200 to a live token of the token server, 401 to anything else."""

    def __init__(self, tokens: TokenServer) -> None:
        self._tokens = tokens
        self.accepted = 0
        self.rejected: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        reason = (
            self._tokens.rejects(auth.removeprefix("Bearer "))
            if auth.startswith("Bearer ")
            else "no bearer token"
        )
        if reason is not None:
            self.rejected[reason] += 1
            return web.json_response(
                {"error": "invalid_token", "error_description": reason},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        self.accepted += 1
        return web.json_response({"ok": True})


@dataclass
class Results:
    """What the clients saw."""

    sent: int = 0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def fail(self, reason: str, sample: str = "") -> None:
        self.failures[reason] += 1
        if sample and reason not in self.samples:
            self.samples[reason] = sample[:SAMPLE_LENGTH]


@dataclass
class ProxyHandle:
    """The proxy subprocess, once started; main() kills it if everything else went wrong."""

    process: subprocess.Popen[bytes] | None = None


@dataclass
class Outcome:
    """Everything the report needs."""

    args: argparse.Namespace
    results: Results
    elapsed: float
    token_fetches: int
    upstream_rejected: Counter[str]
    rss_start_kib: int | None
    rss_end_kib: int | None
    proxy_exit: int | None = None
    log_lines: int = 0


def positive(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="soak.py",
        description="Soak token-proxy under token churn: open-loop load through a real proxy "
        "process, fake token server and upstream on loopback; prints PASS or FAIL.",
    )
    parser.add_argument(
        "--duration", type=positive, default=300.0, metavar="SECONDS", help="default 300"
    )
    parser.add_argument(
        "--rate", type=positive, default=50.0, metavar="REQUESTS_PER_SECOND", help="default 50"
    )
    parser.add_argument(
        "--token-lifetime",
        type=positive,
        default=1.0,
        metavar="SECONDS",
        help="expires_in of every token issued (default 1)",
    )
    return parser.parse_args(argv)


def note(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB, or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"


async def serve(stack: contextlib.AsyncExitStack, app: web.Application) -> str:
    """Serve `app` on a free loopback port until `stack` closes; return its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    port = runner.addresses[0][1]
    return f"http://{LOOPBACK}:{port}"


def proxy_env(*, token_url: str, upstream_url: str, port: int, secrets_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TOKEN_PROXY_")}
    env.update(
        {
            "TOKEN_PROXY_CLIENT_ID": CLIENT_ID,
            "TOKEN_PROXY_CLIENT_SECRET": "soak-" + secrets.token_hex(16),
            "TOKEN_PROXY_TOKEN_URL": token_url,
            "TOKEN_PROXY_UPSTREAM": upstream_url,
            "TOKEN_PROXY_PORT": str(port),
            "TOKEN_PROXY_LOG_LEVEL": "warning",
            "TOKEN_PROXY_SECRETS_DIR": str(secrets_dir),
        }
    )
    return env


def spawn_proxy(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `python -m proxy` with its output in `log_path` (not waited for here)."""
    with log_path.open("wb") as log:
        # A fixed argument list, no shell: the interpreter running this script, and the package.
        return subprocess.Popen(
            [sys.executable, "-m", "proxy"],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


async def stop_proxy(process: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, up to STOP_TIMEOUT seconds to exit, then SIGKILL; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(process.wait, STOP_TIMEOUT)
    finally:
        if process.poll() is None:
            note(f"the proxy did not exit within {STOP_TIMEOUT:g} s of SIGTERM; killing it")
            process.kill()
            process.wait()
    return process.returncode


async def wait_ready(
    session: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer"
    probe_timeout = aiohttp.ClientTimeout(total=2)
    while True:
        if process.poll() is not None:
            raise SoakError(
                f"the proxy exited with status {process.returncode} before it became ready; "
                f"the end of its log ({log_path}):\n{log_tail(log_path)}"
            )
        try:
            async with session.get(url + "/-/ready", timeout=probe_timeout) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}: {(await response.text())[:SAMPLE_LENGTH]}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = type(exc).__name__
        if time.monotonic() > deadline:
            raise SoakError(
                f"the proxy did not answer 200 on /-/ready within {READY_TIMEOUT:g} s "
                f"(last answer: {last}); the end of its log ({log_path}):\n{log_tail(log_path)}"
            )
        await asyncio.sleep(0.1)


async def one_request(
    session: aiohttp.ClientSession, url: str, scheduled: float, results: Results
) -> None:
    try:
        async with session.get(url) as response:
            body = await response.read()
            status = response.status
    except TimeoutError:
        results.fail(f"timeout after {REQUEST_TIMEOUT:g} s")
        return
    except aiohttp.ClientError as exc:
        results.fail(type(exc).__name__, str(exc))
        return
    results.latencies.append(time.monotonic() - scheduled)
    if status == 200:
        results.ok += 1
    else:
        results.fail(f"HTTP {status}", body.decode("utf-8", "replace"))


async def generate_load(
    session: aiohttp.ClientSession, url: str, *, rate: float, duration: float, results: Results
) -> float:
    """Open loop: request i starts at t0 + i/rate for every i/rate < duration; then up to
    STRAGGLER_TIMEOUT seconds for the last ones. Returns t0."""
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.monotonic()
    try:
        for i in range(math.ceil(duration * rate)):
            scheduled = t0 + i / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one_request(session, url, scheduled, results))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            results.sent += 1
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=STRAGGLER_TIMEOUT)
            for _ in pending:
                results.fail(f"still running {STRAGGLER_TIMEOUT:g} s after the last was sent")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return t0


async def report_progress(
    t0: float, duration: float, results: Results, tokens: TokenServer, pid: int
) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        rss = rss_kib(pid)
        note(
            f"{time.monotonic() - t0:.0f}/{duration:g} s: sent {results.sent}, ok {results.ok}, "
            f"failed {results.failed}, token fetches {tokens.requests}, "
            f"proxy RSS {mib(rss)}"
        )


async def rss_after(delay: float, pid: int) -> int | None:
    await asyncio.sleep(delay)
    return rss_kib(pid)


async def soak(args: argparse.Namespace, handle: ProxyHandle, workdir: Path) -> Outcome:
    tokens = TokenServer(args.token_lifetime)
    upstream = Upstream(tokens)
    log_path = workdir / "proxy.log"
    secrets_dir = workdir / "secrets"
    secrets_dir.mkdir()
    async with contextlib.AsyncExitStack() as stack:
        token_app = web.Application()
        token_app.router.add_post("/token", tokens.handle)
        upstream_app = web.Application()
        upstream_app.router.add_route("*", "/{tail:.*}", upstream.handle)
        token_url = await serve(stack, token_app) + "/token"
        upstream_url = await serve(stack, upstream_app)

        port = free_port()
        env = proxy_env(
            token_url=token_url, upstream_url=upstream_url, port=port, secrets_dir=secrets_dir
        )
        process = handle.process = spawn_proxy(env, log_path)
        stopped: list[int | None] = []

        async def stop() -> None:
            stopped.append(await stop_proxy(process))

        stack.push_async_callback(stop)  # runs before the servers close: in-flight requests end
        session = await stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CLIENT_CONNECTIONS),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
                trust_env=False,
            )
        )
        proxy_url = f"http://{LOOPBACK}:{port}"
        await wait_ready(session, proxy_url, process, log_path)
        note(
            f"proxy (pid {process.pid}) ready on {proxy_url}; sending {args.rate:g} requests/s "
            f"for {args.duration:g} s with {args.token_lifetime:g} s tokens"
        )

        results = Results()
        started = time.monotonic()
        warmup = min(WARMUP, 0.1 * args.duration)
        rss_start = asyncio.create_task(rss_after(warmup, process.pid))
        progress = asyncio.create_task(
            report_progress(started, args.duration, results, tokens, process.pid)
        )
        try:
            await generate_load(
                session,
                proxy_url + "/soak",
                rate=args.rate,
                duration=args.duration,
                results=results,
            )
            rss_start_kib = await rss_start
        finally:
            progress.cancel()
            rss_start.cancel()
            await asyncio.gather(progress, rss_start, return_exceptions=True)
        outcome = Outcome(
            args=args,
            results=results,
            elapsed=time.monotonic() - started,
            token_fetches=tokens.requests,
            upstream_rejected=upstream.rejected,
            rss_start_kib=rss_start_kib,
            rss_end_kib=rss_kib(process.pid),
        )
    outcome.proxy_exit = stopped[0] if stopped else None
    with contextlib.suppress(OSError):
        outcome.log_lines = len(log_path.read_text(errors="replace").splitlines())
    return outcome


def mib(kib: int | None) -> str:
    return "unknown (process gone)" if kib is None else f"{kib / 1024:.1f} MiB"


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    return values[max(0, math.ceil(fraction * len(values)) - 1)]


def verdict(outcome: Outcome) -> tuple[list[str], float | None]:
    """The reasons to FAIL (none means PASS), and the RSS change in percent."""
    reasons: list[str] = []
    if outcome.results.failed:
        reasons.append(f"{outcome.results.failed} failed requests")
    start, end = outcome.rss_start_kib, outcome.rss_end_kib
    growth = None if start is None or end is None else (end - start) / start * 100
    if growth is None:
        reasons.append("proxy RSS could not be read (did the proxy die?)")
    elif growth > RSS_GROWTH_LIMIT:
        reasons.append(f"proxy RSS grew by {growth:.1f} % (limit {RSS_GROWTH_LIMIT:g} %)")
    return reasons, growth


def report(outcome: Outcome) -> bool:
    """Print the report on stdout; True for PASS."""
    args, results = outcome.args, outcome.results
    reasons, growth = verdict(outcome)
    latencies = sorted(results.latencies)
    lines = [
        "token-proxy soak report",
        f"  duration         {args.duration:g} s (run took {outcome.elapsed:.1f} s)",
        f"  rate             {args.rate:g} requests/s, open loop",
        f"  token lifetime   {args.token_lifetime:g} s",
        f"  requests sent    {results.sent}",
        f"  failed requests  {results.failed}",
    ]
    for reason, count in results.failures.most_common():
        sample = results.samples.get(reason)
        lines.append(f"    {reason}: {count}" + (f"  (first: {sample!r})" if sample else ""))
    fetch_rate = outcome.token_fetches / outcome.elapsed if outcome.elapsed else 0.0
    rejected = sum(outcome.upstream_rejected.values())
    lines.append(f"  token fetches    {outcome.token_fetches} ({fetch_rate:.2f}/s)")
    lines.append(
        f"  upstream 401s    {rejected} (tokens upstream refused; the proxy replays these once)"
    )
    for reason, count in outcome.upstream_rejected.most_common():
        lines.append(f"    {reason}: {count}")
    if latencies:
        lines.append(f"  latency p50      {percentile(latencies, 0.50) * 1000:.1f} ms")
        lines.append(f"  latency p99      {percentile(latencies, 0.99) * 1000:.1f} ms")
    else:
        lines.append("  latency          no request completed")
    change = "unknown" if growth is None else f"{growth:+.1f} %"
    lines.append(f"  RSS start        {mib(outcome.rss_start_kib)}")
    lines.append(f"  RSS end          {mib(outcome.rss_end_kib)}")
    lines.append(f"  RSS change       {change}")
    lines.append(
        f"  proxy exit       {outcome.proxy_exit} after SIGTERM; "
        f"{outcome.log_lines} lines in its log at level warning"
    )
    lines.extend(f"  fail: {reason}" for reason in reasons)
    lines.append("FAIL" if reasons else "PASS")
    print("\n".join(lines), flush=True)
    return not reasons


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    handle = ProxyHandle()
    workdir = Path(tempfile.mkdtemp(prefix="token-proxy-soak-"))
    passed = False
    try:
        outcome = asyncio.run(run(args, handle, workdir))
        passed = report(outcome)
    except SoakError as exc:
        note(f"error: {exc}")
        print("FAIL", flush=True)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        note("interrupted")
        print("FAIL", flush=True)
    finally:
        process = handle.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        if passed:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            note(f"the proxy's log is kept in {workdir / 'proxy.log'}")
    return 0 if passed else 1


async def run(args: argparse.Namespace, handle: ProxyHandle, workdir: Path) -> Outcome:
    """soak(), with SIGTERM handled like Ctrl-C so that the proxy is always stopped."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await soak(args, handle, workdir)
    except asyncio.CancelledError:
        # Ctrl-C or SIGTERM: by now every resource of soak() is closed and the proxy stopped.
        raise SoakError("interrupted; the proxy and the fake servers were stopped") from None


if __name__ == "__main__":
    sys.exit(main())
