"""deploy/docker-compose.replicas.yml, read as a document (no Docker engine is needed): two
replicas, each the sidecar of its own app, sharing one Valkey whose password reaches them only
as a secret file; and the URL its set-up writes is one the proxy accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from proxy.store.redis_url import parse_redis_url
from tests.test_deploy import DOCKERFILE, healthcheck_command, load_yaml_documents

REPLICAS = Path(__file__).resolve().parent.parent / "deploy" / "docker-compose.replicas.yml"


def document() -> dict[str, Any]:
    (found,) = load_yaml_documents(REPLICAS)
    assert isinstance(found, dict)
    return found


def test_two_replicas_alike_share_valkey_through_a_secret_file() -> None:
    services = document()["services"]
    proxies = {name: s for name, s in services.items() if str(s["image"]).startswith("token-proxy")}
    assert sorted(proxies) == ["proxy-1", "proxy-2"]
    one, two = proxies.values()
    assert one == two
    assert set(one["secrets"]) == {"token_proxy_client_secret", "token_proxy_redis_url"}
    assert not any("REDIS" in key or "SECRET" in key for key in one["environment"])
    assert one["environment"]["TOKEN_PROXY_HOST"] == "127.0.0.1"
    # An unreachable Valkey is no reason not to start: the proxies do not wait for it.
    assert "depends_on" not in one
    assert one["healthcheck"]["test"] == ["CMD", *healthcheck_command()]
    assert one["read_only"] is True
    assert one["cap_drop"] == ["ALL"]
    assert one["stop_grace_period"] == "20s"
    assert (REPLICAS.parent / one["build"]["context"] / "Dockerfile").resolve() == DOCKERFILE
    for index in (1, 2):
        app = services[f"app-{index}"]
        assert app["network_mode"] == f"service:proxy-{index}"
        assert app["depends_on"] == {f"proxy-{index}": {"condition": "service_healthy"}}
        assert "secrets" not in app


def test_valkey_takes_its_password_from_an_acl_file_and_keeps_nothing_on_disk() -> None:
    spec = document()
    valkey = spec["services"]["valkey"]
    command = valkey["command"]
    assert command[:3] == ["valkey-server", "--aclfile", "/run/secrets/valkey_users.acl"]
    assert "--requirepass" not in command
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    assert valkey["secrets"] == ["valkey_users.acl"]
    assert "ports" not in valkey
    assert valkey["read_only"] is True
    assert {each["file"] for each in spec["secrets"].values()} == {
        "./secrets/token_proxy_client_secret",
        "./secrets/token_proxy_redis_url",
        "./secrets/valkey_users.acl",
    }


def test_the_set_up_writes_a_url_the_proxy_accepts() -> None:
    header = REPLICAS.read_text(encoding="utf-8")
    (template,) = re.findall(r"printf '(redis://[^']*)\\n'", header)
    target = parse_redis_url(template.replace("%s", "0123456789abcdef" * 3))
    assert (target.host, target.port, target.db) == ("valkey", 6379, 0)
    assert target.password is not None
