"""Instructions per request, counted by callgrind: token-proxy against its baselines, without
the minute-to-minute noise of a wall clock.

Each proxy runs under `valgrind --tool=callgrind` with counting off while it starts. Then one
keep-alive connection sends GETs one at a time: a warm-up, then `--baseline` requests and
`--requests` requests, the counters zeroed before and dumped after each of the two. The figure
is (count of the larger run - count of the smaller) / (requests - baseline), so whatever a run
costs once (the dump, the first connection) cancels out. Only the proxy's own process is
counted, not the client nor the upstream.

    .venv/bin/python bench/icount.py                  # about a minute: 2,000 requests per case
    .venv/bin/python bench/icount.py --requests 40 --baseline 10 --warmup 10   # a smoke test

bench/run prints the same table beside wrk's (see bench/README.md).
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOOPBACK = "127.0.0.1"
PATH = "/data/wow/token/index?namespace=dynamic-us&locale=en_US"  # bench.py's, too

INSTALL_HINT = "install it with `sudo apt-get install valgrind` (Debian/Ubuntu)"
START_TIMEOUT = 120.0  # seconds: Python starts tens of times slower under valgrind
STOP_TIMEOUT = 30.0  # seconds between SIGTERM and SIGKILL
CONTROL_TIMEOUT = 60.0  # seconds for valgrind to act on one vgdb command
TARGET = 0.75  # token-proxy / reference proxy on uvloop, at most
MOONSHOT = 0.65
# The denominator of the ratios: the reference proxy on the loop token-proxy runs on, so that
# a ratio is the cost of the features and not that of a slower event loop.
SAME_LOOP = "u"


@dataclass(frozen=True)
class Proxy:
    """One proxy to count: how it starts, and what says it is ready to be measured."""

    key: str
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_path: str


@dataclass(frozen=True)
class Count:
    key: str
    name: str
    per_request: float | None
    error: str | None = None


@dataclass(frozen=True)
class Plan:
    """How many requests each phase sends, one at a time on one keep-alive connection."""

    warmup: int = 300
    baseline: int = 500
    requests: int = 2000


class IcountError(Exception):
    """A count cannot be made (valgrind is missing, a server did not start)."""


def note(message: str) -> None:
    print(f"icount: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"


class Processes:
    """The processes started here; `stop_all` ends each one (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    def start(
        self, argv: Sequence[str], *, log: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            # Fixed argument lists, no shell.
            process = subprocess.Popen(  # noqa: S603
                list(argv), env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        with self._lock:
            self._started.append(process)
        return process

    @staticmethod
    def stop(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_all(self) -> None:
        with self._lock:
            started, self._started = self._started, []
        for process in reversed(started):
            self.stop(process)


def proxies(
    python: str,
    *,
    upstream_port: int,
    token_port: int,
    tmp: Path,
    extra_env: dict[str, str] | None = None,
) -> list[Proxy]:
    """token-proxy with its defaults (b), the reference proxy on asyncio's loop (c) and on
    uvloop (u), and the no-feature ceiling (f): the cases of bench/run's instruction table."""
    secrets_dir = tmp / "icount-secrets"
    secrets_dir.mkdir(exist_ok=True)
    # The same hash seed every run: the order of sets and dicts of strings changes counts.
    plain = {k: v for k, v in os.environ.items() if not k.upper().startswith("TOKEN_PROXY_")}
    plain["PYTHONHASHSEED"] = "0"
    env = {
        **plain,
        # What bench/run gives token-proxy (case b): its defaults, a JSON log.
        "TOKEN_PROXY_HOST": LOOPBACK,
        "TOKEN_PROXY_PORT": str(free_port()),
        "TOKEN_PROXY_CLIENT_ID": "bench",
        "TOKEN_PROXY_CLIENT_SECRET": "bench-secret",
        "TOKEN_PROXY_TOKEN_URL": f"http://{LOOPBACK}:{token_port}/token",
        "TOKEN_PROXY_UPSTREAM": f"http://{LOOPBACK}:{upstream_port}",
        "TOKEN_PROXY_LOG_FORMAT": "json",
        "TOKEN_PROXY_SECRETS_DIR": str(secrets_dir),
        **(extra_env or {}),
    }
    upstream = f"http://{LOOPBACK}:{upstream_port}"
    reference = [python, str(HERE / "reference_proxy.py"), "--upstream", upstream]
    ceiling = [python, str(HERE / "ceiling_proxy.py"), "--upstream", upstream]
    return [
        Proxy("b", "token-proxy (defaults)", [python, "-m", "proxy"], env, "/-/ready"),
        Proxy("c", "reference proxy, asyncio", reference, plain, PATH),
        Proxy("u", "reference proxy, uvloop", [*reference, "--loop", "uvloop"], plain, PATH),
        Proxy("f", "no-feature ceiling", ceiling, plain, PATH),
    ]


def _port_of(proxy: Proxy) -> tuple[list[str], int]:
    """The argv with a free --port (token-proxy takes its own from the environment)."""
    if "TOKEN_PROXY_PORT" in proxy.env:
        return proxy.argv, int(proxy.env["TOKEN_PROXY_PORT"])
    port = free_port()
    return [*proxy.argv, "--port", str(port)], port


def _vgdb(vgdb: str, pid: int, *command: str) -> None:
    # A fixed argument list, no shell. vgdb wakes a process blocked in a system call itself.
    done = subprocess.run(  # noqa: S603
        [vgdb, f"--pid={pid}", *command],
        capture_output=True,
        text=True,
        timeout=CONTROL_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise IcountError(f"vgdb {' '.join(command)} failed: {done.stderr.strip() or done.stdout}")


def _get(connection: http.client.HTTPConnection, path: str) -> int:
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    return response.status


def _send(port: int, count: int, connection: http.client.HTTPConnection) -> None:
    for _ in range(count):
        status = _get(connection, PATH)
        if status != 200:
            raise IcountError(f"GET {PATH} on port {port} answered {status}")


def _wait_ready(proxy: Proxy, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise IcountError(
                f"{proxy.name} exited with status {process.returncode} under valgrind; the end "
                f"of its log ({log}):\n{log_tail(log)}"
            )
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
        try:
            if _get(connection, proxy.ready_path) == 200:
                return
        except OSError:
            pass
        finally:
            connection.close()
        if time.monotonic() > deadline:
            raise IcountError(f"{proxy.name} was not ready within {START_TIMEOUT:g} s")
        time.sleep(0.2)


def _total(dump: Path) -> int:
    """The instructions a callgrind dump counted (its `summary:` or `totals:` line)."""
    for line in dump.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key in {"summary", "totals"}:
            return int(value.split()[0])
    raise IcountError(f"no total in the callgrind dump {dump}")


def count(
    proxy: Proxy, plan: Plan, *, processes: Processes, tmp: Path, valgrind: str, vgdb: str
) -> float:
    """Instructions per request of `proxy` (see the module's docstring)."""
    argv, port = _port_of(proxy)
    out = tmp / f"callgrind-{proxy.key}"
    log = tmp / f"icount-{proxy.key}.log"
    tool = [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    process = processes.start([*tool, *argv], log=log, env=proxy.env)
    try:
        _wait_ready(proxy, process, port, log)
        # valgrind runs the program in its own process: the pid is the one to control.
        _vgdb(vgdb, process.pid, "instrumentation", "on")
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
        try:
            _send(port, plan.warmup, connection)
            totals = []
            for phase, requests in (("baseline", plan.baseline), ("requests", plan.requests)):
                _vgdb(vgdb, process.pid, "zero")
                _send(port, requests, connection)
                _vgdb(vgdb, process.pid, "dump", phase)
                totals.append(_total(_latest_dump(out)))
        finally:
            connection.close()
    finally:
        processes.stop(process)
    small, large = totals
    return (large - small) / (plan.requests - plan.baseline)


def _latest_dump(out: Path) -> Path:
    """callgrind numbers each dump it is asked for: out.1, out.2, ..."""
    dumps = [path for path in out.parent.glob(f"{out.name}.*") if path.suffix[1:].isdigit()]
    if not dumps:
        raise IcountError(f"callgrind wrote no dump next to {out}")
    return max(dumps, key=lambda path: int(path.suffix[1:]))


def tools() -> tuple[str, str]:
    """valgrind and vgdb, or IcountError saying how to install them."""
    valgrind, vgdb = shutil.which("valgrind"), shutil.which("vgdb")
    if valgrind is None or vgdb is None:
        raise IcountError(f"valgrind is not installed; {INSTALL_HINT}")
    return valgrind, vgdb


def count_all(
    cases: Sequence[Proxy], plan: Plan, *, processes: Processes, tmp: Path, parallel: int = 2
) -> list[Count]:
    """Every case's figure; cases run side by side, which changes no count."""
    valgrind, vgdb = tools()

    def one(proxy: Proxy) -> Count:
        try:
            figure = count(proxy, plan, processes=processes, tmp=tmp, valgrind=valgrind, vgdb=vgdb)
        except (IcountError, OSError, subprocess.TimeoutExpired) as exc:
            note(f"counting {proxy.name}: {exc}")
            return Count(proxy.key, proxy.name, None, str(exc))
        return Count(proxy.key, proxy.name, figure)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, cases))


def render(counts: Sequence[Count], plan: Plan) -> Iterator[str]:
    by_key = {each.key: each.per_request for each in counts}
    same_loop, ceiling = by_key.get(SAME_LOOP), by_key.get("f")
    yield (
        f"instructions per request (callgrind, proxy process only; ({plan.requests:,} - "
        f"{plan.baseline:,}) sequential keep-alive GETs after {plan.warmup:,} warm-up)"
    )
    yield f"  {'case':<30} {'instr/request':>13} {'/ c uvloop':>10} {'/ ceiling':>10}"
    for each in counts:
        label = f"{'u' if each.key == SAME_LOOP else each.key} {each.name}"
        if each.per_request is None:
            yield f"  {label:<30} {'failed':>13}"
            continue
        yield (
            f"  {label:<30} {each.per_request:>13,.0f} "
            f"{_ratio(each.per_request, same_loop):>10} {_ratio(each.per_request, ceiling):>10}"
        )
    ours = by_key.get("b")
    value = None if ours is None or not same_loop else ours / same_loop
    verdict = "n/a " if value is None else "PASS" if value <= TARGET else "MISS"
    shown = "n/a" if value is None else f"{value:.2f}"
    moonshot = "" if value is None or value > MOONSHOT else " (moonshot met)"
    yield (
        f"  {verdict}  token-proxy / reference on uvloop <= {TARGET:.2f} "
        f"(moonshot {MOONSHOT:.2f}): {shown}{moonshot}"
    )


def _ratio(value: float, base: float | None) -> str:
    return "n/a" if not base else f"{value / base:.2f}"


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _wait_listening(name: str, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while process.poll() is None:
        try:
            socket.create_connection((LOOPBACK, port), 0.5).close()
        except OSError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return
    raise IcountError(f"the {name} did not listen on port {port}; its log:\n{log_tail(log)}")


def _servers(processes: Processes, python: str, tmp: Path) -> tuple[int, int]:
    """The aiohttp upstream of bench.py and the fake token endpoint; their ports."""
    upstream_port, token_port = free_port(), free_port()
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for name, argv, port in (
        (
            "upstream",
            [str(HERE / "bench.py"), "serve-upstream", "--big-size", "1024"],
            upstream_port,
        ),
        ("token-server", [str(HERE / "fake_token_server.py")], token_port),
    ):
        log = tmp / f"{name}.log"
        process = processes.start([python, *argv, "--port", str(port)], log=log, env=env)
        _wait_listening(name, process, port, log)
    return upstream_port, token_port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/icount.py", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--requests", type=_count, default=Plan.requests, help="default 2000")
    parser.add_argument("--baseline", type=_count, help="default a quarter of --requests")
    parser.add_argument("--warmup", type=_count, default=Plan.warmup, help="default 300")
    parser.add_argument(
        "--cases", default="bcuf", help="which of b, c, u, f to count (default all: bcuf)"
    )
    parser.add_argument(
        "--proxy-env",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="extra environment for token-proxy (repeatable), e.g. TOKEN_PROXY_ACCESS_LOG=false",
    )
    parser.add_argument("--parallel", type=_count, default=2, help="cases counted at once")
    parser.add_argument(
        "--upstream-port", type=int, help="a running upstream (bench/run's); default: start one"
    )
    parser.add_argument("--token-port", type=int, help="a running fake token endpoint, likewise")
    parser.add_argument("--keep", action="store_true", help="keep the logs and callgrind dumps")
    args = parser.parse_args(argv)
    baseline = args.baseline if args.baseline is not None else max(1, args.requests // 4)
    if args.requests <= baseline:
        parser.error("--requests must be larger than --baseline")
    plan = Plan(warmup=args.warmup, baseline=baseline, requests=args.requests)
    venv = REPO / ".venv" / "bin" / "python"
    python = str(venv) if venv.exists() else sys.executable
    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="token-proxy-icount-"))
    try:
        tools()
        upstream_port, token_port = args.upstream_port, args.token_port
        if upstream_port is None or token_port is None:
            upstream_port, token_port = _servers(processes, python, tmp)
        extra = dict(pair.partition("=")[::2] for pair in args.proxy_env)
        cases = proxies(
            python,
            upstream_port=upstream_port,
            token_port=token_port,
            tmp=tmp,
            extra_env=extra,
        )
        cases = [case for case in cases if case.key in args.cases]
        counts = count_all(cases, plan, processes=processes, tmp=tmp, parallel=args.parallel)
    except IcountError as exc:
        note(str(exc))
        return 1
    finally:
        processes.stop_all()
        if args.keep:
            note(f"logs and callgrind dumps kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(render(counts, plan)), flush=True)
    return 0 if all(each.per_request is not None for each in counts) else 1


if __name__ == "__main__":
    sys.exit(main())
