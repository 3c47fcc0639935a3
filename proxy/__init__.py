"""token-proxy: a local reverse proxy that injects OAuth 2.0 client-credentials tokens."""

# The one place the version is written: pyproject.toml reads it from here. A constant, not
# importlib.metadata, which costs start-up about 40 ms.
__version__ = "0.1.0"
