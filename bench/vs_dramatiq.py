"""Dramatiq against Celery on celery-msg, in the same run, on the same fresh server: N no-op
tasks published, then run by workers started afterwards. Each side runs the deployments an
operator would run on the 2-core bench VM (:data:`CELERY`, :data:`DRAMATIQ`), and the report
pairs them (:data:`PAIRS`):

- one process, one thread: Celery ``-P solo`` / ``dramatiq --processes 1 --threads 1``;
- two processes, one task at a time each: Celery ``-P prefork -c 2`` / ``--processes 2
  --threads 1``;
- each as it starts by default here: Celery ``-P prefork`` (a child per core: ``-c 2``) /
  Dramatiq (a process per core, 8 threads each: 2 x 8);
- a process per core, as Dramatiq runs: two Celery ``-P solo`` workers on the one queue /
  Dramatiq 2 x 8;
- threads: Celery ``-P threads -c 8`` (one process) / Dramatiq 1 x 8, and two such workers /
  Dramatiq 2 x 8;
- and Dramatiq's own best here: besides its default, 1 x 8 and 2 x 16 are run, and the report
  holds every Celery deployment against Dramatiq's default and against the Dramatiq
  deployment with the best median.

Figures:

- send rate: Dramatiq's ``actor.send()`` in a loop; Celery's ``.delay()`` in a loop inside a
  :func:`celery_msg.bulk` block (to its end: Redis holds every message), and one by one;
- worker rate: N / (last task finished - first worker process ready), as
  :mod:`bench.celery_e2e`;
- whole process: N / (publish time + worker time), the publisher and then the worker.

Dramatiq is an optional bench extra (``pip install 'celery-msg[bench]'``); without it the group
says "not installed" and reports nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import celery_e2e
from .common import OURS, Bench, new_prefix, wait_for
from .tasks import noop
from .worker import REPO, WorkerDied

DRAMATIQ = "dramatiq"


def installed() -> bool:
    return importlib.util.find_spec("dramatiq") is not None


def _dramatiq_send(bench: Bench, n: int) -> float:
    """Send ``n`` no-op messages with Dramatiq (the first outside the timing); tasks/s."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=bench.broker_url("redis"))
    try:
        actor = dramatiq.actor(
            noop, actor_name="bench.noop", queue_name="default", max_retries=0, broker=broker
        )
        actor.send(n)  # connect outside the timing
        started = time.perf_counter()
        for _ in range(n - 1):
            actor.send(n)
        return (n - 1) / (time.perf_counter() - started)
    finally:
        broker.close()


@dataclass(frozen=True)
class CeleryDeployment:
    """``processes`` alike ``celery worker -P pool [-c concurrency]`` on the one queue."""

    label: str
    pool: str
    concurrency: int | None
    processes: int = 1


@dataclass(frozen=True)
class DramatiqDeployment:
    """``dramatiq [--processes p] [--threads t]`` (``None``: its default)."""

    label: str
    processes: int | None
    threads: int | None


#: Celery's deployments (with celery-msg), by the key of their figures.
CELERY: dict[str, CeleryDeployment] = {
    "solo": CeleryDeployment("1 worker `-P solo`", "solo", None),
    "prefork": CeleryDeployment(
        "1 worker `-P prefork -c 2` (its default here: a child per core)", "prefork", 2
    ),
    "solo_x2": CeleryDeployment("2 workers `-P solo` on the queue", "solo", None, processes=2),
    "threads": CeleryDeployment("1 worker `-P threads -c 8`", "threads", 8),
    "threads_x2": CeleryDeployment(
        "2 workers `-P threads -c 8` on the queue", "threads", 8, processes=2
    ),
}

#: Dramatiq's deployments, by the key of their figures.
DRAMATIQ_DEPLOYMENTS: dict[str, DramatiqDeployment] = {
    "1x1": DramatiqDeployment("`--processes 1 --threads 1`", 1, 1),
    "2x1": DramatiqDeployment("`--processes 2 --threads 1`", 2, 1),
    "2x8": DramatiqDeployment("default: 2 processes x 8 threads", None, None),
    "1x8": DramatiqDeployment("`--processes 1 --threads 8`", 1, 8),
    "2x16": DramatiqDeployment("`--processes 2 --threads 16`", 2, 16),
}

#: Like with like: each Celery deployment -> the Dramatiq deployment it matches best.
PAIRS: dict[str, str] = {
    "solo": "1x1",
    "prefork": "2x1",
    "solo_x2": "2x8",
    "threads": "1x8",
    "threads_x2": "2x8",
}

#: Dramatiq's default deployment (the issue's target is its whole-process rate).
DRAMATIQ_DEFAULT = "2x8"


def _dramatiq_worker(
    bench: Bench, n: int, prefix: str, processes: int | None, threads: int | None
) -> float:
    """Start ``dramatiq bench.dramatiq_app`` (``None``: its default processes / threads);
    tasks/s from the first worker process booted to the last task finished."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "BENCH_DRAMATIQ_URL": bench.broker_url("redis"),
        "BENCH_REDIS_URL": bench.bench_url,
        "BENCH_PREFIX": prefix,
    }
    cmd = [sys.executable, "-m", "dramatiq", "bench.dramatiq_app"]
    if processes is not None:
        cmd += ["--processes", str(processes)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = bench.client

    def alive() -> None:
        if proc.poll() is not None:
            raise WorkerDied(f"dramatiq worker exited with code {proc.returncode}")

    try:
        ready = wait_for(lambda: client.get(f"{prefix}:ready"), timeout=60, check=alive)
        last = wait_for(
            lambda: client.get(f"{prefix}:last"),
            timeout=30 + n / celery_e2e.MIN_RATE,
            interval=0.02,
            check=alive,
        )
        if ready is None or last is None:
            done = int(client.get(f"{prefix}:done") or 0)
            raise WorkerDied(f"dramatiq worker: {done} of {n} tasks done; giving up")
        first = float(client.get(f"{prefix}:first") or 0)
        return n / (float(last) - min(float(ready), first))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _whole(send: float, worker: float) -> float:
    return 1 / (1 / send + 1 / worker)


def dramatiq_run(bench: Bench) -> dict[str, float]:
    n = bench.settings.e2e_n
    out: dict[str, float] = {}
    sends: list[float] = []
    for name, deployment in DRAMATIQ_DEPLOYMENTS.items():
        bench.flush()
        send = _dramatiq_send(bench, n)
        worker = _dramatiq_worker(
            bench, n, new_prefix("dramatiq"), deployment.processes, deployment.threads
        )
        sends.append(send)
        out[f"worker_{name}"], out[f"whole_{name}"] = worker, _whole(send, worker)
    bench.flush()
    out["send"] = statistics.median(sends)
    return out


def celery_run(bench: Bench) -> dict[str, float]:
    out: dict[str, float] = {}
    sends: list[float] = []
    bulk = functools.partial(celery_e2e.publish, bulk=True)
    for name, deployment in CELERY.items():
        figures = celery_e2e.run(
            bench,
            OURS,
            deployment.pool,
            deployment.concurrency,
            publisher=bulk,
            processes=deployment.processes,
        )
        send, worker = figures["publish"], figures["tasks_per_s"]
        sends.append(send)
        out[f"worker_{name}"], out[f"whole_{name}"] = worker, _whole(send, worker)
    out["send"] = statistics.median(sends)
    out["send_one_by_one"] = celery_e2e.publish(bench, OURS, bench.settings.e2e_n)
    bench.flush()
    return out


def run(bench: Bench, run_number: int) -> dict[str, dict[str, float]]:
    """One run: {DRAMATIQ: figures, OURS: figures}; who goes first flips per run."""
    steps: list[tuple[str, Any]] = [(DRAMATIQ, dramatiq_run), (OURS, celery_run)]
    out: dict[str, dict[str, float]] = {}
    for name, body in steps if run_number % 2 else steps[::-1]:
        out[name] = body(bench)
    return out
