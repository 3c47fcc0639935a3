"""The one place that builds a credential's TokenManager, on a token store, and the aiohttp
ClientSession that token requests share: the runtime (a single process, and each worker on its
relay) and `token-proxy check` build them here; identity_of names a credential for the store
and for a reload, which keeps the token of a credential whose identity stays."""

from __future__ import annotations

import aiohttp

from proxy.config import Credential, Settings
from proxy.credentials import TokenManager
from proxy.metrics import Metrics
from proxy.store import CredentialIdentity, Store, TokenStore


def identity_of(credential: Credential) -> CredentialIdentity:
    """What makes `credential` the same one as another's, for the store: what its token
    depends on (a reload that keeps it keeps the token; its secret may change)."""
    return CredentialIdentity.of(
        token_url=credential.token_url,
        client_id=credential.client_id,
        scope=credential.scope,
        extra_params=credential.extra_params,
        auth_method=credential.auth_method,
    )


def token_store(store: Store, credential: Credential) -> TokenStore:
    """The store of `credential`'s token in `store`: keyed by its identity and its secret."""
    return store.tokens(identity_of(credential), credential.client_secret.get_secret_value())


def token_session() -> aiohttp.ClientSession:
    """The session of every token request. Token traffic has a session of its own so that it
    never queues behind upstream connections. Create it in the event loop that will use it."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, raise_for_status=False
    )


def build_token_source(
    name: str,
    credential: Credential,
    *,
    settings: Settings,
    store: Store,
    session: aiohttp.ClientSession,
    metrics: Metrics | None,
) -> TokenManager:
    """The TokenManager of credential `name` of `settings`, keeping its token through `store`
    and requesting tokens on `session`. `metrics` None: another process exports the token
    metrics (a worker's supervisor). Not started: start() begins its fetches."""
    return TokenManager(
        name=name,
        credential=credential,
        session=session,
        store=token_store(store, credential),
        metrics=metrics,
        request_timeout=settings.token_timeout,
        wait_timeout=settings.token_wait_timeout,
        egress=settings.credential_egress(name).proxy_for_url(credential.token_url),
    )
