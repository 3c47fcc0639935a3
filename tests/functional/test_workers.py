"""`workers` > 1 as users run it: a supervisor and real worker processes on one loopback port.
One token fetch serves the group, a 401 makes one new fetch for all of them, a path that refuses
every token is learnt once for the group, /-/metrics adds up every worker, a killed worker comes
back, SIGTERM drains, and bad counts exit 2."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import load_settings
from proxy.workers import Supervisor
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

DEADLINE = 15.0


class Group(LoggedProcess):
    """A supervisor process and its workers, logging JSON lines to one file."""

    def events_named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event]

    def worker_pids(self) -> dict[int, int]:
        """The pid of each worker, as the supervisor logged their starts (latest wins)."""
        return {int(e["worker"]): int(e["pid"]) for e in self.events_named("worker started")}

    def access_workers(self) -> set[int]:
        return {int(e["worker"]) for e in self.events() if e.get("logger") == "proxy.access"}


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Wait for condition() with a deadline; the message says what never happened."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def wait_exit(process: subprocess.Popen[bytes], timeout: float = DEADLINE) -> int:
    await until(lambda: process.poll() is not None, "the process exited", timeout)
    code = process.returncode
    assert code is not None
    return code


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child of a killed supervisor is reaped by init; until then it is a zombie.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def metrics_directory(pid: int) -> str:
    """The PROMETHEUS_MULTIPROC_DIR the supervisor gave a worker."""
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return entry.split(b"=", 1)[1].decode()
    raise AssertionError(f"process {pid} has no PROMETHEUS_MULTIPROC_DIR")


def directory_exists(path: str) -> bool:
    return Path(path).is_dir()


def remove_directory(path: str) -> None:
    shutil.rmtree(path)


StartGroup = Callable[..., Awaitable[Group]]


@pytest.fixture
async def start_group(
    token_server: FakeTokenServer, upstream: FakeUpstream, tmp_path: Path, upstream_client: str
) -> AsyncIterator[StartGroup]:
    """Start `python -m proxy run` with TOKEN_PROXY_WORKERS, and wait until every worker serves
    (the supervisor's "started N workers" line) and, unless told not to, until /-/ready is 200."""
    groups: list[Group] = []

    async def start(
        workers: int = 2, *, ready: bool = True, extra_env: dict[str, str] | None = None
    ) -> Group:
        port = free_port()
        env = process_env(
            token_server=token_server,
            upstream=upstream,
            port=port,
            upstream_client=upstream_client,
            secrets_dir=tmp_path,
            extra_env={
                "TOKEN_PROXY_WORKERS": str(workers),
                "TOKEN_PROXY_LOG_FORMAT": "json",
                **(extra_env or {}),
            },
        )
        log_path = tmp_path / f"group-{port}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                proxy_command(), env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        group = Group(process, f"http://127.0.0.1:{port}", log_path)
        groups.append(group)
        await until(
            lambda: (
                bool(group.events_named(f"started {workers} workers")) or process.poll() is not None
            ),
            "every worker listens",
        )
        assert process.poll() is None, group.log_path.read_text()
        if ready:
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + DEADLINE
                while True:
                    async with session.get(group.url + "/-/ready") as response:
                        if response.status == 200:
                            break
                    assert time.monotonic() < deadline, "the group never became ready"
                    await asyncio.sleep(0.05)
        return group

    yield start
    for group in groups:
        pids = group.worker_pids().values()
        group.stop(timeout=DEADLINE, what="worker group")  # SIGTERM: it removes its metrics
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def get_fresh(url: str, count: int, *, path: str = "/thing") -> list[tuple[int, str]]:
    """`count` GETs, each on a connection of its own (so the kernel spreads them)."""
    results = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(count):
            async with session.get(url + path) as response:
                body = await response.text()
                LEAKS.add(f"the response to GET {path}", f"{response.headers}\n{body}")
                results.append((response.status, response.content_type))
    return results


async def send_fresh(
    url: str, method: str, path: str, *, data: bytes | None = None
) -> tuple[int, str, bytes]:
    """One request on a connection of its own; status, the worker that answered, and body."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, url + path, data=data) as response,
    ):
        body = await response.read()
        LEAKS.add(f"the response to {method} {path}", f"{response.headers}\n{body!r}")
        return response.status, response.headers.get("X-Request-ID", ""), body


def workers_by_request(group: Group) -> dict[str, int]:
    """The worker that answered each request, by request id, as the access lines say so far."""
    return {
        str(event["request_id"]): int(event["worker"])
        for event in group.events()
        if event.get("logger") == "proxy.access"
    }


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(url + "/-/metrics") as response:
        text = await response.text()
    LEAKS.add("/-/metrics of a worker group", text)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_workers_share_one_token_and_report_as_one(
    start_group: StartGroup, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """Two workers with pids of their own both serve requests, the token endpoint sees one
    request for the whole group, and /-/metrics (on either worker) counts every request."""
    group = await start_group(2)
    pids = group.worker_pids()
    assert sorted(pids) == [1, 2]
    assert len(set(pids.values())) == 2
    assert group.process.pid not in pids.values()
    sent = 0
    deadline = time.monotonic() + DEADLINE
    while group.access_workers() != {1, 2}:
        assert time.monotonic() < deadline, "one worker served every request"
        results = await get_fresh(group.url, 10)
        assert results == [(200, "application/json")] * 10
        sent += 10
        await asyncio.sleep(0.05)  # the access lines of the last batch reach the log file
    assert len(token_server.requests) == 1
    token = token_server.issued[0]
    assert all(r.header("Authorization") == f"Bearer {token}" for r in upstream.requests)
    assert len(upstream.requests) == sent

    samples = await scrape(group.url)
    forwarded = sum(
        value
        for (name, labels), value in samples.items()
        if name == "token_proxy_requests_total" and ("route", "/") in labels
    )
    assert forwarded == sent
    fetches = ("credential", "default"), ("outcome", "success")
    assert samples[("token_proxy_token_fetches_total", fetches)] == 1
    expires_in = samples[("token_proxy_token_expires_in_seconds", (("credential", "default"),))]
    assert 3500 < expires_in <= 3600
    assert samples[("token_proxy_in_flight_requests", ())] == 1  # the scrape itself

    log = group.log_path.read_text()
    assert token not in log
    assert TEST_SECRET not in log


async def test_upstream_401_fetches_one_new_token_for_the_group(
    start_group: StartGroup, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """A 401 to the group's token makes the supervisor fetch exactly one new token, and the
    request is replayed with it; a path that rejects that new token too costs one more fetch,
    and then its 401s on any worker fetch no more."""
    group = await start_group(2)
    first = token_server.issued[0]

    async def reject_first(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") == f"Bearer {first}":
            return web.json_response({"error": "expired"}, status=401)
        return web.json_response({"ok": True})

    async def reject_all(request: web.Request) -> web.Response:
        return web.json_response({"error": "no"}, status=401)

    upstream.handlers["/reject-first"] = reject_first
    upstream.handlers["/reject-all"] = reject_all
    assert await get_fresh(group.url, 1, path="/reject-first") == [(200, "application/json")]
    assert len(token_server.requests) == 2
    second = token_server.issued[1]
    assert upstream.requests[-1].header("Authorization") == f"Bearer {second}"

    def replayed() -> list[dict[str, Any]]:
        return [e for e in group.events() if e.get("logger") == "proxy.access" and e["replayed"]]

    await until(lambda: bool(replayed()), "the access line of the replayed request")
    assert len(replayed()) == 1

    results = await get_fresh(group.url, 12, path="/reject-all")
    assert {status for status, _ in results} == {401}
    await until(lambda: group.access_workers() == {1, 2}, "both workers answered")
    assert len(token_server.requests) == 3


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_two_revocations_milliseconds_apart_both_end_in_200_in_the_group(
    start_group: StartGroup, token_server: FakeTokenServer, upstream: FakeUpstream, method: str
) -> None:
    """With two workers, the group's token is revoked and its replacement too the moment it is
    in use: each revocation costs the group one fetch, and each request (bodiless or with a
    small buffered body) is replayed and succeeds, whichever worker takes it."""
    group = await start_group(2)
    revoked: set[str] = set()

    async def revoking(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") in revoked:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"ok": True})

    upstream.handlers["/thing"] = revoking
    payload = b'{"small": "body"}' if method == "POST" else None
    for _ in range(2):
        revoked.add(f"Bearer {token_server.issued[-1]}")
        status, _, body = await send_fresh(group.url, method, "/thing", data=payload)
        assert status == 200, body
    assert len(token_server.requests) == 3
    first, second, third = token_server.issued
    assert [request.header("Authorization") for request in upstream.requests] == [
        f"Bearer {first}",
        f"Bearer {second}",
        f"Bearer {second}",
        f"Bearer {third}",
    ]
    assert {request.body for request in upstream.requests} == {payload or b""}


async def test_refusing_path_is_learnt_once_for_the_group(
    start_group: StartGroup, token_server: FakeTokenServer, upstream: FakeUpstream
) -> None:
    """Pairs of a request to a path that refuses every token and a good one, each on a new
    connection, until both workers have answered the refusing path (twenty pairs at least):
    the path costs the group one token fetch, learnt by one worker and known to the other."""
    group = await start_group(2)

    async def needs_user_token(request: web.Request) -> web.Response:
        return web.json_response({"error": "needs a user token"}, status=401)

    upstream.handlers["/profile/user/wow"] = needs_user_token
    refused_by: set[int | None] = set()
    refused_ids: list[str] = []
    pairs = 0
    deadline = time.monotonic() + DEADLINE
    while pairs < 20 or refused_by != {1, 2}:
        assert time.monotonic() < deadline, f"only worker {refused_by} answered the path"
        status, request_id, _ = await send_fresh(group.url, "GET", "/profile/user/wow?x=1")
        assert status == 401
        refused_ids.append(request_id)
        status, _, _ = await send_fresh(group.url, "GET", "/data/wow/realm/index")
        assert status == 200
        pairs += 1
        answered = workers_by_request(group)
        refused_by = {answered.get(request_id) for request_id in refused_ids}
    assert len(token_server.requests) <= 3
    assert len(token_server.requests) == 2  # the first token, and one for the path, group-wide
    refusing = [r for r in upstream.requests if r.raw_path.startswith("/profile/user/wow")]
    assert len(refusing) == pairs + 1  # one replay


async def test_killed_worker_is_restarted(
    start_group: StartGroup, token_server: FakeTokenServer
) -> None:
    """A worker killed outright is logged at error level and started again; requests keep
    succeeding, and the new worker takes the group's token instead of fetching one."""
    group = await start_group(2)
    victim = group.worker_pids()[1]
    os.kill(victim, signal.SIGKILL)
    await until(lambda: bool(group.events_named("worker restarted")), "worker 1 restarted")
    crashed = group.events_named("worker exited unexpectedly")
    assert [(e["worker"], e["pid"], e["level"]) for e in crashed] == [(1, victim, "error")]
    replacement = group.worker_pids()[1]
    assert replacement != victim
    assert alive(replacement)
    results = await get_fresh(group.url, 20)
    assert results == [(200, "application/json")] * 20
    assert len(token_server.requests) == 1


async def test_sigterm_drains_every_worker_and_exits_0(
    start_group: StartGroup, upstream: FakeUpstream
) -> None:
    """SIGTERM to the supervisor reaches every worker: a request in flight finishes, the
    workers and the supervisor exit 0, and the metrics directory is removed."""
    group = await start_group(2)
    pids = list(group.worker_pids().values())
    directory = metrics_directory(pids[0])
    assert directory_exists(directory)
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"slow": True})

    upstream.handlers["/slow"] = slow
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.get(group.url + "/slow"))
        await until(lambda: len(upstream.requests) == 1, "the request reached upstream")
        group.process.send_signal(signal.SIGTERM)
        await until(lambda: len(group.events_named("shutting down")) == 2, "both workers drain")
        release.set()
        response = await pending
        assert response.status == 200
        assert await response.json() == {"slow": True}
    assert await wait_exit(group.process) == 0
    assert not any(alive(pid) for pid in pids)
    assert not directory_exists(directory)
    stopped = group.events_named("stopped")
    assert sorted(str(e.get("worker", "supervisor")) for e in stopped) == ["1", "2", "supervisor"]


async def test_workers_stop_when_the_supervisor_vanishes(start_group: StartGroup) -> None:
    """A worker whose supervisor was killed sees its link close and shuts down by itself."""
    group = await start_group(2)
    pids = list(group.worker_pids().values())
    directory = metrics_directory(pids[0])
    group.process.kill()
    group.process.wait()
    await until(lambda: not any(alive(pid) for pid in pids), "the workers exited")
    assert len(group.events_named("the supervisor is gone; this worker shuts down")) == 2
    remove_directory(directory)  # a killed supervisor could not


async def test_rejected_client_gives_503_from_every_worker(
    start_group: StartGroup, token_server: FakeTokenServer
) -> None:
    """invalid_client at the token endpoint: every worker answers 503 problem+json at once
    (no wait for a token), and its detail and /-/ready name the endpoint's error and
    error_description."""
    token_server.script = [
        web.json_response(
            {"error": "invalid_client", "error_description": "Client authentication failed"},
            status=401,
        )
    ]
    group = await start_group(2, ready=False)
    await until(lambda: len(token_server.requests) == 1, "the supervisor asked for a token")
    async with aiohttp.ClientSession() as session:

        async def rejected() -> bool:
            async with session.get(group.url + "/-/ready") as response:
                body = await response.json(content_type=None)
            error = body.get("credentials", {}).get("default", {}).get("last_error")
            return bool(error == "invalid_client")

        deadline = time.monotonic() + DEADLINE
        while not await rejected():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with session.get(group.url + "/-/ready") as response:
            assert response.status == 503
        async with session.get(group.url + "/-/ready") as response:
            state = (await response.json(content_type=None))["credentials"]["default"]
        assert state["last_error_description"] == "Client authentication failed"
    started = time.monotonic()
    results = await get_fresh(group.url, 16)
    assert time.monotonic() - started < 5
    assert set(results) == {(503, "application/problem+json")}
    await until(lambda: group.access_workers() == {1, 2}, "both workers answered")
    assert len(token_server.requests) == 1
    details: dict[str, str] = {}  # the 503's detail by request id, until both workers gave one
    answered: set[int] = set()
    while answered != {1, 2}:
        assert time.monotonic() - started < DEADLINE, f"only worker {answered} answered"
        status, request_id, body = await send_fresh(group.url, "GET", "/data")
        assert status == 503
        details[request_id] = json.loads(body)["detail"]
        answered = {w for rid, w in workers_by_request(group).items() if rid in details}
    for detail in details.values():
        assert 'invalid_client ("Client authentication failed")' in detail


async def test_port_in_use_is_reported_as_for_one_process(
    start_group: StartGroup, tmp_path: Path
) -> None:
    """The supervisor binds the port itself: a busy port exits 2 with the usual message."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_PROXY_")}
    env.update(
        {
            "TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID,
            "TOKEN_PROXY_CLIENT_SECRET": TEST_SECRET,
            "TOKEN_PROXY_UPSTREAM": "http://127.0.0.1:1",
            "TOKEN_PROXY_TOKEN_URL": "http://127.0.0.1:1/token",
            "TOKEN_PROXY_SECRETS_DIR": str(tmp_path),
        }
    )
    with socket.create_server(("127.0.0.1", port)):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "proxy", "--workers", "2", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 2, done
    assert f"cannot listen on 127.0.0.1 port {port}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param(["--workers", "0"], {}, id="flag-zero"),
        pytest.param([], {"TOKEN_PROXY_WORKERS": "65"}, id="env-too-many"),
        pytest.param([], {"TOKEN_PROXY_WORKERS": "many"}, id="env-not-a-number"),
    ],
)
def test_bad_worker_count_exits_2_naming_the_setting(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    """A bad worker count exits 2 before binding, naming workers and its variable."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_PROXY_")}
    environ.update(
        {
            "TOKEN_PROXY_CLIENT_ID": TEST_CLIENT_ID,
            "TOKEN_PROXY_CLIENT_SECRET": TEST_SECRET,
            "TOKEN_PROXY_SECRETS_DIR": str(tmp_path),
            **env,
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done
    assert ("--workers: " if args else "environment variable TOKEN_PROXY_WORKERS: ") in done.stderr
    assert "Traceback" not in done.stderr
    assert TEST_SECRET not in done.stderr


async def test_supervisor_gives_up_on_a_worker_that_cannot_start(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A worker that exits before it listens ends the supervisor with that exit status and a
    message, rather than a restart loop; the other worker is stopped too."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", TEST_CLIENT_ID)
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET", TEST_SECRET)
    monkeypatch.setenv("TOKEN_PROXY_TOKEN_URL", f"http://127.0.0.1:{free_port()}/token")
    monkeypatch.setenv("TOKEN_PROXY_UPSTREAM", "http://127.0.0.1:1")
    settings = load_settings(flags={"port": 0, "workers": 2})
    # Each "worker" is a Python that exits at once with status 3, whatever its arguments.
    supervisor = Supervisor(settings, command=["-c", "import sys; sys.exit(3)"])
    supervisor.hold_ports()
    assert supervisor.port != 0
    async with asyncio.timeout(DEADLINE):
        code = await supervisor.run()
    assert code == 3
    assert supervisor.failure is not None
    assert "could not start (exit status 3)" in supervisor.failure
