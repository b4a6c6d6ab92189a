"""What the transport reads from a Celery message's headers: when it is due and when it expires.

Celery (task protocol 2) sends ``eta`` and ``expires`` as ISO 8601 strings in the message
headers. The transport turns ``eta`` into a due time so that the message waits in Redis instead
of in a worker's memory, and the worker reads ``expires`` to skip expired messages.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

#: Set by the transport on a Celery retry: when the task first failed (epoch ms).
FIRST_FAILURE_HEADER = "celery_msg_first_failure"
#: ``apply_async(headers={UNIQUE_HEADER: True})``: publish only if the id is not pending.
UNIQUE_HEADER = "celery_msg_unique"


def epoch_ms(value: Any) -> int | None:
    """``value`` (ISO 8601 text, a datetime, or epoch seconds) as epoch milliseconds.

    A naive time is taken as UTC (Celery sends aware times). None when absent or unreadable
    (NaN, infinite, out of range: a header is written by any producer, and one bad message must
    not stop the worker that reads it).
    """
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value * 1000) if math.isfinite(value) and abs(value) < 1e15 else None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        try:
            return int(value.timestamp() * 1000)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def due_ms(message: dict[str, Any]) -> int:
    """When a kombu message is due (epoch ms), from its Celery ``eta`` header; 0 = now."""
    headers = message.get("headers")
    if not headers or not isinstance(headers, dict):
        return 0
    raw = headers.get("eta")
    if raw is None:
        return 0
    due = epoch_ms(raw)
    if due is None:
        logger.warning("message %s: unreadable eta %r; delivered now", headers.get("id"), raw)
        return 0
    return due


def expires_ms(headers: dict[str, Any] | None) -> int | None:
    """When a message expires (epoch ms), from its Celery ``expires`` header; None = never."""
    if not isinstance(headers, dict):
        return None
    return epoch_ms(headers.get("expires"))


def is_retry(message: dict[str, Any]) -> bool:
    """Whether a kombu message is a Celery retry: its ``retries`` header is a number above 0
    (anything else, from any producer, is not)."""
    headers = message.get("headers")
    if not isinstance(headers, dict):
        return False
    retries = headers.get("retries")
    return isinstance(retries, int) and not isinstance(retries, bool) and retries > 0
