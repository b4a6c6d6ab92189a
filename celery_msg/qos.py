"""kombu's QoS for celery-msg: prefetch accounting (kombu's) plus settlement in Redis (ours).

Why its own module: this is where the Celery layer's decision for a delivery is read. ``app.py``
and ``worker.py`` mark a message's :class:`~celery_msg.outcome.Outcome` (acked on receipt
already, to be dropped, or dead-lettered with this record); when kombu acks or rejects the
delivery, :meth:`QoS.ack` / :meth:`QoS.reject` read it and have the channel settle the lease
(:mod:`celery_msg.holdings`) accordingly. Following a ``reject`` therefore reads: Celery rejects
-> ``QoS.reject`` (here) -> ``Channel.settle_*`` -> ``Holdings`` -> ``Broker``.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import virtual

from .errors import BrokerConnectionError
from .outcome import read_outcome

logger = logging.getLogger(__name__)


class QoS(virtual.QoS):
    """Prefetch accounting (kombu's) plus settlement of deliveries in Redis (ours)."""

    restore_at_shutdown = True

    def ack(self, delivery_tag: str) -> None:
        if not read_outcome(self._delivered.get(delivery_tag)).settled:
            self.channel.settle_ack(delivery_tag)  # else acked in Redis on receipt already
        super().ack(delivery_tag)
        self.channel.transport.note_room()

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        outcome = read_outcome(self._delivered.get(delivery_tag))
        try:
            if outcome.settled:
                pass  # acked in Redis on receipt (ack mode early): nothing left to settle
            elif requeue:
                self.channel.settle_requeue(delivery_tag)
            elif outcome.drop:
                # Its policy keeps no dead letters: the worker recorded the failure; drop it.
                self.channel.settle_ack(delivery_tag)
            else:
                record = outcome.rejected
                self.channel.settle_dead(delivery_tag, record.reason, record.detail, **record.extra)
        except BrokerConnectionError as exc:
            # The prefetch slot is freed all the same (a worker must not wedge on a Redis
            # outage); the message, no longer held, comes back when its lease expires.
            logger.warning(
                "could not settle rejected delivery %s (%s): it comes back when its lease expires",
                delivery_tag,
                exc,
            )
        self._quick_ack(delivery_tag)
        self.channel.transport.note_room()

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Return every unacked delivery to the front of its queue, in one batched call."""
        self._flush()
        tags = [tag for tag in self._delivered if tag not in self._dirty]
        self._delivered.clear()
        try:
            self.channel._restore_tags(tags)
        except BrokerConnectionError as exc:
            # Not lost: their leases expire and any live consumer reclaims them.
            logger.warning(
                "could not return %d unacked messages (%s); they come back when their "
                "leases expire",
                len(tags),
                exc,
            )
        return []

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: expired leases are reclaimed by every fetch."""
