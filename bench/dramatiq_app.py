"""The Dramatiq app of ``python -m bench --only dramatiq``: one no-op actor that counts as
:func:`bench.tasks.noop` does, on a Redis broker named by ``BENCH_DRAMATIQ_URL``.

A worker loads it with ``python -m dramatiq bench.dramatiq_app`` (see :mod:`bench.vs_dramatiq`);
the harness imports it to send. Dramatiq is an optional bench extra (``pip install
'celery-msg[bench]'``): without it the group reports "not installed".
"""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from .tasks import _prefix, _store, noop

broker = RedisBroker(url=os.environ.get("BENCH_DRAMATIQ_URL", "redis://127.0.0.1:1/0"))
dramatiq.set_broker(broker)


class Ready(dramatiq.Middleware):  # type: ignore[misc]
    """Records when the worker's threads are up (as Celery's ``worker_ready`` in bench.tasks)."""

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        if "BENCH_PREFIX" in os.environ:
            _store().set(f"{_prefix()}:ready", time.time(), nx=True)  # the first process


broker.add_middleware(Ready())
noop_actor = dramatiq.actor(noop, actor_name="bench.noop", queue_name="default", max_retries=0)
