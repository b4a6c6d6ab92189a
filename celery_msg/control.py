"""Celery's ``inspect scheduled``, answered from Redis for a celery-msg worker.

Celery's own command lists the ETA tasks in the worker's timer. With celery-msg an ETA,
countdown or retry message waits in its queue's *schedule* in Redis until it is due, so that
list is always empty. :func:`install_scheduled` wraps the registered command: a worker whose
consumer is the one :func:`celery_msg.configure` installs answers from the schedules of the
queues it consumes (the soonest :data:`SCHEDULED_LIMIT` of each), in Celery's reply shape; any
other worker in the process gets Celery's answer.

Differences an operator may see: every worker consuming a queue lists that queue's scheduled
messages (they belong to the queue, not yet to a worker); ``priority`` is the message's priority
(Celery's own reply carries its timer's, always 6); ``time_start`` and ``worker_pid`` are None.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from celery.worker.control import Panel
from kombu.utils.json import loads

from .core import Broker, ScheduledMessage
from .outcome import broker_of

logger = logging.getLogger(__name__)

#: Most scheduled messages listed per queue (the soonest due), so a reply stays small.
SCHEDULED_LIMIT = 100

_ORIGINAL = "__celery_msg_original__"
_JSON = "application/json"


def scheduled_requests(
    broker: Broker, queues: Iterable[str], hostname: str, limit: int = SCHEDULED_LIMIT
) -> list[dict[str, Any]]:
    """Celery's ``scheduled`` reply (``{"eta", "priority", "request"}`` per task), soonest first,
    from the schedules of ``queues``; a payload that cannot be read is left out and logged."""
    found: list[tuple[int, dict[str, Any]]] = []
    for queue in dict.fromkeys(queues):
        for message in broker.scheduled(queue, limit):
            entry = scheduled_entry(message, hostname)
            if entry is None:
                logger.warning(
                    "queue %s message %s: scheduled payload is not a readable task message; "
                    "left out of inspect scheduled",
                    queue,
                    message.key,
                )
                continue
            found.append((message.due_ms, entry))
    found.sort(key=lambda pair: pair[0])
    return [entry for _, entry in found]


def scheduled_entry(message: ScheduledMessage, hostname: str) -> dict[str, Any] | None:
    """One entry of the reply, as Celery's ``Request.info()`` shows a request; None when the
    payload is not a task message (everything read from Redis is untrusted)."""
    try:
        raw = loads(message.payload)
    except Exception:  # kombu's loads raises whatever json and its decoders raise
        return None
    if not isinstance(raw, dict):
        return None
    headers, props = raw.get("headers"), raw.get("properties")
    if not isinstance(headers, dict) or not isinstance(props, dict):
        return None
    task_id, name = headers.get("id"), headers.get("task")
    if not isinstance(task_id, str) or not isinstance(name, str):
        return None
    priority = props.get("priority")
    if not isinstance(priority, int) or isinstance(priority, bool):
        priority = 0
    route = props.get("delivery_info")
    route = route if isinstance(route, dict) else {}
    args, kwargs = _arguments(raw, props, headers)
    return {
        "eta": _eta(headers.get("eta"), message.due_ms),
        "priority": priority,
        "request": {
            "id": task_id,
            "name": name,
            "args": args,
            "kwargs": kwargs,
            "type": name,
            "hostname": hostname,
            "time_start": None,
            "acknowledged": False,
            "delivery_info": {
                "exchange": _text_or_none(route.get("exchange")),
                "routing_key": _text_or_none(route.get("routing_key")),
                "priority": priority,
                "redelivered": False,
            },
            "worker_pid": None,
        },
    }


def _eta(header: Any, due_ms: int) -> str:
    """The task's ETA as Celery reports it (the header, ISO 8601), else its due time in UTC."""
    if isinstance(header, str):
        try:
            return datetime.fromisoformat(header).isoformat()
        except ValueError:
            pass
    return datetime.fromtimestamp(due_ms / 1000.0, tz=UTC).isoformat()


def _arguments(
    raw: dict[str, Any], props: dict[str, Any], headers: dict[str, Any]
) -> tuple[Any, Any]:
    """The task's args and kwargs from a JSON body (protocol 2: ``[args, kwargs, embed]``);
    otherwise Celery's own ``argsrepr`` / ``kwargsrepr`` (a body in another serializer, such as
    pickle, is never decoded here)."""
    fallback = (_text_or_none(headers.get("argsrepr")), _text_or_none(headers.get("kwargsrepr")))
    body = raw.get("body")
    if raw.get("content-type") != _JSON or not isinstance(body, str):
        return fallback
    try:
        text = body
        if props.get("body_encoding") == "base64":
            text = base64.b64decode(body, validate=True).decode(
                str(raw.get("content-encoding") or "utf-8")
            )
        decoded = loads(text)
    except (binascii.Error, LookupError, UnicodeDecodeError, ValueError, TypeError):
        return fallback
    if (
        isinstance(decoded, list)
        and len(decoded) == 3
        and isinstance(decoded[0], list)
        and isinstance(decoded[1], dict)
    ):
        return decoded[0], decoded[1]
    return fallback


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def install_scheduled(consumer_type: type[Any]) -> None:
    """Make Celery's ``scheduled`` command (and its alias ``dump_schedule``) answer from Redis
    for workers whose consumer is a ``consumer_type`` on a celery-msg connection. Idempotent.

    Celery's command registry is global to the process, so the registered function is wrapped,
    not replaced: every other worker gets the original answer."""
    current = Panel.data.get("scheduled")
    if current is None or getattr(current, _ORIGINAL, None) is not None:
        return
    original: Callable[..., Any] = current

    def scheduled(state: Any, **kwargs: Any) -> Any:
        consumer = state.consumer
        broker = broker_of(consumer.connection) if isinstance(consumer, consumer_type) else None
        if broker is None:
            return original(state, **kwargs)
        task_consumer = consumer.task_consumer
        queues = [queue.name for queue in task_consumer.queues] if task_consumer else []
        return scheduled_requests(broker, queues, consumer.hostname)

    scheduled.__doc__ = original.__doc__
    setattr(scheduled, _ORIGINAL, original)
    for name, function in list(Panel.data.items()):
        if function is original:
            Panel.data[name] = scheduled
