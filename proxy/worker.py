"""A worker process's link to its supervisor (proxy.workers): the relay that is the token store
of its TokenManagers, and its metrics, which add up every worker's."""

from __future__ import annotations

import os
import socket
import time

from proxy.config import Settings
from proxy.metrics import Metrics, TokenFigures, TokenMetricsCopy
from proxy.store import relay_wire as wire
from proxy.store.relay import Relay, RelayStore
from proxy.token_sources import TokenSources, build_token_sources, identity_of
from proxy.workers import MULTIPROC_ENV, WorkerSpec


class WorkerLink:
    """A worker's side of the group: its relay to the supervisor, which is the token store of
    its TokenManagers, and its metrics, which add up every worker's (the token metrics are the
    group's, which the supervisor counts)."""

    def __init__(self, spec: WorkerSpec, settings: Settings) -> None:
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory or not os.path.isdir(directory):
            raise RuntimeError(f"a worker needs {MULTIPROC_ENV}, which its supervisor sets")
        self.spec = spec
        self._digests = {
            name: identity_of(credential).digest
            for name, credential in settings.credentials.items()
        }
        self.relay = Relay()
        self.store = RelayStore(self.relay)
        self.lost = self.relay.lost
        self.metrics = Metrics(multiprocess_dir=directory)
        self.metrics.include(TokenMetricsCopy(self._figures))

    async def connect(self) -> None:
        await self.relay.connect(socket.socket(fileno=self.spec.fd))

    def token_sources(self, settings: Settings) -> TokenSources:
        """The token sources of this worker (create_app's token_sources hook)."""
        return build_token_sources(settings, store=self.store, metrics=None)

    def listening(self) -> None:
        """Tell the supervisor this worker has bound its port and serves."""
        self.relay.send(wire.ready())

    async def close(self) -> None:
        await self.relay.close()

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
