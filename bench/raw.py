# mypy: disable-error-code="no-untyped-call"
"""Raw kombu throughput: publish N messages, then consume and ack all of them.

Publishing goes through the anonymous exchange with the queue name as routing key, as Celery
does for direct queues. Consuming uses one kombu ``Consumer`` over every queue, with a callback
that acks and ``prefetch_count`` (100) set through ``consumer.qos``, drained with
``conn.drain_events`` until all N arrived. Every message carries its index, so a lost or
duplicated message fails the benchmark instead of inflating it.

Besides the rates, each phase reports CPU microseconds per message spent by this (client)
process and by the server, which tells whether Python or Redis is the bottleneck.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kombu import Connection, Consumer, Exchange, Producer, Queue  # type: ignore[attr-defined]

from .common import Bench
from .idle import process_cpu

CONTENT_TYPE = "application/octet-stream"
DRAIN_TIMEOUT = 10.0

#: Wraps one timed phase (``"publish"`` or ``"consume"``), e.g. with a profiler.
Hook = Callable[[str], Any]


class LostMessages(RuntimeError):
    """A consumer stopped receiving before all N messages arrived, or got one twice."""


def bodies(n: int, size: int) -> list[bytes]:
    return [f"{i:010d}".encode().ljust(size, b"x") for i in range(n)]


@contextmanager
def _no_hook(phase: str) -> Iterator[None]:
    yield


def run(bench: Bench, transport: str, queue_count: int, hook: Hook = _no_hook) -> dict[str, float]:
    """Publish then consume+ack ``bench.settings.raw_n`` messages; rates in msg/s."""
    n = bench.settings.raw_n
    names = [f"bench-raw-{i}" for i in range(queue_count)]
    queues = [Queue(name, Exchange(name, "direct"), routing_key=name) for name in names]
    payloads = bodies(n, bench.settings.size)
    bench.flush()
    out: dict[str, float] = {}
    with Connection(bench.broker_url(transport)) as conn:
        conn.ensure_connection(max_retries=3)
        publish_channel = conn.channel()
        for queue in queues:
            queue.bind(publish_channel).declare()
        producer = Producer(publish_channel)

        with _measured(bench, n, "publish", out), hook("publish"):
            for i, body in enumerate(payloads):
                producer.publish(
                    body,
                    exchange="",
                    routing_key=names[i % queue_count],
                    content_type=CONTENT_TYPE,
                    content_encoding="binary",
                )

        seen = bytearray(n)
        received = 0

        def on_message(body: bytes, message: Any) -> None:
            nonlocal received
            index = int(body[:10])
            if seen[index]:
                raise LostMessages(f"{transport}: message {index} delivered twice")
            seen[index] = 1
            received += 1
            message.ack()

        consumer = Consumer(
            conn.channel(), queues=queues, callbacks=[on_message], accept=[CONTENT_TYPE]
        )
        consumer.qos(prefetch_count=bench.settings.prefetch)
        consumer.consume()
        with _measured(bench, n, "consume", out), hook("consume"):
            while received < n:
                try:
                    conn.drain_events(timeout=DRAIN_TIMEOUT)
                except TimeoutError as exc:  # socket.timeout is TimeoutError
                    raise LostMessages(
                        f"{transport}: only {received} of {n} messages after "
                        f"{DRAIN_TIMEOUT}s without one"
                    ) from exc
        consumer.cancel()
    return out


@contextmanager
def _measured(bench: Bench, n: int, phase: str, out: dict[str, float]) -> Iterator[None]:
    """Time one phase; record its rate and the client's and server's CPU per message."""
    server_pid = bench.server.pid
    server0, client0, wall0 = process_cpu(server_pid), time.process_time(), time.perf_counter()
    yield
    wall = time.perf_counter() - wall0
    out[phase] = n / wall
    out[f"{phase}_client_cpu_us"] = 1e6 * (time.process_time() - client0) / n
    out[f"{phase}_server_cpu_us"] = 1e6 * (process_cpu(server_pid) - server0) / n
