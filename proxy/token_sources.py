"""The one place that builds every credential's TokenManager: on a token store, with one aiohttp
ClientSession for token traffic (a single process, each worker, and `token-proxy check`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import aiohttp

from proxy.config import Credential, Settings
from proxy.credentials import TokenManager
from proxy.metrics import Metrics
from proxy.store import CredentialIdentity, Store


class TokenSources(Mapping[str, TokenManager]):
    """The TokenManager of every credential, by name, and the session their requests share."""

    def __init__(self, managers: dict[str, TokenManager], session: aiohttp.ClientSession) -> None:
        self._managers = managers
        self._session = session

    def __getitem__(self, name: str) -> TokenManager:
        return self._managers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._managers)

    def __len__(self) -> int:
        return len(self._managers)

    def start(self) -> None:
        """Start every manager's background fetch and refresh."""
        for manager in self._managers.values():
            manager.start()

    async def close(self) -> None:
        """Stop every manager, then close the session."""
        for manager in self._managers.values():
            await manager.close()
        await self._session.close()


def identity_of(credential: Credential) -> CredentialIdentity:
    """What makes `credential` the same one as another's, for the store."""
    return CredentialIdentity.of(
        token_url=credential.token_url,
        client_id=credential.client_id,
        scope=credential.scope,
        extra_params=credential.extra_params,
        auth_method=credential.auth_method,
    )


def build_token_sources(
    settings: Settings, *, store: Store, metrics: Metrics | None
) -> TokenSources:
    """A TokenManager per credential of `settings`, each keeping its token through `store`.
    `metrics` None: another process exports the token metrics (a worker's supervisor). Call
    it in the event loop that will use the sources, and close them there."""
    # Token traffic has a session of its own so it never queues behind upstream connections.
    session = aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, raise_for_status=False
    )
    managers = {
        name: TokenManager(
            name=name,
            credential=credential,
            session=session,
            store=store.tokens(
                identity_of(credential), credential.client_secret.get_secret_value()
            ),
            metrics=metrics,
            request_timeout=settings.token_timeout,
            wait_timeout=settings.token_wait_timeout,
        )
        for name, credential in settings.credentials.items()
    }
    return TokenSources(managers, session)
