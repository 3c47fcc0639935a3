"""What one EVALSHA costs the proxy's process in CPU, through redis-py's asyncio client set up in
several ways (and hand-written RESP for comparison), against a real redis-server on loopback.

    .venv/bin/python bench/redis_client_cost.py [--runs 5] [--loop uvloop|asyncio]

It starts its own redis-server on a free 127.0.0.1 port (stopped on exit), loads a small Lua
script shaped like the rate-limit acquire (5 keys, 8 arguments, a 3-item array back), and for
each case times process CPU (time.process_time) over a fixed number of calls, first one caller
at a time, then 50 callers at once. Each case runs in a child process, so the parser redis-py
picks is the one it would pick: with hiredis importable ("hiredis") or with it hidden
("python"). A table of the median of `--runs` runs, in microseconds of CPU per command, closes.
Every call is wrapped in asyncio.timeout, as the store bounds each one (redis_calls.bounded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LUA = "return {1, tonumber(ARGV[3]), #KEYS}"
KEYS = [f"{{rl:bench}}:{part}" for part in ("hits", "pending", "pause", "queue", "leaves")]
ARGS: list[str | int] = ["take", "0123456789abcdef", 2_000_000, 1, 0, "0", 1, 20, 1_000_000]
CONCURRENCY = 50
WIRE_COMMIT = "65acfd3"  # the commit that added redis_wire.py
TIMEOUT = 1.0

# name -> what it is; each is built by `_case` in the child. "lean": hiredis packs the command
# (a Connection subclass, given as connection_class) and no socket_timeout (asyncio.timeout
# bounds the call, and redis-py disconnects a connection whose command was cancelled).
CASES: dict[str, str] = {
    "script": "Script from register_script, called as redis_limits did before 65acfd3",
    "evalsha": "client.evalsha(sha, n, *keys, *args)",
    "execute": 'client.execute_command("EVALSHA", ...)',
    "evalsha-resp3": "evalsha, protocol=3",
    "evalsha-nosockto": "evalsha, socket_timeout=None",
    "evalsha-hpack": "evalsha, Connection subclass whose pack_command is hiredis.pack_command",
    "evalsha-lean": "evalsha, lean (hpack + socket_timeout=None)",
    "script-lean": "Script object on the lean client",
    "evalsha-single": "evalsha, lean, single_connection_client=True (no pool; one at a time)",
    "pool-get-release": "pool.get_connection() + pool.release() alone, no command",
    "pool-conn": "lean, pool.get_connection(), send_command + read_response, pool.release()",
    "conn": "lean, one Connection: send_packed_command + read_response under an asyncio.Lock",
    "conn-pipelined": "lean, one Connection, pipelined: all write, replies read in order",
    "store": "what the store does now: RedisCounters._script on redis_calls.lean_client",
    "wire": "proxy/store/redis_wire.Wire (the hand-written RESP client)",
}
NEEDS_HIREDIS = {
    "evalsha-hpack",
    "evalsha-lean",
    "script-lean",
    "evalsha-single",
    "pool-conn",
    "store",
    "conn",
    "conn-pipelined",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        subprocess.run([str(ROOT / "scripts" / "ensure-redis-server")], check=True)  # noqa: S603
        binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = _free_port()
    with tempfile.TemporaryDirectory() as directory:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", directory]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)  # noqa: S603
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            yield port
        finally:
            process.terminate()
            process.wait(10)


# ---- child: one case, one parser -------------------------------------------------------------


def _client_kwargs(port: int, **extra: Any) -> dict[str, Any]:
    """The store's redis-py settings (redis_url.RedisTarget.client_kwargs), with `extra`."""
    sys.path.insert(0, str(ROOT))
    from proxy.store.redis_url import parse_redis_url  # noqa: PLC0415

    kwargs = parse_redis_url(f"redis://127.0.0.1:{port}/0").client_kwargs(timeout=TIMEOUT)
    kwargs.update(extra)
    return kwargs


# PLR0915: one flat list of cases reads better than one function each.
async def _case(  # noqa: PLR0915
    name: str, port: int
) -> tuple[Callable[[], Awaitable[Any]], Callable[[], Any]]:
    """The call to time for case `name`, and how to close what it opened."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    sha = await _load(port)
    call_args = [sha, len(KEYS), *KEYS, *ARGS]

    if name == "store":
        sys.path.insert(0, str(ROOT))
        from proxy.store.redis_calls import lean_client  # noqa: PLC0415
        from proxy.store.redis_events import Events  # noqa: PLC0415
        from proxy.store.redis_limits import RedisCounters, Script  # noqa: PLC0415
        from proxy.store.redis_url import parse_redis_url  # noqa: PLC0415

        store_client = lean_client(parse_redis_url(f"redis://127.0.0.1:{port}/0"), timeout=TIMEOUT)
        events = Events(store_client, "bench", timeout=TIMEOUT)
        counters = RedisCounters(client=store_client, events=events, prefix="", timeout=TIMEOUT)
        store_script = Script(LUA)

        async def run_store() -> Any:
            return await counters._script(store_script, KEYS, ARGS)

        return run_store, store_client.aclose
    if name == "wire":
        sys.path.insert(0, str(ROOT))
        from proxy.store.redis_url import parse_redis_url  # noqa: PLC0415

        redis_wire = _redis_wire()
        wire = redis_wire.Wire(parse_redis_url(f"redis://127.0.0.1:{port}/0"), timeout=TIMEOUT)
        wire_script = redis_wire.Script(LUA)

        async def run_wire() -> Any:
            return await wire.run(wire_script, KEYS, ARGS)

        return run_wire, wire.close

    extra: dict[str, Any] = {}
    lean = name in (
        "evalsha-lean",
        "script-lean",
        "evalsha-single",
        "pool-conn",
        "conn",
        "conn-pipelined",
    )
    if name == "evalsha-nosockto" or lean:
        extra["socket_timeout"] = None
    if name == "evalsha-hpack" or lean:
        extra["hiredis_packing"] = True
    if name == "evalsha-resp3":
        extra["protocol"] = 3
    if name == "evalsha-single":
        extra["single_connection_client"] = True
    packing = extra.pop("hiredis_packing", False)
    client: Any = aioredis.Redis(**_client_kwargs(port, **extra))
    if packing:
        pool = client.connection_pool
        pool.connection_class = _hiredis_packing(pool.connection_class)

    def bounded(operation: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        async def call() -> Any:
            async with asyncio.timeout(TIMEOUT):
                return await operation()

        return call

    if name in ("script", "script-lean"):
        script = client.register_script(LUA)
        return bounded(lambda: script(keys=KEYS, args=ARGS)), client.aclose
    if name.startswith("evalsha"):
        return bounded(lambda: client.evalsha(*call_args)), client.aclose
    if name == "execute":
        return bounded(lambda: client.execute_command("EVALSHA", *call_args)), client.aclose
    if name == "pool-get-release":
        pool = client.connection_pool

        async def get_release() -> None:
            connection = await pool.get_connection()
            await pool.release(connection)

        return bounded(get_release), client.aclose
    if name == "pool-conn":
        pool = client.connection_pool

        async def from_pool() -> Any:
            connection = await pool.get_connection()
            try:
                await connection.send_command("EVALSHA", *call_args)
                return await connection.read_response()
            finally:
                await pool.release(connection)

        return bounded(from_pool), client.aclose
    if name in ("conn", "conn-pipelined"):
        pool = client.connection_pool
        connection = await pool.get_connection()
        lock = asyncio.Lock()

        async def close() -> None:
            await pool.release(connection)
            await client.aclose()

        if name == "conn":

            async def locked() -> Any:
                packed = connection.pack_command("EVALSHA", *call_args)
                async with lock:
                    await connection.send_packed_command(packed, check_health=False)
                    return await connection.read_response()

            return bounded(locked), close

        # Pipelined over one connection: writes go out at once, replies are read in order by
        # whoever holds the read lock, each caller's own after those before it.
        order: list[asyncio.Future[Any]] = []
        reading = asyncio.Lock()

        async def pipelined() -> Any:
            future = asyncio.get_running_loop().create_future()
            order.append(future)
            packed = connection.pack_command("EVALSHA", *call_args)
            await connection.send_packed_command(packed, check_health=False)
            async with reading:
                while not future.done():
                    reply = await connection.read_response()
                    order.pop(0).set_result(reply)
            return future.result()

        return bounded(pipelined), close
    raise ValueError(name)


def _redis_wire() -> Any:
    """proxy/store/redis_wire.py, the hand-written client the store had from 65acfd3 until it
    went back to redis-py: from git when it is no longer in the tree."""
    import importlib.util  # noqa: PLC0415

    path = ROOT / "proxy" / "store" / "redis_wire.py"
    if not path.exists():
        source = subprocess.run(  # noqa: S603
            ["git", "-C", str(ROOT), "show", f"{WIRE_COMMIT}:proxy/store/redis_wire.py"],  # noqa: S607
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        path = Path(tempfile.mkdtemp()) / "redis_wire.py"
        path.write_text(source)
    spec = importlib.util.spec_from_file_location("redis_wire", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hiredis_packing(base: type[Any]) -> type[Any]:
    """`base` (the pool's connection class: TCP, TLS or unix) packing commands with hiredis."""
    import hiredis  # noqa: PLC0415

    class HiredisPacking(base):  # type: ignore[misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD", as redis-py does
                args = (*args[0].split(), *args[1:])
            return [hiredis.pack_command(args)]

    return HiredisPacking


async def _load(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = LUA.encode()
    writer.write(b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$%d\r\n%s\r\n" % (len(body), body))
    line = await reader.readline()  # $40
    sha = (await reader.readline()).strip().decode()
    if not line.startswith(b"$40"):
        raise RuntimeError(f"SCRIPT LOAD answered {line!r}")
    writer.close()
    return sha


async def _measure(call: Callable[[], Awaitable[Any]], count: int, callers: int) -> float:
    """CPU microseconds per call over `count` calls made by `callers` concurrent loops."""
    each = count // callers

    async def loop() -> None:
        for _ in range(each):
            await call()

    await asyncio.gather(*(loop() for _ in range(callers)))  # warm: connections, caches
    start = time.process_time()
    await asyncio.gather(*(loop() for _ in range(callers)))
    return (time.process_time() - start) / (each * callers) * 1e6


async def _child(name: str, port: int, count: int) -> dict[str, float]:
    call, close = await _case(name, port)
    try:
        reply = await call()
        if name != "pool-get-release" and list(reply) != [1, 2_000_000, 5]:
            raise RuntimeError(f"unexpected reply {reply!r}")
        return {
            "seq": await _measure(call, count, 1),
            "c50": await _measure(call, count * 2, CONCURRENCY),
        }
    finally:
        result = close()
        if result is not None:
            await result


def child_main(arguments: argparse.Namespace) -> None:
    if arguments.parser == "python":
        sys.modules["hiredis"] = None  # type: ignore[assignment]  # redis-py falls back
    import redis.utils  # noqa: PLC0415

    wanted = arguments.parser == "hiredis"
    if wanted != redis.utils.HIREDIS_AVAILABLE:
        raise RuntimeError("redis-py did not pick the parser asked for")
    coroutine = _child(arguments.case, arguments.port, arguments.count)
    if arguments.loop == "uvloop":
        import uvloop  # noqa: PLC0415

        result = uvloop.run(coroutine)
    else:
        result = asyncio.run(coroutine)
    print(json.dumps(result))


# ---- parent ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=3000, help="calls per sequential run")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--parser", choices=("python", "hiredis"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child_main(arguments)
        return

    import redis  # noqa: PLC0415

    try:
        import hiredis  # noqa: PLC0415

        parsers = ["python", "hiredis"]
        hiredis_version = hiredis.__version__
    except ImportError:
        parsers, hiredis_version = ["python"], "not installed"
    cases = [case for case in arguments.cases.split(",") if case]
    print(
        f"redis-py {redis.__version__}, hiredis {hiredis_version}, Python "
        f"{sys.version.split()[0]}, {arguments.loop} loop, {arguments.runs} runs, "
        f"{arguments.count} calls sequential and {arguments.count * 2} with {CONCURRENCY} callers",
        flush=True,
    )
    combos: list[tuple[str, str]] = []
    for case in cases:
        choices = ["-"] if case == "wire" else parsers
        if case in NEEDS_HIREDIS:
            choices = [name for name in parsers if name == "hiredis"]
        combos += [(case, choice) for choice in choices]
    seq: dict[tuple[str, str], list[float]] = {combo: [] for combo in combos}
    c50: dict[tuple[str, str], list[float]] = {combo: [] for combo in combos}
    with redis_server() as port:
        # Round robin, so that whatever else the machine does falls on every case alike.
        for run in range(arguments.runs):
            for case, parser_name in combos:
                command = [sys.executable, __file__, "--child", "--case", case]
                command += ["--parser", parser_name if parser_name != "-" else "python"]
                command += ["--port", str(port), "--count", str(arguments.count)]
                command += ["--loop", arguments.loop]
                out = subprocess.run(command, check=True, capture_output=True, text=True)  # noqa: S603
                result = json.loads(out.stdout)
                seq[case, parser_name].append(result["seq"])
                c50[case, parser_name].append(result["c50"])
            print(f"  run {run + 1} of {arguments.runs} done", flush=True)
    rows = [
        (case, parser_name, statistics.median(seq[case, parser_name]),
         statistics.median(c50[case, parser_name]))
        for case, parser_name in combos
    ]  # fmt: skip
    print()
    print("| case | parser | µs CPU/command, 1 caller | µs CPU/command, 50 callers | what |")
    print("| --- | --- | ---: | ---: | --- |")
    for case, parser_name, seq_us, c50_us in rows:
        print(f"| {case} | {parser_name} | {seq_us:.1f} | {c50_us:.1f} | {CASES[case]} |")


if __name__ == "__main__":
    main()
