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


#: Per process: a connection of the bench server whose replies :func:`noop_unwaited` reads
#: only now and then, and how many are unread.
_unwaited: dict[int, list[Any]] = {}

#: Unread replies after which :func:`noop_unwaited` reads what has arrived.
UNREAD_LIMIT = 300


def noop_unwaited(total: int) -> None:
    """Throughput with no round trip in the task: as :func:`noop`, but its bookkeeping is
    written without waiting for Redis (one send per task; the replies are read in passing).

    :func:`noop` waits for an ``INCR`` reply in every task, as a task waiting on its own I/O
    would: on a fast machine that round trip is a large part of a no-op task's time on either
    transport, which hides what the broker costs. Here the worker's only waits are its
    broker's. Each task writes when it finished, then counts itself (in that order, in one
    send: Redis runs them back to back), so when the count reaches ``total``, ``last`` is the
    last task's finish (of the last to write, with a prefork pool's children interleaving).
    """
    pid = os.getpid()
    state = _unwaited.get(pid)
    if state is None:
        state = _unwaited[pid] = [_store().connection_pool.get_connection(), 0]
    conn, unread = state
    prefix = _prefix()
    now = repr(time.time())
    commands = [("SET", f"{prefix}:first", now, "NX"), ("SET", f"{prefix}:last", now)]
    commands.append(("INCR", f"{prefix}:done"))
    conn.send_packed_command(conn.pack_commands(commands), check_health=False)
    unread += len(commands)
    if unread >= UNREAD_LIMIT:
        while unread and conn.can_read(timeout=0):
            conn.read_response()
            unread -= 1
    state[1] = unread


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
    app.task(name="bench.noop_unwaited")(noop_unwaited)
    app.task(name="bench.probe")(probe)
    app.task(name="bench.sleeper", acks_late=True)(sleeper)
    app.task(name="bench.delayed")(delayed)
    app.task(name="bench.chaos", acks_late=True)(chaos)
    return app


def _on_ready(sender: Any = None, **kwargs: Any) -> None:
    """``ready``: this worker's (the last one's, when several share a prefix); ``first_ready``:
    the first of several workers on one prefix (bench.celery_e2e times from it)."""
    now = time.time()
    pipe = _store().pipeline(transaction=False)
    pipe.set(f"{_prefix()}:ready", now)
    pipe.set(f"{_prefix()}:first_ready", now, nx=True)
    pipe.execute()


if "BENCH_BROKER_URL" in os.environ:  # inside a worker started by bench.worker
    app = make_app(
        os.environ["BENCH_BROKER_URL"], json.loads(os.environ.get("BENCH_TRANSPORT_OPTIONS", "{}"))
    )
    worker_ready.connect(_on_ready, weak=False)
