"""Pure helpers over a kombu message dict (the envelope the transport stores): its stable id,
its priority band, its shape checked on delivery and the fields a delivery stamps on it. No
Redis, no kombu import: the transport, the worker, the migration from ``redis://`` and the tests
share them, so a message is placed and read the same way by each."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Literal

from .headers import FIRST_FAILURE_HEADER

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


def checked_envelope(payload: Any) -> dict[str, Any]:
    """A stored kombu message (decoded JSON), its shape checked (ValueError says what is
    wrong); a missing ``delivery_info`` is added. Anything kombu would fail on later, in the
    worker's consuming thread, fails here instead."""
    if not isinstance(payload, dict) or "body" not in payload:
        raise ValueError("not a kombu message (no body)")
    props = payload.get("properties")
    if not isinstance(props, dict):
        raise ValueError("properties is not a mapping")
    info = props.setdefault("delivery_info", {})
    if not isinstance(info, dict):
        raise ValueError("properties.delivery_info is not a mapping")
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise ValueError("headers is not a mapping")
    for field in ("content-type", "content-encoding"):
        if payload.get(field) is not None and not isinstance(payload[field], str):
            raise ValueError(f"{field} is not a string")
    return payload


def stamp_first_failure(message: dict[str, Any], now_ms: Callable[[], int]) -> None:
    """A Celery retry carries the time of the task's first failure (Celery copies headers from
    retry to retry), for the dead-letter record should its retries run out."""
    headers = message.get("headers")
    if headers and headers.get("retries"):
        headers.setdefault(FIRST_FAILURE_HEADER, now_ms())


def stamp_delivery(
    payload: dict[str, Any], tag: str, queue: str, key: str, token: int, deliveries: int
) -> None:
    """What kombu and Celery read of a delivery: its tag, and in ``delivery_info`` the delivery
    count, source queue, stored key and lease token (celery-msg's own: a prefork pool child
    acks with them, see :mod:`celery_msg.childack`), and whether it is a redelivery."""
    props = payload["properties"]
    props["delivery_tag"] = tag
    info = props["delivery_info"]
    info["delivery_count"] = deliveries
    info["queue"] = queue
    info["message_key"] = key
    info["lease_token"] = token
    payload["redelivered"] = info["redelivered"] = deliveries > 1
