"""Team keys: who may use the proxy. A client sends `Authorization: Bearer <key>`; the key's
sha256 is compared in constant time with every configured client's."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from multidict import CIMultiDictProxy

from proxy.config import Client
from proxy.errors import Unauthorized

ANONYMOUS = "-"


class Gate:
    """Names the client of a request, or refuses it when team mode is on."""

    def __init__(self, clients: Sequence[Client]) -> None:
        self._clients = tuple((client.name, client.digest) for client in clients)

    @property
    def enabled(self) -> bool:
        return bool(self._clients)

    def identify(self, headers: CIMultiDictProxy[str]) -> str:
        if not self._clients:
            return ANONYMOUS
        values = headers.getall("Authorization", ())
        if len(values) != 1:
            raise Unauthorized(
                "this proxy is in team mode: send your team key as 'Authorization: Bearer <key>'"
            )
        scheme, _, key = values[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the team key must be sent as 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(key.strip().encode()).digest()
        found = None
        # Every client is compared, so the time taken says nothing about which one matched.
        for name, expected in self._clients:
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        if found is None:
            raise Unauthorized("the team key is not known to this proxy")
        return found
