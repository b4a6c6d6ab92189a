"""The overview: every queue's counts by state, its oldest ready message, its consumers and its
rates, from the same :func:`celery_msg.snapshot.take` as the Prometheus metrics (one pipelined
round trip per 1,000 queues); the rates come from the dashboard's own
:class:`~celery_msg.web.rates.RateSampler`, not from Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import Broker
from ..snapshot import QueueKind, QueueSnapshot, take
from .rates import CHARTED


@dataclass(frozen=True)
class Overview:
    #: Work queues first, then the plumbing (remote control, events, broadcast), by name.
    queues: list[QueueSnapshot]
    #: Registered queue names that are not UTF-8, and queues whose keys could not be read
    #: (those are still listed, with their error).
    unreadable: int


def read_overview(broker: Broker) -> Overview:
    snapshot = take(broker)
    queues = sorted(snapshot.queues, key=lambda q: (q.kind is not QueueKind.NORMAL, q.queue))
    return Overview(queues, snapshot.skipped_names + len(snapshot.unreadable))


def read_counters(broker: Broker) -> dict[str, dict[str, int]]:
    """The charted counters of every queue (what the rate sampler records)."""
    return {
        q.queue: {name: q.counters.get(name, 0) for name in CHARTED}
        for q in take(broker).queues
        if q.readable
    }
