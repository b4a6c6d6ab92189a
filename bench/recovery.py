"""Recovery after SIGKILL: how long a task held by a dead worker waits before it runs again.

A ``-P solo`` worker starts an ``acks_late`` task that sleeps; the harness SIGKILLs the worker's
whole process group as soon as the task has started, starts a second worker at once, and
measures kill -> the task's second start (capped: kombu's redis transport only redelivers after
``visibility_timeout``, 3600 s by default, and only when a periodic sweep notices).
"""

from __future__ import annotations

import json
import time
from typing import Any

from .common import Bench, new_prefix, wait_for
from .tasks import make_app
from .worker import Worker


class TaskNeverStarted(RuntimeError):
    """The first worker never started the task."""


def run(
    bench: Bench, transport: str, cap: float, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Returns ``recovery_s`` (None when nothing happened within ``cap`` seconds)."""
    bench.flush()
    prefix = new_prefix("recovery")
    starts_key = f"{prefix}:starts"
    options = options or {}
    first = Worker(bench, transport, prefix, transport_options=options, name="victim")
    second = Worker(bench, transport, prefix, transport_options=options, name="heir")
    app = make_app(bench.broker_url(transport), options)
    try:
        first.start().wait_ready()
        app.tasks["bench.sleeper"].delay(bench.settings.task_sleep)
        if not wait_for(lambda: bench.client.llen(starts_key) >= 1, 30, check=first.check_alive):
            raise TaskNeverStarted(f"{transport}: the sleeper task never started")
        first.kill()
        killed = time.time()
        second.start()
        second_ready = second.wait_ready() - killed
        rerun = wait_for(
            lambda: bench.client.lindex(starts_key, 1),
            timeout=max(0.0, cap - (time.time() - killed)),
            interval=0.05,
            check=second.check_alive,
        )
    finally:
        app.close()
        first.close()
        second.close()
    recovered = None if rerun is None else json.loads(rerun)["time"] - killed
    return {"recovery_s": recovered, "cap_s": cap, "heir_ready_s": second_ready}
