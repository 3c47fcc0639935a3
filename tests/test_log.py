"""The logging set-up: JSON off a terminal, console on one, and redaction of secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from aiohttp.http_exceptions import LineTooLong

from proxy.log import (
    REDACTED,
    LineWriter,
    Redactor,
    _process_context,
    bind_process,
    bind_request,
    bind_request_more,
    configure_logging,
    get_logger,
    log_info_fast,
    redactor,
    set_logging,
    unbind_request,
)
from tests.conftest import configure_test_logging


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
