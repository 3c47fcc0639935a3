"""token-proxy processes that tests start: what each logged (JSON lines in a file), and how a
test's fixtures stop them and hand their logs to the leak check."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import LEAKS


@dataclass
class LoggedProcess:
    """A proxy process (or a supervisor and its workers), logging JSON lines to one file."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stop(self, *, timeout: float, what: str = "proxy process") -> None:
        """SIGTERM (so that it cleans up), SIGKILL after `timeout`; its log goes to the leak
        check as `what`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        LEAKS.add(f"the log of {what} {self.process.pid}", self.log_path.read_text())
