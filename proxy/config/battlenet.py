"""Battle.net's presets: each region's API and token endpoint, its token hosts and its quota."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

RegionName = Literal["us", "eu", "kr", "tw", "cn"]

BATTLENET_TOKEN_URL = "https://oauth.battle.net/token"  # noqa: S105  (a URL, not a password)
REGION_TOKEN_URLS: dict[str, str] = {
    "us": BATTLENET_TOKEN_URL,
    "eu": BATTLENET_TOKEN_URL,
    "kr": BATTLENET_TOKEN_URL,
    "tw": BATTLENET_TOKEN_URL,
    "cn": "https://oauth.battlenet.com.cn/token",
}
REGION_UPSTREAMS: dict[str, str] = {
    "us": "https://us.api.blizzard.com",
    "eu": "https://eu.api.blizzard.com",
    "kr": "https://kr.api.blizzard.com",
    "tw": "https://tw.api.blizzard.com",
    "cn": "https://gateway.battlenet.com.cn",
}

BATTLENET_TOKEN_HOSTS = frozenset({"oauth.battle.net", "oauth.battlenet.com.cn"})
BATTLENET_API_HOSTS = {urlsplit(url).hostname: region for region, url in REGION_UPSTREAMS.items()}
# Battle.net's published API quota for a client.
BATTLENET_RATE_LIMIT = ("100/second", "36000/hour")


def battlenet_region(url: Any) -> str | None:
    """The region whose Battle.net API host the URL names, or None for any other host."""
    return BATTLENET_API_HOSTS.get(urlsplit(str(url)).hostname) if url else None


def is_battlenet_token_url(url: Any) -> bool:
    """Whether a token URL is one of Battle.net's token endpoints."""
    return urlsplit(str(url)).hostname in BATTLENET_TOKEN_HOSTS
