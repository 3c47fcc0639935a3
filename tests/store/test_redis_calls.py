"""The client the rate-limit scripts go through (redis_calls.lean_client) against a real
redis-server: commands packed as redis-py packs them, scripts Redis does not know yet,
passwords, databases, unix sockets and verified TLS, a caller that gives up, uvloop, and a
Redis that is killed or stopped (every call bounded by the timeout, the next one on a new
connection)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.errors import StoreUnavailable
from proxy.store.base import Claim, Rate
from proxy.store.redis_calls import bounded, lean_client
from proxy.store.redis_events import Events
from proxy.store.redis_limits import RedisCounters
from proxy.store.redis_url import parse_redis_url
from tests.redis_server import RedisServer, redis_binary
from tests.redis_server import _free_port as free_port
from tests.store.conftest import redis_store, wait_until

TIMEOUT = 0.2
SLACK = 0.15


@pytest.fixture
async def lean(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = lean_client(parse_redis_url(redis_server.url), timeout=TIMEOUT)
    yield client
    await client.aclose()


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    client = lean_client(parse_redis_url("redis://127.0.0.1:1/0"), timeout=TIMEOUT)
    pool = client.connection_pool
    assert pool.connection_class.__name__ == "HiredisPackingConnection"
    lean, plain = pool.connection_class(), aioredis.Connection()
    commands: list[tuple[Any, ...]] = [
        ("EVALSHA", "a" * 40, 2, "{rl:k}:hits", "{rl:k}:pending", "take", 0, -1, 10**20),
        ("SCRIPT LOAD", "return 1"),
        (b"CLIENT SETINFO", b"LIB-NAME", "redis-py"),
        ("SET", "clé", "värde", 1.5, b"\x00\xff"),
    ]
    for command in commands:
        assert b"".join(lean.pack_command(*command)) == b"".join(plain.pack_command(*command))
    wrongs: tuple[Any, ...] = (None, True)
    for wrong in wrongs:
        with pytest.raises(redis_errors.DataError):
            lean.pack_command("SET", "k", wrong)


async def test_a_script_redis_does_not_know_is_sent_whole(redis_server: RedisServer) -> None:
    limit = Claim(key="flushed", rates=(Rate.parse("5/second"),))
    async with redis_store(redis_server.url) as store:
        assert (await store.counters.acquire([limit], hold=5.0)).slot is not None
        await store.client.script_flush()
        admission = await store.counters.acquire([limit], hold=5.0)
        assert admission.slot is not None
        await store.counters.settle(admission.slot)
        assert (await store.client.zcard(store.counters.key("flushed", "hits"))) == 1


async def test_a_caller_that_gives_up_leaves_the_others_their_replies(
    lean: aioredis.Redis,
) -> None:
    async def call(operation: Awaitable[Any]) -> Any:
        return await operation

    slow = asyncio.create_task(call(lean.eval("local t = redis.call('TIME') return 1", 0)))
    others = [asyncio.create_task(call(lean.echo(str(i)))) for i in range(20)]
    await asyncio.sleep(0)
    slow.cancel()  # its client went away: not a timeout
    assert await asyncio.gather(*others) == [str(i).encode() for i in range(20)]
    assert await lean.echo("after") == b"after"


def _counters(client: aioredis.Redis) -> RedisCounters:
    events = Events(client, "calls-test:events", timeout=TIMEOUT)
    return RedisCounters(client=client, events=events, prefix="calls-test:", timeout=TIMEOUT)


async def _clients(redis_server: RedisServer) -> int:
    other = aioredis.Redis(**parse_redis_url(redis_server.url).client_kwargs(timeout=2.0))
    try:
        return int((await other.info("clients"))["connected_clients"]) - 1
    finally:
        await other.aclose()


async def test_more_callers_than_the_pool_holds_wait_for_a_connection_rather_than_fail(
    redis_server: RedisServer,
) -> None:
    client = lean_client(parse_redis_url(redis_server.url), timeout=1.0)
    client.connection_pool.max_connections = 3
    counters = _counters(client)
    limit = Claim(key="crowd", rates=(Rate.parse("1000/second"),))
    before = await _clients(redis_server)
    try:
        admissions = await asyncio.gather(*(counters.acquire([limit], hold=5.0) for _ in range(40)))
        assert all(admission.slot is not None for admission in admissions)
        assert await _clients(redis_server) - before <= 3
        # A caller that gives up while it waits for a connection takes none with it.
        waiting = [asyncio.create_task(counters.acquire([limit], hold=5.0)) for _ in range(10)]
        await asyncio.sleep(0)
        for task in waiting[::2]:
            task.cancel()
        done = await asyncio.gather(*waiting, return_exceptions=True)
        assert sum(not isinstance(result, BaseException) for result in done) >= 5
        again = await asyncio.gather(*(counters.acquire([limit], hold=5.0) for _ in range(6)))
        assert all(admission.slot is not None for admission in again)
    finally:
        await client.aclose()


async def test_a_connection_that_redis_closed_is_connected_again_before_it_is_used(
    redis_server: RedisServer,
) -> None:
    client = lean_client(parse_redis_url(redis_server.url), timeout=1.0)
    counters = _counters(client)
    limit = Claim(key="killed", rates=(Rate.parse("1000/second"),))
    killer = aioredis.Redis(**parse_redis_url(redis_server.url).client_kwargs(timeout=2.0))
    try:
        await asyncio.gather(*(counters.acquire([limit], hold=5.0) for _ in range(4)))
        assert await killer.client_kill_filter(_type="normal", skipme=True) >= 1
        await wait_until(lambda: _no_clients_but_one(killer))
        # Each kept connection was closed by Redis: none of these calls may fail for it.
        for _ in range(2):
            admissions = await asyncio.gather(
                *(bounded(counters.acquire([limit], hold=5.0), 1.0) for _ in range(4))
            )
            assert all(admission.slot is not None for admission in admissions)
    finally:
        await killer.aclose()
        await client.aclose()


async def test_script_calls_into_a_stopped_redis_each_end_at_their_own_deadline(
    redis_server: RedisServer,
) -> None:
    client = lean_client(parse_redis_url(redis_server.url), timeout=TIMEOUT)
    counters = _counters(client)
    limit = Claim(key="stalled", rates=(Rate.parse("1000/second"),))

    async def timed() -> tuple[float, BaseException | None]:
        started = time.monotonic()
        try:
            await counters.acquire([limit], hold=5.0)
        except StoreUnavailable as exc:
            return time.monotonic() - started, exc
        return time.monotonic() - started, None

    try:
        await asyncio.gather(*(counters.acquire([limit], hold=5.0) for _ in range(3)))
        redis_server.stop()
        calls = []
        for _ in range(3):  # started a third of a timeout apart: one timer serves them all
            calls.append(asyncio.create_task(timed()))
            await asyncio.sleep(TIMEOUT / 3)
        given_up = asyncio.create_task(timed())
        await asyncio.sleep(TIMEOUT / 4)
        given_up.cancel()  # the caller's own cancellation is no timeout
        for took, exc in await asyncio.gather(*calls):
            assert isinstance(exc, StoreUnavailable)
            assert exc.kind == "timeout"
            assert TIMEOUT - 0.01 <= took <= TIMEOUT + SLACK
        with pytest.raises(asyncio.CancelledError):
            await given_up
        redis_server.cont()
        admission = await counters.acquire([limit], hold=5.0)
        assert admission.slot is not None
    finally:
        redis_server.cont()
        await client.aclose()


async def _no_clients_but_one(client: aioredis.Redis) -> bool:
    return int((await client.info("clients"))["connected_clients"]) == 1


async def test_password_and_database(redis_server_with_password: RedisServer) -> None:
    server = redis_server_with_password
    url = server.url.rsplit("/", 1)[0] + "/3"
    client = lean_client(parse_redis_url(url), timeout=TIMEOUT)
    other = aioredis.Redis(**parse_redis_url(url).client_kwargs(timeout=2.0))
    wrong = lean_client(parse_redis_url(url.replace(str(server.password), "wrong")), timeout=1)
    try:
        assert await client.set("in-three", "yes")
        assert await other.get("in-three") == b"yes"
        with pytest.raises(StoreUnavailable) as info:
            await bounded(wrong.ping(), TIMEOUT)
        assert info.value.kind == "auth"
        assert str(server.password) not in info.value.detail
    finally:
        for each in (client, other, wrong):
            await each.aclose()


async def test_unix_socket(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = RedisServer(
        redis_binary(),
        tmp_path,
        extra=("--unixsocket", str(socket_path), "--unixsocketperm", "700"),
    )
    server.start()
    client = lean_client(parse_redis_url(f"unix://{socket_path}?db=2"), timeout=TIMEOUT)
    try:
        assert await client.set("over-unix", "1")
        other = aioredis.Redis(**parse_redis_url(f"{server.url[:-2]}/2").client_kwargs(timeout=2))
        assert await other.get("over-unix") == b"1"
        await other.aclose()
    finally:
        await client.aclose()
        server.kill()


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 with its key: ca.pem, cert.pem, key.pem."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-proxy test Redis CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_tls_is_verified_against_the_ca_given(tmp_path: Path) -> None:
    ca, cert, key = _certificates(tmp_path)
    tls = RedisServer(redis_binary(), tmp_path)
    tls_port = tls.port
    while tls_port == tls.port:
        tls_port = free_port()
    tls.extra = (
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
    )  # fmt: skip
    tls.start()
    verified = lean_client(
        parse_redis_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}"), timeout=1.0
    )
    unverified = lean_client(parse_redis_url(f"rediss://127.0.0.1:{tls_port}/0"), timeout=1.0)
    try:
        assert verified.connection_pool.connection_class.__name__ == "HiredisPackingSSLConnection"
        assert await bounded(verified.echo("over TLS"), 1.0) == b"over TLS"
        # The system's CAs do not know this one: refused, never sent in clear.
        with pytest.raises(StoreUnavailable) as info:
            await bounded(unverified.ping(), 1.0)
        assert info.value.kind in {"connection", "other"}
    finally:
        await verified.aclose()
        await unverified.aclose()
        tls.kill()


async def test_a_stopped_redis_costs_one_timeout_and_the_next_call_a_new_connection(
    lean: aioredis.Redis, redis_server: RedisServer
) -> None:
    assert await lean.ping()
    redis_server.stop()
    started = time.monotonic()
    results = await asyncio.gather(
        *(bounded(lean.echo(str(i)), TIMEOUT) for i in range(10)), return_exceptions=True
    )
    assert time.monotonic() - started <= TIMEOUT + SLACK
    assert all(isinstance(result, StoreUnavailable) for result in results)
    kinds = {result.kind for result in results if isinstance(result, StoreUnavailable)}
    assert kinds <= {"timeout", "connection"}
    assert "timeout" in kinds
    redis_server.cont()
    assert await bounded(lean.echo("back"), 1.0) == b"back"


async def test_a_killed_redis_fails_at_once_and_is_reached_again_once_restarted(
    lean: aioredis.Redis, redis_server: RedisServer
) -> None:
    assert await lean.ping()
    redis_server.kill()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await bounded(lean.ping(), TIMEOUT)
    assert info.value.kind == "connection"
    with pytest.raises(StoreUnavailable):
        await bounded(lean.ping(), TIMEOUT)  # refused: no server
    assert time.monotonic() - started < TIMEOUT
    await redis_server.restart()
    assert await bounded(lean.ping(), 1.0)


def test_it_runs_on_uvloop_too(redis_server: RedisServer) -> None:
    """The proxy runs on uvloop."""
    uvloop = pytest.importorskip(
        "uvloop", reason="uvloop is in the speed extra, which make installs"
    )

    async def main() -> list[Any]:
        client = lean_client(parse_redis_url(redis_server.url), timeout=1.0)
        try:
            return [await client.ping(), await client.eval("return {1, ARGV[1]}", 0, "uvloop")]
        finally:
            await client.aclose()

    assert uvloop.run(main()) == [True, [1, b"uvloop"]]
