"""Pure helpers over a kombu message dict (the envelope the transport stores): its stable id
and its priority band. No Redis, no kombu import: the transport, the migration from
``redis://`` and the tests share them, so a message is placed the same way by each."""

from __future__ import annotations

import uuid
from typing import Any, Literal

PriorityOrder = Literal["desc", "asc"]


def message_id(message: dict[str, Any]) -> str:
    """The stable ID of a kombu message: the Celery task id when there is one."""
    headers = message.get("headers")
    props = message.get("properties")
    headers = headers if isinstance(headers, dict) else {}
    props = props if isinstance(props, dict) else {}
    return str(
        headers.get("id")
        or props.get("message_id")
        or props.get("correlation_id")
        or props.get("delivery_tag")
        or uuid.uuid4().hex
    )


def band_of(message: dict[str, Any], default_priority: int, order: PriorityOrder) -> int:
    """The priority band (0 is served first) of a message, from its ``priority`` property
    (0-255, clamped; unreadable or absent: ``default_priority``)."""
    props = message.get("properties")
    raw = props.get("priority") if isinstance(props, dict) else None
    try:
        priority = default_priority if raw is None else int(raw)
    except (TypeError, ValueError):
        priority = default_priority
    priority = max(0, min(255, priority))
    return 255 - priority if order == "desc" else priority
