"""The configuration: Settings, its tables and load_settings, re-exported from its modules."""

from proxy.config.battlenet import (
    BATTLENET_API_HOSTS,
    BATTLENET_RATE_LIMIT,
    BATTLENET_TOKEN_HOSTS,
    BATTLENET_TOKEN_URL,
    REGION_TOKEN_URLS,
    REGION_UPSTREAMS,
    RegionName,
)
from proxy.config.fingerprint import FINGERPRINT_LENGTH, fingerprint
from proxy.config.loader import Loaded, load, load_settings
from proxy.config.messages import ENV_PREFIX, Problem, Problems, problems_of
from proxy.config.model import MAX_WORKERS, LogFormat, LogLevel, Settings
from proxy.config.secret_files import Reread, SecretFile, SecretFiles
from proxy.config.sources import DEFAULT_SECRETS_DIR
from proxy.config.tables import MIN_KEY_LENGTH, AuthMethod, Client, Credential, Route
from proxy.config.values import (
    check_rate_limits,
    check_url,
    is_loopback_host,
    split_rate_limits,
)

__all__ = [
    "BATTLENET_API_HOSTS",
    "BATTLENET_RATE_LIMIT",
    "BATTLENET_TOKEN_HOSTS",
    "BATTLENET_TOKEN_URL",
    "DEFAULT_SECRETS_DIR",
    "ENV_PREFIX",
    "FINGERPRINT_LENGTH",
    "MAX_WORKERS",
    "MIN_KEY_LENGTH",
    "REGION_TOKEN_URLS",
    "REGION_UPSTREAMS",
    "AuthMethod",
    "Client",
    "Credential",
    "Loaded",
    "LogFormat",
    "LogLevel",
    "Problem",
    "Problems",
    "RegionName",
    "Reread",
    "Route",
    "SecretFile",
    "SecretFiles",
    "Settings",
    "check_rate_limits",
    "check_url",
    "fingerprint",
    "is_loopback_host",
    "load",
    "load_settings",
    "problems_of",
    "split_rate_limits",
]
