"""The demo's Celery app, configured from the environment by the demo driver.

Every task records what happened to it in Redis (``<prefix>demo:events``), so the driver can
show, and check, that each task ran to the end exactly once — whatever happened to workers.
"""

from __future__ import annotations

import json
import os
import socket
import time

import redis
from celery import Celery, Task

import celery_msg

BROKER = os.environ.get("CELERY_MSG_DEMO_BROKER", "celery-msg://127.0.0.1:6379/0")
PREFIX = os.environ.get("CELERY_MSG_DEMO_PREFIX", "celery-msg-demo:")
LEASE = float(os.environ.get("CELERY_MSG_DEMO_LEASE", "4"))
EVENTS = f"{PREFIX}demo:events"

app = Celery("celery_msg_demo", broker=BROKER)
app.conf.task_default_queue = "default"
app.conf.task_routes = {"celery_msg.demo.tasks.build_report": {"queue": "reports"}}
app.conf.worker_prefetch_multiplier = 1
celery_msg.configure(app, key_prefix=PREFIX, lease_timeout=LEASE, sweep_interval=0.5)

_redis: redis.Redis | None = None


def _record(kind: str, task_id: str, **extra: object) -> None:
    global _redis
    if _redis is None:
        # The demo broker URL is the Redis URL with the celery-msg scheme.
        _redis = redis.Redis.from_url(BROKER.replace("celery-msg://", "redis://", 1))
    event = {
        "kind": kind,
        "task": task_id,
        "worker": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        **extra,
    }
    _redis.rpush(EVENTS, json.dumps(event))


@app.task(bind=True)
def send_welcome_email(self: Task, user: str) -> str:
    _record("start", self.request.id)
    time.sleep(0.05)
    _record("done", self.request.id)
    return f"welcome email to {user} queued in outbox"


@app.task(bind=True, acks_late=True)
def build_report(self: Task, seconds: float) -> str:
    """Runs longer than the lease: the worker keeps renewing it, so it runs once."""
    _record("start", self.request.id, delivery=self.request.delivery_info.get("delivery_count"))
    time.sleep(seconds)
    _record("done", self.request.id)
    return f"report built in {seconds}s"
