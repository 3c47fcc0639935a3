"""Reloading in one process, against the fake token server and real files: a runtime hands on
to the next what did not change (a kept credential keeps its token), closes once its last
request is done, a refused credential retries at once with a new secret, the configuration's
name hides its secrets, and the Reloader validates first, keeps what needs a restart, reads
secret files again through Kubernetes' ..data link, and says what changed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from proxy.config import Loaded, Settings, fingerprint, load
from proxy.credentials import TokenManager
from proxy.current import Current
from proxy.metrics import ConfigReloads, Metrics
from proxy.reload import SIGHUP, Changes, ConfigSource, Reloader
from proxy.runtime import Runtime
from tests.conftest import (
    TEST_CLIENT_ID,
    TEST_SECRET,
    CapturedLog,
    FakeTokenServer,
    SettingsFactory,
    configure_test_logging,
    wait_for,
)
from tests.test_secret_files import kubernetes_mount, write_atomically

NEW_SECRET = "R0tated-S3cret-Value-Never-Logged-91c2"


def manager(runtime: Runtime, name: str = "default") -> TokenManager:
    source = runtime.tokens[name]
    assert isinstance(source, TokenManager)
    return source


def with_credential(settings: Settings, **changes: Any) -> Settings:
    credentials = {
        name: credential.model_copy(update=changes)
        for name, credential in settings.credentials.items()
    }
    return settings.model_copy(update={"credentials": credentials})


# --- the runtime and what it hands on --------------------------------------------------------


async def test_a_kept_credential_keeps_its_token_and_the_old_runtime_closes_when_idle(
    make_settings: SettingsFactory, token_server: FakeTokenServer
) -> None:
    """A reload that changes routes, limits and timeouts but not the credential's identity
    moves its TokenManager across: no fetch. The old runtime closes only once the request
    still running on it ends, and closing it leaves what the new one took over open."""
    current = Current(metrics=Metrics())
    await current.start(make_settings())
    first = current.runtime
    await manager(first).token()
    assert len(token_server.requests) == 1
    first.begin()  # a request still running on the first runtime
    second_settings = with_credential(
        make_settings(read_timeout=9.0), rate_limit=("5/second",)
    ).model_copy(update={"routes": (*make_settings().routes,)})
    await current.replace(second_settings)
    second = current.runtime
    assert second is not first
    assert manager(second) is manager(first)
    assert second.store is first.store
    assert second.settings.read_timeout == 9.0
    assert current.retiring == 1
    await asyncio.sleep(0.05)
    assert current.retiring == 1, "closed while a request still ran on it"
    first.end()
    await wait_for(lambda: current.retiring == 0, timeout=5)
    assert manager(second).usable_token() is not None
    refreshing = manager(second)._task
    assert refreshing is not None
    assert not refreshing.done()
    assert len(token_server.requests) == 1
    await current.close()
    assert manager(second)._task is None


async def test_a_changed_client_id_fetches_anew_and_a_removed_credential_stops(
    make_settings: SettingsFactory, token_server: FakeTokenServer
) -> None:
    """Another client id is another credential: a new TokenManager fetches its own token; the
    one it replaced, and one removed, are closed with the old runtime."""
    base = make_settings()
    extra = base.credentials["default"].model_copy(update={"client_id": "other-client"})
    settings = base.model_copy(update={"credentials": {**base.credentials, "gone": extra}})
    current = Current(metrics=Metrics())
    await current.start(settings)
    old = current.runtime
    await manager(old).token()
    await manager(old, "gone").token()
    assert len(token_server.requests) == 2
    await current.replace(with_credential(base, client_id="renamed-client"))
    new = current.runtime
    assert manager(new) is not manager(old)
    assert "gone" not in new.tokens
    await manager(new).token()
    assert len(token_server.requests) == 3
    assert token_server.requests[-1].basic_credentials == ("renamed-client", TEST_SECRET)
    await wait_for(lambda: current.retiring == 0, timeout=5)
    assert manager(old)._task is None
    assert manager(old, "gone")._task is None
    await current.close()


async def test_a_reload_that_adds_a_credential_switches_once_it_has_its_token(
    make_settings: SettingsFactory, token_server: FakeTokenServer
) -> None:
    """The new credential's first token request is answered before new requests reach it:
    a token, so that they need not wait; or a refusal, which does not hold the reload."""
    base = make_settings()
    current = Current(metrics=Metrics())
    await current.start(base)
    await manager(current.runtime).token()
    added = base.credentials["default"].model_copy(update={"client_id": "added-client"})
    await current.replace(base.model_copy(update={"credentials": {**base.credentials, "b": added}}))
    assert manager(current.runtime, "b").usable_token() is not None
    token_server.script.append(web.json_response({"error": "invalid_client"}, status=401))
    refused = added.model_copy(update={"client_id": "refused-client"})
    started = asyncio.get_running_loop().time()
    await current.replace(
        base.model_copy(update={"credentials": {**base.credentials, "c": refused}})
    )
    assert asyncio.get_running_loop().time() - started < 2
    assert manager(current.runtime, "c").status().rejected
    await current.close()


async def test_a_route_whose_limit_stays_keeps_its_connection_slots(
    make_settings: SettingsFactory,
) -> None:
    """max_connections counts the requests of the old runtime and of the new one together
    while both run: a reload that leaves the transports' settings as they were hands the
    transports (their pools and slots) on; one that changes a limit builds new ones."""
    settings = make_settings()
    route = settings.routes[0].model_copy(update={"max_connections": 2})
    current = Current(metrics=Metrics())
    await current.start(settings.model_copy(update={"routes": (route,)}))
    first = current.runtime
    await current.replace(first.settings.model_copy(update={"access_log": False}))
    assert current.runtime.transports is first.transports
    wider = route.model_copy(update={"max_connections": 4})
    await current.replace(first.settings.model_copy(update={"routes": (wider,)}))
    assert current.runtime.transports is not first.transports
    await current.close()


# --- the token manager ---------------------------------------------------------------------


async def test_a_refused_credential_retries_at_once_with_a_new_secret(
    make_settings: SettingsFactory, token_server: FakeTokenServer
) -> None:
    """After invalid_client the manager waits 30 s or more; a new secret ends that wait, and
    the next token request carries it."""
    token_server.script.append(
        web.json_response({"error": "invalid_client"}, status=401)  # the secret is refused
    )
    settings = make_settings()
    current = Current(metrics=Metrics())
    await current.start(settings)
    tokens = manager(current.runtime)
    await wait_for(lambda: tokens.status().rejected, timeout=5)
    assert tokens.state()["next_retry_in"] >= 30
    rotated = with_credential(settings, client_secret=SecretStr(NEW_SECRET))
    await current.replace(rotated)
    await wait_for(lambda: tokens.usable_token() is not None, timeout=5)
    assert token_server.requests[-1].basic_credentials == (TEST_CLIENT_ID, NEW_SECRET)
    await current.close()


async def test_a_working_credential_keeps_its_token_until_its_next_fetch(
    make_settings: SettingsFactory, token_server: FakeTokenServer
) -> None:
    """A new secret for a credential that works: no fetch now; its next one carries it."""
    settings = make_settings()
    current = Current(metrics=Metrics())
    await current.start(settings)
    tokens = manager(current.runtime)
    token = await tokens.token()
    await current.replace(with_credential(settings, client_secret=SecretStr(NEW_SECRET)))
    await asyncio.sleep(0.1)
    assert len(token_server.requests) == 1
    assert tokens.usable_token() is token
    assert tokens.invalidate(token, path="/x", replayable=True)
    await tokens.token()
    assert token_server.requests[-1].basic_credentials == (TEST_CLIENT_ID, NEW_SECRET)
    await current.close()


# --- the configuration's name ---------------------------------------------------------------


def test_the_configuration_hash_names_the_secret_without_showing_it(
    make_settings: SettingsFactory,
) -> None:
    """12 hex digits, the same for the same settings, another for another secret or route;
    neither the secret nor its sha256 is in it (it is a hash of the whole)."""
    settings = make_settings()
    name = fingerprint(settings)
    assert len(name) == 12
    assert int(name, 16) >= 0
    assert fingerprint(make_settings()) == name
    assert fingerprint(with_credential(settings, client_secret=SecretStr(NEW_SECRET))) != name
    assert fingerprint(make_settings(read_timeout=1.0)) != name


# --- what changed ---------------------------------------------------------------------------


def test_changes_name_what_changed_and_never_a_value(make_settings: SettingsFactory) -> None:
    base = make_settings()
    extra = base.credentials["default"].model_copy(update={"client_id": "b-client"})
    new = with_credential(base, client_secret=SecretStr(NEW_SECRET)).model_copy(
        update={
            "credentials": {
                "default": base.credentials["default"].model_copy(
                    update={"client_secret": SecretStr(NEW_SECRET)}
                ),
                "b": extra,
            },
            "routes": (*base.routes, base.routes[0].model_copy(update={"prefix": "/b/"})),
            "read_timeout": 3.0,
        }
    )
    changes = Changes.between(base, new)
    assert changes.fields == {
        "routes_added": ["/b/"],
        "credentials_added": ["b"],
        "credentials_changed": ["default"],
        "credentials_rotated": ["default"],
        "settings_changed": ["read_timeout"],
    }
    assert NEW_SECRET not in json.dumps(changes.fields)
    assert Changes.between(base, base).any is False


# --- the reloader, against real files -------------------------------------------------------


class Applied:
    """An apply step that records what it was given, or fails when told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[Loaded, Changes]] = []
        self.fail = False

    async def __call__(self, loaded: Loaded, changes: Changes) -> None:
        if self.fail:
            raise RuntimeError("the new runtime could not be built")
        self.calls.append((loaded, changes))


def reloader_for(
    source: ConfigSource, applied: Applied, reloads: ConfigReloads | None = None
) -> Reloader:
    return Reloader(source, source.load(), apply=applied, reloads=reloads, poll=None)


# Debug and JSON, as the suite logs: a reload sets the level and format of the process.
CONFIG = """
log_level = "debug"
log_format = "json"
read_timeout = {read_timeout}
port = {port}

[credentials.api]
client_id = "api-client"
client_secret_file = "{secret}"
token_url = "http://127.0.0.1:9/token"

[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:9"
credential = "api"
"""


def write_config(path: Path, *, secret: Path, read_timeout: float = 30, port: int = 8080) -> None:
    path.write_text(CONFIG.format(secret=secret, read_timeout=read_timeout, port=port))


@pytest.fixture
def proxy_log_lines() -> Iterator[CapturedLog]:
    captured = CapturedLog()
    configure_test_logging(captured.stream)
    yield captured
    configure_test_logging()


async def test_sighup_applies_a_valid_file_and_keeps_what_needs_a_restart(
    tmp_path: Path, proxy_log_lines: CapturedLog
) -> None:
    """The file read again: its new read_timeout applies, its new port does not (the log
    says it needs a restart), and the reload counts as a success."""
    secret = tmp_path / "secret"
    secret.write_text(TEST_SECRET)
    config = tmp_path / "proxy.toml"
    write_config(config, secret=secret)
    applied, reloads = Applied(), ConfigReloads()
    reloader = reloader_for(ConfigSource(config_file=config), applied, reloads)
    write_config(config, secret=secret, read_timeout=7, port=9999)
    assert await reloader.reload()
    loaded, changes = applied.calls[-1]
    assert loaded.settings.read_timeout == 7
    assert loaded.settings.port == 8080
    assert changes.needs_restart == ("port",)
    assert reloader.loaded is loaded
    assert (reloads.success, reloads.failure) == (1, 0)
    line = next(e for e in proxy_log_lines.lines() if e["logger"] == "proxy.reload")
    assert line["level"] == "warning"
    assert line["needs_restart"] == ["port"]
    assert line["settings_changed"] == ["read_timeout"]
    assert "restart" in line["event"]


async def test_an_invalid_file_is_refused_and_the_running_configuration_stays(
    tmp_path: Path, proxy_log_lines: CapturedLog
) -> None:
    """A reload that does not validate applies nothing, says which setting and how to fix
    it, and counts as a failure; fixing the file and reloading again works."""
    secret = tmp_path / "secret"
    secret.write_text(TEST_SECRET)
    config = tmp_path / "proxy.toml"
    write_config(config, secret=secret)
    applied, reloads = Applied(), ConfigReloads()
    reloader = reloader_for(ConfigSource(config_file=config), applied, reloads)
    before = reloader.loaded
    config.write_text(config.read_text().replace("read_timeout = 30", "read_timeout = -1"))
    assert not await reloader.reload()
    assert applied.calls == []
    assert reloader.loaded is before
    assert (reloads.success, reloads.failure, reloads.last_ok) == (0, 1, False)
    line = next(e for e in proxy_log_lines.lines() if e["logger"] == "proxy.reload")
    assert line["level"] == "error"
    assert any("read_timeout" in problem for problem in line["problems"])
    assert "running one stays" in line["event"]
    applied.fail = True
    write_config(config, secret=secret, read_timeout=8)
    assert not await reloader.reload()
    assert reloader.loaded is before
    applied.fail = False
    assert await reloader.reload()
    assert applied.calls[-1][0].settings.read_timeout == 8
    assert (reloads.success, reloads.failure, reloads.last_ok) == (1, 2, True)


async def test_the_environment_still_outranks_the_file_after_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(TEST_SECRET)
    config = tmp_path / "proxy.toml"
    write_config(config, secret=secret)
    monkeypatch.setenv("TOKEN_PROXY_READ_TIMEOUT", "4")
    applied = Applied()
    reloader = reloader_for(ConfigSource(config_file=config), applied)
    write_config(config, secret=secret, read_timeout=11)
    config.write_text(
        config.read_text().replace("port = 8080", "port = 8080\nshutdown_timeout = 3")
    )
    assert await reloader.reload()
    settings = applied.calls[-1][0].settings
    assert settings.read_timeout == 4
    assert settings.shutdown_timeout == 3


async def test_a_kubernetes_secret_swap_is_applied_without_reading_the_file_again(
    tmp_path: Path, proxy_log_lines: CapturedLog
) -> None:
    """The secret behind a ..data link changes: the poll applies the new secret to that
    credential alone; an edit of the configuration file meanwhile waits for SIGHUP. A file
    that then empties keeps its value, and says so once, not at every poll."""
    mount = tmp_path / "mount"
    mount.mkdir()
    kubernetes_mount(mount, {"client-secret": TEST_SECRET}, version="2024_01")
    config = tmp_path / "proxy.toml"
    write_config(config, secret=mount / "client-secret")
    applied, reloads = Applied(), ConfigReloads()
    reloader = reloader_for(ConfigSource(config_file=config), applied, reloads)
    assert await reloader.check_secrets() is None
    write_config(config, secret=mount / "client-secret", read_timeout=12)
    kubernetes_mount(mount, {"client-secret": NEW_SECRET}, version="2024_02")
    assert await reloader.check_secrets() is True
    loaded, changes = applied.calls[-1]
    assert loaded.settings.credentials["api"].client_secret.get_secret_value() == NEW_SECRET
    assert loaded.settings.read_timeout == 30
    assert changes.fields == {"credentials_changed": ["api"], "credentials_rotated": ["api"]}
    assert changes.trigger != SIGHUP
    assert await reloader.check_secrets() is None
    kubernetes_mount(mount, {"client-secret": ""}, version="2024_03")
    assert await reloader.check_secrets() is None
    assert await reloader.check_secrets() is None
    warned = [e for e in proxy_log_lines.lines() if e["event"].startswith("a secret file")]
    assert len(warned) == 1
    assert "client-secret" in warned[0]["problem"]
    assert reloader.loaded.settings.credentials["api"].client_secret.get_secret_value() == (
        NEW_SECRET
    )
    assert (reloads.success, reloads.failure) == (1, 1)
    assert NEW_SECRET not in proxy_log_lines.text()


async def test_a_secrets_directory_file_is_validated_with_the_file_as_it_was_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of the secrets directory may set any setting: everything is validated again,
    from the configuration file's table as read at the last reload (not the file now)."""
    directory = tmp_path / "secrets"
    directory.mkdir()
    monkeypatch.setenv("TOKEN_PROXY_SECRETS_DIR", str(directory))
    write_atomically(directory / "token_proxy_client_secret", TEST_SECRET)
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'client_id = "{TEST_CLIENT_ID}"\ntoken_url = "http://127.0.0.1:9/t"\n'
        'upstream = "http://127.0.0.1:9"\nread_timeout = 30\nlog_level = "debug"\n'
        'log_format = "json"\n'
    )
    applied = Applied()
    reloader = reloader_for(ConfigSource(config_file=config), applied)
    config.write_text(config.read_text().replace("read_timeout = 30", "read_timeout = 13"))
    write_atomically(directory / "token_proxy_client_secret", NEW_SECRET)
    assert await reloader.check_secrets() is True
    settings = applied.calls[-1][0].settings
    assert settings.credentials["default"].client_secret.get_secret_value() == NEW_SECRET
    assert settings.read_timeout == 30
    assert await reloader.reload()
    assert applied.calls[-1][0].settings.read_timeout == 13


async def test_a_sighup_while_one_runs_is_carried_out_after_it(tmp_path: Path) -> None:
    """Reloads run one at a time in the reloader's task, in the order asked."""
    secret = tmp_path / "secret"
    secret.write_text(TEST_SECRET)
    config = tmp_path / "proxy.toml"
    write_config(config, secret=secret)
    applied = Applied()
    reloader = reloader_for(ConfigSource(config_file=config), applied)
    task = asyncio.create_task(reloader.run())
    try:
        write_config(config, secret=secret, read_timeout=5)
        reloader.hup()
        reloader.hup()
        await wait_for(lambda: len(applied.calls) == 2, timeout=5)
    finally:
        task.cancel()
    assert [loaded.settings.read_timeout for loaded, _ in applied.calls] == [5, 5]
    assert applied.calls[1][1].any is False


def test_load_with_a_table_reads_no_file(tmp_path: Path) -> None:
    config = tmp_path / "gone.toml"
    table = {"client_id": "x", "client_secret": TEST_SECRET, "token_url": "http://127.0.0.1:9/t"}
    table["upstream"] = "http://127.0.0.1:9"
    loaded = load(config_file=config, table=table)
    assert loaded.settings.client_id == "x"
    assert loaded.toml == table


async def test_with_workers_the_redis_settings_need_a_restart_by_file_or_rotation(
    tmp_path: Path,
) -> None:
    """A group's supervisor holds the group's tokens in its store: with workers, a changed
    redis_url (in the file, or in a rotated redis_url_file) keeps its running value and is
    named as needing a restart; a single process takes it live."""
    secret = tmp_path / "secret"
    secret.write_text(TEST_SECRET)
    redis_file = tmp_path / "redis-url"
    redis_file.write_text("redis://127.0.0.1:6390/0\n")
    config = tmp_path / "proxy.toml"

    def write(*, workers: int, prefix: str) -> None:
        write_config(config, secret=secret)
        with config.open("r+") as file:
            text = file.read()
            file.seek(0)
            file.write(
                f'workers = {workers}\nredis_url_file = "{redis_file}"\n'
                f'redis_key_prefix = "{prefix}"\n' + text
            )

    write(workers=2, prefix="a:")
    applied = Applied()
    reloader = reloader_for(ConfigSource(config_file=config), applied)
    write(workers=2, prefix="b:")
    assert await reloader.reload()
    loaded, changes = applied.calls[-1]
    assert loaded.settings.redis_key_prefix == "a:"
    assert changes.needs_restart == ("redis_key_prefix",)
    redis_file.write_text("redis://127.0.0.1:6391/0\n")
    assert await reloader.check_secrets() is True
    loaded, changes = applied.calls[-1]
    assert loaded.settings.redis_url is not None
    assert loaded.settings.redis_url.get_secret_value() == "redis://127.0.0.1:6390/0"
    assert changes.needs_restart == ("redis_url",)

    write(workers=1, prefix="a:")
    single = Applied()
    reloader = reloader_for(ConfigSource(config_file=config), single)
    write(workers=1, prefix="b:")
    redis_file.write_text("redis://127.0.0.1:6392/0\n")
    assert await reloader.reload()
    loaded, changes = single.calls[-1]
    assert loaded.settings.redis_key_prefix == "b:"
    assert loaded.settings.redis_url is not None
    assert loaded.settings.redis_url.get_secret_value() == "redis://127.0.0.1:6392/0"
    assert changes.needs_restart == ()
    # A rotated URL that cannot be read keeps the running one; it never reaches a secret.
    redis_file.write_text("http://127.0.0.1:6393/0\n")
    await reloader.check_secrets()
    assert reloader.loaded.settings.redis_url is not None
    assert reloader.loaded.settings.redis_url.get_secret_value() == "redis://127.0.0.1:6392/0"
    credential = reloader.loaded.settings.credentials["api"]
    assert credential.client_secret.get_secret_value() == TEST_SECRET
