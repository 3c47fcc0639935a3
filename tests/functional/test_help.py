"""`token-proxy --help` as a user reads it, from the real command: every command has a
description, every flag has help, and the usage shows that `run` may be left out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

COMMANDS = {"run", "check", "health", "hash-key"}
# An option's line in argparse's help: two spaces, the flag and its metavar, then (after two
# or more spaces) its help, unless the help starts on the next, further indented line.
OPTION = re.compile(r"^  (-[^ ].*?)(?:\s{2,}(\S.*))?$")


@dataclass
class Help:
    """One help page, cut into the parts argparse prints."""

    usage: str
    description: str
    options: dict[str, str]
    commands: dict[str, str]


def sections(text: str) -> dict[str, list[str]]:
    """The lines under each heading ("options:", "commands:"); "" holds what comes first."""
    found: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        if re.fullmatch(r"[a-z][a-z ]*:", line):
            current = line[:-1]
            found[current] = []
        else:
            found[current].append(line)
    return found


def entries(lines: list[str], pattern: re.Pattern[str]) -> dict[str, str]:
    """Each entry of a section and its help, joined with the continuation lines below it."""
    result: dict[str, str] = {}
    name = ""
    for line in lines:
        match = pattern.match(line)
        if match is not None:
            name = match.group(1).strip()
            result[name] = match.group(2) or ""
        elif name and line.strip():
            result[name] = f"{result[name]} {line.strip()}".strip()
        else:
            name = ""
    return result


def read_help(*argv: str) -> Help:
    env = {**os.environ, "COLUMNS": "100"}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", *argv, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    parts = sections(result.stdout)
    head = "\n".join(parts[""]).strip()
    usage, _, description = head.partition("\n\n")
    commands = entries(parts.get("commands", []), re.compile(r"^    ([a-z-]+)(?:\s{2,}(\S.*))?$"))
    return Help(
        usage=usage,
        description=" ".join(description.split()),
        options=entries(parts.get("options", []), OPTION),
        commands=commands,
    )


def test_usage_shows_that_run_may_be_left_out() -> None:
    """The top-level usage offers `token-proxy [run] [options]` and says that a bare
    `token-proxy` runs; `run --help` shows the same optional `[run]`."""
    top = read_help()
    assert top.usage.startswith("usage: token-proxy [run] [options]")
    assert "{check,health,hash-key}" in top.usage
    assert read_help("run").usage.startswith("usage: token-proxy [run] ")
    text = subprocess.run(
        [sys.executable, "-m", "proxy", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "Without a command, token-proxy runs" in " ".join(text.split())


def test_top_level_help_lists_every_command_with_its_help() -> None:
    """The top-level page names every command, each with a line of help, and its own options
    (--help, --version) have help too."""
    top = read_help()
    assert set(top.commands) == COMMANDS
    for name, text in top.commands.items():
        assert len(text) > 10, name
    assert set(top.options) == {"-h, --help", "--version"}
    assert all(top.options.values()), top.options


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_a_description_and_every_flag_has_help(command: str) -> None:
    """`token-proxy COMMAND --help` opens with a description of what the command does, and
    every flag it accepts says what it is for; the supervisor's hidden --worker flag is not
    shown."""
    page = read_help(command)
    assert page.usage.startswith("usage: token-proxy")
    assert len(page.description) > 40, page.description
    assert page.options, "no options listed"
    for flag, text in page.options.items():
        assert text, f"{command} {flag} has no help"
    assert not any("--worker" in flag and "--workers" not in flag for flag in page.options)


def test_hash_key_says_it_reads_standard_input() -> None:
    """hash-key's help, on the top-level page and its own, says the key comes from standard
    input, and shows how to use it."""
    assert "standard input" in read_help().commands["hash-key"]
    page = read_help("hash-key")
    assert "standard input" in page.description
    assert "| token-proxy hash-key" in page.description


def test_flags_are_shown_with_the_settings_they_override() -> None:
    """run's and health's --host and --port name their environment variable and default, so
    that the help says where else the same setting can come from."""
    for command in ("run", "health"):
        options = read_help(command).options
        assert "TOKEN_PROXY_HOST" in options["--host ADDRESS"], command
        assert "TOKEN_PROXY_PORT" in options["--port PORT"], command
        assert "TOKEN_PROXY_CONFIG" in options["--config PATH"], command
