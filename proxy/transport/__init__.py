"""The upstream transports behind one small interface, one per route profile, so the forwarder
never sees which client talks to upstream: the lean httptools client (the default) or a pooled
aiohttp ClientSession (`upstream_client = "aiohttp"`)."""

from __future__ import annotations

from proxy.transport.base import CHUNK_SIZE, Body, Transport, UpstreamResponse
from proxy.transport.mounts import Profile, Transports

__all__ = ["CHUNK_SIZE", "Body", "Profile", "Transport", "Transports", "UpstreamResponse"]
