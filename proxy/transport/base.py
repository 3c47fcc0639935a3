"""The upstream transport's interface: what the forwarder sends and what it gets back."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Protocol

from multidict import CIMultiDictProxy

# A request body: buffered bytes (replayable), a stream (sent once), or none.
Body = bytes | AsyncIterable[bytes] | None
CHUNK_SIZE = 64 * 1024


class UpstreamResponse(Protocol):
    """One upstream answer: status, headers, a body stream; close() releases it."""

    status: int
    reason: str | None

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def header_items(self) -> Sequence[tuple[str, str]]:
        """The headers as (name, value) pairs in the order upstream sent them."""
        ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def complete_body(self) -> bytes | None:
        """The whole body when it has already arrived with the headers, else None (stream it)."""
        ...

    def close(self) -> None: ...


class Transport(Protocol):
    """Sends one request upstream; `url` is the full URL, its path and query sent as they are."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: Body,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> UpstreamResponse: ...
