"""The dashboard as a real process, and a real browser to drive it.

:class:`WebServer` runs ``celery -A celery_app.worker msg web`` with a test stack's environment
(as :class:`celery_helpers.Worker` does) in its own process group, waits until it answers HTTP
and is always killed at teardown. :func:`launch_chromium` starts Debian's headless chromium
through Playwright (Playwright cannot download its own browser here); a missing browser fails
the test and says how to install it, it is never skipped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from celery_helpers import INTEGRATION_DIR, REPO_ROOT, Stack

from celery_msg.servers import free_port

CELERY = Path(sys.executable).with_name("celery")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Where the tests save the screenshots README.md shows.
DOCS = REPO_ROOT / "docs"


class WebServer:
    """``celery -A celery_app.worker msg web`` for one stack; killed (its group) at close."""

    def __init__(
        self,
        stack: Stack,
        log_path: Path,
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        address: str = "127.0.0.1",
    ) -> None:
        self.port = free_port()
        self.address = address
        self.log_path = log_path
        pythonpath = [str(REPO_ROOT), str(INTEGRATION_DIR)]
        if os.environ.get("PYTHONPATH"):
            pythonpath.append(os.environ["PYTHONPATH"])
        self.env = {
            **os.environ,
            **stack.environ,
            **(env or {}),
            "PYTHONPATH": os.pathsep.join(pythonpath),
            "PYTHONUNBUFFERED": "1",
        }
        self.argv = [
            str(CELERY), "-A", "celery_app.worker", "msg", "web",
            "--port", str(self.port), "--address", address, *args,
        ]  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None, "the dashboard was not started"
        return self._proc

    def spawn(self) -> Self:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def start(self, timeout: float = 30.0) -> Self:
        """Start and wait until it answers HTTP (any status: 401 counts as up)."""
        self.spawn()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the dashboard exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/static/style.css", timeout=2):
                    return self
            except urllib.error.HTTPError:
                return self
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise AssertionError(f"the dashboard did not answer in {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(10)


def launch_chromium(playwright: Any) -> Any:
    """Debian's chromium, headless, through Playwright; fails (never skips) without it."""
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: the browser tests need Debian's chromium "
        "(`make .venv/.installed` installs it, or `apt-get install -y chromium`)"
    )
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )
