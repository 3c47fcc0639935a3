"""The token-proxy command as users run it: configuration errors exit 2 with a readable message
and no traceback, --version, and `check` against the fake token server."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from proxy import __version__
from tests.conftest import TEST_CLIENT_ID, TEST_SECRET, FakeTokenServer, free_port

TIMEOUT = 30.0
ALL_INTERFACES = "0.0.0.0"  # noqa: S104  (refused before binding)


@dataclass(frozen=True)
class Result:
    """How a finished token-proxy process ended."""

    returncode: int
    stdout: str
    stderr: str


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", *args]


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """os.environ without any TOKEN_PROXY_* variable and with an empty secrets directory."""
    secrets = tmp_path / "empty-secrets"
    secrets.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TOKEN_PROXY_")}
    env["TOKEN_PROXY_SECRETS_DIR"] = str(secrets)
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> Result:
    """Run token-proxy to completion (only for processes that need no fake server)."""
    done = subprocess.run(
        command(*args),
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


async def run_cli_async(args: list[str], env: dict[str, str], cwd: Path) -> Result:
    """Run token-proxy without blocking the event loop the fake servers live on."""
    process = await asyncio.create_subprocess_exec(
        *command(*args),
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


def assert_config_error(result: Result, *names: str) -> None:
    """Exit 2 before serving, stderr names every one of `names`, no traceback, stdout empty."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert "configuration error" in result.stderr.lower()
    assert "cannot listen" not in result.stderr
    for name in names:
        assert name in result.stderr, f"{name!r} not in stderr:\n{result.stderr}"


def tables(stdout: str) -> list[list[list[str]]]:
    """check's tables (credentials, then routes), each row split on runs of whitespace."""
    blocks = [block for block in stdout.split("\n\n") if block.strip()]
    return [[line.split() for line in block.splitlines() if line.strip()] for block in blocks]


def table(stdout: str) -> list[list[str]]:
    """The rows of check's first table, the credentials'."""
    return tables(stdout)[0]


# --- --version -----------------------------------------------------------------------------------


def test_version(clean_env: dict[str, str], tmp_path: Path) -> None:
    """`token-proxy --version` prints the installed version on stdout and exits 0."""
    result = run_cli(["--version"], clean_env, tmp_path)
    assert result.returncode == 0, result
    assert __version__ in result.stdout
    assert "0.0.0+unknown" not in result.stdout
    assert "Traceback" not in result.stderr


# --- Configuration errors: exit 2, a message naming the setting, never a traceback -------------


def test_no_configuration_says_what_to_set(clean_env: dict[str, str], tmp_path: Path) -> None:
    """Bare `token-proxy` with nothing configured exits 2 and says which variables to set."""
    result = run_cli([], clean_env, tmp_path)
    assert_config_error(result, "TOKEN_PROXY_CLIENT_ID", "TOKEN_PROXY_CLIENT_SECRET")


SHORTHAND = {"TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID, "TOKEN_PROXY_CLIENT_SECRET": TEST_SECRET}


@pytest.mark.parametrize(
    ("args", "env", "toml", "names"),
    [
        pytest.param(
            [],
            {"TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID},
            None,
            ["client_secret", "TOKEN_PROXY_CLIENT_SECRET_FILE"],
            id="client-id-without-secret",
        ),
        pytest.param(
            [],
            {
                "TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID,
                "TOKEN_PROXY_CLIENT_SECRET_FILE": "{tmp}/no-such-secret",
            },
            None,
            ["environment variable TOKEN_PROXY_CLIENT_SECRET_FILE", "no-such-secret"],
            id="unreadable-secret-file",
        ),
        pytest.param(
            ["--config", "{config}"],
            SHORTHAND,
            'uptream = "https://eu.api.blizzard.com"\n',
            ["uptream", "did you mean", "upstream"],
            id="unknown-toml-key",
        ),
        pytest.param(
            [],
            {**SHORTHAND, "TOKEN_PROXY_REGOIN": "eu"},
            None,
            ["TOKEN_PROXY_REGOIN", "TOKEN_PROXY_REGION"],
            id="unknown-env-var",
        ),
        pytest.param(
            [],
            {
                **SHORTHAND,
                "TOKEN_PROXY_REGION": "eu",
                "TOKEN_PROXY_UPSTREAM": "http://eu.api.blizzard.com",
            },
            None,
            ["environment variable TOKEN_PROXY_UPSTREAM", "https://"],
            id="http-upstream",
        ),
        pytest.param(
            [],
            {**SHORTHAND, "TOKEN_PROXY_TOKEN_URL": "http://oauth.battle.net/token"},
            None,
            ["environment variable TOKEN_PROXY_TOKEN_URL", "https://"],
            id="http-token-url",
        ),
        pytest.param(
            ["run", "--config", "{config}"],
            {},
            '[credentials.bnet]\nclient_id = "x"\nclient_secret = "y"\n'
            '[[routes]]\nprefix = "/"\nupstream = "https://eu.api.blizzard.com"\n'
            'credential = "bent"\n',
            ["credential", "bent", "bnet"],
            id="route-unknown-credential",
        ),
        pytest.param(
            [],
            {**SHORTHAND, "TOKEN_PROXY_REGION": "mars"},
            None,
            ["TOKEN_PROXY_REGION", "'eu'"],
            id="bad-region",
        ),
        pytest.param(
            [],
            {**SHORTHAND, "TOKEN_PROXY_PORT": "70000"},
            None,
            ["TOKEN_PROXY_PORT", "65535"],
            id="bad-port-env",
        ),
        pytest.param(
            ["--port", "70000"],
            SHORTHAND,
            None,
            ["port", "65535"],
            id="bad-port-flag",
        ),
        pytest.param(
            [],
            {**SHORTHAND, "TOKEN_PROXY_CONFIG": "{config}"},
            'port = 8080\nregion = "eu\n',
            ["config.toml", "TOML", "line 2"],
            id="toml-syntax-error",
        ),
        pytest.param(
            ["--config", "{tmp}/missing.toml"],
            SHORTHAND,
            None,
            ["missing.toml", "--config"],
            id="missing-config-file",
        ),
        pytest.param(
            ["--host", ALL_INTERFACES],
            SHORTHAND,
            None,
            ["--host: ", "allow_anonymous_remote"],
            id="non-loopback-host",
        ),
        pytest.param(
            [],
            {**SHORTHAND, "TOKEN_PROXY_UPSTREAM": "https://api.example.com"},
            None,
            ["environment variable TOKEN_PROXY_UPSTREAM: is set but", "TOKEN_PROXY_TOKEN_URL"],
            id="upstream-without-token-url",
        ),
        pytest.param(
            ["--config", "{config}"],
            {},
            '[credentials.api]\nclient_id = "x"\nclient_secret = "y"\n'
            '[[routes]]\nprefix = "/"\nupstream = "https://api.example.com"\n'
            'credential = "api"\n',
            ["config.toml: credentials.api.token_url: is not set", "'api.example.com'"],
            id="credential-without-token-url",
        ),
        pytest.param(
            ["--config", "{config}"],
            {},
            '[credential.api]\nclient_id = "x"\nclient_secret = "y"\n',
            ["config.toml: [credential.api]: unknown table; did you mean [credentials.api]?"],
            id="misspelt-table",
        ),
    ],
)
def test_bad_configuration_exits_2(
    *,
    clean_env: dict[str, str],
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    toml: str | None,
    names: list[str],
) -> None:
    """Each bad configuration exits 2 before serving, naming the setting, without a traceback."""
    config = tmp_path / "config.toml"
    if toml is not None:
        config.write_text(toml, encoding="utf-8")
    fill = {"tmp": str(tmp_path), "config": str(config)}
    clean_env.update({name: value.format(**fill) for name, value in env.items()})
    result = run_cli([arg.format(**fill) for arg in args], clean_env, tmp_path)
    assert_config_error(result, *names)
    assert TEST_SECRET not in result.stderr


def test_every_problem_of_a_config_file_in_one_run(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    """A file with a misspelt key in every kind of table and a bad value exits 2 listing all
    five, each with the file, the table and the fix, once, and nothing that follows from them."""
    config = tmp_path / "config.toml"
    config.write_text(
        'port = "abc"\nread_timout = 5\n'
        '[credentials.api]\nclient_id = "x"\nclientsecret = "y"\n'
        'token_url = "https://auth.example.com/token"\n'
        '[[routes]]\nprefix = "/"\nupstrem = "https://api.example.com"\ncredential = "api"\n'
        '[[clients]]\nname = "dashboard"\nkey_sha = "abc"\n',
        encoding="utf-8",
    )
    result = run_cli(["--config", str(config)], clean_env, tmp_path)
    assert_config_error(
        result,
        "5 configuration errors",
        f"{config}: port: Input should be a valid integer",
        f"{config}: read_timout: unknown key; did you mean read_timeout?",
        f"{config}: credentials.api.clientsecret: unknown key; did you mean client_secret?",
        f"{config}: routes[0].upstrem: unknown key; did you mean upstream?",
        f"{config}: clients[0].key_sha: unknown key; did you mean key_sha256?",
    )
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 5, result.stderr
    assert "TOKEN_PROXY_" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "toml", "where"),
    [
        pytest.param([], {}, 'port = "abc"\n', "{config}: port: ", id="file"),
        pytest.param(["--port", "99999"], {}, "port = 9001\n", "--port: ", id="flag"),
        pytest.param(
            [],
            {"TOKEN_PROXY_PORT": "99999"},
            "port = 9001\n",
            "environment variable TOKEN_PROXY_PORT: ",
            id="environment",
        ),
    ],
)
def test_problem_names_the_source_it_came_from(
    *,
    clean_env: dict[str, str],
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    toml: str,
    where: str,
) -> None:
    """A bad port is reported at the file's key, the flag or the variable that set it, once."""
    config = tmp_path / "config.toml"
    config.write_text(toml, encoding="utf-8")
    clean_env.update({**SHORTHAND, **env})
    result = run_cli([*args, "--config", str(config)], clean_env, tmp_path)
    expected = where.format(config=config)
    assert_config_error(result, f"token-proxy: configuration error\n  - {expected}")
    assert result.stderr.count("  - ") == 1, result.stderr
    if "TOKEN_PROXY_PORT" not in expected:
        assert "TOKEN_PROXY_PORT" not in result.stderr


# Linux capabilities that let root read any file whatever its permissions.
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_SETPCAP = 1, 2, 8
PR_CAPBSET_DROP = 24
OTHER_UID = 10002
# Loaded here, not in the forked child, which should only make the one call.
LIBC = ctypes.CDLL(None, use_errno=True)


def _drop_file_capabilities() -> None:
    """In the child before exec: root without the capabilities to bypass file permissions."""
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if LIBC.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def unreadable_for_the_proxy(path: Path) -> Callable[[], None] | None:
    """Make `path` a file the proxy process may not read, as a root-owned 0600 secret is for
    the image's uid 10001; returns what the process must run in the child before exec. As
    root (who reads every file) the file goes to another user and the process loses the
    capabilities that bypass permissions."""
    if os.geteuid() != 0:
        path.chmod(0)
        return None
    status = Path("/proc/self/status").read_text(encoding="ascii")
    effective = int(
        next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16
    )
    if not effective & (1 << CAP_SETPCAP):
        pytest.skip("running as root without CAP_SETPCAP: cannot make a file unreadable")
    os.chown(path, OTHER_UID, OTHER_UID)
    path.chmod(0o600)
    return _drop_file_capabilities


def test_unreadable_file_in_secrets_directory_exits_2(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    """A secret file the process may not read exits 2 naming the file and the fix (uid 10001,
    chown or mode 0444), without a traceback; the other problems are still reported."""
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    secret = secrets / "token_proxy_client_secret"
    secret.write_text(TEST_SECRET + "\n", encoding="utf-8")
    preexec = unreadable_for_the_proxy(secret)
    clean_env.update(
        {
            "TOKEN_PROXY_SECRETS_DIR": str(secrets),
            "TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID,
            "TOKEN_PROXY_PORT": "99999",
        }
    )
    done = subprocess.run(
        command(),
        env=clean_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        preexec_fn=preexec,
    )
    result = Result(done.returncode, done.stdout, done.stderr)
    assert_config_error(
        result,
        f"secrets file {secret}: cannot be read (Permission denied)",
        "10001",
        "chown",
        "0444",
        "environment variable TOKEN_PROXY_PORT: ",
    )
    assert "client_secret: is not set" not in result.stderr, "its absence follows from it"
    assert TEST_SECRET not in result.stderr


@pytest.mark.parametrize("how", ["secrets-directory", "client_secret_file"])
def test_secret_path_that_is_a_directory_exits_2(
    clean_env: dict[str, str], tmp_path: Path, how: str
) -> None:
    """A directory where the secret file should be (Docker's doing when the host file of a bind
    mount is missing) exits 2 with the path and the fix, never a pydantic warning."""
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    directory = secrets / ("token_proxy_client_secret" if how == "secrets-directory" else "bnet")
    directory.mkdir()
    clean_env.update(
        {"TOKEN_PROXY_SECRETS_DIR": str(secrets), "TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID}
    )
    if how == "client_secret_file":
        clean_env["TOKEN_PROXY_CLIENT_SECRET_FILE"] = str(directory)
    result = run_cli([], clean_env, tmp_path)
    assert_config_error(result, str(directory), "is a directory", "bind mount")
    assert "Warning" not in result.stderr
    assert "attempted to load" not in result.stderr


async def test_relative_secret_file_is_found_next_to_the_config_file(
    token_server: FakeTokenServer, clean_env: dict[str, str], tmp_path: Path
) -> None:
    """`check --config conf/config.toml`, run from elsewhere, reads client_secret_file =
    "secret" from conf/, and the token endpoint gets that secret."""
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "secret").write_text(TEST_SECRET + "\n", encoding="utf-8")
    (folder / "config.toml").write_text(
        f'client_id = "{TEST_CLIENT_ID}"\nclient_secret_file = "secret"\n'
        f'token_url = "{token_server.url}"\nupstream = "http://127.0.0.1:9"\n',
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = await run_cli_async(
        ["check", "--config", str(Path("..") / "conf" / "config.toml")], clean_env, elsewhere
    )
    assert result.returncode == 0, result
    assert [r.basic_credentials for r in token_server.requests] == [(TEST_CLIENT_ID, TEST_SECRET)]
    assert_nothing_leaked(result, token_server)


def test_bad_configuration_does_not_bind(clean_env: dict[str, str], tmp_path: Path) -> None:
    """A configuration error is reported before the port is touched: a busy port goes unnoticed."""
    port = free_port()
    clean_env.update({**SHORTHAND, "TOKEN_PROXY_REGION": "mars", "TOKEN_PROXY_PORT": str(port)})
    with socket.create_server(("127.0.0.1", port)):
        result = run_cli([], clean_env, tmp_path)
    assert_config_error(result, "TOKEN_PROXY_REGION")
    assert str(port) not in result.stderr


# --- check ---------------------------------------------------------------------------------------


def check_env(clean_env: dict[str, str], token_url: str, **extra: str) -> dict[str, str]:
    env = dict(clean_env)
    env.update(
        {
            "TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID,
            "TOKEN_PROXY_CLIENT_SECRET": TEST_SECRET,
            "TOKEN_PROXY_TOKEN_URL": token_url,
            "TOKEN_PROXY_UPSTREAM": f"http://127.0.0.1:{free_port()}",
            **extra,
        }
    )
    return env


def assert_nothing_leaked(result: Result, token_server: FakeTokenServer) -> None:
    for stream in (result.stdout, result.stderr):
        assert TEST_SECRET not in stream
        for token in token_server.issued:
            assert token not in stream
    assert "Traceback" not in result.stderr


async def test_check_prints_table(
    token_server: FakeTokenServer, clean_env: dict[str, str], tmp_path: Path
) -> None:
    """`check` fetches one token and prints credential, token_url, auth_method, scope, expiry."""
    env = check_env(clean_env, token_server.url, TOKEN_PROXY_SCOPE="wow.profile")
    result = await run_cli_async(["check", "--log-level", "debug"], env, tmp_path)
    assert result.returncode == 0, result
    assert len(token_server.requests) == 1
    assert len(token_server.issued) == 1
    rows = table(result.stdout)
    assert len(rows) == 2, result.stdout
    header, row = rows
    for column in ("credential", "token_url", "auth_method", "scope", "expires_in"):
        assert column in header
    assert row[header.index("credential")] == "default"
    assert row[header.index("token_url")] == token_server.url
    assert row[header.index("auth_method")] == "client_secret_basic"
    assert row[header.index("scope")] == "wow.profile"
    assert row[header.index("expires_in")] == "3600"
    assert_nothing_leaked(result, token_server)


async def test_check_one_row_per_credential(
    token_server: FakeTokenServer, clean_env: dict[str, str], tmp_path: Path
) -> None:
    """`check --config` with two credentials fetches one token each and prints a row for each."""
    token_server.scope = "granted.scope"
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[credentials.alpha]
token_url = "{token_server.url}"
client_id = "alpha-id"
client_secret = "{TEST_SECRET}"

[credentials.beta]
token_url = "{token_server.url}"
client_id = "beta-id"
client_secret = "{TEST_SECRET}"
auth_method = "client_secret_post"

[[routes]]
prefix = "/a/"
upstream = "http://127.0.0.1:9"
credential = "alpha"

[[routes]]
prefix = "/b/"
upstream = "http://127.0.0.1:9"
credential = "beta"
""",
        encoding="utf-8",
    )
    result = await run_cli_async(["check", "--config", str(config)], clean_env, tmp_path)
    assert result.returncode == 0, result
    assert len(token_server.issued) == 2
    rows = table(result.stdout)
    header, body = rows[0], rows[1:]
    by_name = {row[header.index("credential")]: row for row in body}
    assert set(by_name) == {"alpha", "beta"}
    assert by_name["alpha"][header.index("auth_method")] == "client_secret_basic"
    assert by_name["beta"][header.index("auth_method")] == "client_secret_post"
    for row in body:
        assert row[header.index("scope")] == "granted.scope"
        assert row[header.index("expires_in")] == "3600"
    assert_nothing_leaked(result, token_server)


async def test_check_rejected_client_exits_1(
    token_server: FakeTokenServer, clean_env: dict[str, str], tmp_path: Path
) -> None:
    """`check` exits 1 and reports the error by name when the token endpoint rejects the client."""
    token_server.script.append(web.json_response({"error": "invalid_client"}, status=401))
    env = check_env(clean_env, token_server.url)
    result = await run_cli_async(["check", "--log-level", "debug"], env, tmp_path)
    assert result.returncode == 1, result
    assert len(token_server.requests) == 1
    assert "default" in result.stdout
    assert "invalid_client" in result.stdout
    assert_nothing_leaked(result, token_server)


async def test_check_unreachable_token_endpoint_exits_1(
    token_server: FakeTokenServer, clean_env: dict[str, str], tmp_path: Path
) -> None:
    """`check` exits 1 without a traceback when nobody listens at the token_url."""
    token_url = f"http://127.0.0.1:{free_port()}/token"
    env = check_env(clean_env, token_url)
    result = await run_cli_async(["check", "--log-level", "debug"], env, tmp_path)
    assert result.returncode == 1, result
    assert "default" in result.stdout
    assert token_url in result.stdout
    assert token_server.requests == []
    assert_nothing_leaked(result, token_server)


async def test_check_config_error_exits_2(
    token_server: FakeTokenServer, clean_env: dict[str, str], tmp_path: Path
) -> None:
    """`check` with a bad configuration exits 2, names the setting and asks for no token."""
    env = check_env(clean_env, token_server.url, TOKEN_PROXY_AUTH_METHOD="client_secret_jwt")
    result = await run_cli_async(["check"], env, tmp_path)
    assert_config_error(
        result, "environment variable TOKEN_PROXY_AUTH_METHOD", "client_secret_basic"
    )
    assert token_server.requests == []
    assert_nothing_leaked(result, token_server)
