"""ETA/countdown tasks: where they wait, and how punctually they start.

kombu's redis transport hands a task published with ``countdown=``/``eta=`` to a worker at once;
the worker keeps it in memory (Celery's timer) until it is due. celery-msg keeps it in Redis (the
queue's schedule) and delivers it when due. Two measurements, each on a ``-P solo`` worker:

* memory: RSS of the worker's process group when idle, then after ``eta_n`` tasks with
  ``countdown=eta_countdown`` (1 h) have been published and the worker has received them all
  (kombu: its queue list is empty and every message sits in ``unacked``; celery-msg: the queue
  counts show them all scheduled), and RSS has stopped growing. Also the server's
  ``used_memory`` growth, and how many of those tasks ran (it must be 0).
* lateness: ``eta_tasks`` tasks with ETAs 5-10 s ahead, ``ETA_GROUP`` per due time; each task
  notes time.time() when it starts; lateness = start - eta. Each task must start exactly once and
  never before its ETA.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

import psutil
import redis

from celery_msg.api import queue_counts

from .common import KOMBU, OURS, Bench, new_prefix, percentile, wait_for
from .tasks import make_app
from .worker import Worker

MB = 1024 * 1024
QUEUE = "celery"  # Celery's default queue
#: kombu's redis transport: the queue's list keys (priority steps 0, 3, 6, 9) and its hash of
#: delivered, not yet acked messages.
KOMBU_LISTS = (QUEUE, *(f"{QUEUE}\x06\x16{p}" for p in (3, 6, 9)))
KOMBU_UNACKED = "unacked"
SETTLE_S = 2.0
#: RSS is "stable" once it moved less than this over RSS_STEADY_S.
RSS_STEP = 0.5 * MB
RSS_STEADY_S = 3.0
#: Lateness: first ETA this far ahead (publishing must finish before it), then one due time per
#: ETA_STEP_MS for ETA_GROUP tasks each.
ETA_LEAD_S = 5.0
ETA_GROUP = 4
#: How long to keep watching for duplicates after the last task ran.
DUPLICATE_GRACE_S = 3.0


class NotReceived(RuntimeError):
    """The worker did not take in every scheduled task in time."""


class PublishTooSlow(RuntimeError):
    """Publishing the lateness tasks overran the first ETA: the run would measure nothing."""


def group_rss(pgid: int) -> int:
    """Resident memory (bytes) of every live process in process group ``pgid``."""
    total = 0
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                total += proc.memory_info().rss
        except (psutil.Error, ProcessLookupError):
            continue  # exited meanwhile
    return total


def _server_memory(bench: Bench) -> int:
    return int(bench.client.info("memory")["used_memory"])


def _all_received(bench: Bench, transport: str, app: Any, n: int) -> bool:
    if transport == OURS:
        return queue_counts(app).get(QUEUE, {}).get("scheduled", 0) >= n
    broker = redis.Redis.from_url(bench.broker_url(KOMBU))
    try:
        pipe = broker.pipeline(transaction=False)
        for key in KOMBU_LISTS:
            pipe.llen(key)
        pipe.hlen(KOMBU_UNACKED)
        *lengths, unacked = pipe.execute()
    finally:
        broker.close()
    return sum(lengths) == 0 and unacked >= n


def _steady_rss(worker: Worker, cap: float) -> int:
    """RSS once it stopped growing (or after ``cap`` seconds)."""
    deadline = time.monotonic() + cap
    samples = [group_rss(worker.pid)]
    while time.monotonic() < deadline:
        time.sleep(1.0)
        worker.check_alive()
        samples.append(group_rss(worker.pid))
        window = samples[-int(RSS_STEADY_S) - 1 :]
        if len(window) > RSS_STEADY_S and max(window) - min(window) < RSS_STEP:
            break
    return samples[-1]


def memory(bench: Bench, transport: str) -> dict[str, Any]:
    s = bench.settings
    n = s.eta_n
    bench.flush()
    prefix = new_prefix("eta-mem")
    app = make_app(bench.broker_url(transport))
    try:
        with Worker(bench, transport, prefix, pool="solo", name="eta") as worker:
            worker.wait_ready()
            time.sleep(SETTLE_S)
            rss_before = group_rss(worker.pid)
            server_before = _server_memory(bench)
            task = app.tasks["bench.delayed"]
            started = time.perf_counter()
            for i in range(n):
                task.apply_async((i,), countdown=s.eta_countdown)
                if i % 5000 == 4999:
                    worker.check_alive()
            published = time.perf_counter()
            received = wait_for(
                lambda: _all_received(bench, transport, app, n),
                timeout=120 + n / 100,
                interval=0.5,
                check=worker.check_alive,
            )
            if not received:
                raise NotReceived(f"{transport}: the worker did not receive all {n} tasks")
            received_at = time.perf_counter()
            rss_after = _steady_rss(worker, cap=60.0)
            server_after = _server_memory(bench)
            ran = int(bench.client.llen(f"{prefix}:runs"))
    finally:
        app.close()
    return {
        "rss_mb": (rss_after - rss_before) / MB,
        "rss_before_mb": rss_before / MB,
        "rss_after_mb": rss_after / MB,
        "server_mb": (server_after - server_before) / MB,
        "ran": ran,
        "n": n,
        "publish_per_s": n / (published - started),
        "receive_after_publish_s": received_at - published,
    }


def lateness(bench: Bench, transport: str) -> dict[str, Any]:
    s = bench.settings
    count = s.eta_tasks
    bench.flush()
    prefix = new_prefix("eta-late")
    runs_key = f"{prefix}:runs"
    app = make_app(bench.broker_url(transport))
    try:
        with Worker(bench, transport, prefix, pool="solo", name="eta") as worker:
            worker.wait_ready()
            task = app.tasks["bench.delayed"]
            task.delay(-1)  # warm up both sides (connections, declarations)
            if not wait_for(lambda: bench.client.llen(runs_key) >= 1, 30, check=worker.check_alive):
                raise NotReceived(f"{transport}: the warm-up task never ran")
            time.sleep(0.5)
            groups = -(-count // ETA_GROUP)
            step_ms = int(1000 * s.eta_spread / groups)
            first_ms = int(1000 * (time.time() + ETA_LEAD_S))
            etas = [(first_ms + (i // ETA_GROUP) * step_ms) / 1000 for i in range(count)]
            for i, eta in enumerate(etas):
                task.apply_async((i,), eta=datetime.fromtimestamp(eta, UTC))
            if time.time() >= etas[0]:
                raise PublishTooSlow(f"{transport}: publishing {count} tasks overran the first ETA")
            wait_for(
                lambda: bench.client.llen(runs_key) >= count + 1,
                timeout=etas[-1] - time.time() + 30,
                interval=0.05,
                check=worker.check_alive,
            )
            time.sleep(DUPLICATE_GRACE_S)
            worker.check_alive()
            raw = [line.split() for line in bench.client.lrange(runs_key, 0, -1)]
    finally:
        app.close()
    starts: dict[int, list[float]] = {}
    for index, when in raw:
        starts.setdefault(int(index), []).append(float(when))
    starts.pop(-1, None)
    late_of = {i: 1000 * (min(starts[i]) - etas[i]) for i in range(count) if i in starts}
    late = list(late_of.values())
    #: Median lateness of the 1st, 2nd, ... task of each due time (a solo worker runs them in turn).
    by_position = [
        percentile([v for i, v in late_of.items() if i % ETA_GROUP == k] or [float("nan")], 50)
        for k in range(ETA_GROUP)
    ]
    early = [1000 * (t - etas[i]) for i in range(count) for t in starts.get(i, []) if t < etas[i]]
    missing = [i for i in range(count) if i not in starts]
    twice = {i: len(v) for i, v in starts.items() if len(v) > 1}
    return {
        "p50_ms": percentile(late, 50) if late else float("nan"),
        "p99_ms": percentile(late, 99) if late else float("nan"),
        "max_ms": max(late, default=float("nan")),
        "min_ms": min(late, default=float("nan")),
        "p50_by_position_ms": by_position,
        "early": len(early),
        "early_ms": sorted(early)[:20],
        "missing": len(missing),
        "duplicates": sum(v - 1 for v in twice.values()),
        "not_once": len(missing) + len(twice),
        "twice": dict(list(twice.items())[:20]),
    }
