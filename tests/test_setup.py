"""Set-up as a newcomer meets it: what `make run` and `make test` install (read from the
Makefile with `make -n`, on a virtual environment that does not exist yet), how flags reach
the proxy through make, and README's claims about installing, tokens, workers and shutdown."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from proxy.app import CUT_OFF_BY_SHUTDOWN
from proxy.oauth import DEFAULT_EXPIRES_IN

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
PIP_INSTALL = re.compile(r"pip install --quiet -e '\.\[([a-z,]+)\]'")


def dry_run(venv: Path, *targets: str, args: str | None = None) -> list[str]:
    """The commands `make` would run for `targets` with its virtual environment at `venv`."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    command = [make, "--no-print-directory", "-n", "-C", str(ROOT), f"VENV={venv}", *targets]
    if args is not None:
        command.append(f"ARGS={args}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.splitlines()


def installs(lines: list[str]) -> list[set[str]]:
    """The extras of each `pip install -e` the commands make, in order."""
    found = []
    for line in lines:
        match = PIP_INSTALL.search(line)
        if match is not None:
            found.append(set(match.group(1).split(",")))
    return found


def test_make_run_installs_only_what_running_needs(tmp_path: Path) -> None:
    """On a fresh clone `make run` creates the venv and installs token-proxy with the speed
    extra, never the dev extra, then runs it."""
    lines = dry_run(tmp_path / ".venv", "run")
    assert any(f"-m venv {tmp_path / '.venv'}" in line for line in lines)
    assert installs(lines) == [{"speed"}]
    assert lines[-1].split()[1:] == ["run"]
    assert lines[-1].split()[0].endswith("/bin/token-proxy")


@pytest.mark.parametrize("target", ["test", "lint", "typecheck"])
def test_make_test_adds_the_dev_extra(tmp_path: Path, target: str) -> None:
    """`make test` (and lint, typecheck) on a fresh clone installs what running needs, then
    the dev extra on top, before using any of its tools."""
    assert {"dev", "speed"} <= EXTRAS
    lines = dry_run(tmp_path / ".venv", target)
    assert installs(lines) == [{"speed"}, {"dev", "speed"}]


def test_make_test_after_make_run_still_installs_the_test_tools(tmp_path: Path) -> None:
    """The two installs have stamps of their own: after `make run` has installed its part,
    `make test` installs the dev extra (and does not make the venv again); once both are in,
    neither target installs anything."""
    venv = tmp_path / ".venv"
    lines = dry_run(venv, "run")
    stamps = [line.split()[-1] for line in lines if line.lstrip("@").startswith("touch ")]
    (run_stamp,) = stamps
    Path(run_stamp).parent.mkdir(parents=True)
    Path(run_stamp).touch()
    assert installs(dry_run(venv, "run")) == []
    lines = dry_run(venv, "test")
    assert installs(lines) == [{"dev", "speed"}]
    assert not any("-m venv" in line for line in lines)
    (dev_stamp,) = [line.split()[-1] for line in lines if line.lstrip("@").startswith("touch ")]
    assert dev_stamp != run_stamp
    Path(dev_stamp).touch()
    assert installs(dry_run(venv, "test")) == []
    assert installs(dry_run(venv, "run")) == []


def test_make_run_passes_args_to_the_proxy(tmp_path: Path) -> None:
    """`make run ARGS="..."` hands the flags to `token-proxy run`, and `make check` likewise."""
    lines = dry_run(tmp_path / ".venv", "run", args="--port 9000 --config proxy.toml")
    assert lines[-1].split()[1:] == ["run", "--port", "9000", "--config", "proxy.toml"]
    lines = dry_run(tmp_path / ".venv", "check", args="--config proxy.toml")
    assert lines[-1].split()[1:] == ["check", "--config", "proxy.toml"]


def test_readme_shows_install_without_make_and_flags_through_make() -> None:
    """README's quick start shows pip and pipx with an extra that exists, and ARGS."""
    text = README.read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    for tool in ("pip", "pipx"):
        (extra,) = re.findall(rf"\b{tool} install '\.\[([a-z]+)\]'", quick_start)
        assert extra in EXTRAS, tool
    assert 'make run ARGS="--port 9000' in quick_start


def test_readme_states_the_lifetime_of_a_token_without_expires_in() -> None:
    """README gives the lifetime the code assumes when a token response has no expires_in."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    (seconds,) = re.findall(r"without `expires_in` counts as (\d+) s", text)
    assert float(seconds) == DEFAULT_EXPIRES_IN


def test_readme_says_one_connection_gets_one_workers_share() -> None:
    """README's Workers section says that a client on one connection gets one worker's share
    of a limit, since limits are divided between the workers."""
    workers = README.read_text(encoding="utf-8").split("### Workers", 1)[1].split("\n###", 1)[0]
    assert "one keep-alive connection gets one worker's share of a limit" in " ".join(
        workers.split()
    )


def test_readme_troubleshoots_requests_cut_off_at_shutdown() -> None:
    """Troubleshooting has an entry for requests cut off at shutdown, naming the access
    line's outcome and status the proxy logs for them, and the setting to raise."""
    text = README.read_text(encoding="utf-8")
    troubleshooting = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    entries = [" ".join(entry.split()) for entry in troubleshooting.split("\n- ")]
    (entry,) = [each for each in entries if each.startswith("**Requests cut off at shutdown.**")]
    assert '`"outcome": "shutdown"`' in entry
    assert f"status {CUT_OFF_BY_SHUTDOWN}" in entry
    assert "`shutdown_timeout`" in entry


def test_a_default_configuration_imports_neither_the_rate_limit_parser_nor_redis() -> None:
    """Start-up imports only what the configuration uses: the `limits` parser only when a rate
    limit is set, redis only with redis_url (each weighs MiB of RSS and tens of ms)."""
    probe = (
        "import sys, proxy.cli, proxy.serve\n"
        "from proxy.config import Settings\n"
        "from proxy.runtime import Runtime\n"
        "Settings(client_id='i', client_secret='s3cret-value', token_url='http://127.0.0.1:9/t',"
        " upstream='http://127.0.0.1:9', port=0)\n"
        "print(sorted({'limits', 'redis'} & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
