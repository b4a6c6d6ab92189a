"""The demo's child processes: the Flask example's web server and its Celery workers.

Each is started in its own session (process group) and killed with the whole group, so that a
worker's pool processes never outlive the demo, whatever way it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: The Flask example, next to this demo in a clone of the repository (``make demo`` runs there).
FLASK_APP = Path(__file__).resolve().parent.parent / "flask_app"
QUEUES = ("emails", "reports", "webhooks", "default", "cache")


class DemoError(RuntimeError):
    """The demo cannot go on (a process died, the example is missing, a timeout)."""


class Child:
    """One child process in its own process group, with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.log = Path(tempfile.mkstemp(prefix=f"celery-msg-demo-{name}-", suffix=".log")[1])
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=FLASK_APP,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (a worker's pool processes included)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        self.kill()
        self.log.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def web_server(env: dict[str, str], port: int) -> Child:
    cmd = [sys.executable, "-m", "flask", "--app", "shop", "run", "--port", str(port)]
    return Child("web", cmd, env)


def worker(name: str, env: dict[str, str]) -> Child:
    cmd = [
        sys.executable, "-m", "celery", "-A", "make_celery", "worker",
        "-P", "prefork", "-c", "2", "-Q", ",".join(QUEUES), "-n", f"{name}@%h",
        "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "info",
    ]  # fmt: skip
    return Child(name, cmd, env)


class Shop:
    """The Flask example's HTTP API, as a client would call it."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.call("POST", path, body or {})

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def wait_up(self, server: Child, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not server.alive():
                raise DemoError(f"the web server exited:\n{server.tail()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, OSError):
                self.get("/queues")
                return
            time.sleep(0.1)
        raise DemoError(f"the web server did not answer in {timeout:.0f}s:\n{server.tail()}")
