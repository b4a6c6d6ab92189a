"""Celery end to end: publish N no-op tasks, then let a real worker run them all.

Publishing is timed on its own (``task.delay`` in a loop, Celery's default producer pool).
The worker starts after that; throughput is N / (last task finished - worker ready), where
"ready" is Celery's ``worker_ready`` signal (or the first task's start, if that came first).
With several worker processes on the queue (``processes``, as an operator runs one ``-P solo``
worker per core), "ready" is the first of them to be ready: the others' start-up counts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import celery_msg

from .common import Bench, new_prefix, wait_for
from .tasks import make_app
from .worker import Worker

#: Slowest rate we wait for before calling a run failed (tasks/s).
MIN_RATE = 20


class Unfinished(RuntimeError):
    """The worker did not finish all N tasks in time."""


#: The no-op tasks: ``bench.noop`` waits for Redis to count it (a round trip per task, as a
#: task doing its own I/O), ``bench.noop_unwaited`` does not (only the broker's waits remain).
NOOP = "bench.noop"
NOOP_UNWAITED = "bench.noop_unwaited"


def publish(
    bench: Bench, transport: str, n: int, *, bulk: bool = False, task_name: str = NOOP
) -> float:
    """Publish ``n`` no-op tasks; returns tasks/s. ``bulk``: the ``.delay()`` calls inside one
    :func:`celery_msg.bulk` block, timed to its end (Redis holds every message)."""
    app = make_app(bench.broker_url(transport))
    try:
        task = app.tasks[task_name]
        task.delay(n)  # connect and declare outside the timing
        started = time.perf_counter()
        with celery_msg.bulk(app) if bulk else contextlib.nullcontext():
            for _ in range(n - 1):
                task.delay(n)
        elapsed = time.perf_counter() - started
    finally:
        app.close()
    return (n - 1) / elapsed


def run(
    bench: Bench,
    transport: str,
    pool: str,
    concurrency: int | None,
    publisher: Callable[[Bench, str, int], float] | None = None,
    task_name: str = NOOP,
    processes: int = 1,
) -> dict[str, Any]:
    """One e2e run; ``publisher`` publishes the N tasks (default :func:`publish` of
    ``task_name``); ``processes`` workers alike (``-n bench1@``, ``bench2@``...) are started
    together on the one queue."""
    n = bench.settings.e2e_n
    bench.flush()
    if publisher is None:
        publish_rate = publish(bench, transport, n, task_name=task_name)
    else:
        publish_rate = publisher(bench, transport, n)
    prefix = new_prefix("e2e")
    client = bench.client

    def finished() -> Any:
        if task_name == NOOP:
            return client.get(f"{prefix}:last")  # written by the task that counted N
        # Written by every task; the count reaching N tells the last one wrote it.
        return int(client.get(f"{prefix}:done") or 0) >= n and client.get(f"{prefix}:last")

    names = ["bench"] if processes == 1 else [f"bench{i}" for i in range(1, processes + 1)]
    with contextlib.ExitStack() as stack:
        workers = [
            stack.enter_context(
                Worker(bench, transport, prefix, pool=pool, concurrency=concurrency, name=name)
            )
            for name in names
        ]

        def check_alive() -> None:
            for worker in workers:
                worker.check_alive()

        for worker in workers:
            worker.wait_ready()
        ready = float(client.get(f"{prefix}:first_ready") or 0)
        done = wait_for(finished, timeout=30 + n / MIN_RATE, interval=0.02, check=check_alive)
        if done is None:
            count = int(client.get(f"{prefix}:done") or 0)
            raise Unfinished(f"{transport} -P {pool}: {count} of {n} tasks done; giving up")
        first = float(client.get(f"{prefix}:first") or 0)
        last = float(done)
    start = min(ready, first)
    return {
        "publish": publish_rate,
        "tasks_per_s": n / (last - start),
        "startup_s": ready - min(worker.started_at for worker in workers),
        "first_task_after_ready_s": first - ready,
    }
