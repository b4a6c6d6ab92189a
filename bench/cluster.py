"""One node vs a 3-master Redis Cluster (issue 11): Celery end to end and raw consume+ack.

    python -m bench.cluster                       # 3 runs each, redis-server
    python -m bench.cluster --runs 1 --n 2000 --server valkey

Per run and topology: a fresh broker (one ``redis-server``, or three masters of a
:class:`~celery_msg.topologies.ClusterTopology` from the same binary), queues ``a``, ``b``, ``c``
whose slots are on three different masters.

- *e2e*: ``--n`` no-op tasks published round-robin to the three queues (``apply_async``, timed
  alone), then one ``celery worker -Q a,b,c -P prefork -c 2``; tasks/s from its ready signal to
  the last task (as :mod:`bench.celery_e2e`).
- *raw*: ``--raw-n`` messages published with :class:`~celery_msg.core.Broker`, then one consumer
  reserving 100 at a time over the three queues, acking each batch in the next round
  (``settle_and_reserve``, the worker's hot path): messages/s.
- *spread*: each master's share of the ``EVALSHA`` calls of the e2e run (``INFO
  commandstats``), i.e. how the work of three queues lands on the shards.

What this can show on a 2-core machine: the *cost* of going through a Cluster (the per-slot
splitting, the cluster client) and that the load spreads; not a scale-out gain, since the three
masters, the worker and the publisher share the same two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import redis
from kombu import Connection

import celery_msg  # noqa: F401  (registers the URL schemes)
from celery_msg.connection import redis_client
from celery_msg.core import Broker, Lease, ReserveRequest
from celery_msg.options import TransportOptions
from celery_msg.testing import ServerKind, ServerProcess
from celery_msg.topologies import ClusterTopology

from .common import Bench, Settings, new_prefix, wait_for
from .tasks import make_app
from .worker import Worker

QUEUES = ("a", "b", "c")


class QueueWorker(Worker):
    """A bench worker that consumes the three queues."""

    def command(self) -> list[str]:
        return [*super().command(), "-Q", ",".join(QUEUES)]


@contextlib.contextmanager
def broker_of(kind: ServerKind, topology: str) -> Iterator[tuple[str, list[redis.Redis]]]:
    """The broker URL of a fresh topology, and a client per master (for commandstats)."""
    if topology == "cluster":
        with ClusterTopology(kind, masters=3) as cluster:
            yield cluster.broker_url(), [m.client() for m in cluster.masters]
    else:
        with ServerProcess(kind) as server:
            yield f"celery-msg://127.0.0.1:{server.port}/0", [server.client()]


def evalsha_calls(clients: list[redis.Redis]) -> list[int]:
    return [int(c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)) for c in clients]


def e2e(bench: Bench, url: str, clients: list[redis.Redis], n: int) -> dict[str, Any]:
    prefix = new_prefix("cluster")
    app = make_app(url)
    try:
        task = app.tasks["bench.noop"]
        task.apply_async((n,), queue=QUEUES[0])
        started = time.perf_counter()
        for i in range(1, n):
            task.apply_async((n,), queue=QUEUES[i % 3])
        publish = (n - 1) / (time.perf_counter() - started)
    finally:
        app.close()
    before = evalsha_calls(clients)
    with QueueWorker(
        bench, "celery-msg", prefix, pool="prefork", concurrency=2, broker_url=url
    ) as w:
        ready = w.wait_ready()
        done = wait_for(
            lambda: bench.client.get(f"{prefix}:last"), 30 + n / 20, 0.02, w.check_alive
        )
        if done is None:
            raise RuntimeError(f"worker did not finish; log:\n{w.log_tail()}")
        first = float(bench.client.get(f"{prefix}:first") or 0)
    calls = [after - b for after, b in zip(evalsha_calls(clients), before, strict=True)]
    total = sum(calls) or 1
    return {
        "publish": publish,
        "tasks_per_s": n / (float(done) - min(ready, first)),
        "spread": [round(c / total, 2) for c in calls],
    }


def raw(url: str, n: int) -> float:
    client, _ = redis_client(Connection(url), TransportOptions())
    broker = Broker(client, prefix=new_prefix("raw") + ":")
    try:
        for queue in QUEUES:
            broker.declare(queue)
        for i in range(n):
            broker.publish(QUEUES[i % 3], f"m{i}", "x" * 256, 0)
        request = ReserveRequest(list(QUEUES), 100, "raw")
        acks: list[Lease] = []
        got = 0
        started = time.perf_counter()
        while got < n:
            round_ = broker.settle_and_reserve(acks, [request])
            acks = [Lease(d.queue, d.key, d.token) for d in round_.deliveries[0]]
            got += len(acks)
        broker.settle_and_reserve(acks, [])
        return n / (time.perf_counter() - started)
    finally:
        broker.close()
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n", type=int, default=3000, help="tasks per e2e run")
    parser.add_argument("--raw-n", type=int, default=20_000, help="messages per raw run")
    parser.add_argument("--server", choices=("redis", "valkey"), default="redis")
    args = parser.parse_args(argv)
    kind: ServerKind = args.server
    results: dict[str, dict[str, list[Any]]] = {}
    with ServerProcess(kind) as store:
        bench = Bench(store, Settings())
        try:
            for _ in range(args.runs):
                for topology in ("1 node", "cluster"):
                    with broker_of(kind, topology) as (url, clients):
                        row = results.setdefault(topology, {})
                        measured = e2e(bench, url, clients, args.n)
                        for key, value in measured.items():
                            row.setdefault(key, []).append(value)
                        row.setdefault("raw", []).append(raw(url, args.raw_n))
                        for client in clients:
                            client.close()
        finally:
            bench.close()
    print(f"server: {kind}; e2e n={args.n}; raw n={args.raw_n}; runs={args.runs}; medians")
    print(f"{'':8} {'publish/s':>10} {'e2e tasks/s':>12} {'raw msg/s':>10}  evalsha share/master")
    for topology, row in results.items():
        spread = row["spread"][len(row["spread"]) // 2]
        print(
            f"{topology:8} {statistics.median(row['publish']):10.0f} "
            f"{statistics.median(row['tasks_per_s']):12.0f} "
            f"{statistics.median(row['raw']):10.0f}  {spread}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
