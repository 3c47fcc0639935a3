"""The suite's leak check names the test during which a secret or token leaked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LEAKING_TESTS = """
from proxy.log import get_logger
from tests.conftest import LEAKS, TEST_SECRET


def test_clean_before():
    get_logger("proxy.test").info("nothing to hide")


def test_logs_the_secret():
    get_logger("proxy.test").info("oops", value=TEST_SECRET)


def test_answers_a_token():
    LEAKS.tokens.add("tok-leaked-0123456789abcdef")
    LEAKS.add("the response to GET /x", "body tok-leaked-0123456789abcdef")


def test_clean_after():
    get_logger("proxy.test").info("nothing to hide either")
"""


def _run_pytest(directory: Path) -> str:
    """Run pytest on `directory`, with this suite's conftest as its plugin; its report."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-rA"],
        cwd=directory,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    return result.stdout


def test_the_leak_check_names_the_test_that_leaked(tmp_path: Path) -> None:
    """A secret logged in one test and a token answered in another fail those two tests, at
    their teardown, each naming itself and where the leak was seen; the tests around them
    pass, and the end of the session reports nothing twice."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (tmp_path / "test_leaky.py").write_text(LEAKING_TESTS)
    output = _run_pytest(tmp_path)
    assert "4 passed, 2 errors" in output, output  # each test's call passed; two teardowns not
    errors = {line for line in output.splitlines() if line.startswith("ERROR test_leaky.py::")}
    assert {line.split(" ")[1] for line in errors} == {
        "test_leaky.py::test_logs_the_secret",
        "test_leaky.py::test_answers_a_token",
    }
    assert (
        "test_leaky.py::test_logs_the_secret leaked secrets or tokens: "
        "['the test secret in the in-process logs, during test_leaky.py::test_logs_the_secret']"
    ) in output, output
    assert (
        "test_leaky.py::test_answers_a_token leaked secrets or tokens: "
        "['token tok-le… in the response to GET /x, during test_leaky.py::test_answers_a_token']"
    ) in output, output
    assert "secrets or tokens leaked:" not in output  # the session's check: nothing twice


LATE_TOKEN_TESTS = """
from tests.conftest import LEAKS


def test_answers_a_token_not_known_yet():
    LEAKS.add("the response to GET /early", "body tok-issued-later-0123456789")


def test_learns_the_token():
    LEAKS.tokens.add("tok-issued-later-0123456789")
"""


def test_the_session_check_names_the_test_too(tmp_path: Path) -> None:
    """A token captured before the suite knew it was one passes its own test's check; the
    session's check at the end finds it and names the test during which it was captured."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (tmp_path / "test_late.py").write_text(LATE_TOKEN_TESTS)
    output = _run_pytest(tmp_path)
    assert "2 passed, 1 error" in output, output
    assert (
        "secrets or tokens leaked: ['token tok-is… in the response to GET /early, "
        "during test_late.py::test_answers_a_token_not_known_yet']"
    ) in output, output
