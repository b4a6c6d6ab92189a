"""Latency: one task at a time into an idle worker, publish -> task start.

The harness notes time.time() just before ``delay()``; the task notes time.time() when it
starts (same machine, same clock). Tasks are spaced ``latency_spacing`` apart so the worker is
idle (blocked waiting) each time one arrives.
"""

from __future__ import annotations

import time
from typing import Any

from .common import Bench, new_prefix, percentile, wait_for
from .tasks import make_app
from .worker import Worker


class MissingProbes(RuntimeError):
    """Some probe tasks never started."""


def run(bench: Bench, transport: str) -> dict[str, Any]:
    count = bench.settings.latency_count
    bench.flush()
    prefix = new_prefix("latency")
    app = make_app(bench.broker_url(transport))
    published: list[float] = []
    try:
        with Worker(bench, transport, prefix, pool="solo") as worker:
            worker.wait_ready()
            probe = app.tasks["bench.probe"]
            probe.delay(-1)  # warm up both sides (connections, declarations)
            time.sleep(0.5)
            for i in range(count):
                published.append(time.time())
                probe.delay(i)
                time.sleep(bench.settings.latency_spacing)
            key = f"{prefix}:started"
            done = wait_for(
                lambda: bench.client.hlen(key) >= count + 1, timeout=30, check=worker.check_alive
            )
            if not done:
                raise MissingProbes(f"{transport}: {bench.client.hlen(key) - 1} of {count} ran")
            started = {int(k): float(v) for k, v in bench.client.hgetall(key).items()}
    finally:
        app.close()
    latencies = [1000 * (started[i] - published[i]) for i in range(count)]
    return {
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
    }
