"""Several worker processes on one port (`workers` > 1). The supervisor, the process the user
started, holds the port and starts the workers; each serves the whole app on the same port
through SO_REUSEPORT, the kernel spreading connections between them. The group's token store
is the supervisor's: each worker's TokenManagers keep their tokens through the relay
(proxy.store.relay), so that each token is fetched once for the whole group and the 401 rule's
memory of paths is the group's. The supervisor reloads for the group (SIGHUP, changed secret
files) and tells each worker to reload too (proxy.worker). Written by hand: process managers
such as gunicorn's arbiter share no state with their workers, and the shared token is the
point here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.multiprocess import mark_process_dead

from proxy.config import Loaded, Settings
from proxy.egress import register_secrets as register_egress_secrets
from proxy.log import get_logger
from proxy.metrics import ConfigReloads
from proxy.reload import SIGHUP, Changes, ConfigSource, Reloader
from proxy.store import CredentialIdentity
from proxy.store import relay_wire as wire
from proxy.store.build import build_store
from proxy.store.relay_server import RelayServer
from proxy.token_sources import identity_of
from proxy.worker import MULTIPROC_ENV, WorkerSpec

log = get_logger("proxy.workers")

WORKER_FLAG = "--worker"
# A worker that has not started listening by then is taken for one that cannot.
START_TIMEOUT = 30.0
# Starts in a row that never reached listening before the supervisor gives up.
GIVE_UP_AFTER = 3
# Restart delays after a crash double from the base to the cap; a worker that lived this long
# starts the count again.
RESTART_BASE = 0.1
RESTART_CAP = 5.0
STEADY_AFTER = 30.0
# Workers get shutdown_timeout to drain, and this much more to close down (they cut off what
# is still running at the deadline, which takes them well under a second) before being killed.
EXIT_MARGIN = 1.0


@dataclass
class _Worker:
    """One worker process as the supervisor sees it."""

    index: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    started_at: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reader_task: asyncio.Task[None] | None = None


def _identities(settings: Settings) -> Iterator[tuple[CredentialIdentity, str]]:
    for credential in settings.credentials.values():
        yield identity_of(credential), credential.client_secret.get_secret_value()


class Supervisor:
    """Holds the port and the group's token store, reloads for the group, and keeps `workers`
    worker processes serving: a worker that dies is restarted after a short, growing pause;
    one that cannot start at all ends the supervisor with a message."""

    def __init__(
        self,
        settings: Settings,
        *,
        command: list[str],
        reloading: tuple[ConfigSource, Loaded] | None = None,
    ) -> None:
        self._settings = settings
        # Where SIGHUP reads the configuration again; None: SIGHUP is ignored.
        self._reloading = reloading
        # How to start this program again: the interpreter's arguments and the user's own.
        self._command = command
        self.port = settings.port
        self.metrics_port = settings.metrics_port
        self.failure: str | None = None
        self._held: list[socket.socket] = []
        self._workers: dict[int, _Worker] = {}
        # The group's token store: Redis (behind its fallback) with redis_url, else memory.
        self._store = build_store(settings)
        self._relay = RelayServer(self._store, _identities(settings))
        # The group's reload metrics, which every worker exports.
        self._reloads = ConfigReloads()
        self._directory = ""
        self._stopping = False
        self._done = asyncio.Event()
        self._exit_code = 0
        self._listening: set[int] = set()

    # The port --------------------------------------------------------------------------------

    def hold_ports(self) -> None:
        """Bind, without listening, every address the workers will listen on: a busy port is
        reported as the single process reports it, and port 0 becomes one port for all."""
        try:
            self.port = self._hold(self._settings.port)
            if self._settings.metrics_port is not None:
                self.metrics_port = self._hold(self._settings.metrics_port)
        except OSError:
            self.release_ports()
            raise

    def _hold(self, port: int) -> int:
        infos = socket.getaddrinfo(
            self._settings.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[int, str]] = set()
        for family, kind, proto, _, address in infos:
            if (family, str(address[0])) in seen:
                continue
            seen.add((family, str(address[0])))
            sock = socket.socket(family, kind, proto)
            self._held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
        return port

    def make_metrics_directory(self) -> None:
        """The private directory of the workers' metrics files; run() removes it."""
        self._directory = tempfile.mkdtemp(prefix="token-proxy-metrics-")

    def release_ports(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()

    # The group -------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT (then 0), or until a worker cannot start (then its
        exit status, or 1)."""
        settings = self._settings
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._done.set)
        reloading = self._reloader()
        loop.add_signal_handler(
            signal.SIGHUP, reloading.hup if reloading is not None else lambda: None
        )
        if not self._directory:
            self.make_metrics_directory()
        register_egress_secrets(settings)
        await self._store.start()
        self._relay.start()
        reloader = None
        if reloading is not None:
            reloader = asyncio.create_task(reloading.run(), name="reloader")
        self._log_split()
        keepers = [
            asyncio.create_task(self._keep(index), name=f"worker:{index}")
            for index in range(1, settings.workers + 1)
        ]
        try:
            await self._done.wait()
            log.info(
                "stopping the workers",
                workers=len(self._workers),
                grace_seconds=settings.shutdown_timeout,
            )
        finally:
            self._stopping = True
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            if reloader is not None:
                reloader.cancel()
                await asyncio.gather(reloader, return_exceptions=True)
            await self._stop_workers()
            await self._relay.close()
            await self._store.close()
            shutil.rmtree(self._directory, ignore_errors=True)
            self.release_ports()
        log.info("stopped")
        return self._exit_code

    # Reloading -------------------------------------------------------------------------------

    def _reloader(self) -> Reloader | None:
        if self._reloading is None:
            return None
        source, loaded = self._reloading
        return Reloader(
            source, loaded, apply=self._reload, reloads=self._reloads, reported=self._tell_reloads
        )

    async def _reload(self, loaded: Loaded, changes: Changes) -> None:
        """The group's reload: the relay serves the credentials of `loaded` (one that stays
        keeps its token; the workers' token managers use a changed secret at their next
        fetch), then every worker reloads, from the file's table as read here."""
        self._settings = loaded.settings
        self._relay.use(_identities(loaded.settings))
        table = loaded.toml if changes.trigger == SIGHUP else None
        self._tell(wire.reload(changes.trigger, table))
        if any(key.startswith(("credentials", "clients")) for key in changes.fields):
            self._log_split()

    def _tell_reloads(self) -> None:
        self._tell(wire.reloads(self._reloads.figures()))

    def _tell(self, message: wire.Message) -> None:
        line = wire.encode(message)
        for worker in self._workers.values():
            if not worker.writer.is_closing():
                worker.writer.write(line)

    def _log_split(self) -> None:
        settings = self._settings
        if settings.limits_shared:
            log.info("rate limits are shared whole by the workers, through Redis")
            return
        credentials, clients = settings.split_limits()
        shares = {
            f"credential {name}": list(credential.rate_limits)
            for name, credential in credentials.items()
            if credential.rate_limits
        }
        for client in clients:
            if client.rate_limit:
                shares[f"client {client.name}"] = list(client.rate_limit)
        if shares:
            log.info(
                f"rate limits are split {settings.workers} ways: each worker applies its share",
                workers=settings.workers,
                per_worker=shares,
            )

    async def _keep(self, index: int) -> None:
        """Keep worker `index` running: start it, restart it when it dies."""
        try:
            await self._keep_running(index)
        except Exception as exc:  # a supervisor that cannot start workers must say so and stop
            log.exception("cannot start a worker", worker=index)
            self.failure = f"cannot start worker {index}: {type(exc).__name__}: {exc}"
            self._exit_code = 1
            self._done.set()

    async def _keep_running(self, index: int) -> None:
        # A worker stays registered until it has exited: when the supervisor stops, this task
        # is cancelled and _stop_workers drains whatever is still registered.
        failed_starts = 0
        crashes = 0
        started_once = False
        while not self._stopping:
            worker = await self._spawn(index)
            if await self._until_listening(worker):
                started_once = True
                failed_starts = 0
                self._listened(worker)
                code = await worker.process.wait()
                if self._stopping:
                    return
                self._forget(worker)
                lived = time.monotonic() - worker.started_at
                log.error(
                    "worker exited unexpectedly",
                    worker=index,
                    pid=worker.process.pid,
                    exit_status=code,
                    lived_s=round(lived, 1),
                )
                if lived >= STEADY_AFTER:
                    crashes = 0
            else:
                code = await self._reap(worker)
                if self._stopping:
                    return
                self._forget(worker)
                failed_starts += 1
                if not started_once or failed_starts >= GIVE_UP_AFTER:
                    self._give_up(index, code, failed_starts)
                    return
                log.error(
                    "worker exited before it could serve",
                    worker=index,
                    pid=worker.process.pid,
                    exit_status=code,
                )
            crashes += 1
            delay = min(RESTART_CAP, RESTART_BASE * 2 ** (crashes - 1))
            log.info("restarting worker", worker=index, in_s=delay)
            await asyncio.sleep(delay)

    async def _spawn(self, index: int) -> _Worker:
        settings = self._settings
        mine, theirs = socket.socketpair()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=mine, limit=wire.LINE_LIMIT)
            spec = WorkerSpec(
                index=index,
                workers=settings.workers,
                fd=theirs.fileno(),
                port=self.port,
                metrics_port=self.metrics_port,
            )
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                *self._command,
                WORKER_FLAG,
                spec.encode(),
                pass_fds=(theirs.fileno(),),
                env={**os.environ, MULTIPROC_ENV: self._directory},
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        worker = _Worker(index=index, process=process, writer=writer, started_at=time.monotonic())
        self._workers[index] = worker
        await self._relay.attach(index, writer)
        writer.write(wire.encode(wire.reloads(self._reloads.figures())))
        worker.reader_task = asyncio.create_task(
            self._relay.serve(index, reader, on_ready=worker.ready.set)
        )
        log.info("worker started", worker=index, pid=process.pid)
        return worker

    async def _until_listening(self, worker: _Worker) -> bool:
        ready = asyncio.create_task(worker.ready.wait())
        exited = asyncio.create_task(worker.process.wait())
        try:
            await asyncio.wait(
                {ready, exited}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (ready, exited):
                task.cancel()
        return worker.ready.is_set() and worker.process.returncode is None

    def _listened(self, worker: _Worker) -> None:
        first = len(self._listening) < self._settings.workers
        self._listening.add(worker.index)
        if first and len(self._listening) == self._settings.workers:
            log.info(
                f"started {self._settings.workers} workers",
                pids=[w.process.pid for w in self._workers.values()],
                address=f"{self._settings.host}:{self.port}",
            )
        elif not first:
            log.info("worker restarted", worker=worker.index, pid=worker.process.pid)

    async def _reap(self, worker: _Worker) -> int:
        process = worker.process
        if process.returncode is None:
            process.kill()
        return await process.wait()

    def _give_up(self, index: int, code: int, attempts: int) -> None:
        what = "could not start" if attempts == 1 else f"could not start {attempts} times in a row"
        self.failure = (
            f"worker {index} {what} (exit status {code}); its messages are above. The "
            "supervisor stops the other workers and exits"
        )
        log.error("a worker could not start; stopping", worker=index, exit_status=code)
        self._exit_code = code if code > 0 else 1
        self._done.set()

    def _forget(self, worker: _Worker) -> None:
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        if worker.reader_task is not None:
            worker.reader_task.cancel()
        worker.writer.close()
        mark_process_dead(worker.process.pid, self._directory)  # type: ignore[no-untyped-call]  # unannotated upstream

    async def _stop_workers(self) -> None:
        workers = list(self._workers.values())
        for worker in workers:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        waits = [worker.process.wait() for worker in workers]
        try:
            async with asyncio.timeout(self._settings.shutdown_timeout + EXIT_MARGIN):
                await asyncio.gather(*waits)
        except TimeoutError:
            for worker in workers:
                if worker.process.returncode is None:
                    log.error(
                        "worker did not stop in time; killing it",
                        worker=worker.index,
                        pid=worker.process.pid,
                    )
                    worker.process.kill()
            await asyncio.gather(*(worker.process.wait() for worker in workers))
        for worker in workers:
            if worker.process.returncode not in (0, None):
                log.warning(
                    "worker exited with an error while stopping",
                    worker=worker.index,
                    exit_status=worker.process.returncode,
                )
            self._forget(worker)
