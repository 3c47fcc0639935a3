"""A token endpoint for bench/run: POST /token answers one long-lived client-credentials token.

.venv/bin/python bench/fake_token_server.py --port 8083
"""

from __future__ import annotations

import argparse
import secrets

from aiohttp import web


async def token(request: web.Request) -> web.Response:
    form = await request.post()
    if form.get("grant_type") != "client_credentials":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    return web.json_response(
        {
            "access_token": "bench-" + secrets.token_hex(16),
            "token_type": "bearer",
            "expires_in": 86399,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/token", token)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
