"""The dashboard as a real process, and a real browser to drive it.

:class:`WebServer` runs ``celery -A celery_app.worker msg web`` with a test stack's environment
(as :class:`celery_helpers.Worker` does) in its own process group, waits until it answers HTTP
and is always killed at teardown. :func:`launch_chromium` starts Debian's headless chromium
through Playwright (Playwright cannot download its own browser here); a missing browser fails
the test and says how to install it, it is never skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from celery_helpers import REPO_ROOT, Stack, Worker, wait_until

from celery_msg.testing import free_port

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
#: Where the tests save the screenshots README.md shows, when asked to
#: (``CELERY_MSG_SCREENSHOTS=1 make test``); otherwise into the test's temporary folder, so that
#: a test run does not rewrite tracked files.
DOCS = REPO_ROOT / "docs"


def screenshot_dir(tmp_path: Path) -> Path:
    if os.environ.get("CELERY_MSG_SCREENSHOTS"):
        DOCS.mkdir(exist_ok=True)
        return DOCS
    return tmp_path


class WebServer(Worker):
    """``celery -A celery_app.worker msg web`` for one stack: started, logged and killed (its
    process group) as a :class:`Worker` is, ready once it answers HTTP."""

    def __init__(
        self,
        stack: Stack,
        log_path: Path,
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        address: str = "127.0.0.1",
    ) -> None:
        super().__init__({**stack.environ, **(env or {})}, log_path, name="web")
        self.port = free_port()
        self.argv = [
            str(CELERY), "-A", "celery_app.worker", "msg", "web",
            "--port", str(self.port), "--address", address, *args,
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Self:
        """Start and wait until it answers HTTP (any status: 401 counts as up)."""
        self.spawn()

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the dashboard exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/static/style.css", timeout=2):
                    return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False

        wait_until(answers, timeout, f"the dashboard to answer; log:\n{self.log()}", 0.1)
        return self

    def run(
        self, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the command to its end (for a start that must fail); stdout and stderr."""
        environ = {**self.process_environ(), **(env or {})}
        return subprocess.run(
            [*self.argv, *extra], env=environ, cwd=self.cwd, capture_output=True, text=True,
            timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def launch_chromium(playwright: Any) -> Any:
    """Debian's chromium, headless, through Playwright; fails (never skips) without it."""
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: the browser tests need Debian's chromium "
        "(`make .venv/.installed` installs it, or `apt-get install -y chromium`)"
    )
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )
