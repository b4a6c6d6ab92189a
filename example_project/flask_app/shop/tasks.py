"""The shop's background work. Each task is written as a real one would be; what makes it
interesting for celery-msg is said in its docstring."""

from __future__ import annotations

import json
import os
import socket
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import redis
from celery import Task, shared_task
from flask import current_app

_store: dict[tuple[int, str], redis.Redis] = {}


def store() -> redis.Redis:
    """The shop's own Redis data (one client per process: pool processes are forked)."""
    url = current_app.config["REDIS_URL"]
    client = _store.get((os.getpid(), url))
    if client is None:
        client = _store[(os.getpid(), url)] = redis.Redis.from_url(url, decode_responses=True)
    return client


def key(name: str) -> str:
    """One of the shop's own keys, under its prefix (next to the broker's)."""
    return f"{current_app.config['KEY_PREFIX']}{name}"


def _ran(task: Task, **facts: Any) -> dict[str, Any]:
    """What the task reports as its result: where it ran, and on which delivery."""
    return {
        "worker": task.request.hostname or socket.gethostname(),
        "pid": os.getpid(),
        # celery-msg passes each task its queue and delivery count (1 = first delivery).
        "queue": getattr(task.request, "celery_msg_queue", None),
        "delivery": getattr(task.request, "celery_msg_deliveries", None),
        "retries": task.request.retries,
        **facts,
    }


@shared_task(bind=True)
def send_welcome_email(self: Task, user_email: str) -> dict[str, Any]:
    """Fast and high priority; acked on receipt (queue policy), unique per task id for a day.
    Each send writes a file of its own, so a second send would show as a second file."""
    outbox = Path(current_app.config["OUTBOX"])
    outbox.mkdir(parents=True, exist_ok=True)
    message = EmailMessage()
    message["To"] = user_email
    message["From"] = "hello@shop.example"
    message["Subject"] = "Welcome to the shop"
    message.set_content("Thanks for signing up!")
    path = outbox / f"{self.request.id}.{time.time_ns()}.eml"
    path.write_bytes(bytes(message))
    return _ran(self, outbox=str(path))


@shared_task(bind=True)
def build_report(self: Task, report_id: str, seconds: float) -> dict[str, Any]:
    """Slow: runs longer than the lease. The worker renews the lease meanwhile, so the report
    is built once; if the worker dies, the report is built again elsewhere (it is idempotent:
    its file is written at the end, under its own name)."""
    started_at = time.time()
    store().rpush(key(f"report-starts:{report_id}"), os.getpid())
    time.sleep(seconds)
    outbox = Path(current_app.config["OUTBOX"])
    outbox.mkdir(parents=True, exist_ok=True)
    (outbox / f"report-{report_id}.txt").write_text(f"report {report_id}\n")
    starts = store().llen(key(f"report-starts:{report_id}"))
    return _ran(self, report=report_id, started_at=started_at, starts=starts)


@shared_task(bind=True)
def call_webhook(self: Task, url: str, fail_times: int) -> dict[str, Any]:
    """A partner endpoint that is down for the first ``fail_times`` calls: ConnectionError,
    retried by the ``webhooks`` policy with exponential backoff, waiting in Redis."""
    if self.request.retries < fail_times:
        raise ConnectionError(f"{url}: connection refused (attempt {self.request.retries + 1})")
    return _ran(self, url=url)


GATEWAY_DOWN = "payment-gateway-down"


@shared_task(bind=True)
def charge_card(self: Task, order_id: int, amount_cents: int) -> dict[str, Any]:
    """Fails while the payment gateway is down; its policy sends the failure straight to the
    dead-letter store, from where it is replayed once the gateway is back."""
    if store().exists(key(GATEWAY_DOWN)):
        raise RuntimeError(f"payment gateway unavailable: order {order_id} not charged")
    store().hset(key("charged"), str(order_id), amount_cents)
    return _ran(self, order=order_id, charged=amount_cents)


@shared_task(bind=True)
def send_reminder(self: Task, user_email: str) -> dict[str, Any]:
    """Sent with ``countdown=``: it waits in Redis, not in a worker, until it is due."""
    eta = self.request.eta
    return _ran(self, to=user_email, eta=eta, ran_at=time.time())


@shared_task(bind=True)
def invalidate_cache(self: Task, cache_key: str) -> dict[str, Any]:
    """A broadcast: every worker drops its cached copy of ``cache_key``."""
    store().rpush(key(f"cache-invalidated:{cache_key}"), json.dumps(_ran(self, key=cache_key)))
    return _ran(self, key=cache_key)
