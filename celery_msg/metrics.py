"""Prometheus metrics of a celery-msg broker: a custom collector over :mod:`celery_msg.snapshot`.

Every scrape takes one snapshot (one pipelined round trip per 1,000 queues, never a scan of the
keyspace) and turns it into these families, all labelled ``queue`` and ``kind``:

=============================================  =======  ==========================================
``celery_msg_messages{state}``                 gauge    ready (due scheduled included), reserved,
                                                        scheduled, dead
``celery_msg_oldest_ready_age_seconds``        gauge    how long the oldest ready message has
                                                        waited; 0 when nothing is ready;
                                                        over-reported by less than 1 s
                                                        (``scripts.CLOCK_MS``: the queue's
                                                        clock, see ``lua/_queue.lua``)
``celery_msg_consumers``                       gauge    consumers attached (live heartbeats)
``celery_msg_<counter>_total``                 counter  published, delivered, redelivered, acked,
                                                        requeued, reclaimed, promoted, retried,
                                                        replayed, expired, dropped, deduplicated,
                                                        lease_lost, dead_trimmed
``celery_msg_dead_lettered_total{reason}``     counter  failed, poison, rejected, undecodable,
                                                        expired, missing-body, ... (``unknown``:
                                                        counted before reasons were)
``celery_msg_queue_readable``                  gauge    0 for a queue whose keys are corrupted
=============================================  =======  ==========================================

plus, without labels, ``celery_msg_up`` (0: Redis unreachable; nothing else is exported then),
``celery_msg_queues``, ``celery_msg_scrape_duration_seconds`` and
``celery_msg_scrape_round_trips``.

Which queues: by default only task queues (``kind="normal"``). Celery's own queues come and go
with workers and clients (a reply queue per ``celery inspect``, a broadcast and a mailbox queue
per worker, an event queue per Flower): exported, they would add series with every restart and
clutter dashboards. Pass ``kinds`` (or ``--kind`` on the command line) to include them; the
``kind`` label tells them apart. Counters are the queue's own, kept by the scripts in Redis: they
survive restarts of this exporter and of workers, and restart from zero only when a queue is
deleted (Prometheus' ``rate()`` handles that as a counter reset).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from contextlib import AbstractContextManager
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .core import Broker
from .errors import CeleryMsgError
from .keys import Counter
from .snapshot import CHUNK, QueueKind, QueueSnapshot, take

logger = logging.getLogger(__name__)

NAMESPACE = "celery_msg"

#: The kinds of queue exported unless asked otherwise.
DEFAULT_KINDS: frozenset[QueueKind] = frozenset({QueueKind.NORMAL})

#: Counter (``stats`` field) -> metric name (``_total`` is added) and help text. ``dead`` is
#: exported per reason instead (``dead_lettered_total``).
COUNTERS: dict[Counter, tuple[str, str]] = {
    Counter.PUBLISHED: ("published", "Messages stored by a publish."),
    Counter.DELIVERED: ("delivered", "Deliveries to a consumer, under a lease."),
    Counter.REDELIVERED: ("redelivered", "Deliveries of a message delivered before."),
    Counter.ACKED: ("acked", "Messages acknowledged (done)."),
    Counter.REQUEUED: ("requeued", "Messages given back to their queue by their consumer."),
    Counter.RECLAIMED: ("reclaimed", "Leases that expired (consumer died or hung): requeued."),
    Counter.PROMOTED: ("promoted", "Scheduled messages (ETA, countdown) that became ready."),
    Counter.RETRIED: ("retried", "Publishes of a Celery retry."),
    Counter.REPLAYED: ("replayed", "Dead messages put back into their queue."),
    Counter.EXPIRED: ("expired", "Messages removed unserved: past their TTL or expires."),
    Counter.DROPPED: ("dropped", "Messages dropped from the head of a queue at max_length."),
    Counter.DUPLICATES: ("deduplicated", "Unique publishes refused: the id was pending."),
    Counter.LEASE_LOST: ("lease_lost", "Acks, renewals and rejects refused: lease lost."),
    Counter.DEAD_TRIMMED: ("dead_trimmed", "Dead messages removed by retention."),
}

#: Label value of dead-letterings counted before they were counted per reason.
UNKNOWN_REASON = "unknown"


class QueueCollector(Collector):
    """A prometheus-client collector of a celery-msg broker's queues.

    In an app's own ``/metrics``::

        from prometheus_client import REGISTRY
        from celery_msg.metrics import QueueCollector

        REGISTRY.register(QueueCollector.for_app(celery_app))

    It reads Redis on every scrape (nothing is cached), so a scrape shows the queues as they
    are; it never raises: with Redis unreachable it reports ``celery_msg_up 0``.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        kinds: Collection[QueueKind] = DEFAULT_KINDS,
        chunk: int = CHUNK,
        owner: AbstractContextManager[Any] | None = None,
    ) -> None:
        unknown = [k for k in kinds if not isinstance(k, QueueKind)]
        if unknown:
            raise ValueError(f"kinds must be QueueKind values, not {unknown!r}")
        self.broker = broker
        self.kinds = frozenset(kinds)
        self.chunk = chunk
        self._owner = owner

    @classmethod
    def for_app(cls, app: Any, **options: Any) -> QueueCollector:
        """A collector of ``app``'s broker (its ``celery-msg://`` URL and transport options),
        keeping one connection open until :meth:`close`."""
        from .api import broker_for  # the Celery layer: imported only when asked for

        owner = broker_for(app)
        broker = owner.__enter__()
        return cls(broker, owner=owner, **options)

    def close(self) -> None:
        if self._owner is not None:
            self._owner.__exit__(None, None, None)
            self._owner = None

    def describe(self) -> Iterable[Metric]:
        """The families, without samples: registering the collector reads nothing."""
        return families()

    def collect(self) -> Iterable[Metric]:
        started = time.perf_counter()
        families = _Families()
        try:
            snap = take(self.broker, chunk=self.chunk)
        except CeleryMsgError as exc:  # unreachable, or refused (ACL): say so, do not fail
            logger.warning("metrics: could not read the queues: %s", exc)
            families.up.add_metric([], 0)
            return [families.up]
        queues = [q for q in snap.queues if q.kind in self.kinds]
        for q in queues:
            families.add(q)
        families.up.add_metric([], 1)
        families.queues.add_metric([], len(queues))
        families.duration.add_metric([], time.perf_counter() - started)
        families.round_trips.add_metric([], snap.round_trips)
        return families.all()


def families() -> list[Metric]:
    """Every metric family the collector exports, without samples (for docs and tests)."""
    return _Families().all()


class _Families:
    """One scrape's metric families (built anew each scrape: the collector keeps no state)."""

    def __init__(self) -> None:
        per_queue = ["queue", "kind"]
        self.messages = GaugeMetricFamily(
            f"{NAMESPACE}_messages", "Messages in a queue by state.", labels=[*per_queue, "state"]
        )
        self.oldest = GaugeMetricFamily(
            f"{NAMESPACE}_oldest_ready_age_seconds",
            "How long the oldest ready message of a queue has waited (0: none ready).",
            labels=per_queue,
        )
        self.consumers = GaugeMetricFamily(
            f"{NAMESPACE}_consumers", "Consumers attached to a queue.", labels=per_queue
        )
        self.counters = {
            counter: CounterMetricFamily(f"{NAMESPACE}_{name}", doc, labels=per_queue)
            for counter, (name, doc) in COUNTERS.items()
        }
        self.dead_lettered = CounterMetricFamily(
            f"{NAMESPACE}_dead_lettered",
            "Messages dead-lettered, by reason.",
            labels=[*per_queue, "reason"],
        )
        self.readable = GaugeMetricFamily(
            f"{NAMESPACE}_queue_readable",
            "0 when a queue's keys are corrupted (see the exporter's log).",
            labels=per_queue,
        )
        self.up = GaugeMetricFamily(f"{NAMESPACE}_up", "1 when Redis answered this scrape.")
        self.queues = GaugeMetricFamily(f"{NAMESPACE}_queues", "Queues exported.")
        self.duration = GaugeMetricFamily(
            f"{NAMESPACE}_scrape_duration_seconds", "Time taken to read the queues."
        )
        self.round_trips = GaugeMetricFamily(
            f"{NAMESPACE}_scrape_round_trips", "Redis round trips taken to read the queues."
        )

    def add(self, q: QueueSnapshot) -> None:
        labels = [q.queue, str(q.kind)]
        self.readable.add_metric(labels, 1 if q.readable else 0)
        if not q.readable:
            return
        for state, n in q.states().items():
            self.messages.add_metric([*labels, state], n)
        self.oldest.add_metric(labels, q.oldest_ready_age or 0.0)
        self.consumers.add_metric(labels, q.consumers)
        for counter, family in self.counters.items():
            family.add_metric(labels, q.counter(counter))
        for reason, n in _dead_by_reason(q).items():
            self.dead_lettered.add_metric([*labels, reason], n)

    def all(self) -> list[Metric]:
        return [
            self.messages,
            self.oldest,
            self.consumers,
            *self.counters.values(),
            self.dead_lettered,
            self.readable,
            self.up,
            self.queues,
            self.duration,
            self.round_trips,
        ]


def _dead_by_reason(q: QueueSnapshot) -> dict[str, int]:
    """Dead-letterings per reason; those counted before reasons were go to ``unknown``."""
    by_reason = dict(q.dead_by_reason)
    rest = q.counter(Counter.DEAD) - sum(by_reason.values())
    if rest > 0:
        by_reason[UNKNOWN_REASON] = by_reason.get(UNKNOWN_REASON, 0) + rest
    return by_reason
