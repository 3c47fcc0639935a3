"""token-proxy: a local reverse proxy that injects OAuth 2.0 client-credentials tokens."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("token-proxy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
