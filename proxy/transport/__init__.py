"""The upstream transport behind one small interface, so the forwarder never sees which client
talks to upstream: the lean httptools client (the default) or a pooled aiohttp ClientSession
(`upstream_client = "aiohttp"`), each translating its errors to ours."""

from __future__ import annotations

from proxy.transport.aiohttp_client import AiohttpTransport
from proxy.transport.base import CHUNK_SIZE, Body, Transport, UpstreamResponse
from proxy.transport.lean import LeanClient

__all__ = ["CHUNK_SIZE", "Body", "Transport", "UpstreamResponse", "make_transport"]


def make_transport(
    kind: str, *, connect_timeout: float, read_timeout: float, max_connections: int
) -> Transport:
    """The transport named by the upstream_client setting."""
    transport_class: type[AiohttpTransport | LeanClient] = (
        AiohttpTransport if kind == "aiohttp" else LeanClient
    )
    return transport_class(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_connections=max_connections,
    )
