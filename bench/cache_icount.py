"""What a cache hit costs in CPU instructions beside an uncached request, counted by callgrind
in the proxy process alone.

    .venv/bin/python bench/cache_icount.py                 # about 3 minutes
    .venv/bin/python bench/cache_icount.py --requests 300  # a smoke test

Instruction counts do not depend on the other processes sharing the two cores, so they show
what a change to the hit path saves where CPU time (cache_bench.py) varies by tens of percent.
It starts, all on 127.0.0.1, bench/fake_token_server.py and cache_bench.py's upstream (153-byte
JSON, `Cache-Control: max-age=3600`), then for each case token-proxy with its default settings
under `valgrind --tool=callgrind --instr-atstart=no`: once it is ready, instrumentation is
switched on, 300 GETs warm it up, the counters are zeroed, `--requests` sequential GETs on one
keep-alive connection are counted, and the counts are dumped. The cases:
- uncached: TOKEN_PROXY_CACHE=false, the same URL every time;
- hit: TOKEN_PROXY_CACHE=true, every counted request answered `X-Cache: HIT`;
- hit without the access line: the same with TOKEN_PROXY_ACCESS_LOG=false;
- /-/healthy: the proxy's own answer (no key check, route, feature or access line), the least
  any request costs.
Needs valgrind (`apt-get install valgrind`). Every process started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, bench/ is sys.path[0], where `bench` is bench.py: the repository instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.cache_bench import (
    HERE,
    LOOPBACK,
    PATH,
    free_port,
    proxy_env,
    run,
    started,
    wait_until_answers,
)

# A proxy under callgrind starts some fifty times slower than on its own.
VALGRIND_START_TIMEOUT = 180.0
TARGET = 0.5  # the "a hit should cost well under half an uncached request"


@dataclass(frozen=True)
class Case:
    name: str
    cache: str
    path: str
    hits: bool
    env: tuple[tuple[str, str], ...] = ()


_NO_ACCESS_LINE = (("TOKEN_PROXY_ACCESS_LOG", "false"),)
CASES = (
    Case("uncached (cache off)", "false", PATH, hits=False),
    Case("hit", "true", PATH, hits=True),
    Case(
        "hit, access line off", "true", PATH, hits=True, env=(("TOKEN_PROXY_ACCESS_LOG", "false"),)
    ),
    Case("/-/healthy (the floor)", "true", "/-/healthy", hits=False),
)


def instructions(dump: Path) -> int:
    """The total instructions (Ir) of one callgrind dump."""
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"cache_icount: no totals in {dump}")


def count(case: Case, *, ports: dict[str, int], logs: Path, requests: int) -> int:
    """Instructions per request of token-proxy in `case`."""
    out = logs / f"callgrind-{case.cache}-{len(case.env)}-{case.path.count('/')}"
    env = proxy_env(ports, logs, case.cache)
    env.update(case.env)
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "proxy",
    ]
    log = logs / f"{out.name}.log"
    with started(argv, env=env, log=log) as pid:
        port = ports["proxy"]
        wait_until_answers(port, "/-/ready", timeout=VALGRIND_START_TIMEOUT)
        control(pid, "-i", "on")
        run(port, pid, [case.path] * 300)  # warm-up
        control(pid, "-z")
        measured = run(port, pid, [case.path] * requests)
        control(pid, "--dump=measured")
    if case.hits and measured.hits != requests:
        raise SystemExit(f"cache_icount: {measured.hits} of {requests} were hits ({case.name})")
    dumps = sorted(out.parent.glob(out.name + ".*"))
    measured_dumps = [d for d in dumps if "measured" in d.read_text(errors="replace")[:2000]]
    if not measured_dumps:
        raise SystemExit(f"cache_icount: callgrind wrote no dump; see {log}")
    return instructions(measured_dumps[0]) // requests


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)  # noqa: S603, S607


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="counted GETs per case")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("cache_icount: needs valgrind: sudo apt-get install valgrind")
    python = sys.executable
    ports = {name: free_port() for name in ("token", "upstream", "proxy")}
    figures: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="cache-icount-") as tmp:
        logs = Path(tmp)
        token = [python, str(HERE / "fake_token_server.py"), "--port", str(ports["token"])]
        upstream = [python, str(HERE / "cache_bench.py"), "serve-upstream"]
        with (
            started(token, env=None, log=logs / "token.log"),
            started([*upstream, "--port", str(ports["upstream"])], env=None, log=logs / "up.log"),
        ):
            wait_until_answers(ports["upstream"], "/-/count")
            for case in CASES:
                print(f"counting: {case.name} ...", file=sys.stderr, flush=True)
                figures[case.name] = count(case, ports=ports, logs=logs, requests=args.requests)
    report(figures, args.requests)


def report(figures: dict[str, int], requests: int) -> None:
    uncached, hit = figures[CASES[0].name], figures[CASES[1].name]
    quiet, floor = figures[CASES[2].name], figures[CASES[3].name]
    print(f"instructions per request (callgrind Ir, {requests} sequential GETs on {LOOPBACK}):")
    for name, value in figures.items():
        print(f"  {name:<26}{value:>10,}  {value / uncached:>5.2f} of uncached")
    verdict = "PASS" if hit / uncached < TARGET else "MISS"
    print(
        f"a hit costs {hit / uncached:.2f} of an uncached request ({verdict}: target under "
        f"{TARGET}); of the hit, {floor:,} ({floor / hit:.0%}) is what /-/healthy costs too, "
        f"{hit - quiet:,} ({(hit - quiet) / hit:.0%}) the access line, and {quiet - floor:,} "
        f"({(quiet - floor) / hit:.0%}) the rest: key check, route, the cache step and its answer"
    )


if __name__ == "__main__":
    main()
