"""Current: the runtime that new requests start on, how a reload replaces it, and the
replaced runtimes that still finish their requests before they close."""

from __future__ import annotations

import asyncio

from proxy.config import Settings
from proxy.metrics import Metrics
from proxy.runtime import Runtime, StoreFactory


class Current:
    """The runtime that new requests start on; a reload replaces it with one assignment, and
    requests already running keep the one they took, which closes once they are done."""

    __slots__ = ("_metrics", "_retiring", "_runtime", "_store_factory", "_token_metrics")

    def __init__(
        self,
        *,
        metrics: Metrics | None = None,
        store_factory: StoreFactory | None = None,
        token_metrics: bool = True,
    ) -> None:
        """`store_factory` and `token_metrics`: those of every runtime (see Runtime.open); a
        runtime hands its store on to the next unless the store's settings changed."""
        self._runtime: Runtime | None = None
        self._retiring: dict[Runtime, asyncio.Task[None]] = {}
        self._metrics = metrics if metrics is not None else Metrics()
        self._store_factory = store_factory
        self._token_metrics = token_metrics

    async def start(self, settings: Settings, *, config_hash: str | None = None) -> None:
        """Build the first runtime."""
        self._runtime = await Runtime.open(
            settings,
            metrics=self._metrics,
            store_factory=self._store_factory,
            token_metrics=self._token_metrics,
            config_hash=config_hash,
        )

    async def replace(self, settings: Settings, *, config_hash: str | None = None) -> None:
        """A reload: build the next runtime from the current one, which hands on what did not
        change, and switch new requests to it."""
        new = await Runtime.open(
            settings,
            metrics=self._metrics,
            store_factory=self._store_factory,
            token_metrics=self._token_metrics,
            previous=self.runtime,
            config_hash=config_hash,
        )
        await new.first_answers()
        self.swap(new)

    @property
    def runtime(self) -> Runtime:
        runtime = self._runtime
        if runtime is None:
            raise RuntimeError("the application has not started: it has no runtime yet")
        return runtime

    @runtime.setter
    def runtime(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def swap(self, runtime: Runtime) -> Runtime | None:
        """Start new requests on `runtime`; the one it replaces (returned) closes when its last
        request ends."""
        old, self._runtime = self._runtime, runtime
        if old is not None:
            self._retiring[old] = asyncio.create_task(self._retire(old), name="runtime-retire")
        return old

    @property
    def retiring(self) -> int:
        """Replaced runtimes whose requests are still running."""
        return len(self._retiring)

    async def _retire(self, old: Runtime) -> None:
        try:
            await old.drained()
            await old.close()
        finally:
            self._retiring.pop(old, None)

    async def close(self) -> None:
        """Close the current runtime and those replaced (the server has stopped: a request
        still counted on one of them was cut off)."""
        retiring = list(self._retiring.items())
        for _, task in retiring:
            task.cancel()
        await asyncio.gather(*(task for _, task in retiring), return_exceptions=True)
        for old, _ in retiring:
            await old.close()
        if self._runtime is not None:
            await self._runtime.close()
