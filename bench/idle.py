"""Idle cost: CPU a worker with nothing to do burns, and what it makes the server burn.

The worker runs Celery's default pool (prefork, 2 processes); its CPU is the sum of utime+stime
over every process of its process group (pool children included), read from /proc over
``idle_seconds`` after it is ready. Reported as % of one core.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .common import Bench, new_prefix
from .worker import Worker

TICKS = os.sysconf("SC_CLK_TCK")
SETTLE_S = 2.0


def _fields(stat: str) -> list[str]:
    # /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses.
    return stat[stat.rindex(")") + 2 :].split()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, reaped children included) of one process."""
    f = _fields(Path(f"/proc/{pid}/stat").read_text())
    return sum(int(x) for x in f[11:15]) / TICKS


def group_cpu(pgid: int) -> float:
    """CPU seconds of every live process in process group ``pgid``."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            f = _fields((entry / "stat").read_text())
        except (OSError, ValueError):
            continue  # exited meanwhile
        if int(f[2]) == pgid:
            total += sum(int(x) for x in f[11:15])
    return total / TICKS


def run(bench: Bench, transport: str) -> dict[str, Any]:
    seconds = bench.settings.idle_seconds
    bench.flush()
    with Worker(bench, transport, new_prefix("idle"), pool="prefork", concurrency=2) as worker:
        worker.wait_ready()
        time.sleep(SETTLE_S)
        worker.check_alive()
        before = _sample(worker.pid, bench.server.pid)
        time.sleep(seconds)
        worker.check_alive()
        after = _sample(worker.pid, bench.server.pid)
    elapsed = after[2] - before[2]
    return {
        "worker_pct": 100 * (after[0] - before[0]) / elapsed,
        "server_pct": 100 * (after[1] - before[1]) / elapsed,
    }


def _sample(worker_pgid: int, server_pid: int) -> tuple[float, float, float]:
    return group_cpu(worker_pgid), process_cpu(server_pid), time.monotonic()
