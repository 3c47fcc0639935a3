"""`token-proxy health`: ask a running proxy's /-/healthy or /-/ready at the address its
settings give, for container health checks and Kubernetes probes. Standard library only, so
that a probe run every few seconds costs little."""

from __future__ import annotations

import http.client
import ipaddress
import json

from proxy import __version__

# What a /-/ready problem document may say about why; longer bodies are not read.
_MAX_BODY = 64 * 1024


def probe_host(host: str) -> str:
    """Where to reach a proxy that listens on `host`: its loopback when `host` is every
    interface (0.0.0.0, ::, or empty), else `host` itself."""
    if not host:
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return host


def probe(*, host: str, port: int, ready: bool, timeout: float) -> tuple[bool, str]:
    """GET /-/ready (or /-/healthy) once; True when it answered 200, and a line saying what
    happened either way."""
    path = "/-/ready" if ready else "/-/healthy"
    target = probe_host(host)
    shown = f"[{target}]" if ":" in target else target
    url = f"http://{shown}:{port}{path}"
    # http.client rather than urllib: urllib would send it through HTTP_PROXY.
    connection = http.client.HTTPConnection(target, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"User-Agent": f"token-proxy/{__version__}"})
        response = connection.getresponse()
        body = response.read(_MAX_BODY)
    except (OSError, http.client.HTTPException) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return False, f"GET {url} failed: {reason or type(exc).__name__}"
    finally:
        connection.close()
    if response.status == 200:
        return True, f"GET {url} answered 200"
    return False, f"GET {url} answered {response.status}{_why(body)}"


def _why(body: bytes) -> str:
    """The title and detail of a problem document, when the body is one."""
    try:
        problem = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(problem, dict):
        return ""
    said = [str(problem[key]) for key in ("title", "detail") if problem.get(key)]
    return f": {'; '.join(said)}" if said else ""
