"""Configuration from the environment, with defaults for a laptop.

``CELERY`` is the Celery configuration (lower-case setting names); the queues and the
celery-msg policies are declared here, once, next to the routes that use them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

from kombu import Exchange, Queue
from kombu.common import Broadcast

from celery_msg import DeadLetter, Exponential, Fixed, Policies, Policy, Retry, Unique


def settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """The Flask configuration, read from ``environ`` (``os.environ`` in production)."""
    redis_url = environ.get("CELERY_MSG_REDIS_URL", "redis://127.0.0.1:6379/0")
    broker_url = redis_url.replace("rediss://", "celery-msgs://", 1).replace(
        "redis://", "celery-msg://", 1
    )
    key_prefix = environ.get("SHOP_KEY_PREFIX", "flask-shop:")
    # Seconds a worker holds a task without renewing its lease: short here, so that a report
    # (which runs longer) shows the renewal, and a killed worker's tasks come back fast.
    lease = float(environ.get("SHOP_LEASE_TIMEOUT", "4"))
    outbox = environ.get("SHOP_OUTBOX", os.path.join(tempfile.gettempdir(), "shop-outbox"))
    return {
        "REDIS_URL": redis_url,
        "KEY_PREFIX": key_prefix,
        "OUTBOX": outbox,
        "CELERY": celery_settings(broker_url, redis_url, key_prefix, lease),
    }


def celery_settings(
    broker_url: str, redis_url: str, key_prefix: str, lease: float
) -> dict[str, Any]:
    return {
        "broker_url": broker_url,
        "result_backend": redis_url,
        "result_backend_transport_options": {"global_keyprefix": key_prefix},
        "broker_transport_options": {"key_prefix": key_prefix, "lease_timeout": lease},
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_track_started": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "default",
        "task_queues": (
            Queue("emails", Exchange("emails"), routing_key="emails"),
            Queue("reports", Exchange("reports"), routing_key="reports"),
            Queue("webhooks", Exchange("webhooks"), routing_key="webhooks"),
            Queue("default", Exchange("default"), routing_key="default"),
            Broadcast("cache"),
        ),
        "task_routes": {
            "shop.tasks.send_welcome_email": {"queue": "emails", "priority": 9},
            "shop.tasks.send_reminder": {"queue": "emails"},
            "shop.tasks.build_report": {"queue": "reports"},
            "shop.tasks.call_webhook": {"queue": "webhooks"},
            "shop.tasks.invalidate_cache": {"queue": "cache", "exchange": "cache"},
        },
        "msg_policies": Policies(
            # Every queue: keep the failures of the last week, redeliver a message at most 5
            # times (a task that keeps killing its worker is poison after that).
            default=Policy(max_deliveries=5, dead_letter=DeadLetter(max_age=7 * 86400)),
            queues={
                # A welcome email sent twice is worse than a late one: ack on receipt.
                "emails": Policy(ack="early"),
                # Reports are idempotent and must finish: only a success acks them.
                "reports": Policy(ack="on_success"),
                # Partners' endpoints go down: retry with exponential backoff, then give up.
                "webhooks": Policy(
                    ack="late",
                    retry=Retry(
                        max_retries=4,
                        backoff=Exponential(base=0.5, factor=2, cap=5, jitter="equal"),
                        retry_on=(ConnectionError, TimeoutError),
                    ),
                ),
            },
            tasks={
                # A card is charged once: a failure goes straight to the dead-letter store,
                # where an operator looks at it and replays it when the gateway is back.
                "shop.tasks.charge_card": Policy(ack="late", retry=Retry(max_retries=0)),
                # The signup form may be submitted twice, before or after the first email went
                # out (its queue acks on receipt): one welcome email per address and day.
                "shop.tasks.send_welcome_email": Policy(unique=Unique(until=None, ttl=86_400)),
                "shop.tasks.send_reminder": Policy(retry=Retry(max_retries=2, backoff=Fixed(1))),
            },
        ),
    }
