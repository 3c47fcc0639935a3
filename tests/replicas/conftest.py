"""Replicas as users run them: several real token-proxy processes (or a --workers group) with
one configuration and TOKEN_PROXY_REDIS_URL pointing at a real redis-server, in front of the
suite's fake token endpoint and upstream."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import (
    LEAKS,
    TEST_CLIENT_ID,
    TEST_SECRET,
    FakeTokenServer,
    FakeUpstream,
    free_port,
    proxy_command,
)
from tests.processes import LoggedProcess

START_TIMEOUT = 20.0


class Replica(LoggedProcess):
    """One token-proxy process (a supervisor, with workers) sharing Redis with others."""

    def said(self, text: str) -> list[dict[str, Any]]:
        """The log lines whose event contains `text`."""
        return [event for event in self.events() if text in str(event.get("event"))]

    async def ready(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(self.url + "/-/ready") as response:
            body: dict[str, Any] = await response.json(content_type=None)
            LEAKS.add(f"the /-/ready of replica {self.process.pid}", json.dumps(body))
            body["status_code"] = response.status
            return body

    async def metrics(self, session: aiohttp.ClientSession) -> str:
        async with session.get(self.url + "/-/metrics") as response:
            text = await response.text()
            LEAKS.add(f"the /-/metrics of replica {self.process.pid}", text)
            return text


def toml_value(value: object) -> str:
    """A value in TOML: JSON's strings, numbers, booleans and lists of them are TOML too."""
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(value)


def write_config(
    path: Path,
    *,
    credential: str,
    token_url: str,
    upstream: str,
    table: Mapping[str, object],
    top: Mapping[str, object],
) -> None:
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    lines += [
        f"[credentials.{credential}]",
        f"client_id = {toml_value(TEST_CLIENT_ID)}",
        f"client_secret = {toml_value(TEST_SECRET)}",
        f"token_url = {toml_value(token_url)}",
    ]
    lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    lines += [
        "[[routes]]",
        'prefix = "/"',
        f"upstream = {toml_value(upstream)}",
        f"credential = {toml_value(credential)}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


StartReplicas = Callable[..., Awaitable[list[Replica]]]


@pytest.fixture
async def start_replicas(
    token_server: FakeTokenServer, upstream: FakeUpstream, tmp_path: Path, upstream_client: str
) -> AsyncIterator[StartReplicas]:
    """Start `count` proxies sharing `redis_url`, each naming its credential differently
    (the same credential all the same), and wait until every one is ready."""
    started: list[Replica] = []

    async def start(
        count: int,
        *,
        redis_url: str,
        table: Mapping[str, object] | None = None,
        top: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
        names: Sequence[str] = ("bnet", "battlenet", "api"),
        wait: str = "ready",
    ) -> list[Replica]:
        replicas = []
        for index in range(count):
            port = free_port()
            config = tmp_path / f"replica-{port}.toml"
            write_config(
                config,
                credential=names[index % len(names)],
                token_url=token_server.url,
                upstream=upstream.url,
                table=table or {},
                top=top or {},
            )
            environ = {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_PROXY_")}
            environ.update(
                {
                    "TOKEN_PROXY_CONFIG": str(config),
                    "TOKEN_PROXY_PORT": str(port),
                    "TOKEN_PROXY_LOG_LEVEL": "debug",
                    "TOKEN_PROXY_LOG_FORMAT": "json",
                    "TOKEN_PROXY_UPSTREAM_CLIENT": upstream_client,
                    "TOKEN_PROXY_SECRETS_DIR": str(tmp_path),
                    "TOKEN_PROXY_REDIS_URL": redis_url,
                    **(env or {}),
                }
            )
            log_path = tmp_path / f"replica-{port}.log"
            with log_path.open("wb") as log_file:
                process = subprocess.Popen(
                    proxy_command(), env=environ, stdout=log_file, stderr=subprocess.STDOUT
                )
            replica = Replica(process, f"http://127.0.0.1:{port}", log_path)
            started.append(replica)
            replicas.append(replica)
        workers = int((env or {}).get("TOKEN_PROXY_WORKERS", "1"))
        async with aiohttp.ClientSession() as session:
            for replica in replicas:
                await _until_ready(replica, session, workers=workers, path=_WAITS[wait])
        return replicas

    yield start
    for replica in started:
        replica.stop(timeout=START_TIMEOUT, what="replica")


# What start(wait=...) waits for: a token in every replica, or only that each one listens.
_WAITS = {"ready": "/-/ready", "listening": "/-/healthy"}


async def _until_ready(
    replica: Replica, session: aiohttp.ClientSession, *, workers: int, path: str
) -> None:
    """Until `path` answers 200 (and, for a group, every worker listens)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            async with session.get(replica.url + path) as response:
                if response.status == 200 and (
                    workers == 1 or replica.said(f"started {workers} workers")
                ):
                    return
        except aiohttp.ClientError:
            pass
        if replica.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"replica did not become ready:\n{replica.log_path.read_text()}")
        await asyncio.sleep(0.05)


@dataclass
class Arrival:
    """One request the upstream received: when (monotonic) and its query."""

    at: float
    query: str


class Arrivals:
    """An upstream handler that records when each request arrived, and answers 200 (or what
    `answer` gives for a query)."""

    def __init__(self) -> None:
        self.seen: list[Arrival] = []
        self.answer: Callable[[web.Request], web.Response | None] = lambda request: None

    async def __call__(self, request: web.Request) -> web.Response:
        self.seen.append(Arrival(time.monotonic(), request.query_string))
        return self.answer(request) or web.json_response({"ok": True})

    def times(self) -> list[float]:
        return sorted(arrival.at for arrival in self.seen)


def most_in_any_window(stamps: Sequence[float], seconds: float) -> int:
    """The most stamps in any half-open window [t, t + seconds) (stamps sorted)."""
    best, start = 0, 0
    for end, stamp in enumerate(stamps):
        while stamps[start] <= stamp - seconds:
            start += 1
        best = max(best, end - start + 1)
    return best
