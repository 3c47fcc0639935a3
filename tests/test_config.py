"""Settings: source order, the single-API shorthand and Battle.net presets, TOML credentials
and routes, and a ConfigError that names the setting and the fix for every bad configuration."""

from __future__ import annotations

from pathlib import Path
from traceback import format_exception

import certifi
import pytest
from pydantic import ValidationError

from proxy.config import REGION_TOKEN_URLS, Settings, load_settings
from proxy.config.values import check_url
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ID = "cfg-client-id"
SECRET = "Cfg-S3cret-Value-Never-Shown-91b2"
BATTLENET_TOKEN_URL = "https://oauth.battle.net/token"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104  (the address under test, never bound here)


@pytest.fixture
def shorthand(monkeypatch: pytest.MonkeyPatch) -> None:
    """The smallest valid configuration: client id and secret in the environment."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET", SECRET)


@pytest.fixture
def secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty secrets directory that load_settings reads (TOKEN_PROXY_SECRETS_DIR)."""
    directory = tmp_path / "secrets"
    directory.mkdir()
    monkeypatch.setenv("TOKEN_PROXY_SECRETS_DIR", str(directory))
    return directory


def write_toml(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(**kwargs: object) -> str:
    """Load settings that must be refused, and return the ConfigError's message."""
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    message = info.value.detail
    assert message == str(info.value)
    assert message.strip(), "a ConfigError must say something"
    return message


def secret_of(settings: Settings, credential: str = "default") -> str:
    return settings.credentials[credential].client_secret.get_secret_value()


# --- Source order: flags > environment > secrets directory > TOML file > defaults --------------


@pytest.mark.usefixtures("shorthand")
def test_defaults() -> None:
    """With only a client id and secret, every other setting takes its documented default."""
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.region == "us"
    assert settings.auth_method == "client_secret_basic"
    assert settings.scope == ""
    assert settings.connect_timeout == 5
    assert settings.read_timeout == 60
    assert settings.shutdown_timeout == 15
    assert settings.log_level == "info"
    assert settings.log_format == "auto"
    assert settings.allow_anonymous_remote is False
    credential = settings.credentials["default"]
    assert credential.auth_method == "client_secret_basic"
    assert credential.scope == ""


@pytest.mark.usefixtures("shorthand")
def test_toml_overrides_defaults(tmp_path: Path) -> None:
    """A key in the TOML file replaces the default."""
    config = write_toml(tmp_path, 'port = 9001\nlog_level = "debug"\n')
    settings = load_settings(config_file=config)
    assert settings.port == 9001
    assert settings.log_level == "debug"


def test_secrets_dir_overrides_toml(
    tmp_path: Path, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file token_proxy_<name> in the secrets directory beats the same key in the TOML file."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    (secrets_dir / "token_proxy_client_secret").write_text("from-secrets-dir\n")
    (secrets_dir / "token_proxy_port").write_text("9002")
    config = write_toml(tmp_path, 'client_secret = "from-toml"\nport = 9001\nscope = "toml"\n')
    settings = load_settings(config_file=config)
    assert secret_of(settings) == "from-secrets-dir"
    assert settings.port == 9002
    assert settings.scope == "toml", "keys absent from the secrets directory still come from TOML"


def test_environment_overrides_secrets_dir(
    tmp_path: Path, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TOKEN_PROXY_* variable beats the secrets directory and the TOML file."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET", "from-env")
    monkeypatch.setenv("TOKEN_PROXY_PORT", "9003")
    (secrets_dir / "token_proxy_client_secret").write_text("from-secrets-dir\n")
    (secrets_dir / "token_proxy_port").write_text("9002")
    config = write_toml(tmp_path, 'client_secret = "from-toml"\nport = 9001\n')
    settings = load_settings(config_file=config)
    assert secret_of(settings) == "from-env"
    assert settings.port == 9003


@pytest.mark.usefixtures("shorthand")
def test_flags_override_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command-line flag beats the environment, the secrets directory and the TOML file."""
    monkeypatch.setenv("TOKEN_PROXY_PORT", "9003")
    monkeypatch.setenv("TOKEN_PROXY_LOG_LEVEL", "warning")
    config = write_toml(tmp_path, 'port = 9001\nlog_level = "error"\n')
    settings = load_settings(flags={"port": 9004, "log_level": "debug"}, config_file=config)
    assert settings.port == 9004
    assert settings.log_level == "debug"


@pytest.mark.usefixtures("shorthand")
def test_unset_flags_do_not_hide_lower_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag passed as None (not given on the command line) leaves the environment's value."""
    monkeypatch.setenv("TOKEN_PROXY_PORT", "9003")
    monkeypatch.setenv("TOKEN_PROXY_HOST", "::1")
    settings = load_settings(flags={"port": None, "host": None, "log_level": None})
    assert settings.port == 9003
    assert settings.host == "::1"
    assert settings.log_level == "info"


@pytest.mark.usefixtures("shorthand")
def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TOKEN_PROXY_CONFIG names the TOML file when no config_file is given."""
    monkeypatch.setenv("TOKEN_PROXY_CONFIG", str(write_toml(tmp_path, "port = 9005\n")))
    assert load_settings().port == 9005


@pytest.mark.usefixtures("shorthand")
def test_config_file_argument_beats_config_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit config_file (--config) is read instead of the file TOKEN_PROXY_CONFIG names."""
    monkeypatch.setenv("TOKEN_PROXY_CONFIG", str(write_toml(tmp_path, "port = 9005\n", "env.toml")))
    flag_file = write_toml(tmp_path, "port = 9006\n", "flag.toml")
    assert load_settings(config_file=flag_file).port == 9006


@pytest.mark.parametrize(
    ("env", "toml", "expected"),
    [
        pytest.param(
            {"TOKEN_PROXY_CLIENT_SECRET": "from-env"},
            "client_secret_file = '{file}'\n",
            "from-env",
            id="env-secret-over-toml-secret-file",
        ),
        pytest.param(
            {"TOKEN_PROXY_CLIENT_SECRET_FILE": "{file}"},
            "client_secret = 'from-toml'\n",
            "from-file",
            id="env-secret-file-over-toml-secret",
        ),
    ],
)
def test_higher_source_secret_replaces_lower_source_secret_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    toml: str,
    expected: str,
) -> None:
    """A secret given by a higher source wins over a secret (or secret file) from a lower one."""
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("from-file\n")
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(file=secret_file))
    config = write_toml(tmp_path, toml.format(file=secret_file))
    assert secret_of(load_settings(config_file=config)) == expected


def test_secrets_dir_secret_replaces_toml_secret_file(
    tmp_path: Path, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client secret in the secrets directory wins over client_secret_file in the TOML file."""
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("from-file\n")
    (secrets_dir / "token_proxy_client_secret").write_text("from-secrets-dir\n")
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    config = write_toml(tmp_path, f"client_secret_file = '{secret_file}'\n")
    assert secret_of(load_settings(config_file=config)) == "from-secrets-dir"


@pytest.mark.usefixtures("shorthand")
def test_secrets_dir_must_be_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TOKEN_PROXY_SECRETS_DIR that is not a directory is a configuration error naming it."""
    monkeypatch.setenv("TOKEN_PROXY_SECRETS_DIR", str(tmp_path / "missing"))
    message = config_error()
    assert "TOKEN_PROXY_SECRETS_DIR" in message
    assert "directory" in message


# --- Single-API shorthand and Battle.net presets -----------------------------------------------


@pytest.mark.usefixtures("shorthand")
def test_shorthand_defines_default_credential_and_root_route() -> None:
    """Client id and secret alone give one credential 'default' and one route '/' to US."""
    settings = load_settings()
    assert list(settings.credentials) == ["default"]
    credential = settings.credentials["default"]
    assert credential.client_id == CLIENT_ID
    assert credential.client_secret.get_secret_value() == SECRET
    assert credential.token_url == BATTLENET_TOKEN_URL
    assert len(settings.routes) == 1
    route = settings.routes[0]
    assert (route.prefix, route.credential) == ("/", "default")
    assert route.upstream == "https://us.api.blizzard.com"


@pytest.mark.usefixtures("shorthand")
@pytest.mark.parametrize(
    ("region", "token_url", "upstream"),
    [
        ("us", BATTLENET_TOKEN_URL, "https://us.api.blizzard.com"),
        ("eu", BATTLENET_TOKEN_URL, "https://eu.api.blizzard.com"),
        ("kr", BATTLENET_TOKEN_URL, "https://kr.api.blizzard.com"),
        ("tw", BATTLENET_TOKEN_URL, "https://tw.api.blizzard.com"),
        ("cn", "https://oauth.battlenet.com.cn/token", "https://gateway.battlenet.com.cn"),
    ],
)
def test_region_presets(
    monkeypatch: pytest.MonkeyPatch, region: str, token_url: str, upstream: str
) -> None:
    """TOKEN_PROXY_REGION picks the Battle.net token endpoint and API host of that region."""
    monkeypatch.setenv("TOKEN_PROXY_REGION", region)
    settings = load_settings()
    assert settings.region == region
    assert settings.credentials["default"].token_url == token_url
    assert [route.upstream.rstrip("/") for route in settings.routes] == [upstream]


@pytest.mark.usefixtures("shorthand")
def test_region_from_toml(tmp_path: Path) -> None:
    """A top-level region key in the TOML file selects the preset as the environment does."""
    settings = load_settings(config_file=write_toml(tmp_path, 'region = "cn"\n'))
    assert settings.credentials["default"].token_url == "https://oauth.battlenet.com.cn/token"
    assert settings.routes[0].upstream.rstrip("/") == "https://gateway.battlenet.com.cn"


@pytest.mark.usefixtures("shorthand")
def test_upstream_and_token_url_override_region(monkeypatch: pytest.MonkeyPatch) -> None:
    """TOKEN_PROXY_UPSTREAM and TOKEN_PROXY_TOKEN_URL replace the region's hosts."""
    monkeypatch.setenv("TOKEN_PROXY_REGION", "cn")
    monkeypatch.setenv("TOKEN_PROXY_UPSTREAM", "https://api.example.com/v2")
    monkeypatch.setenv("TOKEN_PROXY_TOKEN_URL", "https://auth.example.com/oauth/token")
    settings = load_settings()
    assert settings.credentials["default"].token_url == "https://auth.example.com/oauth/token"
    assert [route.upstream for route in settings.routes] == ["https://api.example.com/v2"]
    assert settings.routes[0].credential == "default"


@pytest.mark.usefixtures("shorthand")
def test_shorthand_auth_method_and_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    """TOKEN_PROXY_AUTH_METHOD and TOKEN_PROXY_SCOPE reach the default credential."""
    monkeypatch.setenv("TOKEN_PROXY_AUTH_METHOD", "client_secret_post")
    monkeypatch.setenv("TOKEN_PROXY_SCOPE", "wow.profile sc2.profile")
    credential = load_settings().credentials["default"]
    assert credential.auth_method == "client_secret_post"
    assert credential.scope == "wow.profile sc2.profile"


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_client_secret_file_trailing_newline_stripped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """TOKEN_PROXY_CLIENT_SECRET_FILE supplies the secret without its trailing newline."""
    secret_file = tmp_path / "bnet-secret"
    secret_file.write_bytes(f"{SECRET}{ending}".encode())
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET_FILE", str(secret_file))
    assert secret_of(load_settings()) == SECRET


def test_shorthand_from_toml_only(tmp_path: Path) -> None:
    """Top-level client_id and client_secret_file in the TOML file define the shorthand too."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    config = write_toml(
        tmp_path,
        f'client_id = "{CLIENT_ID}"\nclient_secret_file = "{secret_file}"\n'
        'region = "eu"\nupstream = "https://eu.api.blizzard.com"\n',
    )
    settings = load_settings(config_file=config)
    assert secret_of(settings) == SECRET
    assert settings.routes[0].upstream == "https://eu.api.blizzard.com"


def test_credentials_and_routes_from_toml(tmp_path: Path) -> None:
    """[credentials.*] tables and [[routes]] entries define several APIs and credentials."""
    bnet_secret = tmp_path / "bnet"
    bnet_secret.write_text("bnet-secret\n")
    config = write_toml(
        tmp_path,
        f"""
[credentials.bnet]
client_id = "bnet-id"
client_secret_file = "{bnet_secret}"
region = "cn"

[credentials.other]
token_url = "https://auth.example.com/token"
client_id = "other-id"
client_secret = "other-secret"
auth_method = "client_secret_post"
scope = "read write"
extra_params = {{ audience = "https://api.example.com" }}

[[routes]]
prefix = "/cn/"
upstream = "https://gateway.battlenet.com.cn"
credential = "bnet"

[[routes]]
prefix = "/cn/special/"
upstream = "https://api.example.com/v2"
credential = "other"
""",
    )
    settings = load_settings(config_file=config)
    assert set(settings.credentials) == {"bnet", "other"}
    bnet = settings.credentials["bnet"]
    assert bnet.client_id == "bnet-id"
    assert bnet.client_secret.get_secret_value() == "bnet-secret"
    assert bnet.token_url == "https://oauth.battlenet.com.cn/token"
    assert bnet.auth_method == "client_secret_basic"
    other = settings.credentials["other"]
    assert other.token_url == "https://auth.example.com/token"
    assert other.auth_method == "client_secret_post"
    assert other.scope == "read write"
    assert other.extra_params == {"audience": "https://api.example.com"}
    assert [(r.prefix, r.upstream, r.credential) for r in settings.routes] == [
        ("/cn/", "https://gateway.battlenet.com.cn", "bnet"),
        ("/cn/special/", "https://api.example.com/v2", "other"),
    ]
    assert [r.prefix for r in settings.routes_by_length] == ["/cn/special/", "/cn/"]


def test_spec_example_toml_loads(tmp_path: Path) -> None:
    """The TOML example of SPEC section 2 is accepted (rate limits and [[clients]] come with
    the team-mode issues)."""
    secret_file = tmp_path / "bnet"
    secret_file.write_text("bnet-secret\n")
    config = write_toml(
        tmp_path,
        f"""
[credentials.bnet]
token_url = "https://oauth.battle.net/token"
client_id = "bnet-id"
client_secret_file = "{secret_file}"
auth_method = "client_secret_basic"
scope = ""
extra_params = {{}}

[[routes]]
prefix = "/eu/"
upstream = "https://eu.api.blizzard.com/"
credential = "bnet"
""",
    )
    settings = load_settings(config_file=config)
    assert secret_of(settings, "bnet") == "bnet-secret"
    assert [r.prefix for r in settings.routes] == ["/eu/"]


@pytest.mark.usefixtures("shorthand")
def test_example_config_file_loads() -> None:
    """The shipped config.example.toml loads once a client id and secret are supplied."""
    example = ROOT / "config.example.toml"
    settings = load_settings(config_file=example)
    assert settings.port == 8080
    assert list(settings.credentials) == ["default"]


# --- Bad configurations: ConfigError names the setting and says how to fix it -----------------


def test_no_credentials_at_all() -> None:
    """With nothing configured the error says which variables or table to set."""
    message = config_error()
    assert "TOKEN_PROXY_CLIENT_ID" in message
    assert "TOKEN_PROXY_CLIENT_SECRET" in message
    assert "[credentials." in message


def test_secret_without_client_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret alone is refused with a message that asks for client_id."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET", SECRET)
    message = config_error()
    assert "client_id" in message.lower()
    assert SECRET not in message


def test_client_id_without_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client id without any secret names client_secret and the two ways to give it."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    message = config_error()
    assert "client_secret" in message
    assert "TOKEN_PROXY_CLIENT_SECRET" in message
    assert "TOKEN_PROXY_CLIENT_SECRET_FILE" in message


def test_credential_table_without_secret(tmp_path: Path) -> None:
    """A [credentials.NAME] table without a secret names that credential and client_secret."""
    config = write_toml(
        tmp_path,
        '[credentials.bnet]\nclient_id = "x"\n'
        '[[routes]]\nprefix = "/"\nupstream = "https://eu.api.blizzard.com"\ncredential = "bnet"\n',
    )
    message = config_error(config_file=config)
    assert "bnet" in message
    assert "client_secret" in message


def test_client_secret_and_file_in_one_source(tmp_path: Path) -> None:
    """client_secret and client_secret_file in the same source are refused: keep only one."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    config = write_toml(
        tmp_path,
        f'client_id = "x"\nclient_secret = "inline"\nclient_secret_file = "{secret_file}"\n',
    )
    message = config_error(config_file=config)
    assert "client_secret" in message
    assert "client_secret_file" in message


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
def test_unreadable_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A secret file that is missing, a directory or empty is refused, naming the file."""
    path = tmp_path / "secret"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_text("\n")
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET_FILE", str(path))
    message = config_error()
    assert "environment variable TOKEN_PROXY_CLIENT_SECRET_FILE" in message
    assert str(path) in message


@pytest.mark.usefixtures("shorthand")
@pytest.mark.parametrize(
    ("toml", "unknown", "suggestion"),
    [
        ('uptream = "https://eu.api.blizzard.com"\n', "uptream", "upstream"),
        (
            '[credentials.bnet]\nclient_id = "x"\nclient_secret = "y"\n'
            'token_ur = "https://oauth.battle.net/token"\n',
            "token_ur",
            "token_url",
        ),
        (
            '[[routes]]\nprefix = "/"\nupstrem = "https://eu.api.blizzard.com"\n'
            'credential = "default"\n',
            "upstrem",
            "upstream",
        ),
    ],
    ids=["top-level", "credential", "route"],
)
def test_unknown_toml_key(tmp_path: Path, toml: str, unknown: str, suggestion: str) -> None:
    """An unknown key in the TOML file is refused with a did-you-mean suggestion."""
    message = config_error(config_file=write_toml(tmp_path, toml))
    assert unknown in message
    assert "did you mean" in message
    assert suggestion in message.split("did you mean", 1)[1]


@pytest.mark.usefixtures("shorthand")
def test_unknown_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown TOKEN_PROXY_ variable is refused, naming it and suggesting the close one."""
    monkeypatch.setenv("TOKEN_PROXY_UPSTRAEM", "https://eu.api.blizzard.com")
    message = config_error()
    assert "TOKEN_PROXY_UPSTRAEM" in message
    assert "did you mean TOKEN_PROXY_UPSTREAM" in message


@pytest.mark.usefixtures("shorthand")
def test_unknown_environment_variable_without_close_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unknown TOKEN_PROXY_ variable with no close setting is refused and says to unset it."""
    monkeypatch.setenv("TOKEN_PROXY_ZZZZZZZZ", "1")
    message = config_error()
    assert "TOKEN_PROXY_ZZZZZZZZ" in message
    assert "unset" in message


def test_unknown_key_of_a_credential_in_the_environment_suggests_a_credential_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A table given as JSON in the environment is not pre-checked like the TOML file: its
    misspelt key still gets a did-you-mean from the keys of that table, not the top level's."""
    monkeypatch.setenv(
        "TOKEN_PROXY_CREDENTIALS",
        '{"api": {"client_id": "id", "client_secret": "s", "regon_routes": ["eu"]}}',
    )
    message = config_error()
    assert (
        "environment variable TOKEN_PROXY_CREDENTIALS (credentials.api.regon_routes): "
        "unknown key; did you mean region_routes?"
    ) in message


@pytest.mark.usefixtures("shorthand")
@pytest.mark.parametrize(
    ("variable", "value", "setting"),
    [
        ("TOKEN_PROXY_UPSTREAM", "http://eu.api.blizzard.com", "upstream"),
        ("TOKEN_PROXY_TOKEN_URL", "http://oauth.battle.net/token", "token_url"),
        ("TOKEN_PROXY_UPSTREAM", "http://127.0.0.1.example.com", "upstream"),
        ("TOKEN_PROXY_TOKEN_URL", "http://10.0.0.1/token", "token_url"),
    ],
)
def test_plain_http_to_remote_host_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, setting: str
) -> None:
    """An http:// upstream or token_url on a non-loopback host is refused; the fix is https://."""
    monkeypatch.setenv(variable, value)
    message = config_error()
    assert f"environment variable {variable}: {value!r} uses plain http" in message, setting
    assert "https://" in message


@pytest.mark.parametrize(
    ("table", "setting"),
    [
        (
            '[credentials.a]\nclient_id = "x"\nclient_secret = "y"\n'
            'token_url = "http://auth.example.com/token"\n'
            '[[routes]]\nprefix = "/"\nupstream = "https://api.example.com"\ncredential = "a"\n',
            "token_url",
        ),
        (
            '[credentials.a]\nclient_id = "x"\nclient_secret = "y"\n'
            'token_url = "https://auth.example.com/token"\n'
            '[[routes]]\nprefix = "/"\nupstream = "http://api.example.com"\ncredential = "a"\n',
            "upstream",
        ),
    ],
    ids=["credential-token_url", "route-upstream"],
)
def test_plain_http_in_toml_tables_refused(tmp_path: Path, table: str, setting: str) -> None:
    """Plain http to a remote host is refused inside [credentials.*] and [[routes]] as well."""
    message = config_error(config_file=write_toml(tmp_path, table))
    assert setting in message
    assert "https://" in message


@pytest.mark.usefixtures("shorthand")
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_plain_http_on_loopback_allowed(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    """http:// is accepted for upstream and token_url on 127.0.0.1, localhost and ::1."""
    monkeypatch.setenv("TOKEN_PROXY_UPSTREAM", f"http://{host}:8081")
    monkeypatch.setenv("TOKEN_PROXY_TOKEN_URL", f"http://{host}:8082/token")
    settings = load_settings()
    assert settings.credentials["default"].token_url == f"http://{host}:8082/token"
    assert settings.routes[0].upstream == f"http://{host}:8081"


def test_route_names_unknown_credential(tmp_path: Path) -> None:
    """A route naming an undefined credential is refused, listing the defined ones."""
    config = write_toml(
        tmp_path,
        '[credentials.bnet]\nclient_id = "x"\nclient_secret = "y"\n'
        '[[routes]]\nprefix = "/"\nupstream = "https://eu.api.blizzard.com"\ncredential = "bent"\n',
    )
    message = config_error(config_file=config)
    assert "credential" in message
    assert "'bent'" in message
    assert "bnet" in message


@pytest.mark.usefixtures("shorthand")
def test_bad_region(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown region names TOKEN_PROXY_REGION and lists the valid presets."""
    monkeypatch.setenv("TOKEN_PROXY_REGION", "mars")
    message = config_error()
    assert message.startswith("environment variable TOKEN_PROXY_REGION: ")
    for region in ("us", "eu", "kr", "tw", "cn"):
        assert f"'{region}'" in message


@pytest.mark.usefixtures("shorthand")
@pytest.mark.parametrize(("value", "hint"), [("70000", "65535"), ("-1", "0"), ("http", "integer")])
def test_bad_port_from_environment(monkeypatch: pytest.MonkeyPatch, value: str, hint: str) -> None:
    """A port outside 0-65535 or not a number names TOKEN_PROXY_PORT and the valid range."""
    monkeypatch.setenv("TOKEN_PROXY_PORT", value)
    message = config_error()
    assert message.startswith("environment variable TOKEN_PROXY_PORT: ")
    assert hint in message


@pytest.mark.usefixtures("shorthand")
def test_bad_port_from_flag() -> None:
    """A port flag outside 0-65535 is refused and names the port setting."""
    message = config_error(flags={"port": 65536})
    assert "port" in message
    assert "65535" in message


@pytest.mark.usefixtures("shorthand")
def test_toml_syntax_error(tmp_path: Path) -> None:
    """A TOML syntax error names the file and the line to fix."""
    config = write_toml(tmp_path, 'port = 8080\nregion = "eu\n')
    message = config_error(config_file=config)
    assert str(config) in message
    assert "TOML" in message
    assert "line 2" in message


@pytest.mark.usefixtures("shorthand")
def test_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TOKEN_PROXY_CONFIG that does not exist is refused, naming the setting and the path."""
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("TOKEN_PROXY_CONFIG", str(missing))
    message = config_error()
    assert "TOKEN_PROXY_CONFIG" in message
    assert str(missing) in message


@pytest.mark.usefixtures("shorthand")
@pytest.mark.parametrize("host", [ALL_INTERFACES, "::", "192.168.1.10", "proxy.example.com"])
def test_non_loopback_host_needs_allow_anonymous_remote(
    monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    """Listening on a non-loopback address is refused and names allow_anonymous_remote."""
    monkeypatch.setenv("TOKEN_PROXY_HOST", host)
    message = config_error()
    assert message.startswith(f"environment variable TOKEN_PROXY_HOST: {host!r}")
    assert "set TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE=true" in message


@pytest.mark.usefixtures("shorthand")
def test_non_loopback_host_from_flag_refused() -> None:
    """A non-loopback --host flag is refused like the environment variable."""
    message = config_error(flags={"host": ALL_INTERFACES})
    assert "host" in message
    assert "allow_anonymous_remote" in message


@pytest.mark.usefixtures("shorthand")
def test_allow_anonymous_remote_permits_non_loopback_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """allow_anonymous_remote = true lets the proxy listen on a non-loopback address."""
    monkeypatch.setenv("TOKEN_PROXY_HOST", ALL_INTERFACES)
    monkeypatch.setenv("TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE", "true")
    settings = load_settings()
    assert settings.host == ALL_INTERFACES
    assert settings.allow_anonymous_remote is True


@pytest.mark.usefixtures("shorthand")
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "localhost", "::1"])
def test_loopback_hosts_need_nothing(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    """Loopback listen addresses are accepted without allow_anonymous_remote."""
    monkeypatch.setenv("TOKEN_PROXY_HOST", host)
    assert load_settings().host == host


# --- One run reports every problem, each where it was made -------------------------------------

EVERY_TABLE_MISSPELT = """
read_timout = 5

[credentials.api]
client_id = "api-id"
clientsecret = "api-secret"
token_url = "https://auth.example.com/token"

[[routes]]
prefix = "/"
upstrem = "https://api.example.com"
credential = "api"

[[clients]]
name = "dashboard"
key_sha = "abc"
"""


def test_unknown_keys_in_every_table_are_reported_together(tmp_path: Path) -> None:
    """A misspelt key at the top level, in [credentials.x], [[routes]] and [[clients]] is each
    reported with the file, the table and a did-you-mean, in one run; the key's absence
    (client_secret, upstream, key_sha256) is not reported on top of it."""
    config = write_toml(tmp_path, EVERY_TABLE_MISSPELT)
    lines = config_error(config_file=config).splitlines()
    assert lines == [
        f"{config}: read_timout: unknown key; did you mean read_timeout?",
        f"{config}: credentials.api.clientsecret: unknown key; did you mean client_secret?",
        f"{config}: routes[0].upstrem: unknown key; did you mean upstream?",
        f"{config}: clients[0].key_sha: unknown key; did you mean key_sha256?",
    ]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[credential.api]\nclient_id = "x"\nclient_secret = "y"\n',
            "[credential.api]: unknown table; did you mean [credentials.api]?",
        ),
        (
            '[credentials.api]\nclient_id = "x"\nclient_secret = "y"\n'
            '[[route]]\nprefix = "/"\nupstream = "https://eu.api.blizzard.com"\n'
            'credential = "api"\n',
            "[[route]]: unknown table; did you mean [[routes]]?",
        ),
    ],
    ids=["credential", "route"],
)
def test_misspelt_table_is_named_instead_of_nothing_configured(
    tmp_path: Path, toml: str, expected: str
) -> None:
    """A misspelt table name gets a did-you-mean, and the 'no credentials/routes are configured'
    that followed from it (and hid it) is not reported."""
    config = write_toml(tmp_path, toml)
    assert config_error(config_file=config).splitlines() == [f"{config}: {expected}"]


def test_problems_of_every_kind_are_reported_in_one_run(
    tmp_path: Path, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown variable, an unknown secrets file, an unknown TOML key, a bad value and a
    missing secret all appear in one message, each once."""
    monkeypatch.setenv("TOKEN_PROXY_LOG_LEVL", "debug")
    (secrets_dir / "token_proxy_clientsecret").write_text("x\n")
    config = write_toml(
        tmp_path,
        'port = "abc"\nread_timout = 5\n'
        '[credentials.api]\nclient_id = "x"\ntoken_url = "https://auth.example.com/token"\n'
        '[[routes]]\nprefix = "/"\nupstream = "https://api.example.com"\ncredential = "api"\n',
    )
    lines = config_error(config_file=config).splitlines()
    assert len(lines) == 5, lines
    assert len(set(lines)) == len(lines)
    text = "\n".join(lines)
    assert "environment variable TOKEN_PROXY_LOG_LEVL: is not a setting; did you mean " in text
    assert f"secrets file {secrets_dir / 'token_proxy_clientsecret'}: names no setting" in text
    assert f"{config}: read_timout: unknown key" in text
    assert f"{config}: port: " in text
    assert f"{config}: credentials.api.client_secret: is not set" in text


@pytest.mark.usefixtures("shorthand")
def test_one_mistake_is_one_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad shorthand key is reported once, at the variable, not once more at the credential
    'default' that it fills in."""
    monkeypatch.setenv("TOKEN_PROXY_AUTH_METHOD", "client_secret_jwt")
    lines = config_error().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("environment variable TOKEN_PROXY_AUTH_METHOD: ")
    assert "client_secret_basic" in lines[0]


@pytest.mark.usefixtures("shorthand")
def test_problem_in_the_file_names_the_file_and_key_not_a_variable(tmp_path: Path) -> None:
    """port = "abc" in the file is reported as the file's key, not as TOKEN_PROXY_PORT."""
    config = write_toml(tmp_path, 'port = "abc"\n')
    message = config_error(config_file=config)
    assert message.startswith(f"{config}: port: ")
    assert "TOKEN_PROXY_PORT" not in message


@pytest.mark.usefixtures("shorthand")
def test_problem_from_a_flag_names_the_flag(tmp_path: Path) -> None:
    """--port 99999 is reported as the flag, even when the file sets port too."""
    config = write_toml(tmp_path, "port = 9001\n")
    message = config_error(flags={"port": 99999}, config_file=config)
    assert message.startswith("--port: ")
    assert "65535" in message
    assert "TOKEN_PROXY_PORT" not in message
    assert str(config) not in message


@pytest.mark.usefixtures("shorthand")
def test_problem_from_the_secrets_directory_names_its_file(secrets_dir: Path) -> None:
    """A bad value in a file of the secrets directory is reported at that file."""
    (secrets_dir / "token_proxy_port").write_text("abc\n")
    message = config_error()
    assert message.startswith(f"secrets file {secrets_dir / 'token_proxy_port'}: ")


def test_fix_for_a_credential_table_names_the_table_not_a_variable(tmp_path: Path) -> None:
    """A [credentials.NAME] table without a secret is told to get one in the table: the
    shorthand's TOKEN_PROXY_CLIENT_SECRET would not fix it (it needs client_id as well)."""
    config = write_toml(
        tmp_path,
        '[credentials.api]\nclient_id = "x"\ntoken_url = "https://auth.example.com/token"\n'
        '[[routes]]\nprefix = "/"\nupstream = "https://api.example.com"\ncredential = "api"\n',
    )
    message = config_error(config_file=config)
    assert message.startswith(f"{config}: credentials.api.client_secret: is not set; add ")
    assert "TOKEN_PROXY_" not in message


def test_no_credentials_for_the_routes_asks_for_their_tables(tmp_path: Path) -> None:
    """With [[routes]] but no credential, the fix is the tables the routes name, not the
    shorthand's variables (whose credential 'default' those routes would not use)."""
    config = write_toml(
        tmp_path,
        '[[routes]]\nprefix = "/"\nupstream = "https://api.example.com"\ncredential = "api"\n',
    )
    message = config_error(config_file=config)
    assert "[[routes]] name 'api'" in message
    assert "[credentials.NAME]" in message
    assert "TOKEN_PROXY_" not in message


def test_fix_is_written_for_the_source_of_the_problem(tmp_path: Path) -> None:
    """A non-loopback host set in the file is told to set allow_anonymous_remote in the file."""
    config = write_toml(
        tmp_path,
        f'host = "{ALL_INTERFACES}"\n[credentials.api]\nclient_id = "x"\nclient_secret = "y"\n'
        'token_url = "https://auth.example.com/token"\n'
        '[[routes]]\nprefix = "/"\nupstream = "https://api.example.com"\ncredential = "api"\n',
    )
    message = config_error(config_file=config)
    assert message.startswith(f"{config}: host: '{ALL_INTERFACES}' is not a loopback address")
    assert "set allow_anonymous_remote = true" in message
    assert "TOKEN_PROXY_" not in message


# --- Relative paths in a config file ---------------------------------------------------------


def test_relative_paths_in_the_config_file_are_relative_to_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """client_secret_file (top level and in a table) and ca_bundle written as relative paths
    are found next to the config file, whatever the working directory."""
    folder = tmp_path / "conf"
    (folder / "secrets").mkdir(parents=True)
    (folder / "secrets" / "default").write_text("default-secret\n")
    (folder / "secrets" / "api").write_text("api-secret\n")
    bundle = folder / "ca.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes())
    config = write_toml(
        folder,
        f'client_id = "{CLIENT_ID}"\nclient_secret_file = "secrets/default"\n'
        '[credentials.api]\nclient_id = "api-id"\nclient_secret_file = "./secrets/api"\n'
        'token_url = "https://auth.example.com/token"\n'
        '[[routes]]\nprefix = "/api/"\nupstream = "https://api.example.com"\n'
        'credential = "api"\nca_bundle = "ca.pem"\n'
        '[[routes]]\nprefix = "/"\nupstream = "https://us.api.blizzard.com"\n'
        'credential = "default"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(config_file=Path("..") / "conf" / "config.toml")
    assert secret_of(settings) == "default-secret"
    assert secret_of(settings, "api") == "api-secret"
    assert settings.routes[0].ca_bundle == bundle
    assert config.exists()


def test_relative_path_from_the_environment_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TOKEN_PROXY_CLIENT_SECRET_FILE is a path as the shell has it: from the working directory."""
    (tmp_path / "secret").write_text("cwd-secret\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET_FILE", "secret")
    assert secret_of(load_settings()) == "cwd-secret"


def test_missing_relative_secret_file_names_where_it_was_looked_for(tmp_path: Path) -> None:
    """A relative client_secret_file that does not exist is reported with the full path tried."""
    config = write_toml(tmp_path, f'client_id = "{CLIENT_ID}"\nclient_secret_file = "nope"\n')
    message = config_error(config_file=config)
    assert message.startswith(f"{config}: client_secret_file: {str(tmp_path / 'nope')!r} ")


# --- The secrets directory ---------------------------------------------------------------------


@pytest.mark.usefixtures("shorthand")
def test_secrets_file_that_names_no_setting_gets_a_did_you_mean(secrets_dir: Path) -> None:
    """A token_proxy_* file that names no setting is refused like an unknown variable."""
    (secrets_dir / "token_proxy_clientsecret").write_text("x\n")
    (secrets_dir / "unrelated").write_text("another program's secret\n")
    message = config_error()
    assert message == (
        f"secrets file {secrets_dir / 'token_proxy_clientsecret'}: names no setting; "
        "did you mean token_proxy_client_secret?"
    )


def test_secret_that_is_a_directory_is_a_config_error(
    secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory where a secret file should be (Docker's doing when the host file of a bind
    mount is missing) is reported with its path and the fix, not a pydantic warning."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    (secrets_dir / "token_proxy_client_secret").mkdir()
    message = config_error()
    assert message.startswith(f"secrets file {secrets_dir / 'token_proxy_client_secret'}: ")
    assert "is a directory" in message
    assert "bind mount" in message
    assert "client_secret: is not set" not in message, "its absence follows from it"


def test_secret_file_setting_that_is_a_directory_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """client_secret_file naming a directory gets the same explanation."""
    (tmp_path / "secret").mkdir()
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET_FILE", str(tmp_path / "secret"))
    message = config_error()
    assert "is a directory" in message
    assert "bind mount" in message


@pytest.mark.usefixtures("shorthand")
def test_secrets_file_linking_out_of_the_directory_is_a_config_error(
    tmp_path: Path, secrets_dir: Path
) -> None:
    """A token_proxy_* link to a file outside the directory, which pydantic-settings skips
    with a warning, is reported with the fix."""
    outside = tmp_path / "port"
    outside.write_text("9000\n")
    (secrets_dir / "token_proxy_port").symlink_to(outside)
    message = config_error()
    assert message.startswith(f"secrets file {secrets_dir / 'token_proxy_port'}: is a link to ")
    assert "outside the secrets directory" in message


@pytest.mark.usefixtures("shorthand")
def test_secrets_directory_links_inside_it_are_read(secrets_dir: Path) -> None:
    """Kubernetes' layout (token_proxy_x -> ..data/token_proxy_x) is read as usual."""
    data = secrets_dir / "..2026_01_01"
    data.mkdir()
    (data / "token_proxy_port").write_text("9007\n")
    (secrets_dir / "..data").symlink_to(data.name)
    (secrets_dir / "token_proxy_port").symlink_to("..data/token_proxy_port")
    assert load_settings().port == 9007


# --- A custom upstream needs its own token URL -------------------------------------------------


@pytest.mark.usefixtures("shorthand")
def test_custom_upstream_without_token_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """TOKEN_PROXY_UPSTREAM without TOKEN_PROXY_TOKEN_URL would send another provider's secret
    to Battle.net's token endpoint: refused, naming both."""
    monkeypatch.setenv("TOKEN_PROXY_UPSTREAM", "https://api.example.com")
    message = config_error()
    assert message.startswith("environment variable TOKEN_PROXY_UPSTREAM: is set but ")
    assert "set TOKEN_PROXY_TOKEN_URL" in message


@pytest.mark.usefixtures("shorthand")
def test_battlenet_upstream_without_region_is_told_its_region(tmp_path: Path) -> None:
    """Even a Battle.net API host needs region (or token_url) with it; the fix names it."""
    config = write_toml(tmp_path, 'upstream = "https://eu.api.blizzard.com"\n')
    message = config_error(config_file=config)
    assert message.startswith(f"{config}: upstream: is set but token_url is not")
    assert 'set region = "eu"' in message


@pytest.mark.usefixtures("shorthand")
@pytest.mark.parametrize("region", ["us", "cn"])
def test_custom_upstream_with_explicit_region_uses_the_region_token_url(
    monkeypatch: pytest.MonkeyPatch, region: str
) -> None:
    """With TOKEN_PROXY_REGION given, the region's token URL goes with a custom upstream."""
    monkeypatch.setenv("TOKEN_PROXY_UPSTREAM", "https://bnet-mirror.example.com")
    monkeypatch.setenv("TOKEN_PROXY_REGION", region)
    settings = load_settings()
    assert settings.credentials["default"].token_url == REGION_TOKEN_URLS[region]
    assert settings.routes[0].upstream == "https://bnet-mirror.example.com"


@pytest.mark.usefixtures("shorthand")
def test_custom_token_url_without_upstream_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another provider's token URL without an upstream would send its tokens to Battle.net."""
    monkeypatch.setenv("TOKEN_PROXY_TOKEN_URL", "https://auth.example.com/token")
    message = config_error()
    assert message.startswith("environment variable TOKEN_PROXY_TOKEN_URL: is set but ")
    assert "set TOKEN_PROXY_UPSTREAM" in message


@pytest.mark.usefixtures("shorthand")
def test_battlenet_token_url_alone_keeps_the_region_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Battle.net's own token URL without an upstream is the Battle.net preset, spelt out."""
    monkeypatch.setenv("TOKEN_PROXY_TOKEN_URL", BATTLENET_TOKEN_URL)
    assert load_settings().routes[0].upstream == "https://us.api.blizzard.com"


CREDENTIAL_WITHOUT_TOKEN_URL = """
[credentials.api]
client_id = "api-id"
client_secret = "api-secret"
{extra}
[[routes]]
prefix = "/"
upstream = "{upstream}"
credential = "api"
"""


def test_credential_without_token_url_for_another_api_is_refused(tmp_path: Path) -> None:
    """A [credentials.x] table without token_url or region whose route goes to an API that is
    not Battle.net's is refused: its secret would go to Battle.net's token endpoint."""
    upstream = "https://user:Pa55word-in-url@api.example.com"
    config = write_toml(tmp_path, CREDENTIAL_WITHOUT_TOKEN_URL.format(extra="", upstream=upstream))
    message = config_error(config_file=config)
    assert message.startswith(f"{config}: credentials.api.token_url: is not set, ")
    assert "routes[0] sends its token to 'api.example.com'" in message
    assert "Pa55word-in-url" not in message


@pytest.mark.parametrize(
    ("extra", "upstream"),
    [
        ("", "https://eu.api.blizzard.com"),
        ("", "https://gateway.battlenet.com.cn"),
        ('region = "eu"', "https://bnet-mirror.example.com"),
        ('region_routes = ["us"]', "http://127.0.0.1:9"),
        (f'token_url = "{BATTLENET_TOKEN_URL}"', "http://127.0.0.1:9"),
    ],
    ids=["eu-api", "cn-api", "region", "region_routes", "token_url"],
)
def test_battlenet_credential_tables_need_no_token_url(
    tmp_path: Path, extra: str, upstream: str
) -> None:
    """Battle.net TOML configurations keep working: a route to a Battle.net API, or region,
    region_routes or token_url in the table, says where the secret goes."""
    config = write_toml(
        tmp_path, CREDENTIAL_WITHOUT_TOKEN_URL.format(extra=extra, upstream=upstream)
    )
    assert load_settings(config_file=config).credentials["api"].client_id == "api-id"


@pytest.mark.usefixtures("shorthand")
def test_shorthand_credential_routed_to_another_api_needs_a_token_url(tmp_path: Path) -> None:
    """The shorthand's credential 'default' named by a [[routes]] entry to another API needs
    token_url as well (or region)."""
    route = (
        '[[routes]]\nprefix = "/"\nupstream = "https://api.example.com"\ncredential = "default"\n'
    )
    message = config_error(config_file=write_toml(tmp_path, route))
    assert message.startswith("token_url: is not set, ")
    assert "'api.example.com'" in message
    config = write_toml(tmp_path, 'region = "us"\n' + route)
    assert load_settings(config_file=config).credentials["default"].token_url == BATTLENET_TOKEN_URL


def test_unused_credential_without_token_url_is_refused(tmp_path: Path) -> None:
    """A credential no route uses still fetches a token at start-up: without token_url or
    region it is refused too."""
    toml = CREDENTIAL_WITHOUT_TOKEN_URL.format(extra="", upstream="https://eu.api.blizzard.com")
    toml += '[credentials.spare]\nclient_id = "spare-id"\nclient_secret = "spare-secret"\n'
    message = config_error(config_file=write_toml(tmp_path, toml))
    assert "credentials.spare.token_url: is not set" in message
    assert "no route uses this credential" in message


# --- Secrets are never shown ------------------------------------------------------------------


def test_settings_never_show_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """repr, str and JSON of Settings hide every client secret, inline or read from a file."""
    file_secret = "File-S3cret-Value-4c1d"
    toml_secret = "Toml-S3cret-Value-8e2f"
    secret_file = tmp_path / "secret"
    secret_file.write_text(file_secret + "\n")
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET_FILE", str(secret_file))
    config = write_toml(
        tmp_path,
        f'[credentials.other]\nclient_id = "o"\nclient_secret = "{toml_secret}"\n'
        'token_url = "https://auth.example.com/token"\n',
    )
    settings = load_settings(config_file=config)
    assert secret_of(settings) == file_secret
    assert secret_of(settings, "other") == toml_secret
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert file_secret not in shown
        assert toml_secret not in shown
    assert "**********" in repr(settings)


@pytest.mark.usefixtures("shorthand")
def test_shorthand_secret_hidden_in_repr() -> None:
    """The shorthand's client_secret is a SecretStr that repr and str of Settings mask."""
    settings = load_settings()
    assert settings.client_secret is not None
    assert settings.client_secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


@pytest.mark.usefixtures("shorthand")
def test_config_error_never_shows_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A configuration error reported alongside a secret never repeats that secret."""
    monkeypatch.setenv("TOKEN_PROXY_REGION", "mars")
    monkeypatch.setenv("TOKEN_PROXY_PORT", "99999")
    config = write_toml(tmp_path, f'[credentials.x]\nclient_id = "x"\nclient_secret = "{SECRET}"\n')
    message = config_error(config_file=config)
    assert SECRET not in message


@pytest.mark.usefixtures("shorthand")
def test_config_error_keeps_pydantics_error_as_its_cause_without_the_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ConfigError is raised from pydantic's ValidationError, and that cause, printed as a
    traceback would print it, quotes none of the values given: the secret is among them."""
    secret = "Short-S3cret"  # pydantic would cut a long one short in the middle
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET", secret)
    monkeypatch.setenv("TOKEN_PROXY_PORT", "99999")
    with pytest.raises(ConfigError) as info:
        load_settings()
    cause = info.value.__cause__
    assert isinstance(cause, ValidationError)
    traceback = "".join(format_exception(info.value))
    assert "ValidationError" in traceback
    assert secret not in traceback
    assert secret not in repr(cause)


def test_config_error_of_an_unreadable_file_keeps_the_os_error(tmp_path: Path) -> None:
    """A config file that cannot be read is a ConfigError raised from the OSError that says why."""
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=tmp_path / "missing.toml")
    assert isinstance(info.value.__cause__, ConfigError)
    assert isinstance(info.value.__cause__.__cause__, FileNotFoundError)


# --- workers -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("shorthand")
def test_workers_default_to_one_from_every_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """workers is 1 unless set; TOML, environment and the --workers flag set it, in that order."""
    assert load_settings().workers == 1
    config = write_toml(tmp_path, "workers = 2\n")
    assert load_settings(config_file=config).workers == 2
    monkeypatch.setenv("TOKEN_PROXY_WORKERS", "3")
    assert load_settings(config_file=config).workers == 3
    assert load_settings(config_file=config, flags={"workers": 4}).workers == 4


@pytest.mark.usefixtures("shorthand")
@pytest.mark.parametrize("value", ["0", "65", "-1"])
def test_workers_out_of_bounds(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """A worker count outside 1..64 names the setting, its variable and what to choose."""
    monkeypatch.setenv("TOKEN_PROXY_WORKERS", value)
    message = config_error()
    assert message.startswith("environment variable TOKEN_PROXY_WORKERS: ")
    assert "between 1 and 64" in message
    assert "CPU core" in message


@pytest.mark.usefixtures("shorthand")
def test_workers_not_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker count that is not an integer names the setting."""
    monkeypatch.setenv("TOKEN_PROXY_WORKERS", "two")
    assert config_error().startswith("environment variable TOKEN_PROXY_WORKERS: ")


def test_workers_split_every_rate_limit(tmp_path: Path) -> None:
    """With workers, each worker's share of a credential's and a client's limits is the limit
    divided by the count, rounded down, so that together they never exceed it."""
    config = write_toml(
        tmp_path,
        f"""
        workers = 3
        [credentials.bnet]
        client_id = "{CLIENT_ID}"
        client_secret = "{SECRET}"
        [credentials.other]
        client_id = "{CLIENT_ID}"
        client_secret = "{SECRET}"
        token_url = "https://auth.example.com/token"
        rate_limit = ["10 per 2 minutes"]
        [[routes]]
        prefix = "/"
        upstream = "https://us.api.blizzard.com"
        credential = "bnet"
        [[clients]]
        name = "dashboard"
        key_sha256 = "{"ab" * 32}"
        rate_limit = ["20/second"]
        """,
    )
    settings = load_settings(config_file=config)
    credentials, clients = settings.split_limits()
    assert credentials["bnet"].rate_limits == ("33 per 1 second", "12000 per 1 hour")
    assert credentials["other"].rate_limits == ("3 per 2 minute",)
    assert clients[0].rate_limit == ("6 per 1 second",)
    assert settings.credentials["bnet"].rate_limits == ("100/second", "36000/hour")


def test_workers_refuse_a_limit_below_one_each(tmp_path: Path) -> None:
    """A limit smaller than the worker count cannot be split: the error names both."""
    config = write_toml(
        tmp_path,
        f"""
        workers = 4
        [credentials.api]
        client_id = "{CLIENT_ID}"
        client_secret = "{SECRET}"
        token_url = "https://auth.example.com/token"
        rate_limit = ["3/second"]
        [[routes]]
        prefix = "/"
        upstream = "https://api.example.com"
        credential = "api"
        """,
    )
    message = config_error(config_file=config)
    assert f"{config}: credentials.api.rate_limit: '3/second'" in message
    assert "lower workers," in message, "workers was set in the file, so the fix names its key"
    assert "TOKEN_PROXY_WORKERS" not in message
    assert SECRET not in message


@pytest.mark.parametrize(
    "url",
    [
        "ftp://someone:Pa55-In-A-Url@host/token",
        "https://someone:Pa55-In-A-Url@host/token",
        "someone:Pa55-In-A-Url@host/token",
        "https://someone:Pa55-In-A-Url@/token",
    ],
)
def test_url_with_a_password_is_refused_without_quoting_it(url: str) -> None:
    """A token URL that carries a user and password, whatever else is wrong with it, is refused
    with a message that shows neither."""
    with pytest.raises(ValueError, match="credentials in the URL") as info:
        check_url(url, what="token_url")
    assert "Pa55-In-A-Url" not in str(info.value)
    assert "someone" not in str(info.value)
