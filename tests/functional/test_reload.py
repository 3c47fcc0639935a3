"""Changing a running proxy, as users do it, on real processes and real files: a Kubernetes
Secret swapped under a running proxy, SIGHUP after editing team keys, routes, rate limits and
credentials, a broken file, two reloads under steady load with a slow request in flight, and a
reload of a group of workers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import re
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    LEAKS,
    TEST_CLIENT_ID,
    TEST_SECRET,
    FakeTokenServer,
    FakeUpstream,
    free_port,
    process_env,
    proxy_command,
)
from tests.processes import LoggedProcess
from tests.test_secret_files import kubernetes_mount

DEADLINE = 15.0
WRONG_SECRET = "Wr0ng-S3cret-Before-Rotation-4b1d"
KEY_A = "team-key-A-" + "a" * 24
KEY_B = "team-key-B-" + "b" * 24


@dataclass
class Issuer:
    """A token endpoint that checks the client's secret: invalid_client for a wrong one."""

    accepted: dict[str, str] = field(default_factory=dict)  # client id -> its secret
    fetches: list[str] = field(default_factory=list)  # the client id of each token issued
    issued: dict[str, str] = field(default_factory=dict)  # token -> client id
    url: str = ""
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        user, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
        client_id, secret = unquote_plus(user), unquote_plus(password)
        if self.accepted.get(client_id) != secret:
            return web.json_response({"error": "invalid_client"}, status=401)
        token = f"rl{next(self._counter)}-{secrets.token_hex(12)}"
        LEAKS.tokens.add(token)
        self.fetches.append(client_id)
        self.issued[token] = client_id
        return web.json_response({"access_token": token, "expires_in": 3600})

    def count(self, client_id: str = TEST_CLIENT_ID) -> int:
        return self.fetches.count(client_id)


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    fake = Issuer(accepted={TEST_CLIENT_ID: TEST_SECRET})
    app = web.Application()
    app.router.add_post("/token", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("/token"))
    yield fake
    await server.close()


@dataclass
class Proxy(LoggedProcess):
    """A proxy process (or a supervisor and its workers) started from a configuration file."""

    config: Path = Path()

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event", "").startswith(event)]

    def hup(self) -> None:
        self.process.send_signal(signal.SIGHUP)


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> float:
    """Wait for condition() with a deadline; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def until_async(
    condition: Callable[[], Awaitable[bool]], what: str, timeout: float = DEADLINE
) -> float:
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def config_text(
    issuer: Issuer,
    upstream: FakeUpstream,
    *,
    secret_file: Path | None = None,
    extra: str = "",
    credential: str = "",
    routes: tuple[str, ...] = ("/",),
    keys: dict[str, str] | None = None,
    log_level: str = "debug",
) -> str:
    """A configuration file: the credential `api` (secret inline or from a file), a route to
    the upstream per prefix, a [[clients]] table per team key, and `extra` lines."""
    secret = (
        f'client_secret_file = "{secret_file}"'
        if secret_file is not None
        else f'client_secret = "{TEST_SECRET}"'
    )
    text = (
        f'log_format = "json"\nlog_level = "{log_level}"\n{extra}\n'
        f'[credentials.api]\nclient_id = "{TEST_CLIENT_ID}"\n{secret}\n'
        f'token_url = "{issuer.url}"\n{credential}\n'
    )
    for prefix in routes:
        credential_name = "other" if prefix == "/other/" else "api"
        text += (
            f'\n[[routes]]\nprefix = "{prefix}"\nupstream = "{upstream.url}"\n'
            f'credential = "{credential_name}"\n'
        )
    for name, key in (keys or {}).items():
        digest = hashlib.sha256(key.encode()).hexdigest()
        text += f'\n[[clients]]\nname = "{name}"\nkey_sha256 = "{digest}"\n'
    return text


OTHER_CREDENTIAL = """
[credentials.other]
client_id = "other-client"
client_secret = "Other-S3cret-Value-77a0"
token_url = "{url}"
"""

StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start(
    issuer: Issuer, upstream: FakeUpstream, tmp_path: Path, upstream_client: str
) -> AsyncIterator[StartProxy]:
    """Start `python -m proxy run --config FILE` (workers too, with TOKEN_PROXY_WORKERS), and
    wait until it serves, and unless told not to, until /-/ready answers 200."""
    started: list[Proxy] = []

    async def run(text: str, *, ready: bool = True, env: dict[str, str] | None = None) -> Proxy:
        port = free_port()
        config = tmp_path / f"proxy-{port}.toml"
        config.write_text(text)
        environ = process_env(
            token_server=FakeTokenServer(url=issuer.url),  # process_env reads its url only
            upstream=upstream,
            port=port,
            upstream_client=upstream_client,
            secrets_dir=tmp_path / "no-secrets",
            extra_env={"TOKEN_PROXY_CONFIG": str(config), **(env or {})},
        )
        (tmp_path / "no-secrets").mkdir(exist_ok=True)
        # The file says these (log_level too, so that a reload can change it).
        for shorthand in ("CLIENT_ID", "CLIENT_SECRET", "TOKEN_URL", "UPSTREAM", "LOG_LEVEL"):
            del environ[f"TOKEN_PROXY_{shorthand}"]
        log_path = tmp_path / f"proxy-{port}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                proxy_command(), env=environ, stdout=log_file, stderr=subprocess.STDOUT
            )
        proxy = Proxy(process, f"http://127.0.0.1:{port}", log_path, config=config)
        started.append(proxy)
        listening = "started" if "TOKEN_PROXY_WORKERS" in (env or {}) else "token-proxy listening"
        await until(
            lambda: bool(proxy.named(listening)) or process.poll() is not None, "it listens"
        )
        assert process.poll() is None, log_path.read_text()
        if ready:
            await until_async(lambda: status_of(proxy.url + "/-/ready", 200), "ready")
        return proxy

    yield run
    for proxy in started:
        proxy.stop(timeout=DEADLINE)


async def status_of(url: str, expected: int, *, key: str | None = None) -> bool:
    return (await get(url, key=key))[0] == expected


async def get(url: str, *, key: str | None = None) -> tuple[int, Any]:
    """One GET on a connection of its own: status and JSON body (or text)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(url, headers=headers) as response,
        ):
            text = await response.text()
            LEAKS.add(f"the response to GET {url}", text)
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text
    except aiohttp.ClientError:
        return 0, None


async def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    _, text = await get(url + "/-/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                return float(sample.value)
    return None


# --- secret files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mounted_as", "workers"),
    [("client_secret_file", 1), ("secrets directory", 1), ("client_secret_file", 2)],
)
async def test_a_rotated_kubernetes_secret_is_used_without_a_signal(
    *,
    start: StartProxy,
    issuer: Issuer,
    upstream: FakeUpstream,
    tmp_path: Path,
    mounted_as: str,
    workers: int,
) -> None:
    """The secret comes from a Secret volume (files as links through ..data), named by
    client_secret_file or as the secrets directory itself (deploy/kubernetes.yaml), and is
    wrong at start: 503, the proxy keeps running. The kubelet swaps ..data to the right
    secret: the same process answers 200 within 15 s, with no signal (a poll with lstat, or a
    watch on the old inode, misses this swap), and its one token came with the new secret.
    With workers, the supervisor sees the swap and each worker switches too; one of them
    fetches the group's token."""
    mount = tmp_path / "secret-volume"
    mount.mkdir()
    if mounted_as == "client_secret_file":
        name, env = "client-secret", dict[str, str]()
        text = config_text(issuer, upstream, secret_file=mount / name)
    else:
        name, env = "token_proxy_client_secret", {"TOKEN_PROXY_SECRETS_DIR": str(mount)}
        text = (
            f'log_format = "json"\nlog_level = "debug"\nclient_id = "{TEST_CLIENT_ID}"\n'
            f'token_url = "{issuer.url}"\nupstream = "{upstream.url}"\n'
        )
    if workers > 1:
        env["TOKEN_PROXY_WORKERS"] = str(workers)
    kubernetes_mount(mount, {name: WRONG_SECRET}, version="2024_05_01_1")
    proxy = await start(text, ready=False, env=env)
    status, problem = await get(proxy.url + "/thing")
    assert status == 503
    assert "invalid_client" in problem["detail"]
    assert not await status_of(proxy.url + "/-/ready", 200)
    kubernetes_mount(mount, {name: TEST_SECRET}, version="2024_05_01_2")
    took = await until_async(lambda: status_of(proxy.url + "/thing", 200), "200 after rotation")
    assert took < 15
    assert proxy.process.poll() is None
    assert issuer.count() == 1
    # The supervisor's line has no worker number; each worker's has its own.
    processes = {None} | set(range(1, workers + 1) if workers > 1 else ())
    await until(
        lambda: {e.get("worker") for e in proxy.named("configuration reloaded")} == processes,
        "every process reloaded",
    )
    for line in proxy.named("configuration reloaded"):
        assert line["trigger"] == "secret files"
        assert line["credentials_rotated"] == [
            "api" if mounted_as == "client_secret_file" else "default"
        ]
    print(
        f"\n{mounted_as}, {workers} worker(s): rotated secret used {took:.2f} s after the "
        "..data swap, no signal"
    )


# --- SIGHUP ---------------------------------------------------------------------------------


async def test_sighup_replaces_a_team_key_without_fetching_a_token(
    start: StartProxy, issuer: Issuer, upstream: FakeUpstream, upstream_client: str
) -> None:
    """Key A replaced by key B in [[clients]], then SIGHUP: within 5 s B is let in and A
    refused, no token is fetched, /-/ready names the new configuration and the reload
    metrics count it. A file setting that the environment also sets changes nothing (the
    environment still outranks it), and a new metrics_port is left for a restart."""
    proxy = await start(config_text(issuer, upstream, keys={"alice": KEY_A}))
    assert (await get(proxy.url + "/thing", key=KEY_A))[0] == 200
    assert (await get(proxy.url + "/thing", key=KEY_B))[0] == 401
    _, ready = await get(proxy.url + "/-/ready")
    before = ready["config_hash"]
    assert re.fullmatch(r"[0-9a-f]{12}", before)
    fetched = issuer.count()
    other_client = "aiohttp" if upstream_client == "lean" else "lean"
    extra = f'upstream_client = "{other_client}"\nmetrics_port = {free_port()}'
    proxy.config.write_text(config_text(issuer, upstream, keys={"bob": KEY_B}, extra=extra))
    proxy.hup()

    async def switched() -> bool:
        a = (await get(proxy.url + "/thing", key=KEY_A))[0]
        b = (await get(proxy.url + "/thing", key=KEY_B))[0]
        return (a, b) == (401, 200)

    took = await until_async(switched, "B accepted and A refused", timeout=5)
    assert issuer.count() == fetched
    (line,) = proxy.named("configuration reloaded")
    assert line["clients_added"] == ["bob"]
    assert line["clients_removed"] == ["alice"]
    assert line["needs_restart"] == ["metrics_port"]
    assert "upstream_client" not in json.dumps(line)  # the environment's value stands
    _, ready = await get(proxy.url + "/-/ready")
    assert ready["config_hash"] == line["config"] != before
    assert await metric(proxy.url, "token_proxy_config_reloads_total", {"outcome": "success"}) == 1
    assert await metric(proxy.url, "token_proxy_config_last_reload_successful") == 1
    assert KEY_B not in proxy.log_path.read_text()
    print(f"\nSIGHUP: key B in, key A out after {took:.2f} s, {issuer.count() - fetched} fetches")


async def test_sighup_with_a_broken_file_keeps_the_running_configuration(
    start: StartProxy, issuer: Issuer, upstream: FakeUpstream
) -> None:
    """A file that does not validate: the proxy goes on serving with what it had, says which
    setting is wrong and how to fix it, and counts a failed reload; once fixed, SIGHUP
    applies it."""
    proxy = await start(config_text(issuer, upstream))
    _, ready = await get(proxy.url + "/-/ready")
    proxy.config.write_text(config_text(issuer, upstream, extra="read_timeout = -5\nrate = 1"))
    proxy.hup()
    await until(lambda: bool(proxy.named("the configuration was not reloaded")), "refusal logged")
    (line,) = proxy.named("the configuration was not reloaded")
    assert line["level"] == "error"
    problems = " ".join(line["problems"])
    assert "read_timeout" in problems
    assert "rate" in problems
    assert proxy.process.poll() is None
    assert (await get(proxy.url + "/thing"))[0] == 200
    assert (await get(proxy.url + "/-/ready"))[1]["config_hash"] == ready["config_hash"]
    assert await metric(proxy.url, "token_proxy_config_reloads_total", {"outcome": "failure"}) == 1
    assert await metric(proxy.url, "token_proxy_config_last_reload_successful") == 0
    proxy.config.write_text(config_text(issuer, upstream, routes=("/", "/v2/")))
    proxy.hup()
    await until(lambda: bool(proxy.named("configuration reloaded")), "the fixed file applied")
    _, echoed = await get(proxy.url + "/v2/thing")
    assert echoed["path"] == "/thing"
    assert issuer.count() == 1


async def test_two_sighups_under_steady_load_lose_no_request(
    start: StartProxy, issuer: Issuer, upstream: FakeUpstream
) -> None:
    """About 50 requests a second for a few seconds, with a slow request in flight across
    the first SIGHUP (a timeout change) and a second one adding a route: every request is
    answered 200, the slow one finishes on the configuration it started with, the new route
    works afterwards, and the token fetched at start serves them all."""
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.sleep(2.0)
        return web.json_response({"slow": True})

    upstream.handlers["/slow"] = slow
    proxy = await start(config_text(issuer, upstream))
    statuses: list[int] = []
    rate, seconds = 50, 4.0
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(path: str) -> int:
            try:
                async with session.get(proxy.url + path) as response:
                    await response.read()
                    return response.status
            except aiohttp.ClientError:
                return 0

        async def load() -> None:
            started = time.monotonic()
            tasks = []
            for i in range(int(rate * seconds)):
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one("/thing")))
            statuses.extend(await asyncio.gather(*tasks))

        loading = asyncio.create_task(load())
        await asyncio.sleep(0.5)
        slow_request = asyncio.create_task(one("/slow"))
        await asyncio.wait_for(arrived.wait(), DEADLINE)
        proxy.config.write_text(config_text(issuer, upstream, extra="read_timeout = 30"))
        proxy.hup()
        first_took = await until(
            lambda: len(proxy.named("configuration reloaded")) == 1, "first reload"
        )
        assert not slow_request.done(), "the slow request should span the first reload"
        await asyncio.sleep(1.0)
        proxy.config.write_text(
            config_text(issuer, upstream, extra="read_timeout = 30", routes=("/", "/extra/"))
        )
        proxy.hup()
        second_took = await until(
            lambda: len(proxy.named("configuration reloaded")) == 2, "second reload"
        )
        await loading
        slow_status = await slow_request
    _, echoed = await get(proxy.url + "/extra/thing")
    failures = [status for status in statuses if status != 200]
    print(
        f"\nunder load: {len(statuses)} requests at {rate}/s over {seconds:g} s, 2 SIGHUPs, "
        f"{len(failures)} not 200, slow request {slow_status}, token fetches {issuer.count()}, "
        f"reload lines {first_took:.2f} s and {second_took:.2f} s after each signal"
    )
    assert len(statuses) == rate * seconds
    assert failures == []
    assert slow_status == 200
    assert echoed["path"] == "/thing"
    assert issuer.count() == 1
    first, second = proxy.named("configuration reloaded")
    assert first["settings_changed"] == ["read_timeout"]
    assert second["routes_added"] == ["/extra/"]
    assert "Traceback" not in proxy.log_path.read_text()


async def test_a_rate_limit_set_by_reload_takes_effect_and_so_does_the_log_level(
    start: StartProxy, issuer: Issuer, upstream: FakeUpstream
) -> None:
    """No limit: a burst passes. SIGHUP with "2/second" and no wait: the next burst gets
    429s beyond the limit; and with log_level warning, its access lines are no longer
    written. The token stays."""
    proxy = await start(config_text(issuer, upstream))

    async def burst() -> list[int]:
        return [s for s, _ in await asyncio.gather(*(get(proxy.url + "/thing") for _ in range(6)))]

    assert await burst() == [200] * 6
    limited = 'rate_limit = ["2/second"]\nrate_limit_max_wait = 0'
    proxy.config.write_text(config_text(issuer, upstream, credential=limited, log_level="warning"))
    proxy.hup()
    await until(lambda: bool(proxy.named("configuration reloaded")), "reloaded")
    logged = len([e for e in proxy.events() if e.get("logger") == "proxy.access"])
    statuses = await burst()
    assert statuses.count(200) <= 2
    assert statuses.count(429) >= 4
    access = [e for e in proxy.events() if e.get("logger") == "proxy.access"]
    assert len(access) == logged, access[logged:]
    assert issuer.count() == 1


async def test_a_credential_added_by_reload_fetches_its_token_and_is_ready(
    start: StartProxy, issuer: Issuer, upstream: FakeUpstream
) -> None:
    """SIGHUP adding a credential and its route: the new credential fetches its token, is
    ready in /-/ready, and its route sends that token; the one already there fetches none."""
    issuer.accepted["other-client"] = "Other-S3cret-Value-77a0"
    proxy = await start(config_text(issuer, upstream))
    proxy.config.write_text(
        config_text(issuer, upstream, routes=("/", "/other/"))
        + OTHER_CREDENTIAL.format(url=issuer.url)
    )
    proxy.hup()

    async def both_ready() -> bool:
        status, body = await get(proxy.url + "/-/ready")
        return status == 200 and set(body["credentials"]) == {"api", "other"}

    await until_async(both_ready, "both credentials ready")
    assert (await get(proxy.url + "/other/thing"))[0] == 200
    sent = upstream.requests[-1].header("Authorization")
    assert sent is not None
    assert issuer.issued[sent.removeprefix("Bearer ")] == "other-client"
    assert issuer.count() == 1
    assert issuer.count("other-client") == 1
    (line,) = proxy.named("configuration reloaded")
    assert line["credentials_added"] == ["other"]
    assert line["routes_added"] == ["/other/"]


# --- workers --------------------------------------------------------------------------------


async def test_a_reload_reaches_both_workers(
    start: StartProxy, issuer: Issuer, upstream: FakeUpstream
) -> None:
    """With --workers 2, SIGHUP to the supervisor: it reloads, then both workers switch to
    the same configuration (each says so with its hash), the new route answers from both,
    the group's token stays, and the reload is counted once for the group."""
    proxy = await start(config_text(issuer, upstream), env={"TOKEN_PROXY_WORKERS": "2"})
    proxy.config.write_text(config_text(issuer, upstream, routes=("/", "/extra/")))
    proxy.hup()

    def reloaded() -> dict[object, str]:
        return {e.get("worker"): e["config"] for e in proxy.named("configuration reloaded")}

    await until(lambda: len(reloaded()) == 3, "the supervisor and both workers reloaded")
    assert set(reloaded()) == {None, 1, 2}
    assert len(set(reloaded().values())) == 1
    served: set[int] = set()
    for _ in range(40):
        status, echoed = await get(proxy.url + "/extra/thing")
        assert status == 200
        assert echoed["path"] == "/thing"
        served = {
            int(e["worker"])
            for e in proxy.events()
            if e.get("logger") == "proxy.access" and e.get("route") == "/extra/"
        }
        if served == {1, 2}:
            break
    assert served == {1, 2}
    assert issuer.count() == 1
    _, ready = await get(proxy.url + "/-/ready")
    assert ready["config_hash"] == next(iter(reloaded().values()))
    assert await metric(proxy.url, "token_proxy_config_reloads_total", {"outcome": "success"}) == 1


async def test_a_credential_added_by_reload_is_the_groups_and_one_removed_goes_from_both(
    start: StartProxy, issuer: Issuer, upstream: FakeUpstream
) -> None:
    """With --workers 2, SIGHUP adding a credential and its route: the supervisor's store
    serves it at once, its token is fetched once for the group and both workers send it, and
    its token metrics are the group's; a SIGHUP that removes it again takes it off both."""
    issuer.accepted["other-client"] = "Other-S3cret-Value-77a0"
    proxy = await start(config_text(issuer, upstream), env={"TOKEN_PROXY_WORKERS": "2"})
    proxy.config.write_text(
        config_text(issuer, upstream, routes=("/", "/other/"))
        + OTHER_CREDENTIAL.format(url=issuer.url)
    )
    proxy.hup()
    await until(lambda: len(proxy.named("configuration reloaded")) == 3, "all three reloaded")
    served: set[int] = set()
    for _ in range(40):
        status, _ = await get(proxy.url + "/other/thing")
        assert status == 200
        sent = upstream.requests[-1].header("Authorization")
        assert sent is not None
        assert issuer.issued[sent.removeprefix("Bearer ")] == "other-client"
        served = {
            int(e["worker"])
            for e in proxy.events()
            if e.get("logger") == "proxy.access" and e.get("route") == "/other/"
        }
        if served == {1, 2}:
            break
    assert served == {1, 2}
    assert issuer.count("other-client") == 1
    assert issuer.count() == 1
    fetched = {"credential": "other", "outcome": "success"}
    assert await metric(proxy.url, "token_proxy_token_fetches_total", fetched) == 1
    left = await metric(proxy.url, "token_proxy_token_expires_in_seconds", {"credential": "other"})
    assert left is not None
    assert left > 3000
    proxy.config.write_text(config_text(issuer, upstream))
    proxy.hup()
    await until(lambda: len(proxy.named("configuration reloaded")) == 6, "all three again")
    for _ in range(6):
        status, body = await get(proxy.url + "/-/ready")
        assert status == 200
        assert set(body["credentials"]) == {"api"}
    for _ in range(6):  # each worker stopped exporting it
        gone = await metric(
            proxy.url, "token_proxy_token_expires_in_seconds", {"credential": "other"}
        )
        assert gone is None
    assert not proxy.named("the token store did not answer")
