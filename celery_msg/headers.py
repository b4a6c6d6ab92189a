"""What the transport reads from a Celery message's headers: when it is due and when it expires.

Celery (task protocol 2) sends ``eta`` and ``expires`` as ISO 8601 strings in the message
headers. The transport turns ``eta`` into a due time so that the message waits in Redis instead
of in a worker's memory, and the worker reads ``expires`` to skip expired messages.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

#: Set by the transport on a Celery retry: when the task first failed (epoch ms).
FIRST_FAILURE_HEADER = "celery_msg_first_failure"
#: ``apply_async(headers={UNIQUE_HEADER: True})``: publish only if the id is not pending.
UNIQUE_HEADER = "celery_msg_unique"


def epoch_ms(value: Any) -> int | None:
    """``value`` (ISO 8601 text, a datetime, or epoch seconds) as epoch milliseconds.

    A naive time is taken as UTC (Celery sends aware times). None when absent or unreadable.
    """
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value * 1000)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return int(value.timestamp() * 1000)
    return None


def due_ms(message: dict[str, Any]) -> int:
    """When a kombu message is due (epoch ms), from its Celery ``eta`` header; 0 = now."""
    headers = message.get("headers")
    if not headers:
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
    if not headers:
        return None
    return epoch_ms(headers.get("expires"))
