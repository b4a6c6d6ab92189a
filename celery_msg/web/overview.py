"""The overview: every queue's counts by state, its oldest ready message and its rates.

One pipelined round trip for all queues, whatever their number; the rates come from the
:class:`~celery_msg.web.rates.RateSampler` the dashboard runs, not from Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import Broker, translated_errors
from .rates import CHARTED


@dataclass(frozen=True)
class QueueRow:
    """One queue as the overview shows it."""

    name: str
    kind: str
    ready: int
    reserved: int
    scheduled: int
    dead: int
    #: Seconds the oldest READY message has waited, when known.
    oldest_age: float | None
    #: Consumers attached, when known.
    consumers: int | None
    counters: dict[str, int]


@dataclass(frozen=True)
class Overview:
    queues: list[QueueRow]
    #: Registered queue names skipped because they are not UTF-8.
    unreadable: int


def queue_kind(name: str) -> str:
    """``pidbox`` (remote control), ``events`` (Celery's event queues), ``broadcast``, or
    ``normal``: the overview lists the plumbing apart so it does not hide the work queues."""
    if name.endswith(".pidbox"):
        return "pidbox"
    if name.startswith("celeryev."):
        return "events"
    if name.endswith(".bcast") or name.startswith("bcast."):
        return "broadcast"
    return "normal"


def _number(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError):
        return 0


def read_overview(broker: Broker) -> Overview:
    """Counts and charted counters of every registered queue in one pipeline."""
    names, unreadable = broker.queue_registry()
    with translated_errors(f"read the overview of {len(names)} queues"):
        pipe = broker.client.pipeline(transaction=False)
        for name in names:
            keys = broker.keys(name)
            pipe.zcard(keys.ready)
            pipe.zcard(keys.leased)
            pipe.zcard(keys.sched)
            pipe.zcard(keys.dead)
            pipe.hmget(keys.stats, list(CHARTED))
        replies = pipe.execute(raise_on_error=False)
    rows = []
    for i, name in enumerate(names):
        ready, reserved, sched, dead, stats = replies[i * 5 : i * 5 + 5]
        if isinstance(stats, Exception):  # a key of the wrong type: show the queue, not 500
            stats, unreadable = [None] * len(CHARTED), unreadable + 1
        rows.append(
            QueueRow(
                name=name,
                kind=queue_kind(name),
                ready=_number(ready),
                reserved=_number(reserved),
                scheduled=_number(sched),
                dead=_number(dead),
                oldest_age=None,
                consumers=None,
                counters={c: _number(v) for c, v in zip(CHARTED, stats, strict=True)},
            )
        )
    # Work queues first; the plumbing (remote control, events, broadcast) after them.
    rows.sort(key=lambda row: (row.kind != "normal", row.name))
    return Overview(rows, unreadable)


def read_counters(broker: Broker) -> dict[str, dict[str, int]]:
    """The charted counters of every queue (what the rate sampler records)."""
    return {row.name: row.counters for row in read_overview(broker).queues}
