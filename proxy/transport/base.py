"""The upstream transport's interface: what the forwarder sends and what it gets back."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from multidict import CIMultiDictProxy

from proxy.errors import UpstreamError

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

    def received_body(self) -> bytes | None:
        """The whole body when upstream has already sent all of it, taken at once; else None,
        and the body is read with chunks(). Never waits for upstream, so a body that is slow
        or breaks off is relayed as it comes, its headers first."""
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
    ) -> UpstreamResponse: ...


@dataclass(frozen=True, slots=True)
class Attempt:
    """What an error message may say about the exchange that failed: where it went, the
    transport's timeouts, and whether the answer's headers had already arrived."""

    host: str | None
    port: int | None
    connect_timeout: float
    read_timeout: float
    reading_body: bool = False

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


# Builds our error from a library's exception (typed Any: each row's function gets its type).
Translation = Callable[[Any, Attempt], UpstreamError]


class ErrorTable:
    """One library's exceptions at the transport boundary and the UpstreamError each becomes:
    the first row whose type matches wins, as in a chain of except clauses. Callers catch
    `types` and `raise table.translate(exc, attempt) from exc`, so the cause is kept."""

    __slots__ = ("_rows", "types")

    def __init__(self, *rows: tuple[type[BaseException], Translation]) -> None:
        self._rows = rows
        self.types = tuple(kind for kind, _ in rows)

    def translate(self, exc: BaseException, attempt: Attempt) -> UpstreamError:
        for kind, translation in self._rows:
            if isinstance(exc, kind):
                return translation(exc, attempt)
        raise TypeError(f"{type(exc).__name__} is not in this table") from exc
