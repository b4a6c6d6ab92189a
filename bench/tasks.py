"""The Celery app of the benchmarks: the same code for both transports, only the URL differs.

The harness builds it with :func:`make_app` to publish; a worker loads it with
``celery -A bench.tasks`` and reads its configuration from the environment (see
:mod:`bench.worker`). Tasks report to Redis database 1 under ``BENCH_PREFIX``; the harness
polls those keys.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

import celery_msg

_clients: dict[int, redis.Redis] = {}


def _store() -> redis.Redis:
    """One bookkeeping client per process (prefork children must not share a socket)."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        client = _clients[pid] = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    return client


def _prefix() -> str:
    return os.environ["BENCH_PREFIX"]


def noop(total: int) -> None:
    """Throughput: count; the first and the last task also record when they ran."""
    started = time.time()
    done = _store().incr(f"{_prefix()}:done")
    if done == 1:
        _store().set(f"{_prefix()}:first", started)
    if done == total:
        _store().set(f"{_prefix()}:last", time.time())


def probe(index: int) -> None:
    """Latency: record when this task started."""
    _store().hset(f"{_prefix()}:started", str(index), time.time())


def sleeper(seconds: float) -> None:
    """Recovery: record which process started this task and when, then stay busy."""
    _store().rpush(f"{_prefix()}:starts", json.dumps({"pid": os.getpid(), "time": time.time()}))
    time.sleep(seconds)


def delayed(index: int) -> None:
    """ETA/countdown: record every start (index and time), so that early or repeated runs show."""
    _store().rpush(f"{_prefix()}:runs", f"{index} {time.time()!r}")


def chaos(index: int, seconds: float) -> None:
    """Chaos: record every start and every finish (outside the broker), with the process group.

    The worker's process group (its main pid: workers run in their own session) tells the
    harness which incarnation of a worker ran the task; a finish recorded here and then a
    SIGKILL before the ack is exactly what makes a finished task run again.
    """
    store, key = _store(), f"{_prefix()}:events"
    who = f"{index} {os.getpgid(0)} {os.getpid()}"
    store.rpush(key, f"S {who} {time.time()!r}")
    time.sleep(seconds)
    pipe = store.pipeline(transaction=False)
    pipe.rpush(key, f"F {who} {time.time()!r}")
    pipe.sadd(f"{_prefix()}:finished", index)
    pipe.execute()


def make_app(broker_url: str, transport_options: dict[str, Any] | None = None) -> Celery:
    app = Celery("bench", broker=broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=dict(transport_options or {}),
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    if broker_url.startswith("celery-msg"):
        celery_msg.configure(app)  # the one line a celery-msg user adds
    app.task(name="bench.noop")(noop)
    app.task(name="bench.probe")(probe)
    app.task(name="bench.sleeper", acks_late=True)(sleeper)
    app.task(name="bench.delayed")(delayed)
    app.task(name="bench.chaos", acks_late=True)(chaos)
    return app


def _on_ready(sender: Any = None, **kwargs: Any) -> None:
    _store().set(f"{_prefix()}:ready", time.time())


if "BENCH_BROKER_URL" in os.environ:  # inside a worker started by bench.worker
    app = make_app(
        os.environ["BENCH_BROKER_URL"], json.loads(os.environ.get("BENCH_TRANSPORT_OPTIONS", "{}"))
    )
    worker_ready.connect(_on_ready, weak=False)
