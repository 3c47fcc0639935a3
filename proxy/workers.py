"""Several worker processes on one port (`workers` > 1). The supervisor, the process the user
started, holds the port, runs the TokenManager of every credential, so that each token is
fetched once for the whole group, and starts the workers. Each worker serves the whole app on
the same port through SO_REUSEPORT, the kernel spreading connections between them, and keeps
a TokenReplica per credential that the supervisor updates over a socketpair (newline-framed
JSON), with the token and with the 401 rule's memory of paths that refuse every token, so that
the group learns each such path once. Written by hand: process managers such as gunicorn's
arbiter share no state with their workers, and the shared token is the point here.

The messages carry tokens, so they are never logged; tokens go to the redactor on both ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.multiprocess import mark_process_dead

from proxy.config import Credential, Loaded, Settings
from proxy.credentials import Token, TokenManager, TokenReplica, TokenStatus
from proxy.egress import register_secrets as register_egress_secrets
from proxy.errors import ProxyError
from proxy.log import get_logger
from proxy.metrics import Metrics, TokenFigures, TokenMetricsCopy
from proxy.refusals import Evidence, Refusal, RefusingPaths
from proxy.reload import SIGHUP, Changes, ConfigSource, Reloader, token_identity

log = get_logger("proxy.workers")

WORKER_FLAG = "--worker"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
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
_LINE_LIMIT = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What the supervisor tells a worker on its command line (the hidden --worker flag)."""

    index: int
    workers: int
    fd: int
    port: int
    metrics_port: int | None

    def encode(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "workers": self.workers,
                "fd": self.fd,
                "port": self.port,
                "metrics_port": self.metrics_port,
            }
        )

    @classmethod
    def decode(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        return cls(
            index=int(data["index"]),
            workers=int(data["workers"]),
            fd=int(data["fd"]),
            port=int(data["port"]),
            metrics_port=None if data["metrics_port"] is None else int(data["metrics_port"]),
        )


def worker_settings(settings: Settings, spec: WorkerSpec) -> Settings:
    """A worker's settings: the port the supervisor holds, and its share of every rate limit."""
    credentials, clients = settings.model_copy(update={"workers": spec.workers}).split_limits()
    return settings.model_copy(
        update={
            "port": spec.port,
            "metrics_port": spec.metrics_port,
            "workers": spec.workers,
            "credentials": credentials,
            "clients": clients,
        }
    )


def _line(message: Mapping[str, Any]) -> bytes:
    # default=str: a reload's table may hold a TOML date, which no setting takes.
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


def _status_message(name: str, status: TokenStatus, figures: TokenFigures) -> dict[str, Any]:
    token = status.token
    return {
        "tell": "status",
        "credential": name,
        "token": None
        if token is None
        else {
            "value": token.value,
            "obtained_at": token.obtained_at,
            "lifetime": token.lifetime,
            "scope": token.scope,
        },
        "failures": status.failures,
        "last_error": status.last_error,
        "last_error_description": status.last_error_description,
        "rejected": status.rejected,
        "retry_at": status.retry_at,
        "fetches": dict(figures.fetches),
        "expiry": figures.expiry,
        "refresh_failures": figures.failures,
    }


def _read_status(message: Mapping[str, Any]) -> tuple[TokenStatus, TokenFigures]:
    raw = message["token"]
    token = (
        None
        if raw is None
        else Token(
            value=str(raw["value"]),
            obtained_at=float(raw["obtained_at"]),
            lifetime=float(raw["lifetime"]),
            scope=raw["scope"],
        )
    )
    status = TokenStatus(
        token=token,
        failures=int(message["failures"]),
        last_error=message["last_error"],
        last_error_description=message["last_error_description"],
        rejected=bool(message["rejected"]),
        retry_at=message["retry_at"],
    )
    figures = TokenFigures(
        fetches={str(k): float(v) for k, v in message["fetches"].items()},
        expiry=float(message["expiry"]),
        failures=float(message["refresh_failures"]),
    )
    return status, figures


def _path_message(name: str, path: str, refusal: Refusal) -> dict[str, Any]:
    return {
        "tell": "path",
        "credential": name,
        "path": path,
        "evidence": refusal.evidence.value,
        "until": refusal.until,
        "dropped": refusal.dropped,
    }


# --- The worker's side -------------------------------------------------------------------------


class WorkerLink:
    """A worker's end of the socketpair: the supervisor's tokens come in, requests for a new
    token (or to drop one upstream rejected) go out. Its metrics add up every worker's."""

    def __init__(self, spec: WorkerSpec, settings: Settings) -> None:
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory or not os.path.isdir(directory):
            raise RuntimeError(f"a worker needs {MULTIPROC_ENV}, which its supervisor sets")
        self.spec = spec
        self._settings = settings
        self._statuses: dict[str, tuple[TokenStatus, TokenFigures]] = {}
        self._replicas: dict[str, TokenReplica] = {}
        self._paths: dict[str, RefusingPaths] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._closing = False
        self.lost = asyncio.Event()
        # The supervisor's word to reload with the group (the trigger and the file's table),
        # and one that came before this worker listened for it.
        self._on_reload: Callable[[str, Mapping[str, Any] | None], None] | None = None
        self._missed_reload: tuple[str, Mapping[str, Any] | None] | None = None
        self.metrics = Metrics(multiprocess_dir=directory)
        self.metrics.include(TokenMetricsCopy(self._figures))

    def settings_for(self, settings: Settings) -> Settings:
        """This worker's share of the group's settings (worker_settings), which its token
        sources made from now on use."""
        self._settings = worker_settings(settings, self.spec)
        return self._settings

    async def connect(self) -> None:
        sock = socket.socket(fileno=self.spec.fd)
        reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=_LINE_LIMIT)
        self._reader_task = asyncio.create_task(self._read(reader), name="supervisor-link")

    def token_source(self, name: str, credential: Credential) -> TokenReplica:
        """The TokenSource of one credential (create_app's token_sources hook)."""
        replica = TokenReplica(
            name=name,
            credential=credential,
            ask=self._send,
            paths=self._paths_of(name),
            wait_timeout=self._settings.token_wait_timeout,
        )
        self._replicas[name] = replica
        known = self._statuses.get(name)
        if known is not None:
            replica.apply(known[0])
        return replica

    def on_reload(self, reload: Callable[[str, Mapping[str, Any] | None], None]) -> None:
        """Reload this worker with `reload` when the supervisor says so (and now, if it said
        so while this worker was starting)."""
        self._on_reload = reload
        missed, self._missed_reload = self._missed_reload, None
        if missed is not None:
            reload(*missed)

    def forget(self, name: str) -> None:
        """A credential a reload removed: its token metrics are no longer exported."""
        self._statuses.pop(name, None)
        self._replicas.pop(name, None)

    def listening(self) -> None:
        """Tell the supervisor this worker has bound its port and serves."""
        self._send({"ask": "ready"})

    async def close(self) -> None:
        self._closing = True
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    def _send(self, message: Mapping[str, Any]) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(_line(message))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                tell = message.get("tell")
                if tell == "status":
                    self._apply(str(message["credential"]), *_read_status(message))
                elif tell == "path":
                    refusal = Refusal(
                        until=float(message["until"]),
                        evidence=Evidence(message["evidence"]),
                        dropped=float(message["dropped"]),
                    )
                    self._paths_of(str(message["credential"])).learn(str(message["path"]), refusal)
                elif tell == "reload":
                    asked = str(message["trigger"]), message["table"]
                    if self._on_reload is None:
                        self._missed_reload = asked
                    else:
                        self._on_reload(*asked)
                elif tell == "reloads":
                    self.metrics.reloads.copy(message["figures"])
        except (ConnectionError, ValueError, KeyError, TypeError) as exc:
            # The text of the exception could hold part of a message, a token: only its type.
            log.error("the link to the supervisor broke", error=type(exc).__name__)
        finally:
            if not self._closing:
                log.warning("the supervisor is gone; this worker shuts down")
                self.lost.set()

    def _apply(self, name: str, status: TokenStatus, figures: TokenFigures) -> None:
        self._statuses[name] = (status, figures)
        replica = self._replicas.get(name)
        if replica is not None:
            replica.apply(status)

    def _paths_of(self, name: str) -> RefusingPaths:
        """The 401 rule's memory of one credential: it may arrive before the replica exists."""
        paths = self._paths.get(name)
        if paths is None:
            paths = self._paths[name] = RefusingPaths()
        return paths

    def _figures(self) -> dict[str, tuple[TokenFigures, float]]:
        now = time.monotonic()
        result = {}
        for name, (status, figures) in self._statuses.items():
            replica = self._replicas.get(name)
            token = replica.status().token if replica is not None else status.token
            result[name] = (figures, max(0.0, token.expires_at - now) if token else 0.0)
        return result


# --- The supervisor ------------------------------------------------------------------------------


@dataclass
class _Worker:
    """One worker process as the supervisor sees it."""

    index: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    started_at: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reader_task: asyncio.Task[None] | None = None


class Supervisor:
    """Holds the port, fetches every credential's token once for the group, and keeps
    `workers` worker processes serving: a worker that dies is restarted after a short,
    growing pause; one that cannot start at all ends the supervisor with a message."""

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
        self._managers: dict[str, TokenManager] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._metrics = Metrics()
        self._fetching: dict[str, asyncio.Task[None]] = {}
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
        session = self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, raise_for_status=False
        )
        for name, credential in settings.credentials.items():
            self._add_manager(name, credential)
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
            for task in [*keepers, *self._fetching.values()]:
                task.cancel()
            await asyncio.gather(*keepers, *self._fetching.values(), return_exceptions=True)
            if reloader is not None:
                reloader.cancel()
                await asyncio.gather(reloader, return_exceptions=True)
            await self._stop_workers()
            for task in self._watchers.values():
                task.cancel()
            await asyncio.gather(*self._watchers.values(), return_exceptions=True)
            for manager in self._managers.values():
                await manager.close()
            await session.close()
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
            source,
            loaded,
            apply=self._reload,
            reloads=self._metrics.reloads,
            reported=self._tell_reloads,
        )

    def _add_manager(self, name: str, credential: Credential) -> None:
        """Start the TokenManager of one credential, and tell the workers it has no token yet
        (a worker that held the token of a replaced one must not keep it)."""
        if self._session is None:
            raise RuntimeError("the supervisor is not running")
        settings = self._settings
        manager = self._managers[name] = TokenManager(
            name=name,
            credential=credential,
            session=self._session,
            metrics=self._metrics,
            request_timeout=settings.token_timeout,
            wait_timeout=settings.token_wait_timeout,
            egress=settings.credential_egress(name).proxy_for_url(credential.token_url),
        )
        manager.start()
        self._watchers[name] = asyncio.create_task(self._watch(name), name=f"token-watch:{name}")
        self._broadcast(name)

    async def _drop_manager(self, name: str) -> None:
        for task in (self._watchers.pop(name, None), self._fetching.pop(name, None)):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._managers.pop(name).close()

    async def _reload(self, loaded: Loaded, changes: Changes) -> None:
        """The group's reload: this process's token managers first (a credential that stays
        the same keeps its token, a changed secret is used at the next fetch), then every
        worker reloads too, from the file's table as read here."""
        old, settings = self._settings, loaded.settings
        self._settings = settings
        for name in list(self._managers):
            credential = settings.credentials.get(name)
            if credential is None or token_identity(credential) != token_identity(
                old.credentials[name]
            ):
                await self._drop_manager(name)
        for name, credential in settings.credentials.items():
            manager = self._managers.get(name)
            if manager is None:
                self._add_manager(name, credential)
            else:
                manager.use(
                    credential,
                    request_timeout=settings.token_timeout,
                    wait_timeout=settings.token_wait_timeout,
                )
        for name in changes.removed_credentials:
            self._metrics.forget_credential(name)
        table = loaded.toml if changes.trigger == SIGHUP else None
        self._tell({"tell": "reload", "trigger": changes.trigger, "table": table})
        if any(key.startswith(("credentials", "clients")) for key in changes.fields):
            self._log_split()

    def _tell_reloads(self) -> None:
        self._tell({"tell": "reloads", "figures": self._metrics.reloads.figures()})

    def _tell(self, message: Mapping[str, Any]) -> None:
        line = _line(message)
        for worker in self._workers.values():
            if not worker.writer.is_closing():
                worker.writer.write(line)

    def _log_split(self) -> None:
        settings = self._settings
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
            reader, writer = await asyncio.open_unix_connection(sock=mine, limit=_LINE_LIMIT)
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
        for name, manager in self._managers.items():
            writer.write(self._status_line(name))
            for path, refusal in manager.refusals():
                writer.write(_line(_path_message(name, path, refusal)))
        writer.write(_line({"tell": "reloads", "figures": self._metrics.reloads.figures()}))
        worker.reader_task = asyncio.create_task(self._listen(worker, reader))
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

    # Tokens ----------------------------------------------------------------------------------

    def _status_line(self, name: str) -> bytes:
        manager = self._managers[name]
        return _line(_status_message(name, manager.status(), self._metrics.token_figures(name)))

    def _broadcast(self, name: str) -> None:
        line = self._status_line(name)
        for worker in self._workers.values():
            if not worker.writer.is_closing():
                worker.writer.write(line)

    def _broadcast_path(self, name: str, path: str) -> None:
        refusal = self._managers[name].remembered(path)
        if refusal is None:
            return
        line = _line(_path_message(name, path, refusal))
        for worker in self._workers.values():
            if not worker.writer.is_closing():
                worker.writer.write(line)

    async def _watch(self, name: str) -> None:
        manager = self._managers[name]
        while True:
            await manager.wait_changed()
            self._broadcast(name)

    async def _listen(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                try:
                    message = json.loads(line)
                    self._answer(worker, message)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error(
                        "worker sent a message not understood",
                        worker=worker.index,
                        error=type(exc).__name__,
                    )

    def _answer(self, worker: _Worker, message: Mapping[str, Any]) -> None:
        ask = message["ask"]
        if ask == "ready":
            worker.ready.set()
            return
        name = str(message["credential"])
        manager = self._managers.get(name)
        if manager is None:
            return
        if ask == "invalidate":
            # Whatever the worker guessed, the supervisor decides for the group: a path that
            # some worker found refusing keeps the token, which goes back to the asking worker.
            path = str(message["path"])
            manager.relayed_401(
                float(message["obtained_at"]), path=path, replayable=bool(message["replayable"])
            )
            self._broadcast(name)
            self._broadcast_path(name, path)
        elif ask == "replayed":
            path = str(message["path"])
            manager.replayed(path, rejected=bool(message["rejected"]))
            self._broadcast_path(name, path)
        elif ask == "token" and name not in self._fetching:
            task = asyncio.create_task(self._fetch_now(name, manager))
            self._fetching[name] = task

    async def _fetch_now(self, name: str, manager: TokenManager) -> None:
        """A worker found no usable token: wake the manager, as a request of its own would."""
        try:
            with contextlib.suppress(ProxyError):
                await manager.token()
        finally:
            self._fetching.pop(name, None)
