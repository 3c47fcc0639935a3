"""The logging set-up: JSON off a terminal, console on one, and redaction of secrets."""

from __future__ import annotations

import asyncio
import copy
import datetime
import gc
import io
import json
import logging
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from aiohttp.http_exceptions import LineTooLong

import proxy.log as proxy_log
from proxy.log import (
    REDACTED,
    LineWriter,
    Redactor,
    _process_context,
    bind_process,
    bind_request,
    bind_request_more,
    configure_logging,
    flush_logs,
    get_logger,
    log_info_fast,
    redactor,
    set_logging,
    unbind_request,
)
from tests.conftest import FakeTokenServer, ProxyFactory, configure_test_logging


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(level="debug", fmt="auto", stream=stream, cache=False)
    yield stream
    configure_test_logging()


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_sensitive_keys_are_redacted() -> None:
    """Values under keys named like a secret, token, authorization, password or key are hidden."""
    processor = Redactor()
    event = processor(
        None,
        "info",
        {
            "event": "x",
            "client_secret": "abc",
            "access_token": "def",
            "Authorization": "Bearer ghi",
            "password": "jkl",
            "api_key": "mno",
            "headers": {"authorization": "Basic pqr", "accept": "*/*"},
            "token_url": "https://oauth.battle.net/token",
            "keyboard": "stays",
        },
    )
    for key in ("client_secret", "access_token", "Authorization", "password", "api_key"):
        assert event[key] == REDACTED
    assert event["headers"] == {"authorization": REDACTED, "accept": "*/*"}
    assert event["token_url"] == "https://oauth.battle.net/token"
    assert event["keyboard"] == "stays"


def test_live_values_are_scrubbed_anywhere() -> None:
    """A registered secret or token is replaced wherever it appears, inside any string."""
    processor = Redactor()
    processor.add_secret("my-very-secret")
    processor.add_token("tok-1234567890")
    event = processor(
        None,
        "info",
        {
            "event": "failed with my-very-secret in the message",
            "detail": ["nested tok-1234567890 value", {"deeper": b"my-very-secret"}],
        },
    )
    text = json.dumps(event)
    assert "my-very-secret" not in text
    assert "tok-1234567890" not in text
    assert text.count(REDACTED) == 3


def test_values_written_escaped_are_scrubbed_too() -> None:
    """A secret with a quote or a backslash is hidden also where repr() escaped it, within
    either quote (a KeyError's message, a task's exception in the loop's report)."""
    processor = Redactor()
    secret = "it's\\a secret"
    processor.add_secret(secret)
    for shown in (repr(KeyError(secret)), repr(KeyError(f'"{secret}"'))):
        assert "\\\\" in shown
        assert processor.scrub(shown).count(REDACTED) == 1, shown


def test_short_values_are_not_scrubbed() -> None:
    """A value too short to be a real secret is not used to shred ordinary words."""
    processor = Redactor()
    processor.add_secret("abc")
    assert processor.scrub("abc def") == "abc def"


def test_json_when_not_a_terminal(log_output: io.StringIO) -> None:
    """Off a terminal each line is one JSON object with level, logger and timestamp."""
    get_logger("proxy.test").info("hello", answer=42)
    (line,) = _lines(log_output)
    assert line["event"] == "hello"
    assert line["answer"] == 42
    assert line["level"] == "info"
    assert line["logger"] == "proxy.test"
    assert "timestamp" in line


def test_console_on_a_terminal() -> None:
    """On a terminal the lines are for people, not JSON."""
    stream = _Terminal()
    try:
        configure_logging(level="info", fmt="auto", stream=stream, cache=False)
        get_logger("proxy.test").info("hello", answer=42)
    finally:
        configure_test_logging()
    text = stream.getvalue()
    assert "hello" in text
    assert "answer" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_level_filters(log_output: io.StringIO) -> None:
    """Lines below the configured level are dropped."""
    configure_logging(level="warning", fmt="json", stream=log_output, cache=False)
    get_logger("proxy.test").info("quiet")
    get_logger("proxy.test").warning("loud")
    assert [line["event"] for line in _lines(log_output)] == ["loud"]


def test_stdlib_loggers_are_redacted_with_tracebacks(log_output: io.StringIO) -> None:
    """aiohttp's loggers go through the same chain: a secret in a traceback is scrubbed."""
    redactor.add_secret("stdlib-secret-value")
    try:
        raise RuntimeError("boom stdlib-secret-value")
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    (line,) = _lines(log_output)
    assert line["logger"] == "aiohttp.server"
    assert "RuntimeError" in str(line["exception"])
    assert "stdlib-secret-value" not in log_output.getvalue()


def test_structlog_exceptions_are_redacted(log_output: io.StringIO) -> None:
    """A traceback logged through structlog is scrubbed of live secrets too."""
    redactor.add_token("structlog-token-value")
    try:
        raise ValueError("structlog-token-value")
    except ValueError:
        get_logger("proxy.test").exception("failed")
    assert "structlog-token-value" not in log_output.getvalue()
    assert "ValueError" in log_output.getvalue()


def test_context_is_merged(log_output: io.StringIO) -> None:
    """Values bound in the context (the request id) appear on every line."""
    bound = bind_request(request_id="rid-1")
    bind_request_more(client="team-a")
    try:
        get_logger("proxy.test").info("inside")
        logging.getLogger("aiohttp.server").warning("stdlib inside")
    finally:
        unbind_request(bound)
    get_logger("proxy.test").info("outside")
    inside, stdlib_inside, outside = _lines(log_output)
    assert inside["request_id"] == stdlib_inside["request_id"] == "rid-1"
    assert inside["client"] == stdlib_inside["client"] == "team-a"
    assert "request_id" not in outside


def test_process_context_is_on_every_line(log_output: io.StringIO) -> None:
    """A worker's number, bound for the process, is on its lines, the access line included."""
    bind_process(worker=3)
    try:
        get_logger("proxy.test").info("slow path")
        log_info_fast("proxy.access", "request", {"status": 200})
    finally:
        _process_context.clear()
    slow, fast = _lines(log_output)[-2:]
    assert slow["worker"] == fast["worker"] == 3


def test_parser_rejections_are_one_quiet_line(log_output: io.StringIO) -> None:
    """A request aiohttp's parser rejects gives one info line without a traceback, so that a
    client cannot flood the log at error level."""
    try:
        raise LineTooLong("header", "8190", "9000")
    except LineTooLong:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "x")
    (line,) = _lines(log_output)
    assert line["level"] == "info"
    assert "exception" not in line
    assert "LineTooLong" in str(line["event"])


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_of_one_loop_iteration_leave_in_one_write() -> None:
    """Under load the access lines of many requests share one system call; none is held past
    the end of the loop iteration that logged it."""
    stream = _CountingStream()
    writer = LineWriter(stream)
    try:
        for number in range(100):
            writer.write(f"line {number}\n")
        assert stream.getvalue() == ""
        await asyncio.sleep(0)
        assert stream.getvalue().splitlines() == [f"line {number}" for number in range(100)]
        assert stream.writes == 1
        writer.write("later\n")
        await asyncio.sleep(0)
        assert stream.getvalue().endswith("line 99\nlater\n")
    finally:
        writer.close()


def test_lines_without_a_running_loop_are_written_at_once() -> None:
    stream = _CountingStream()
    writer = LineWriter(stream)
    writer.write("at startup\n")
    assert stream.getvalue() == "at startup\n"
    writer.close()


def test_structlog_and_stdlib_lines_keep_their_order(log_output: io.StringIO) -> None:
    """Our loggers and aiohttp's (stdlib) go through one writer, so their lines never swap."""

    async def both() -> None:
        get_logger("proxy.test").info("first")
        logging.getLogger("aiohttp.server").warning("second")
        get_logger("proxy.test").info("third")
        await asyncio.sleep(0)

    asyncio.run(both())
    events = [line["event"] for line in _lines(log_output)]
    assert [event for event in events if event in {"first", "second", "third"}] == [
        "first",
        "second",
        "third",
    ]


def test_fast_lines_match_the_structlog_chain(log_output: io.StringIO) -> None:
    """The access line's short path writes what get_logger(...).info(...) writes: the same keys
    in the same order, the bound context merged in, level and timestamp last."""
    log_output.truncate(0)
    log_output.seek(0)
    configure_logging(level="debug", fmt="json", stream=log_output, cache=False, buffered=False)
    fields = {"method": "GET", "status": 200, "duration_ms": 1.5, "replayed": False}
    bound = bind_request(request_id="abc123")
    try:
        log_info_fast("proxy.access", "request", dict(fields))
        get_logger("proxy.access").info("request", **fields)
    finally:
        unbind_request(bound)
    fast, slow = _lines(log_output)
    assert list(fast) == list(slow)
    assert {**fast, "timestamp": None} == {**slow, "timestamp": None}
    assert list(fast)[-3:] == ["request_id", "level", "timestamp"]


FAST_SECRET = 'fast-path-"secret"\\ü'
FAST_TOKEN = "fast-path-token-0123456789abcdef"
# The events the access line's fast path and structlog's chain must write alike: the access
# line itself, then what else a field could hold.
FAST_EVENTS: list[dict[str, Any]] = [
    {
        "method": "GET",
        "path": "/data/wow/token/index?namespace=dynamic-eu&access_token=[redacted]",
        "route": "/data",
        "client": "-",
        "status": 200,
        "duration_ms": 1.49,
        "upstream_ms": 0.55,
        "bytes_in": 0,
        "bytes_out": 44,
        "token_age_s": None,
        "replayed": False,
        "outcome": "complete",
        "upstream_url": None,
    },
    {},
    {"path": "/données/ü/😀/\u2028", "client": "équipe-Ω", "note": 'tab\tline\n"q" \\ \x00\x7f'},
    {"a": 1e-7, "b": 1e300, "c": -0.0, "d": 1 / 3, "e": 2.0, "f": 2**62, "g": -(2**63)},
    {"nan": float("nan"), "inf": float("inf"), "minus_inf": float("-inf")},
    {"yes": True, "no": False, "none": None, "empty": ""},
    {"headers": {"authorization": "Basic abc", "accept": "*/*", "deeper": {"api_key": "k"}}},
    {"items": [1, "x", None, {"token": "t", "n": 2.5}], "pair": (1, "two"), "one": frozenset({3})},
    {"raw": b"bytes \xff", "kind": ValueError("an error"), "status": 200},
    {"path": f"/p?x={FAST_SECRET}", "status": 401},
    {"upstream_url": f"https://eu.api.blizzard.com/?access_token={FAST_TOKEN}", "status": 200},
    {"authorization": "Bearer anything", "client_secret": None, "token_age_s": 3.5},
    {"detail": {"nested": [FAST_SECRET, f"x{FAST_TOKEN}y"]}},
]


class _FrozenDatetime(datetime.datetime):
    moment = 0.0

    @classmethod
    def now(cls, tz: datetime.tzinfo | None = None) -> _FrozenDatetime:
        frozen = datetime.datetime.fromtimestamp(cls.moment, tz)
        return cls.combine(frozen.date(), frozen.timetz())


@pytest.mark.parametrize("moment", [1_700_000_000.25, 1_700_000_000.0, 1_700_000_000.5])
@pytest.mark.parametrize("serializer", ["orjson", "json"])
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_fast_path_writes_what_structlog_writes(
    monkeypatch: pytest.MonkeyPatch, moment: float, serializer: str, fmt: str
) -> None:
    """log_info_fast writes, character for character, the line get_logger(...).info(...)
    writes through structlog's chain, for the access line and for anything else a field can
    hold: unicode, control characters, None, floats (also nan and inf), nested values, bytes
    and objects, sensitive keys, and live secrets and tokens (as is, JSON-escaped, nested),
    with the request's and the process's context merged, with orjson and without it, at a
    whole second and within one, and with plain=True (the access line's) wherever the fields
    are plain. In console mode both go through the chain."""
    if serializer == "json":
        monkeypatch.setattr(proxy_log, "_dumps", proxy_log._json_dumps)
    monkeypatch.setattr(proxy_log, "time", SimpleNamespace(time=lambda: moment))
    monkeypatch.setattr(_FrozenDatetime, "moment", moment)
    clock = SimpleNamespace(datetime=_FrozenDatetime, timezone=datetime.timezone)
    monkeypatch.setattr(structlog.processors, "datetime", clock)
    stream = io.StringIO()
    configure_logging(level="debug", fmt=fmt, stream=stream, cache=False, buffered=False)
    expected = proxy_log._FastLines if fmt == "json" else proxy_log._ChainLines
    assert type(proxy_log._lines) is expected
    redactor.add_secret(FAST_SECRET)
    redactor.add_token(FAST_TOKEN)
    bind_process(worker=2)
    try:
        for fields in FAST_EVENTS:
            for request_id in ("rid-ü-1", f"rid-{FAST_SECRET}"):
                bound = bind_request(request_id=request_id, client="team")
                try:
                    start = stream.tell()
                    log_info_fast("proxy.access", "request", copy.deepcopy(fields))
                    fast = stream.getvalue()[start:]
                    start = stream.tell()
                    get_logger("proxy.access").info("request", **copy.deepcopy(fields))
                    slow = stream.getvalue()[start:]
                    # The access line's way, for the lines the walk would leave alone.
                    vouched = fast
                    if not redactor.needs_walk(dict(fields)):
                        start = stream.tell()
                        log_info_fast("proxy.access", "request", dict(fields), plain=True)
                        vouched = stream.getvalue()[start:]
                finally:
                    unbind_request(bound)
                assert fast == slow, fields
                assert vouched == slow, fields
                assert fast.count("\n") == 1
                assert FAST_SECRET not in fast
                assert FAST_TOKEN not in fast
    finally:
        _process_context.clear()
        configure_test_logging()


@pytest.mark.parametrize(
    "secret", ["plain-secret-value", 'quote"and\\backslash-secret', "ünïcode-sécret"]
)
def test_fast_lines_redact_secrets_in_any_field(log_output: io.StringIO, secret: str) -> None:
    """A live secret in a field or in the bound context is hidden on the short path too, also
    when JSON escaping changes how it is written."""
    configure_logging(level="debug", fmt="json", stream=log_output, cache=False, buffered=False)
    redactor.add_secret(secret)
    bound = bind_request(request_id=f"id-{secret}")
    try:
        log_info_fast("proxy.access", "request", {"method": f"X{secret}Y", "status": 200})
    finally:
        unbind_request(bound)
    log_info_fast("proxy.access", "request", {"token": "anything", "status": 200})
    text = log_output.getvalue()
    assert secret not in text
    assert json.dumps(secret)[1:-1] not in text
    first, second = _lines(log_output)[-2:]
    assert first["method"] == f"X{REDACTED}Y"
    assert first["request_id"] == f"id-{REDACTED}"
    assert second["token"] == REDACTED


def test_fast_lines_respect_the_log_level(log_output: io.StringIO) -> None:
    configure_logging(level="warning", fmt="json", stream=log_output, cache=False, buffered=False)
    log_info_fast("proxy.access", "request", {"status": 200})
    assert log_output.getvalue() == ""


def test_a_task_started_in_a_request_keeps_the_fields_it_saw(log_output: io.StringIO) -> None:
    """Fields added to a request later (its team client) do not reach into tasks it started
    before, whose context is a copy of the request's."""

    async def scenario() -> None:
        bound = bind_request(request_id="rid-7", client="-")
        try:
            early = asyncio.get_running_loop().create_future()
            started = asyncio.create_task(_log_after(early))
            bind_request_more(client="team-b")
            get_logger("proxy.test").info("request")
            early.set_result(None)
            await started
        finally:
            unbind_request(bound)

    asyncio.run(scenario())
    request, task = _lines(log_output)[-2:]
    assert request["client"] == "team-b"
    assert task["client"] == "-"
    assert task["request_id"] == "rid-7"


async def _log_after(event: asyncio.Future[None]) -> None:
    await event
    get_logger("proxy.test").info("task")


# --- a chained cause leaks nothing ----------------------------------------------------------------

# Secrets as a user may choose them: plain, and with what repr() and JSON escape (a traceback
# shows a KeyError's message, and a task's exception, through repr()).
CHAIN_SECRETS = [
    ("Chain-Secret-Value-0a1b2c3d", "chain-team-key-4e5f6a7b8c9d"),
    ('Ch"ain\\S3cret-ünï-0a1b', "chain-team-key-'quoted'-4e5f"),
]


def _shown_forms(value: str) -> set[str]:
    """The ways a traceback or a JSON line can write `value`: as is, as repr() writes it within
    either quote, and each of those JSON-escaped."""
    plain = {value, repr(value)[1:-1], repr(value + "'\"")[1:-4]}
    return plain | {json.dumps(form)[1:-1] for form in plain}


def _chained_failure(secret: str, token: str, key: str) -> RuntimeError:
    """A plain error raised from a cause whose message, notes, own cause and that cause's
    context (an exception group) hold the client secret, a token and a team key."""
    try:
        try:
            try:
                raise ExceptionGroup(
                    "token fetches failed",
                    [ValueError(f"client_secret={secret!r}"), TimeoutError(f"token {token}")],
                )
            except ExceptionGroup:
                raise ConnectionError(f"Authorization: Bearer {token}; key={key!r}") from None
        except ConnectionError as connection:
            connection.__suppress_context__ = False
            cause = KeyError(f"{secret} {token} {key}")
            cause.add_note(f"the team key was {key}")
            raise cause from connection
    except KeyError as exc:
        try:
            raise RuntimeError("the upstream exchange failed") from exc
        except RuntimeError as failure:
            return failure


def _log_everywhere(failure: RuntimeError) -> None:
    """The failure logged in every way the proxy and its libraries log one."""
    try:
        raise failure
    except RuntimeError:
        get_logger("proxy.test").exception("failed")
        logging.getLogger("aiohttp.server").exception("Error handling request")
    get_logger("proxy.test").error("failed", exc_info=failure)
    logging.getLogger("aiohttp.web").error("failed", exc_info=failure)


def _task_exception_never_retrieved(
    failure: RuntimeError, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    """What the loop's default exception handler prints for a task that failed unawaited."""

    async def fail() -> None:
        raise failure

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(fail())
        await asyncio.wait({task})
        del task  # its exception never retrieved: the loop reports it when it is collected
        gc.collect()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def _loop_factories() -> list[Callable[[], asyncio.AbstractEventLoop]]:
    factories: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]
    try:
        import uvloop  # noqa: PLC0415  (optional: the `speed` extra)
    except ImportError:  # pragma: no cover - depends on the installation
        return factories
    return [*factories, uvloop.new_event_loop]


@pytest.mark.parametrize(("secret", "key"), CHAIN_SECRETS, ids=["plain", "escaped"])
@pytest.mark.parametrize("fmt", ["json", "console", "terminal"])
async def test_a_chained_cause_leaks_nothing(
    start_proxy: ProxyFactory,
    token_server: FakeTokenServer,
    secret: str,
    key: str,
    fmt: str,
) -> None:
    """An error raised from a cause that holds the client secret, a live token and a team key
    (in its message, its notes, its own cause and that one's context) shows none of them when
    logged through the configured chain: JSON and console, structlog's loggers and the
    standard library's, and the loop's report of a task exception never retrieved (on
    asyncio's loop and uvloop's). The proxy registered the secret, key and token itself."""
    client = await start_proxy(client_secret=secret, clients=[{"name": "team", "key": key}])
    async with client.get("/x", headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status == 200
    token = token_server.issued[-1]
    failure = _chained_failure(secret, token, key)
    stream = _Terminal() if fmt == "terminal" else io.StringIO()
    try:
        configure_logging(
            level="debug", fmt="auto" if fmt == "terminal" else fmt, stream=stream, cache=False
        )
        _log_everywhere(failure)
        for factory in _loop_factories():
            await asyncio.to_thread(_task_exception_never_retrieved, failure, factory)
        flush_logs()
    finally:
        configure_test_logging()
    text = stream.getvalue()
    for name in ("RuntimeError", "KeyError", "ConnectionError", "ExceptionGroup", "TimeoutError"):
        assert text.count(name) >= 6, (name, text)
    assert text.count("Task exception was never retrieved") == len(_loop_factories())
    assert REDACTED in text
    for value in (secret, token, key):
        shown = [form for form in _shown_forms(value) if form in text]
        assert not shown, (shown, text)


def test_log_level_and_format_change_for_loggers_already_in_use() -> None:
    """structlog caches a logger on first use; set_logging still changes what it writes."""
    stream = io.StringIO()
    configure_logging(level="info", fmt="json", stream=stream, cache=True, buffered=False)
    try:
        logger = get_logger("tests.live-level")
        logger.debug("hidden")
        logger.info("shown")
        set_logging(level="debug", fmt="json")
        logger.debug("now shown")
        set_logging(level="warning", fmt="console")
        logger.info("hidden again")
        logger.warning("as console")
    finally:
        configure_test_logging()
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines[:2]] == ["shown", "now shown"]
    assert len(lines) == 3
    assert "as console" in lines[2]
    assert not lines[2].startswith("{")
