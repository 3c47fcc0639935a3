"""Transports: the upstream transport of each route, one per route profile, as httpx mounts
its transports."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from proxy.config import Route, Settings
from proxy.transport.aiohttp_client import AiohttpTransport
from proxy.transport.base import Transport
from proxy.transport.lean import LeanClient
from proxy.transport.slots import ConnectionSlots

TransportKind = Literal["lean", "aiohttp"]


@dataclass(frozen=True, slots=True)
class Profile:
    """What a transport is built with for a route; routes with equal profiles share one.
    (An egress proxy, when there is one, is a field of this too.)"""

    ca_bundle: Path | None = None
    # A route with max_connections of its own keeps its cap to itself: its prefix makes its
    # profile its own, even when another route names the same number.
    capped_route: str | None = None
    max_connections: int | None = None

    @classmethod
    def of(cls, route: Route) -> Profile:
        if route.max_connections is None:
            return cls(ca_bundle=route.ca_bundle)
        return cls(
            ca_bundle=route.ca_bundle,
            capped_route=route.prefix,
            max_connections=route.max_connections,
        )


class Transports:
    """The transport of every route, built when the proxy starts: TLS trust and connection
    limits are given to each transport then, never per request. Every transport takes its
    connections from one pool of `max_connections`; a route with a cap of its own takes them
    within that cap too. start() and close() are for all of them."""

    def __init__(
        self,
        *,
        kind: TransportKind,
        routes: Sequence[Route],
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
    ) -> None:
        self._pool = ConnectionSlots.for_pool(max_connections, wait=connect_timeout)
        transport_class: type[LeanClient | AiohttpTransport] = (
            AiohttpTransport if kind == "aiohttp" else LeanClient
        )
        built: dict[Profile, Transport] = {}
        self._by_prefix: dict[str, Transport] = {}
        for route in routes:
            profile = Profile.of(route)
            transport = built.get(profile)
            if transport is None:
                transport = built[profile] = transport_class(
                    connect_timeout=connect_timeout,
                    read_timeout=read_timeout,
                    slots=self._slots(profile, wait=connect_timeout),
                    ssl_context=_ssl_context(profile.ca_bundle),
                )
            self._by_prefix[route.prefix] = transport
        self._transports = tuple(built.values())

    @classmethod
    def from_settings(cls, settings: Settings) -> Transports:
        return cls(
            kind=settings.upstream_client,
            routes=settings.routes,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            max_connections=settings.max_connections,
        )

    def for_route(self, route: Route) -> Transport:
        """The transport of `route`, one of the routes these were built for."""
        return self._by_prefix[route.prefix]

    async def start(self) -> None:
        try:
            for transport in self._transports:
                await transport.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for transport in self._transports:
            await transport.close()
        self._pool.close()

    def _slots(self, profile: Profile, *, wait: float) -> ConnectionSlots:
        if profile.capped_route is None or profile.max_connections is None:
            return self._pool
        return ConnectionSlots.for_route(
            profile.capped_route, profile.max_connections, wait=wait, parent=self._pool
        )


def _ssl_context(ca_bundle: Path | None) -> ssl.SSLContext | None:
    """Certificate verification is always on; a route may name its own CA bundle (None: the
    transport's default, the system's CAs)."""
    if ca_bundle is None:
        return None
    return ssl.create_default_context(cafile=str(ca_bundle))
