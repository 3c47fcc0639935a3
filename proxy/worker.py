"""A worker process's side of the group (proxy.workers): what the supervisor tells it on its
command line, its share of the settings, and its link to the supervisor: the relay that is the
token store of its TokenManagers, the supervisor's word to reload with the group, and its
metrics, which add up every worker's."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.config import Settings
from proxy.metrics import Metrics, TokenFigures, TokenMetricsCopy
from proxy.store import relay_wire as wire
from proxy.store.build import build_store
from proxy.store.relay import Relay, RelayStore
from proxy.token_sources import identity_of

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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


# Carries out a reload as the supervisor did it: the trigger, and the file's table (SIGHUP).
OnReload = Callable[[str, Mapping[str, Any] | None], None]


class WorkerLink:
    """A worker's side of the group: its relay to the supervisor, which is the token store of
    its TokenManagers (its rate-limit counters are its own), the supervisor's word to reload,
    and its metrics, which add up every worker's (the token metrics and the reload metrics are
    the group's, which the supervisor counts)."""

    def __init__(self, spec: WorkerSpec, settings: Settings) -> None:
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory or not os.path.isdir(directory):
            raise RuntimeError(f"a worker needs {MULTIPROC_ENV}, which its supervisor sets")
        self.spec = spec
        self._digests: dict[str, str] = {}
        self._track(settings)
        self.relay = Relay(on_group=self._told)
        self.lost = self.relay.lost
        # The supervisor's word to reload with the group, and one that came before this
        # worker listened for it.
        self._on_reload: OnReload | None = None
        self._missed_reload: tuple[str, Mapping[str, Any] | None] | None = None
        self.metrics = Metrics(multiprocess_dir=directory)
        self.metrics.include(TokenMetricsCopy(self._figures))

    def store_for(self, settings: Settings) -> RelayStore:
        """This worker's store for `settings`: tokens through the relay; limits, pauses and
        cached answers in Redis when redis_url is set (shared whole), else its own memory."""
        local = build_store(settings) if settings.redis_url is not None else None
        return RelayStore(self.relay, local=local)

    async def connect(self) -> None:
        await self.relay.connect(socket.socket(fileno=self.spec.fd))

    def settings_for(self, settings: Settings) -> Settings:
        """This worker's share of the group's settings (worker_settings), whose credentials'
        token metrics it exports from now on."""
        mine = worker_settings(settings, self.spec)
        self._track(mine)
        return mine

    def on_reload(self, reload: OnReload) -> None:
        """Reload this worker with `reload` when the supervisor says so (and now, if it said
        so while this worker was starting)."""
        self._on_reload = reload
        missed, self._missed_reload = self._missed_reload, None
        if missed is not None:
            reload(*missed)

    def forget(self, name: str) -> None:
        """A credential a reload removed: its token metrics are no longer exported."""
        self._digests.pop(name, None)

    def listening(self) -> None:
        """Tell the supervisor this worker has bound its port and serves."""
        self.relay.send(wire.ready())

    async def close(self) -> None:
        await self.relay.close()

    def _track(self, settings: Settings) -> None:
        self._digests.update(
            {
                name: identity_of(credential).digest
                for name, credential in settings.credentials.items()
            }
        )

    def _told(self, message: wire.Message) -> None:
        """What the supervisor tells of the group: a reload, the group's reload metrics."""
        tell = message["tell"]
        if tell == "reload":
            asked = wire.read_reload(message)
            if self._on_reload is None:
                self._missed_reload = asked
            else:
                self._on_reload(*asked)
        elif tell == "reloads":
            self.metrics.reloads.copy(wire.read_reloads(message))

    def _figures(self) -> dict[str, tuple[TokenFigures, float]]:
        now = time.time()
        result = {}
        for name, digest in self._digests.items():
            figures = self.relay.figures(digest)
            if figures is None:
                continue
            token = self.relay.tokens(digest).current().token
            result[name] = (figures, max(0.0, token.expires_at - now) if token else 0.0)
        return result
