"""bench/icount.py on a tiny count: each of its four proxies starts under callgrind, answers,
and gets a figure, so that the instruction table bench/run prints cannot rot. valgrind is
required (`make test` installs it with scripts/ensure-valgrind), never skipped."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
ROW = re.compile(r"^  ([bcuf]) (.+?)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)$", re.MULTILINE)


def test_icount_prints_instructions_per_request_for_each_proxy() -> None:
    missing = "valgrind is not installed: run scripts/ensure-valgrind (make test does)"
    assert shutil.which("valgrind"), missing
    assert shutil.which("vgdb"), missing
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "icount.py"),
            "--requests=6",
            "--baseline=2",
            "--warmup=2",
            "--parallel=4",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {
        key: (name, int(figure.replace(",", "")))
        for key, name, figure, *_ in ROW.findall(done.stdout)
    }
    assert set(rows) == {"b", "c", "u", "f"}, done.stdout
    assert rows["b"][0].startswith("token-proxy")
    for name, figure in rows.values():
        # A Python proxy spends hundreds of thousands of instructions on a request: a figure
        # far off means the subtraction or the dump it reads went wrong.
        assert 50_000 < figure < 5_000_000, (name, done.stdout)
    # The ceiling has no feature: it costs less than token-proxy and the reference proxy.
    assert rows["f"][1] < rows["b"][1]
    assert rows["f"][1] < rows["u"][1] < rows["c"][1]
    uvloop_row = next(line for line in done.stdout.splitlines() if line.startswith("  u "))
    assert uvloop_row.split()[-2] == "1.00"  # the ratios' denominator
    assert re.search(r"(PASS|MISS)  token-proxy / reference on uvloop <= 0\.75", done.stdout)


def test_footprint_prints_start_up_and_idle_rss_with_targets() -> None:
    """`bench/run footprint`: token-proxy's start-up to ready and its idle VmRSS measured on a
    real run, beside the reference proxy's, each target with its verdict."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench.py"), "footprint", "--rounds=1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    startup = re.search(r"^  start-up to ready\s+([\d.]+) s", done.stdout, re.MULTILINE)
    idle = re.search(r"^  idle VmRSS\s+([\d.]+) MiB", done.stdout, re.MULTILINE)
    floor = re.search(r"^  reference proxy, uvloop, idle\s+([\d.]+) MiB", done.stdout, re.MULTILINE)
    assert startup, done.stdout
    assert idle, done.stdout
    assert floor, done.stdout
    assert 0 < float(startup[1]) < 20
    # More than the Python interpreter alone, and more than a proxy with none of its features.
    assert 15 < float(floor[1]) < float(idle[1]) < 200
    assert re.search(r"(PASS|MISS)  idle RSS <= 45 MiB", done.stdout)
    assert re.search(r"(PASS|MISS)  start-up to ready < 0.5 s", done.stdout)
