"""The cost of a Prometheus scrape of 10, 100 and 1,000 queues (``--only scrape``).

Each queue holds a few messages in every state (ready in two priority bands, reserved,
scheduled, dead) and has counters, as a busy deployment's would. The exporter is the real one:
prometheus-client's HTTP server with :class:`celery_msg.metrics.QueueCollector`, in this
process, scraped over HTTP with ``urllib``; the scrape time is the client's wall time of one
``GET /metrics``. Its Redis round trips are counted on the collector's own connection
(:class:`CountingConnection`): one ``send`` is one round trip, a pipeline sends once.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_http_server

from celery_msg.core import Broker, Lease
from celery_msg.metrics import QueueCollector
from celery_msg.transitions import UNROUTED, Publish

from .common import Bench, median, new_prefix

#: Messages published into every queue, and what becomes of them.
PER_QUEUE = 6
#: Scrapes per measurement (after one to warm up); the median is the run's figure.
SCRAPES = 5


class CountingConnection(redis.Connection):
    """A real connection that counts what it sends: one ``send_packed_command`` per round trip
    (a pipeline packs all its commands into one)."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sent += 1
        super().send_packed_command(command, check_health)


def counting_client(port: int) -> redis.Redis:
    pool = redis.ConnectionPool(connection_class=CountingConnection, port=port)
    return redis.Redis(connection_pool=pool)


def fill(broker: Broker, queues: list[str]) -> None:
    """``PER_QUEUE`` messages in each queue: 2 ready (two bands), 2 reserved, 1 scheduled,
    1 dead; pipelined, a few hundred queues per round trip."""
    publish = broker.scripts.publish.script
    now = broker.now_ms()
    for start in range(0, len(queues), 250):
        part = queues[start : start + 250]
        pipe = broker.client.pipeline(transaction=False)
        for queue in part:
            pipe.sadd(f"{broker.prefix}queues", queue)
        pipe.execute()
        calls = [
            (
                publish,
                broker.keys(queue).publish,
                Publish.args(
                    message_id=f"m{i}",
                    payload=b"x" * 200,
                    band=i % 2,
                    due_ms=now + 3_600_000 if i == 4 else 0,
                    unique=False,
                    route_version=UNROUTED,
                    now_ms=now,
                    lock_until_ms=0,
                ),
            )
            for queue in part
            for i in range(PER_QUEUE)
        ]
        broker.run_scripts(calls)
        for queue in part:
            first = broker.reserve([queue], 3, "bench-consumer")[0]
            broker.dead_letter(Lease(queue, first.key, first.token), "failed", "bench")


def run(bench: Bench, queue_count: int) -> dict[str, Any]:
    """Scrape ``queue_count`` filled queues ``SCRAPES`` times; median time and round trips."""
    bench.flush()
    prefix = new_prefix("scrape") + ":"
    client = counting_client(bench.server.port)
    broker = Broker(client, prefix=prefix)
    fill(broker, [f"queue-{i:05}" for i in range(queue_count)])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(broker))
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        body = _get(url)  # warm up: scripts loaded, connections made
        times: list[float] = []
        trips: list[int] = []
        for _ in range(SCRAPES):
            CountingConnection.sent = 0
            started = time.perf_counter()
            body = _get(url)
            times.append(time.perf_counter() - started)
            trips.append(CountingConnection.sent)
    finally:
        server.shutdown()
        thread.join(5)
        client.close()
        bench.flush()
    return {
        "queues": queue_count,
        "scrape_ms": median(times) * 1000,
        "scrapes_ms": [t * 1000 for t in times],
        "round_trips": max(trips),
        "bytes": len(body),
        "series": sum(1 for line in body.splitlines() if line and not line.startswith("#")),
    }


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as reply:
        return str(reply.read().decode())
