"""Unit tests of rate limiting: proxy.ratelimit (RateLimiter, RateLimits, parse_retry_after) and
the configuration behind it (rate limit syntax, Battle.net's default quota, region_routes).
The limiters run on an injected clock whose time moves only when a test advances it."""

from __future__ import annotations

import asyncio
import bisect
import email.utils
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.config import Credential, Settings, load_settings
from proxy.errors import ConfigError, RateLimited
from proxy.ratelimit import (
    MAX_UPSTREAM_PAUSE,
    SYSTEM_CLOCK,
    Clock,
    RateLimiter,
    RateLimits,
    parse_retry_after,
)
from proxy.store.memory import MemoryCounters

SECRET = "Rl-S3cret-Value-Never-Shown-4c1d"
LOOPBACK_TOKEN_URL = "http://127.0.0.1:9/token"
BATTLENET_TOKEN_URL = "https://oauth.battle.net/token"
CN_TOKEN_URL = "https://oauth.battlenet.com.cn/token"
BATTLENET_QUOTA = ("100/second", "36000/hour")
HOLD = 30.0


class FakeClock:
    """A clock that moves only when a test advances it; a wait on it ends when its future is
    done or when the clock passes its deadline."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self._timers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def wait(self, future: asyncio.Future[Any], seconds: float) -> bool:
        if future.done():
            return True
        timer = asyncio.get_running_loop().create_future()
        self._timers.append((self.now + seconds, timer))
        try:
            await asyncio.wait([future, timer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not timer.done():
                timer.cancel()
        return future.done()

    async def advance(self, seconds: float) -> None:
        """Move time on, end the waits whose deadline it passed, and let their tasks run."""
        self.now += seconds
        for deadline, timer in self._timers:
            if deadline <= self.now and not timer.done():
                timer.set_result(None)
        self._timers = [(deadline, timer) for deadline, timer in self._timers if not timer.done()]
        await let_run()


async def let_run() -> None:
    """Let every task that can go on without time passing do so (nothing here does I/O)."""
    for _ in range(20):
        await asyncio.sleep(0)


def limiter(
    rates: Sequence[str],
    *,
    max_wait: float = 5.0,
    name: str = "credential 'c'",
    clock: Clock | None = None,
) -> RateLimiter:
    clock = clock if clock is not None else FakeClock()
    return RateLimiter(
        kind="credential",
        name=name,
        key="credential:c",
        rates=rates,
        max_wait=max_wait,
        counters=MemoryCounters(clock=clock),
        hold=HOLD,
        clock=clock,
    )


def rate_limits(
    credentials: dict[str, tuple[Sequence[str], float]],
    clients: dict[str, tuple[Sequence[str], float]],
    clock: FakeClock | None = None,
) -> RateLimits:
    clock = clock if clock is not None else FakeClock()
    return RateLimits(
        credentials=credentials,
        clients=clients,
        counters=MemoryCounters(clock=clock),
        hold=HOLD,
        clock=clock,
    )


async def at_once(awaitable: Awaitable[Any]) -> Any:
    """The result of `awaitable`, which must come without the clock moving."""
    task = asyncio.ensure_future(awaitable)
    await let_run()
    assert task.done(), "it waited, though no time had to pass"
    return task.result()


def credential(**values: Any) -> Credential:
    return Credential.model_validate({"client_id": "rl-client", "client_secret": SECRET, **values})


def settings(credentials: dict[str, dict[str, Any]], **values: Any) -> Settings:
    tables = {
        name: {"client_id": f"{name}-id", "client_secret": SECRET, **table}
        for name, table in credentials.items()
    }
    return Settings.model_validate({"credentials": tables, **values})


def routes_of(built: Settings) -> dict[str, tuple[str, str]]:
    return {route.prefix: (route.upstream, route.credential) for route in built.routes}


def config_error(tmp_path: Path, toml: str) -> str:
    """Load a TOML configuration that must be refused; the ConfigError's message."""
    path = tmp_path / "config.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path)
    return info.value.detail


async def answered(limiter_: RateLimiter) -> None:
    """A request let through that upstream answered at once."""
    settle = await limiter_.acquire()
    await settle()


# --- RateLimiter -------------------------------------------------------------------------------


async def test_limiter_admits_up_to_the_limit_at_once() -> None:
    """A limiter of 5/second admits 5 requests without waiting."""
    five = limiter(["5/second"], max_wait=0)
    for _ in range(5):
        await at_once(answered(five))


async def test_limiter_refuses_beyond_the_limit_when_it_may_not_wait() -> None:
    """With max_wait = 0 the request over the limit gets RateLimited at once, with a
    Retry-After of at least one second that names rate_limit_max_wait."""
    two = limiter(["2/second"], max_wait=0)
    await answered(two)
    await answered(two)
    with pytest.raises(RateLimited) as info:
        await at_once(answered(two))
    assert info.value.status == 429
    assert info.value.retry_after == 1
    assert info.value.headers == {"Retry-After": "1"}
    assert "rate_limit_max_wait" in info.value.detail


async def test_limiter_makes_the_excess_wait_for_the_window_to_move() -> None:
    """The request over 2/second waits until the first request's second has passed, then goes."""
    clock = FakeClock()
    two = limiter(["2/second"], max_wait=3, clock=clock)
    await answered(two)
    await answered(two)
    third = asyncio.create_task(answered(two))
    await clock.advance(0.99)
    assert not third.done()
    await clock.advance(0.02)
    assert third.done()
    await third


async def test_limiter_does_not_wait_when_the_slot_frees_after_max_wait() -> None:
    """A slot that frees only after max_wait is refused at once rather than after waiting."""
    one = limiter(["1/second"], max_wait=0.3)
    await answered(one)
    with pytest.raises(RateLimited) as info:
        await at_once(answered(one))
    assert info.value.retry_after == 1


async def test_limiter_serves_waiters_first_come_first_served() -> None:
    """Requests queued behind a full window are admitted in the order they arrived."""
    clock = FakeClock()
    five = limiter(["5/second"], max_wait=5, clock=clock)
    for _ in range(5):
        await answered(five)
    admitted: list[int] = []

    async def take(n: int) -> None:
        await answered(five)
        admitted.append(n)

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(take(n)))
        await asyncio.sleep(0)  # the task reaches the queue before the next one is made
    await clock.advance(1.01)
    await asyncio.gather(*tasks)
    assert admitted == [0, 1, 2, 3, 4]


async def test_waiters_of_replicas_sharing_a_store_are_served_in_arrival_order() -> None:
    """Two limiters on one store (two replicas of one credential) serve their waiters in the
    order they came, across both: a replica's second waiter goes before the other replica's
    later one, even though that one was first to ask when the window moved."""
    clock = FakeClock()
    counters = MemoryCounters(clock=clock)

    def replica() -> RateLimiter:
        return RateLimiter(
            kind="credential",
            name="credential 'c'",
            key="credential:c",
            rates=["1/second"],
            max_wait=10,
            counters=counters,
            hold=HOLD,
            clock=clock,
        )

    one, two = replica(), replica()
    await answered(one)
    admitted: list[str] = []

    async def take(limiter_: RateLimiter, name: str) -> None:
        await answered(limiter_)
        admitted.append(name)

    tasks = []
    for limiter_, name in ((one, "one-a"), (one, "one-b"), (two, "two-c")):
        tasks.append(asyncio.create_task(take(limiter_, name)))
        await let_run()
    for _ in range(4):
        await clock.advance(1.01)
    await asyncio.gather(*tasks)
    assert admitted == ["one-a", "one-b", "two-c"]


async def test_a_waiter_that_gives_up_leaves_the_queue() -> None:
    """A request cancelled while it waits (its client left) gives its place to the next."""
    clock = FakeClock()
    one = limiter(["1/second"], max_wait=10, clock=clock)
    await answered(one)
    leaving = asyncio.create_task(answered(one))
    await let_run()
    staying = asyncio.create_task(answered(one))
    await let_run()
    leaving.cancel()
    await let_run()
    await clock.advance(1.01)
    await clock.advance(0.01)
    assert staying.done()
    await staying


async def test_limiter_every_rate_counts() -> None:
    """With 10/second and 3/minute, the fourth request is refused for about a minute."""
    both = limiter(["10/second", "3/minute"], max_wait=0.1)
    for _ in range(3):
        await answered(both)
    with pytest.raises(RateLimited) as info:
        await answered(both)
    assert 55 <= info.value.retry_after <= 60


async def test_limiter_without_rates_never_waits() -> None:
    """A limiter without rates (no rate_limit) admits any number of requests at once."""
    free = limiter([], max_wait=0)
    for _ in range(1000):
        await at_once(answered(free))


async def test_pause_holds_requests_back_for_its_seconds() -> None:
    """After pause(0.4) even a limiter without rates admits the next request only 0.4 s later."""
    clock = FakeClock()
    free = limiter([], max_wait=5, clock=clock)
    await free.pause(0.4)
    waiting = asyncio.create_task(answered(free))
    await clock.advance(0.39)
    assert not waiting.done()
    await clock.advance(0.02)
    assert waiting.done()
    await at_once(answered(free))


async def test_pause_longer_than_max_wait_is_refused_with_its_retry_after() -> None:
    """A pause of 5 s refuses a request that may wait 1 s, with Retry-After: 5."""
    clock = FakeClock()
    free = limiter([], max_wait=1, clock=clock)
    await free.pause(5)
    with pytest.raises(RateLimited) as info:
        await at_once(answered(free))
    assert info.value.retry_after == 5
    await clock.advance(5.01)
    await at_once(answered(free))


async def test_pause_never_shortens_and_is_capped() -> None:
    """A shorter pause does not cut a longer one short, and no pause lasts beyond
    MAX_UPSTREAM_PAUSE."""
    clock = FakeClock()
    free = limiter([], max_wait=0, clock=clock)
    await free.pause(20)
    await free.pause(1)
    with pytest.raises(RateLimited) as info:
        await answered(free)
    assert info.value.retry_after == 20
    await free.pause(1e9)
    with pytest.raises(RateLimited) as info:
        await answered(free)
    assert info.value.retry_after == MAX_UPSTREAM_PAUSE
    await clock.advance(MAX_UPSTREAM_PAUSE + 0.01)
    await answered(free)


# --- RateLimits --------------------------------------------------------------------------------


async def test_rate_limits_keep_credentials_and_clients_apart() -> None:
    """Each credential and each client counts on its own, even a client named like a
    credential; a credential full for one client is full for every client. Each refusal says
    which limit refused."""
    limits = rate_limits(
        credentials={"x": (["1/second"], 0), "y": (["1/second"], 0), "z-none": ([], 0)},
        clients={"x": (["1/second"], 0), "free": ([], 0)},
    )
    await limits.acquire(credential="x", client="free")
    await limits.acquire(credential="y", client="x")
    with pytest.raises(RateLimited) as info:
        await limits.acquire(credential="x", client="-")
    assert info.value.limit == "credential"
    with pytest.raises(RateLimited) as info:
        await limits.acquire(credential="z-none", client="x")
    assert info.value.limit == "client"


async def test_rate_limits_client_limit_applies_to_that_client_only() -> None:
    """A client with 2/second gets its third request refused, while another client goes on."""
    limits = rate_limits(
        credentials={"c": ([], 5)},
        clients={"small": (["2/second"], 0), "big": ([], 0)},
    )
    for _ in range(2):
        await limits.acquire(credential="c", client="small")
    with pytest.raises(RateLimited):
        await limits.acquire(credential="c", client="small")
    for _ in range(10):
        await limits.acquire(credential="c", client="big")


async def test_upstream_slow_down_pauses_that_credential_only() -> None:
    """An upstream Retry-After of 2 pauses its credential (even one without rates) for 2 s,
    and leaves the other credential alone."""
    clock = FakeClock()
    limits = rate_limits(credentials={"a": ([], 0), "b": ([], 0)}, clients={}, clock=clock)
    assert await limits.upstream_said_slow_down("a", "2") == 2.0
    with pytest.raises(RateLimited) as info:
        await limits.acquire(credential="a", client="-")
    assert info.value.retry_after == 2
    await limits.acquire(credential="b", client="-")
    await clock.advance(2.01)
    await limits.acquire(credential="a", client="-")


async def test_upstream_slow_down_without_a_usable_retry_after_pauses_nothing() -> None:
    """A 429 without Retry-After, or with one that is not understood, pauses nothing."""
    limits = rate_limits(credentials={"a": ([], 0)}, clients={})
    assert await limits.upstream_said_slow_down("a", None) is None
    assert await limits.upstream_said_slow_down("a", "in a while") is None
    await limits.acquire(credential="a", client="-")


# --- parse_retry_after -------------------------------------------------------------------------


def test_parse_retry_after_delay_seconds() -> None:
    """Delay-seconds are read as seconds, surrounding blanks ignored."""
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after("0") == 0.0


def test_parse_retry_after_http_date() -> None:
    """An HTTP-date gives the seconds until then, and 0 for a date already past."""
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    seconds = parse_retry_after(soon)
    assert seconds is not None
    assert 28 <= seconds <= 31
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


@pytest.mark.parametrize("value", ["", "soon", "-1", "1.5", "1e3", "+1", "0x10"])
def test_parse_retry_after_refuses_what_is_neither(value: str) -> None:
    """A value that is neither delay-seconds nor an HTTP-date gives None."""
    assert parse_retry_after(value) is None


@pytest.mark.parametrize(
    "value",
    ["\u00b2", "\u00b9\u00b2", "\u0661"],
    ids=["superscript-two", "superscript-twelve", "arabic-indic-one"],
)
def test_parse_retry_after_accepts_ascii_digits_only(value: str) -> None:
    """Non-ASCII digits (superscripts, Arabic-Indic) are not delay-seconds (RFC 9110 uses
    DIGIT, i.e. 0-9) and give None rather than an exception or a number."""
    assert parse_retry_after(value) is None


# --- Configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", ["20/fortnight", "twenty/second", "20", "", "20 per"])
def test_credential_rate_limit_syntax_is_checked(rate: str) -> None:
    """A credential rate limit that `limits` cannot parse is refused with an example."""
    with pytest.raises(ValidationError, match="100/second"):
        credential(token_url=LOOPBACK_TOKEN_URL, rate_limit=[rate])


def test_client_rate_limit_syntax_is_checked() -> None:
    """A team client's rate limit is checked the same way."""
    with pytest.raises(ValidationError, match="100/second"):
        settings(
            {"c": {"token_url": LOOPBACK_TOKEN_URL}},
            routes=[{"prefix": "/", "upstream": "http://127.0.0.1:9", "credential": "c"}],
            clients=[{"name": "tool", "key": "tool-key-0123456789abc", "rate_limit": ["x/y"]}],
        )


def test_negative_max_wait_is_refused() -> None:
    """rate_limit_max_wait must not be negative, for credentials and clients."""
    with pytest.raises(ValidationError, match="rate_limit_max_wait"):
        credential(token_url=LOOPBACK_TOKEN_URL, rate_limit_max_wait=-1)
    with pytest.raises(ValidationError, match="rate_limit_max_wait"):
        settings(
            {"c": {"token_url": LOOPBACK_TOKEN_URL}},
            routes=[{"prefix": "/", "upstream": "http://127.0.0.1:9", "credential": "c"}],
            clients=[{"name": "t", "key": "tool-key-0123456789abc", "rate_limit_max_wait": -1}],
        )


def test_bad_rate_limit_in_toml_names_the_setting(tmp_path: Path) -> None:
    """In a config file, a bad rate limit is a ConfigError naming credentials.NAME.rate_limit."""
    message = config_error(
        tmp_path,
        f"""
[credentials.api]
token_url = "{LOOPBACK_TOKEN_URL}"
client_id = "id"
client_secret = "{SECRET}"
rate_limit = ["10/sec0nd"]

[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:9"
credential = "api"
""",
    )
    assert "credentials.api.rate_limit" in message
    assert "10/sec0nd" in message
    assert SECRET not in message


def test_default_credential_limits() -> None:
    """rate_limit_max_wait defaults to 5 s; a non-Battle.net credential has no limits."""
    plain = credential(token_url=LOOPBACK_TOKEN_URL)
    assert plain.rate_limit_max_wait == 5.0
    assert not plain.is_battlenet
    assert plain.rate_limits == ()


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"region": "eu"},
        {"token_url": BATTLENET_TOKEN_URL},
        {"region": "cn"},
        {"token_url": CN_TOKEN_URL},
    ],
)
def test_battlenet_gets_its_published_quota_by_default(values: dict[str, Any]) -> None:
    """A credential whose token_url is a Battle.net host gets 100/second and 36000/hour."""
    bnet = credential(**values)
    assert bnet.is_battlenet
    assert bnet.rate_limits == BATTLENET_QUOTA


@pytest.mark.parametrize(
    "token_url",
    [
        "https://auth.example.com/oauth/token",
        "https://oauth.battle.net.example.com/token",
        "https://example.com/oauth.battle.net/token",
        LOOPBACK_TOKEN_URL,
    ],
)
def test_no_default_quota_for_other_hosts(token_url: str) -> None:
    """A token_url on any other host, even one that merely mentions battle.net, has no limits."""
    other = credential(token_url=token_url)
    assert not other.is_battlenet
    assert other.rate_limits == ()


def test_explicit_rate_limit_replaces_or_disables_the_quota() -> None:
    """rate_limit = [...] replaces Battle.net's quota and rate_limit = [] disables it."""
    assert credential(rate_limit=["5/second"]).rate_limits == ("5/second",)
    assert credential(rate_limit=[]).rate_limits == ()
    assert credential(token_url=LOOPBACK_TOKEN_URL, rate_limit=["2/minute"]).rate_limits == (
        "2/minute",
    )


def test_shorthand_battlenet_credential_has_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    """The single-API shorthand for Battle.net (environment only) is limited to the quota."""
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_ID", "env-id")
    monkeypatch.setenv("TOKEN_PROXY_CLIENT_SECRET", SECRET)
    assert load_settings().credentials["default"].rate_limits == BATTLENET_QUOTA
    monkeypatch.setenv("TOKEN_PROXY_TOKEN_URL", LOOPBACK_TOKEN_URL)
    monkeypatch.setenv("TOKEN_PROXY_UPSTREAM", "http://127.0.0.1:9")
    assert load_settings().credentials["default"].rate_limits == ()


def test_region_routes_expand_to_one_route_per_region() -> None:
    """region_routes = us, eu, kr, tw adds /us/ /eu/ /kr/ /tw/ to each region's API host,
    next to the routes written out."""
    built = settings(
        {"bnet": {"region_routes": ["us", "eu", "kr", "tw"]}},
        routes=[{"prefix": "/other/", "upstream": "http://127.0.0.1:9", "credential": "bnet"}],
    )
    assert routes_of(built) == {
        "/other/": ("http://127.0.0.1:9", "bnet"),
        "/us/": ("https://us.api.blizzard.com", "bnet"),
        "/eu/": ("https://eu.api.blizzard.com", "bnet"),
        "/kr/": ("https://kr.api.blizzard.com", "bnet"),
        "/tw/": ("https://tw.api.blizzard.com", "bnet"),
    }
    assert built.credentials["bnet"].rate_limits == BATTLENET_QUOTA


def test_region_routes_alone_are_enough_routes() -> None:
    """A credential with region_routes needs no [[routes]] table."""
    built = settings({"bnet": {"region_routes": ["eu"]}})
    assert routes_of(built) == {"/eu/": ("https://eu.api.blizzard.com", "bnet")}


def test_region_routes_for_china_alone() -> None:
    """region = cn with region_routes = cn routes /cn/ to China's gateway with China's token URL."""
    built = settings({"china": {"region": "cn", "region_routes": ["cn"]}})
    assert routes_of(built) == {"/cn/": ("https://gateway.battlenet.com.cn", "china")}
    assert built.credentials["china"].token_url == CN_TOKEN_URL


@pytest.mark.parametrize(
    "table",
    [
        {"region_routes": ["us", "cn"]},
        {"region": "cn", "region_routes": ["cn", "eu"]},
        {"region_routes": ["cn"]},
        {"token_url": LOOPBACK_TOKEN_URL, "region_routes": ["us"]},
    ],
)
def test_region_routes_that_need_another_token_url_are_refused(table: dict[str, Any]) -> None:
    """China mixed with the other regions (or any region whose token URL differs from the
    credential's) is refused with a hint to give it a credential of its own."""
    with pytest.raises(ValidationError, match="credential of their own"):
        settings({"bnet": table})


def test_region_routes_mixing_china_in_toml_is_a_config_error(tmp_path: Path) -> None:
    """In a config file, mixing cn with us is a ConfigError that names the regions."""
    message = config_error(
        tmp_path,
        f"""
[credentials.bnet]
client_id = "id"
client_secret = "{SECRET}"
region_routes = ["us", "cn"]
""",
    )
    assert "region_routes" in message
    assert "cn" in message
    assert SECRET not in message


def test_unknown_region_in_region_routes_is_refused() -> None:
    """A region that Battle.net does not have is refused."""
    with pytest.raises(ValidationError, match="region_routes"):
        settings({"bnet": {"region_routes": ["us", "mars"]}})


def test_region_routes_clashing_with_a_route_are_refused() -> None:
    """A region route whose prefix a [[routes]] entry already uses is refused."""
    with pytest.raises(ValidationError, match="more than one route"):
        settings(
            {"bnet": {"region_routes": ["us"]}},
            routes=[{"prefix": "/us/", "upstream": "http://127.0.0.1:9", "credential": "bnet"}],
        )


async def test_pending_requests_hold_their_slot_until_answered() -> None:
    """A request let through but not yet answered upstream holds its slot: under 2/second a
    third request waits for an answer, however long connecting takes."""
    clock = FakeClock()
    two = limiter(["2/second"], max_wait=3, clock=clock)
    first = await two.acquire()
    second = await two.acquire()
    third = asyncio.create_task(two.acquire())
    await clock.advance(0.9)
    assert not third.done()
    await first()
    await second()
    await clock.advance(0.9)  # both are counted when they answered, not when they went
    assert not third.done()
    await clock.advance(0.11)
    assert third.done()
    settle = await third
    await settle()


async def test_upstream_arrivals_never_exceed_the_limit_when_connecting_is_slow() -> None:
    """Arrivals upstream stay within 20 in any second even when the first requests take
    longer to get there than the later ones (new connections, then pooled ones)."""
    # Real time: what is measured is where the arrivals fall, not how long anything took.
    twenty = RateLimiter(
        kind="credential",
        name="credential 'c'",
        key="credential:c",
        rates=["20/second"],
        max_wait=10,
        counters=MemoryCounters(clock=SYSTEM_CLOCK),
        hold=HOLD,
    )
    arrivals: list[float] = []

    async def one(n: int) -> None:
        settle = await twenty.acquire()
        await asyncio.sleep(0.06 if n < 20 else 0.0005)  # connecting, then pooled
        arrivals.append(time.monotonic())
        await asyncio.sleep(0.002)  # upstream answers
        await settle()

    await asyncio.gather(*(one(n) for n in range(60)))
    arrivals.sort()
    most = max(bisect.bisect_left(arrivals, t + 1.0) - i for i, t in enumerate(arrivals))
    assert most <= 20
