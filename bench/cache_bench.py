"""What the response cache saves: a cached GET beside an uncached one, and the upstream requests
of a repeated workload, through token-proxy as a real process.

    .venv/bin/python bench/cache_bench.py                # about 30 s
    .venv/bin/python bench/cache_bench.py --requests 500 --workload 2000   # a smoke test

It starts, all on 127.0.0.1: bench/fake_token_server.py, an aiohttp upstream (this file's
`serve-upstream`) answering every GET with the 153-byte JSON of bench/run plus
`Cache-Control: max-age=3600` and an ETag, and counting what reaches it; then token-proxy twice
with its default settings (access log and metrics on), once with TOKEN_PROXY_CACHE=false and once
with true. Against each it measures, on one keep-alive connection, one request at a time:
- one URL asked `--requests` times (after a warm-up): requests/s, and the proxy's CPU time per
  request (utime + stime of /proc/PID/stat, which leaves out the client and the upstream);
- the workload: `--workload` requests over `--urls` distinct URLs in a shuffled order (each URL
  as often as the others), and how many of them reached upstream.
Every load is bounded in count; every process started here is stopped on exit.
CPU time moves with whatever else runs on the machine; bench/cache_icount.py counts the same
hit and uncached request in instructions under callgrind, which it does not.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOOPBACK = "127.0.0.1"
PATH = "/data/wow/token/index?namespace=dynamic-us&locale=en_US"
BODY = (
    '{"_links":{"self":{"href":"https://us.api.blizzard.com/data/wow/token/'
    '?namespace=dynamic-us"}},"last_updated_timestamp":1700000000000,"price":2712340000}'
)
START_TIMEOUT = 20.0
TICKS = os.sysconf("SC_CLK_TCK")


def serve_upstream(port: int) -> None:
    """The upstream: every GET gets BODY, fresh for an hour; GET /-/count says how many came."""
    count = 0

    async def answer(request: web.Request) -> web.Response:
        nonlocal count
        if request.path == "/-/count":
            return web.json_response({"count": count})
        count += 1
        return web.Response(
            text=BODY,
            content_type="application/json",
            headers={"Cache-Control": "max-age=3600", "ETag": '"bench-1"'},
        )

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", answer)
    web.run_app(app, host=LOOPBACK, port=port, access_log=None, print=None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def started(argv: list[str], *, env: dict[str, str] | None, log: Path) -> Iterator[int]:
    """A process for the block's duration (its pid); SIGTERM, then SIGKILL, at the end."""
    with log.open("ab") as out:
        process = subprocess.Popen(  # noqa: S603  (fixed argument lists, no shell)
            argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        yield process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_answers(port: int, path: str, *, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"cache_bench: nothing answered {path} on port {port} in time")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """The user and system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS  # utime, stime


def upstream_count(port: int) -> int:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    connection.request("GET", "/-/count")
    count: int = json.loads(connection.getresponse().read())["count"]
    connection.close()
    return count


@dataclass
class Run:
    """One sequence of requests on one connection: how long, the proxy's CPU, what came."""

    requests: int
    seconds: float
    user: float
    system: float
    hits: int

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        return (self.user + self.system) / self.requests * 1e6

    @property
    def user_us(self) -> float:
        return self.user / self.requests * 1e6


def run(port: int, pid: int, targets: list[str]) -> Run:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    hits = 0
    user, system = cpu_seconds(pid)
    started_at = time.perf_counter()
    for target in targets:
        connection.request("GET", target)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"cache_bench: {target} answered {response.status}")
        hits += response.getheader("X-Cache") == "HIT"
    seconds = time.perf_counter() - started_at
    user_after, system_after = cpu_seconds(pid)
    connection.close()
    return Run(
        requests=len(targets),
        seconds=seconds,
        user=user_after - user,
        system=system_after - system,
        hits=hits,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve-upstream", help="(internal) the counting upstream")
    serve.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", type=int, default=5000, help="one URL, this many times")
    parser.add_argument("--workload", type=int, default=10_000, help="requests of the workload")
    parser.add_argument("--urls", type=int, default=200, help="distinct URLs of the workload")
    parser.add_argument(
        "--rounds", type=int, default=3, help="take turns off/on this many times; medians shown"
    )
    parser.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for token-proxy, repeatable (e.g. TOKEN_PROXY_ACCESS_LOG=false)",
    )
    args = parser.parse_args()
    if args.command == "serve-upstream":
        serve_upstream(args.port)
        return
    python = sys.executable
    ports = {name: free_port() for name in ("token", "upstream", "proxy")}
    repeated = [PATH] * args.requests
    urls = [f"/data/wow/item/{n}?namespace=static-us&locale=en_US" for n in range(args.urls)]
    workload = [urls[n % len(urls)] for n in range(args.workload)]
    random.Random(17).shuffle(workload)  # noqa: S311  (a fixed order, not a secret)
    results: dict[str, list[Round]] = {}
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp, ExitStack() as stack:
        logs = Path(tmp)
        stack.enter_context(
            started(
                [python, str(HERE / "fake_token_server.py"), "--port", str(ports["token"])],
                env=None,
                log=logs / "token.log",
            )
        )
        upstream = ports["upstream"]
        stack.enter_context(
            started(
                [python, __file__, "serve-upstream", "--port", str(upstream)],
                env=None,
                log=logs / "upstream.log",
            )
        )
        wait_until_answers(upstream, "/-/count")
        for _ in range(args.rounds):
            for mode in ("false", "true"):
                results.setdefault(mode, []).append(
                    measure(
                        mode,
                        ports=ports,
                        args=args,
                        logs=logs,
                        repeated=repeated,
                        workload=workload,
                    )
                )
    report(results, args)


def proxy_env(ports: dict[str, int], logs: Path, mode: str) -> dict[str, str]:
    """token-proxy's environment: its defaults, the bench's servers, TOKEN_PROXY_CACHE=`mode`,
    and no other TOKEN_PROXY_ variable of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_PROXY_")}
    env.update(
        {
            "TOKEN_PROXY_CLIENT_ID": "bench",
            "TOKEN_PROXY_CLIENT_SECRET": "bench-secret",
            "TOKEN_PROXY_TOKEN_URL": f"http://{LOOPBACK}:{ports['token']}/token",
            "TOKEN_PROXY_UPSTREAM": f"http://{LOOPBACK}:{ports['upstream']}",
            "TOKEN_PROXY_PORT": str(ports["proxy"]),
            "TOKEN_PROXY_LOG_FORMAT": "json",
            "TOKEN_PROXY_SECRETS_DIR": str(logs),
            "TOKEN_PROXY_CACHE": mode,
        }
    )
    return env


def measure(
    mode: str,
    *,
    ports: dict[str, int],
    args: argparse.Namespace,
    logs: Path,
    repeated: list[str],
    workload: list[str],
) -> Round:
    """A token-proxy with TOKEN_PROXY_CACHE=`mode`: the repeated URL, the workload, and
    /-/healthy (the proxy's own answer: its cost with no feature at all)."""
    upstream = ports["upstream"]
    env = proxy_env(ports, logs, mode)
    env.update(pair.split("=", 1) for pair in args.proxy_env)
    with started([sys.executable, "-m", "proxy"], env=env, log=logs / f"proxy-{mode}.log") as pid:
        port = ports["proxy"]
        wait_until_answers(port, "/-/ready")
        run(port, pid, [PATH] * 300)  # warm-up
        single = run(port, pid, repeated)
        before = upstream_count(upstream)
        mixed = run(port, pid, workload)
        reached = upstream_count(upstream) - before
        floor = run(port, pid, ["/-/healthy"] * len(repeated))
    return Round(single=single, mixed=mixed, upstream=reached, floor=floor)


@dataclass
class Round:
    """What one token-proxy measured."""

    single: Run
    mixed: Run
    upstream: int
    floor: Run


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def report(results: dict[str, list[Round]], args: argparse.Namespace) -> None:
    """Medians over the rounds, every round's figure beside them."""
    header = (
        f"  {'':<22}{'requests/s':>11}  {'(rounds)':<20}{'CPU us/req':>11}  "
        f"{'(rounds)':<14}{'of it user':>10}"
    )
    medians: dict[tuple[str, str], tuple[float, float, float]] = {}

    def row(label: str, runs: list[Run], key: tuple[str, str]) -> None:
        rate = median([r.per_second for r in runs])
        cpu = median([r.cpu_us for r in runs])
        user = median([r.user_us for r in runs])
        medians[key] = (rate, cpu, user)
        rates = " ".join(f"{r.per_second:,.0f}" for r in runs)
        cpus = " ".join(f"{r.cpu_us:.0f}" for r in runs)
        print(f"  {label:<22}{rate:>11,.0f}  {rates:<20}{cpu:>11.0f}  {cpus:<14}{user:>10.0f}")

    off, on = results["false"], results["true"]
    print(f"one URL, {args.requests} sequential GETs on one connection, {args.rounds} rounds:")
    print(header)
    row("cache off (uncached)", [r.single for r in off], ("single", "off"))
    row("cache on (hits)", [r.single for r in on], ("single", "on"))
    row("/-/healthy (no feature)", [r.floor for r in off + on], ("floor", ""))
    print(f"workload: {args.workload} GETs over {args.urls} URLs, shuffled, {args.rounds} rounds:")
    print(header)
    row("cache off", [r.mixed for r in off], ("mixed", "off"))
    row("cache on", [r.mixed for r in on], ("mixed", "on"))
    print(
        f"  requests that reached upstream: cache off {[r.upstream for r in off]}, "
        f"cache on {[r.upstream for r in on]}"
    )
    off_rate, off_cpu, off_user = medians[("single", "off")]
    on_rate, on_cpu, on_user = medians[("single", "on")]
    floor_cpu = medians[("floor", "")][1]
    print(
        f"a hit costs {on_cpu / off_cpu:.2f} of an uncached request in the proxy's CPU time "
        f"({on_user / off_user:.2f} in user time); the proxy's own /-/healthy costs "
        f"{floor_cpu / off_cpu:.2f}, so the cache adds {on_cpu - floor_cpu:.0f} us to the "
        f"least any answer costs; end to end a hit is {on_rate / off_rate:.2f} times as fast"
    )


if __name__ == "__main__":
    main()
