"""A task that runs longer than the broker's timeout: does it run once?

Worker A (``-P solo``) starts an ``acks_late`` task that sleeps three timeouts; once one
timeout has passed, worker B starts on the same queue. kombu's redis transport restores a
message whose visibility timeout expired (it does so at every worker start-up and in periodic
sweeps) even though A is alive and still running it, so B runs it a second time. celery-msg
leases instead: A renews its lease while the task runs, so B finds nothing. Result: how many
times the task started, for a timeout (visibility_timeout / lease_timeout) of ``timeout`` s.
"""

from __future__ import annotations

import time
from typing import Any

from .common import OURS, Bench, new_prefix, wait_for
from .recovery import TaskNeverStarted
from .tasks import make_app
from .worker import Worker


def run(bench: Bench, transport: str, timeout: float) -> dict[str, Any]:
    bench.flush()
    prefix = new_prefix("long")
    starts_key = f"{prefix}:starts"
    name = "lease_timeout" if transport == OURS else "visibility_timeout"
    options: dict[str, Any] = {name: timeout}
    first = Worker(bench, transport, prefix, transport_options=options, name="long-a")
    second = Worker(bench, transport, prefix, transport_options=options, name="long-b")
    app = make_app(bench.broker_url(transport), options)
    task_seconds = 3 * timeout
    try:
        first.start().wait_ready()
        app.tasks["bench.sleeper"].delay(task_seconds)
        if not wait_for(lambda: bench.client.llen(starts_key) >= 1, 30, check=first.check_alive):
            raise TaskNeverStarted(f"{transport}: the long task never started")
        started = time.time()
        time.sleep(timeout + 1)
        second.start().wait_ready()
        # Wait until the first run is over and a little more, for a late duplicate.
        time.sleep(max(0.0, started + task_seconds + 2 - time.time()))
        runs = int(bench.client.llen(starts_key))
    finally:
        app.close()
        first.close()
        second.close()
    return {"starts": runs, "timeout_s": timeout, "task_s": task_seconds}
