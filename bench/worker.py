"""Real ``celery worker`` subprocesses, each in its own process group, always killed.

Every worker is started with ``start_new_session=True`` so that its pool children share its
process group, and is killed with SIGKILL on the whole group: when a benchmark ends, fails or is
interrupted (an ``atexit`` hook catches whatever a caller forgot).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import Bench

REPO = Path(__file__).resolve().parent.parent
WORKER_FLAGS = ("--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "warning")

_live: set[Worker] = set()


class WorkerDied(RuntimeError):
    """The worker process exited while a benchmark was waiting for it."""


class Worker:
    """One ``celery -A bench.tasks worker`` on one transport."""

    def __init__(
        self,
        bench: Bench,
        transport: str,
        prefix: str,
        *,
        pool: str = "solo",
        concurrency: int | None = None,
        transport_options: dict[str, Any] | None = None,
        name: str = "bench",
        broker_url: str | None = None,
    ) -> None:
        self.bench = bench
        self.transport = transport
        self.prefix = prefix
        self.pool = pool
        self.concurrency = concurrency
        self.transport_options = transport_options or {}
        self.name = name
        #: Where the worker connects (default: the bench server; chaos: a proxy or its own).
        self.broker_url = broker_url or bench.broker_url(transport)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self.started_at = 0.0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "celery", "-A", "bench.tasks", "worker", "-P", self.pool]
        if self.concurrency is not None:
            cmd += ["-c", str(self.concurrency)]
        return [*cmd, *WORKER_FLAGS, "-n", f"{self.name}@%h"]

    def start(self) -> Worker:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "BENCH_BROKER_URL": self.broker_url,
            "BENCH_REDIS_URL": self.bench.bench_url,
            "BENCH_PREFIX": self.prefix,
            "BENCH_TRANSPORT_OPTIONS": json.dumps(self.transport_options),
        }
        with self.log_path.open("wb") as log:
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                self.command(),
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _live.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise WorkerDied(
                f"{self.transport} worker exited with code {self.proc.returncode}; log:\n"
                f"{self.log_tail()}"
            )

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until the worker's ``worker_ready`` signal fired; returns its time.time()."""
        key = f"{self.prefix}:ready"
        deadline = time.monotonic() + timeout
        while True:
            raw = self.bench.client.get(key)
            if raw is not None:
                return float(raw)
            self.check_alive()
            if time.monotonic() >= deadline:
                raise WorkerDied(f"worker not ready after {timeout}s; log:\n{self.log_tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (pool children included) and reap it."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _live.discard(self)

    def close(self) -> None:
        self.kill()
        self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def kill_all() -> None:
    for worker in list(_live):
        worker.close()
