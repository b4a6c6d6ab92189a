"""What every benchmark shares: settings, the two transports, one server, timing helpers.

Both transports run against the same freshly started server (a :class:`ServerProcess`, never
the shared Redis on 6379), in the same process, one after the other within each run, so that a
busy machine slows both alike. The server is flushed before every measurement.
"""

from __future__ import annotations

import math
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis

import celery_msg  # noqa: F401  (registers the celery-msg:// scheme with kombu)
from celery_msg.testing import ServerProcess

OURS = "celery-msg"
KOMBU = "redis"
TRANSPORTS: tuple[str, ...] = (OURS, KOMBU)
LABELS = {OURS: "celery-msg", KOMBU: "kombu redis"}

#: Brokers use database 0; the benchmarks' own bookkeeping (counters, timestamps) database 1.
BROKER_DB = 0
BENCH_DB = 1


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one benchmark session (``--quick`` shrinks them)."""

    runs: int = 3
    raw_n: int = 20_000
    size: int = 256
    prefetch: int = 100
    e2e_n: int = 10_000
    idle_seconds: float = 20.0
    latency_count: int = 100
    latency_spacing: float = 0.05
    #: How long the recovery task sleeps (it must outlive the kill and the redelivery).
    task_sleep: float = 30.0
    #: Longest wait for a redelivery with each transport's default settings.
    recovery_cap: float = 60.0
    #: Longest wait for kombu with visibility_timeout=30 (its sweep runs every ~100 s).
    kombu_vt_cap: float = 130.0
    kombu_vt: float = 30.0
    #: Tasks published with a countdown while a worker runs (memory), and that countdown (s).
    eta_n: int = 100_000
    eta_countdown: float = 3600.0
    #: Tasks with ETAs spread over ``eta_spread`` s (starting 5 s ahead) for lateness.
    eta_tasks: int = 200
    eta_spread: float = 5.0
    #: Chaos: tasks per run, each sleeping chaos_task_s; the publisher stays at most
    #: chaos_backlog ahead of the finished ones; after the faults, the longest wait (s) for
    #: the last tasks (kombu needs its visibility timeout, 30 s, and a worker start).
    chaos_n: int = 20_000
    chaos_task_s: float = 0.003
    chaos_backlog: int = 1_000
    chaos_drain: float = 90.0
    #: The single-worker figure: tasks, and SIGKILLs spread evenly over their progress.
    chaos_single_n: int = 4_000
    chaos_single_kills: int = 8
    #: Redis memory per waiting message: how many, and their size as kombu stores them (B).
    memory_n: int = 100_000
    memory_size: int = 939
    #: Bulk publishing: tasks in the timed group, and ``.delay()`` calls timed in a loop.
    bulk_group_n: int = 10_000
    bulk_delay_n: int = 100_000
    #: Prometheus scrape: how many queues, each filled with a few messages in every state.
    scrape_queues: tuple[int, ...] = (10, 100, 1_000)
    quick: bool = False

    def quicken(self) -> Settings:
        return replace(
            self,
            runs=1,
            raw_n=2_000,
            e2e_n=500,
            idle_seconds=3.0,
            latency_count=20,
            recovery_cap=15.0,
            eta_n=5_000,
            chaos_n=3_000,
            chaos_single_n=1_000,
            memory_n=10_000,
            bulk_group_n=2_000,
            bulk_delay_n=5_000,
            quick=True,
        )


class Bench:
    """One server both transports use, and the URLs and clients that point at it."""

    def __init__(self, server: ServerProcess, settings: Settings) -> None:
        self.server = server
        self.settings = settings
        self._client: redis.Redis | None = None

    def broker_url(self, transport: str) -> str:
        return f"{transport}://127.0.0.1:{self.server.port}/{BROKER_DB}"

    @property
    def bench_url(self) -> str:
        return f"redis://127.0.0.1:{self.server.port}/{BENCH_DB}"

    @property
    def client(self) -> redis.Redis:
        """A client on the bookkeeping database."""
        if self._client is None:
            self._client = redis.Redis.from_url(self.bench_url)
        return self._client

    def flush(self) -> None:
        """Empty every database of our own throwaway server."""
        self.client.flushall()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def new_prefix(what: str) -> str:
    return f"bench:{what}:{uuid.uuid4().hex[:8]}"


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.01,
    check: Callable[[], None] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; None after ``timeout`` seconds.

    ``check`` runs on every poll and may raise (e.g. when the worker process has died).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


def summarize(runs: Sequence[float], unit: str, **extra: Any) -> dict[str, Any]:
    return {"median": median(runs), "runs": list(runs), "unit": unit, **extra}
