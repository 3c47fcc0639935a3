"""The Redis settings: redis_url from the environment, the TOML file, redis_url_file or the
secrets directory, checked with the store's parser (a bad one is a configuration error that
names the setting and never the password), redis_timeout and redis_key_prefix, and what they
change: the store the runtime builds, the rate-limit keys, and --workers' split of limits."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import Settings, load, load_settings
from proxy.current import Current
from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.runtime import Runtime, credential_key
from proxy.store import MemoryStore
from proxy.store.base import DEFAULT_REDIS_PREFIX, DEFAULT_REDIS_TIMEOUT
from proxy.store.build import build_store, same_store
from proxy.store.fallback import FallbackStore
from tests.conftest import FakeTokenServer
from tests.redis_server import RedisServer
from tests.store.conftest import wait_until

PASSWORD = "Redis-Settings-Pa55-Never-Shown-e3b1"
URL = f"redis://:{PASSWORD}@127.0.0.1:6390/2"
SHORTHAND = {
    "TOKEN_PROXY_CLIENT_ID": "redis-settings-id",
    "TOKEN_PROXY_CLIENT_SECRET": "Redis-Settings-Client-S3cret",
    "TOKEN_PROXY_TOKEN_URL": "http://127.0.0.1:9/token",
    "TOKEN_PROXY_UPSTREAM": "http://127.0.0.1:9",
}


@pytest.fixture
def shorthand(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SHORTHAND.items():
        monkeypatch.setenv(name, value)


def refusal(**flags: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(flags=flags)
    return info.value.detail


@pytest.mark.usefixtures("shorthand")
def test_redis_is_off_by_default_and_the_store_is_memory() -> None:
    settings = load_settings()
    assert settings.redis_url is None
    assert settings.redis_timeout == DEFAULT_REDIS_TIMEOUT == 0.25
    assert settings.redis_key_prefix == DEFAULT_REDIS_PREFIX == "token-proxy:"
    assert isinstance(build_store(settings), MemoryStore)


@pytest.mark.usefixtures("shorthand")
def test_redis_url_from_the_environment_is_a_secret_and_builds_the_fallback_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKEN_PROXY_REDIS_URL", URL)
    monkeypatch.setenv("TOKEN_PROXY_REDIS_TIMEOUT", "0.1")
    monkeypatch.setenv("TOKEN_PROXY_REDIS_KEY_PREFIX", "team-a:")
    settings = load_settings()
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == URL
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.model_dump())
    store = build_store(settings)
    assert isinstance(store, FallbackStore)
    assert store.shared_store.timeout == 0.1
    assert store.shared_store.prefix == "team-a:"
    assert store.shared_store.target.port == 6390
    assert store.shared_store.target.db == 2
    assert PASSWORD not in repr(store.shared_store)
    assert PASSWORD not in str(store.state())


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (f"http://:{PASSWORD}@127.0.0.1:6379", "only redis, rediss and unix"),
        (f"redis://:{PASSWORD}/x@host:6379", "percent-encode"),
        (f"rediss://:{PASSWORD}@host/0?ssl_cert_reqs=none", "TLS is always verified"),
        (f"unix://:{PASSWORD}@relative.sock", "a unix:// URL names no host"),
        ("", "it is empty"),
    ],
)
@pytest.mark.usefixtures("shorthand")
def test_a_bad_redis_url_is_a_configuration_error_that_never_shows_the_password(
    monkeypatch: pytest.MonkeyPatch, url: str, said: str
) -> None:
    monkeypatch.setenv("TOKEN_PROXY_REDIS_URL", url)
    detail = refusal()
    assert detail.startswith("environment variable TOKEN_PROXY_REDIS_URL: ")
    assert said in detail
    assert "write it as redis://" in detail
    assert PASSWORD not in detail
    # The setting is named once, by where it was set.
    assert detail.count("TOKEN_PROXY_REDIS_URL") == 1


def test_bad_redis_url_exits_2_before_binding_without_the_password(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "TOKEN_PROXY_SECRETS_DIR": str(tmp_path),
        **SHORTHAND,
        "TOKEN_PROXY_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:notaport",
    }
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--port", "0"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    stderr = done.stderr.decode()
    assert "TOKEN_PROXY_REDIS_URL: its host or port cannot be read" in stderr
    assert "Traceback" not in stderr
    assert PASSWORD not in stderr + done.stdout.decode()


@pytest.mark.usefixtures("shorthand")
def test_redis_url_file_is_read_relative_to_the_toml_file_and_named_in_its_problems(
    tmp_path: Path,
) -> None:
    (tmp_path / "redis-url").write_text(URL + "\n", encoding="utf-8")
    config = tmp_path / "proxy.toml"
    config.write_text('redis_url_file = "redis-url"\n', encoding="utf-8")
    loaded = load(config_file=config)
    assert loaded.settings.redis_url is not None
    assert loaded.settings.redis_url.get_secret_value() == URL
    # Read again when it changes, like every secret file.
    assert [file.setting for file in loaded.secret_files.files] == [("redis_url_file",)]
    (tmp_path / "redis-url").write_text("redis://127.0.0.1:6391/0\n", encoding="utf-8")
    reread = loaded.secret_files.reread()
    assert [file.value.get_secret_value() for file in reread.changed] == [
        "redis://127.0.0.1:6391/0"
    ]
    (tmp_path / "redis-url").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=config)
    assert "redis_url_file: " in info.value.detail
    assert "is empty; write the Redis URL in it" in info.value.detail
    (tmp_path / "redis-url").write_text(f"redis://:{PASSWORD}@h:0/0", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=config)
    assert f"{config}: redis_url_file: the URL it holds: its port is not a number" in (
        info.value.detail
    )
    assert PASSWORD not in info.value.detail


@pytest.mark.usefixtures("shorthand")
def test_redis_url_and_its_file_in_one_source_is_an_error_but_the_environment_wins_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "redis-url").write_text("redis://127.0.0.1:6391/0", encoding="utf-8")
    config = tmp_path / "proxy.toml"
    config.write_text(f'redis_url_file = "redis-url"\nredis_url = "{URL}"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=config)
    assert "redis_url_file: is set and so is redis_url; keep only one" in info.value.detail
    assert PASSWORD not in info.value.detail
    config.write_text('redis_url_file = "redis-url"\n', encoding="utf-8")
    monkeypatch.setenv("TOKEN_PROXY_REDIS_URL", URL)
    settings = load_settings(config_file=config)
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == URL
    assert settings.redis_url_file is None


@pytest.mark.usefixtures("shorthand")
def test_redis_url_from_the_secrets_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token_proxy_redis_url").write_text(URL + "\n", encoding="utf-8")
    monkeypatch.setenv("TOKEN_PROXY_SECRETS_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == URL
    (tmp_path / "token_proxy_redis_url").write_text(f"redis://:{PASSWORD}@:6379", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"secrets file {tmp_path / 'token_proxy_redis_url'}: it names no host" in (
        info.value.detail
    )
    assert PASSWORD not in info.value.detail


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("REDIS_TIMEOUT", "0", "Input should be greater than 0"),
        ("REDIS_TIMEOUT", "11", "Input should be less than or equal to 10"),
        ("REDIS_KEY_PREFIX", "", "is empty"),
        (
            "REDIS_KEY_PREFIX",
            "team a:",
            "must be up to 64 printable ASCII characters without blanks, { or }",
        ),
        (
            "REDIS_KEY_PREFIX",
            "{team}:",
            "must be up to 64 printable ASCII characters without blanks, { or }",
        ),
    ],
)
@pytest.mark.usefixtures("shorthand")
def test_redis_timeout_and_prefix_are_checked(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, said: str
) -> None:
    monkeypatch.setenv(f"TOKEN_PROXY_{name}", value)
    assert refusal().startswith(f"environment variable TOKEN_PROXY_{name}: {said}")


def test_limits_are_split_between_workers_in_memory_but_shared_whole_through_redis() -> None:
    values: dict[str, object] = {
        "credentials": {
            "c": {
                "client_id": "split-id",
                "client_secret": "Split-S3cret-Value",
                "token_url": "http://127.0.0.1:9/token",
                "rate_limit": ["20/second", "1/hour"],
            }
        },
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9", "credential": "c"}],
        "clients": [{"name": "t", "key": "team-key-0123456789", "rate_limit": ["10/second"]}],
        "workers": 2,
    }
    # 1/hour cannot be split two ways; shared through Redis it need not be.
    with pytest.raises(ValueError, match="cannot be split between 2 workers"):
        Settings.model_validate(values)
    values["credentials"]["c"]["rate_limit"] = ["20/second"]  # type: ignore[index]
    split = Settings.model_validate(values)
    credentials, clients = split.split_limits()
    assert credentials["c"].rate_limits == ("10 per 1 second",)
    assert clients[0].rate_limit == ("5 per 1 second",)
    values["credentials"]["c"]["rate_limit"] = ["20/second", "1/hour"]  # type: ignore[index]
    shared = Settings.model_validate({**values, "redis_url": "redis://127.0.0.1:6379"})
    credentials, clients = shared.split_limits()
    assert credentials["c"].rate_limits == ("20/second", "1/hour")
    assert clients[0].rate_limit == ("10/second",)


def test_a_credential_is_keyed_by_its_identity_not_its_name() -> None:
    def settings(name: str, scope: str) -> Settings:
        return Settings.model_validate(
            {
                "credentials": {
                    name: {
                        "client_id": "same-id",
                        "client_secret": "Any-S3cret-Value",
                        "token_url": "http://127.0.0.1:9/token",
                        "scope": scope,
                    }
                },
                "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9", "credential": name}],
            }
        )

    one, two = settings("bnet", "a b"), settings("battlenet", "b a")
    key = credential_key(one.credentials["bnet"])
    assert key == credential_key(two.credentials["battlenet"])
    assert key != credential_key(settings("bnet", "a").credentials["bnet"])
    assert "same-id" not in key
    assert key.startswith("credential:")


def test_a_reload_keeps_the_store_only_when_its_settings_are_the_same() -> None:
    base = {**{k.removeprefix("TOKEN_PROXY_").lower(): v for k, v in SHORTHAND.items()}}
    memory = Settings.model_validate(base)
    redis = Settings.model_validate({**base, "redis_url": URL})
    assert same_store(memory, Settings.model_validate({**base, "log_level": "debug"}))
    assert not same_store(memory, redis)
    assert same_store(redis, Settings.model_validate({**base, "redis_url": URL}))
    assert not same_store(redis, Settings.model_validate({**base, "redis_url": URL + "0"}))
    assert not same_store(
        redis, Settings.model_validate({**base, "redis_url": URL, "redis_key_prefix": "b:"})
    )


async def test_the_runtime_builds_the_store_from_settings_and_hands_it_over(
    make_settings: Callable[..., Settings], redis_server: RedisServer
) -> None:
    """Runtime.open builds and starts the fallback store that redis_url asks for; a reload
    with the same store settings takes it over as it is (the first runtime's close leaves it
    open), and the runtime that had it last closes it."""
    settings = make_settings(redis_url=redis_server.url, redis_key_prefix="handover:")
    metrics = Metrics()
    first = await Runtime.open(settings, metrics=metrics)
    store = first.store
    assert isinstance(store, FallbackStore)
    assert store.state()["state"] == "shared"
    second = await Runtime.open(settings, metrics=metrics, previous=first)
    await first.close()
    assert store.state()["state"] == "shared"
    assert second.store is store
    claim = second.limits._credentials["default"].claim  # the key in use
    assert claim.key == credential_key(settings.credentials["default"])
    admission = await store.counters.acquire([claim], hold=5.0)
    assert admission.slot is not None
    assert admission.slot.origin == "redis"
    await second.close()
    # Closed with the runtime that had it last: its background check has stopped.
    assert store._task is None


async def test_a_reload_that_sets_redis_url_moves_the_token_into_redis_without_a_fetch(
    make_settings: Callable[..., Settings],
    redis_server: RedisServer,
    token_server: FakeTokenServer,
) -> None:
    """Turning Redis on (or changing it) by a reload keeps the credential's token source and
    its token, which the new store gets: a second replica on that Redis takes it as it is,
    and neither asks the token endpoint again."""
    current = Current(metrics=Metrics())
    await current.start(make_settings())
    try:
        first = current.runtime
        await wait_for_token(first)
        assert first.store.state() == {"backend": "memory"}
        assert len(token_server.requests) == 1
        await current.replace(make_settings(redis_url=redis_server.url))
        second = current.runtime
        assert isinstance(second.store, FallbackStore)
        assert second.store.state()["state"] == "shared"
        assert second.tokens["default"] is first.tokens["default"]
        await wait_until(lambda: not current.retiring)  # the first one let the memory go
        other = await Runtime.open(make_settings(redis_url=redis_server.url), metrics=Metrics())
        try:
            token = await asyncio.wait_for(other.tokens["default"].token(), 5)
            assert token.value == token_server.issued[0]
        finally:
            await other.close()
        assert len(token_server.requests) == 1
    finally:
        await current.close()


async def wait_for_token(runtime: Runtime) -> None:
    await asyncio.wait_for(runtime.tokens["default"].token(), 5)
