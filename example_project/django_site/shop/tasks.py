"""The back office's background work. Queues and what happens on failure are not decided here
but in settings (CELERY_TASK_ROUTES and CELERY_MSG_POLICIES): the tasks are plain Celery."""

import logging
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from celery import shared_task
from django.conf import settings
from django.core.cache import cache
from django.core.mail import EmailMessage

from . import activity

logger = logging.getLogger(__name__)


class PaymentGatewayError(Exception):
    """The payment provider refused the charge."""


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see the whole file or none of it (write a temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _to_outbox(task_id: str, to: str, subject: str, body: str) -> Path:
    """Write the e-mail where a mail relay would pick it up: ``$SHOP_OUTBOX/<task id>.eml``.

    Named after the task id, so that running the task again rewrites the same file instead of
    sending a second e-mail.
    """
    message = EmailMessage(subject, body, settings.DEFAULT_FROM_EMAIL, [to])
    path = Path(settings.SHOP_OUTBOX) / f"{task_id}.eml"
    _write_atomically(path, message.message().as_bytes())
    return path


@shared_task(bind=True)
def send_welcome_email(self, user_email: str) -> dict:
    """Published with a high priority by POST /signup: it overtakes queued reminders."""
    path = _to_outbox(
        self.request.id,
        user_email,
        "Welcome to the shop",
        f"Hello {user_email},\n\nyour account is ready. Happy shopping!\n",
    )
    activity.record("welcome-email", task_id=self.request.id, to=user_email, file=str(path))
    return {"to": user_email, "file": str(path)}


@shared_task(bind=True)
def send_reminder(self, user_email: str) -> dict:
    """Published with ``countdown=``: it waits in Redis (not in a worker) until due."""
    path = _to_outbox(
        self.request.id,
        user_email,
        "You left something in your cart",
        f"Hello {user_email},\n\nyour cart is still waiting for you.\n",
    )
    activity.record("reminder-email", task_id=self.request.id, to=user_email, file=str(path))
    return {"to": user_email, "file": str(path)}


@shared_task(bind=True)
def build_report(self, report_id: str, seconds: float) -> dict:
    """A slow report: ``seconds`` of crunching (longer than the broker's lease_timeout), then
    the file. The worker renews the message's lease meanwhile, so it is never handed to another
    worker and runs once."""
    activity.record("report-started", task_id=self.request.id, report=report_id)
    started = time.monotonic()
    rows = []
    while (elapsed := time.monotonic() - started) < seconds:
        time.sleep(min(1.0, seconds - elapsed))
        rows.append(f"{len(rows) + 1},{report_id},{elapsed:.1f}")
    path = Path(settings.SHOP_REPORTS_DIR) / f"{report_id}.csv"
    _write_atomically(path, ("step,report,elapsed\n" + "\n".join(rows) + "\n").encode())
    activity.record("report-finished", task_id=self.request.id, report=report_id, file=str(path))
    return {"report": report_id, "file": str(path), "seconds": round(time.monotonic() - started, 1)}


@shared_task(bind=True)
def call_webhook(self, url: str, fail_times: int) -> dict:
    """Notify a partner. The partner is simulated (no network): its endpoint refuses the first
    ``fail_times`` attempts. The webhooks queue's policy retries ConnectionError with
    exponential backoff; ``self.request.retries`` counts the retries so far."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")  # not retried (give_up_on)
    attempt = self.request.retries + 1
    activity.record("webhook-attempt", task_id=self.request.id, url=url, attempt=attempt)
    if self.request.retries < fail_times:
        raise ConnectionError(f"{url}: connection refused (attempt {attempt})")
    return {"url": url, "delivered": True, "attempts": attempt}


@shared_task(bind=True)
def charge_card(self, order_id: int) -> dict:
    """Charge an order's card. The (simulated) gateway declines every charge: the task fails,
    is not retried, and its message lands in the dead-letter store of the default queue, from
    where an operator replays it once the gateway is fixed."""
    activity.record("charge-attempt", task_id=self.request.id, order=order_id)
    raise PaymentGatewayError(f"order {order_id}: card declined by the payment gateway")


@shared_task(bind=True)
def invalidate_cache(self, key: str) -> dict:
    """Routed to the Broadcast queue "cache": runs once on every worker, each dropping ``key``
    from its host's cache."""
    cache.delete(key)
    node = self.request.hostname
    activity.record("cache-invalidated", task_id=self.request.id, key=key, node=node)
    logger.info("cache key %r invalidated on %s", key, node)
    return {"key": key, "node": node}
