"""A stand-in for Battle.net on 127.0.0.1, for README's newcomer walkthrough: an OAuth token
endpoint and the WoW token price, no account needed.

    .venv/bin/python -m aiohttp.web -H 127.0.0.1 -P 9999 docs.fake_provider:init_func

POST /token issues a bearer token for any HTTP Basic client id and secret;
GET /data/wow/token/index answers only requests carrying one of those tokens.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import sys
import time

from aiohttp import web

NAMESPACES = {"dynamic-us", "dynamic-eu", "dynamic-kr", "dynamic-tw", "dynamic-cn"}
ISSUED = web.AppKey("issued", set[str])


def _say(message: str) -> None:
    print(f"fake-provider: {message}", file=sys.stderr, flush=True)


def _client_id(request: web.Request) -> str | None:
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client_id, _, client_secret = base64.b64decode(encoded).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return client_id if client_id and client_secret else None


async def token(request: web.Request) -> web.Response:
    """The client-credentials grant, as Battle.net answers it."""
    form = await request.post()
    client_id = _client_id(request)
    if client_id is None:
        _say("POST /token without HTTP Basic client credentials: 401 invalid_client")
        return web.json_response({"error": "invalid_client"}, status=401)
    if form.get("grant_type") != "client_credentials":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    issued = secrets.token_urlsafe(24)
    request.app[ISSUED].add(issued)
    _say(f"POST /token from client {client_id!r}: issued a token for 86399 s")
    return web.json_response(
        {"access_token": issued, "token_type": "bearer", "expires_in": 86399, "sub": client_id}
    )


async def wow_token_index(request: web.Request) -> web.Response:
    """The WoW token price endpoint, which needs a bearer token and a dynamic namespace."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or presented not in request.app[ISSUED]:
        _say(f"GET {request.path_qs} without a valid bearer token: 401")
        return web.json_response({"code": 401, "type": "BLZWEBAPI00000401"}, status=401)
    namespace = request.query.get("namespace", "")
    if namespace not in NAMESPACES:
        _say(f"GET {request.path_qs}: namespace {namespace!r} unknown, 404")
        return web.json_response({"code": 404, "detail": "Not Found"}, status=404)
    _say(f"GET {request.path_qs} with a valid bearer token: 200")
    region = namespace.removeprefix("dynamic-")
    return web.json_response(
        {
            "_links": {
                "self": {
                    "href": f"https://{region}.api.blizzard.com/data/wow/token/"
                    f"?namespace={namespace}"
                }
            },
            "last_updated_timestamp": int(time.time()) * 1000,
            "price": 2673370000,
        }
    )


def create_app() -> web.Application:
    """The fake provider's application."""
    app = web.Application()
    app[ISSUED] = set()
    app.router.add_post("/token", token)
    app.router.add_get("/data/wow/token/index", wow_token_index)
    return app


def init_func(argv: list[str]) -> web.Application:
    """Entry point for `python -m aiohttp.web ... docs.fake_provider:init_func`."""
    return create_app()


if __name__ == "__main__":
    web.run_app(create_app(), host="127.0.0.1", port=9999)
