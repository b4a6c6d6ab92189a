"""The expiring (auto-delete / ``x-expires``) bindings of one connection, and which are live.

A broadcast or reply queue is bound with an expiry (``binding_ttl``) and lives as long as some
consumer keeps renewing its binding. The renewal must follow what is *consumed*, not which
kombu channel once bound it: kombu declares a binding once per connection (its ``BrokerState``
is per transport), while Celery cancels and re-creates its remote-control consumer on a new
channel after a reply fails. Tying renewal to the binding channel made such a worker deaf once
its binding expired. Here bindings are recorded per connection and renewed while any channel
of the connection consumes their queue.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from .core import Binding


class EphemeralBindings:
    """Expiring bindings declared on one connection (thread-safe: the renewer reads them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: set[str] = set()
        self._bindings: dict[str, set[Binding]] = {}

    def declare(self, queue: str) -> None:
        """``queue`` is auto-delete or expiring: its bindings expire unless renewed."""
        with self._lock:
            self._queues.add(queue)

    def is_ephemeral(self, queue: str) -> bool:
        with self._lock:
            return queue in self._queues

    def add(self, exchange: str, binding: Binding) -> None:
        with self._lock:
            self._bindings.setdefault(exchange, set()).add(binding)

    def discard(self, exchange: str, binding: Binding) -> None:
        with self._lock:
            self._bindings.get(exchange, set()).discard(binding)

    def forget_queue(self, queue: str) -> None:
        """``queue`` was deleted: nothing of it is renewed any more."""
        with self._lock:
            self._queues.discard(queue)
            for group in self._bindings.values():
                group.difference_update({b for b in group if b.queue == queue})

    def live(self, consumed: Iterable[str]) -> dict[str, set[Binding]]:
        """The bindings to renew now: those of the queues in ``consumed`` (exchange -> set)."""
        queues = set(consumed)
        with self._lock:
            live = {
                exchange: {b for b in group if b.queue in queues}
                for exchange, group in self._bindings.items()
            }
        return {exchange: group for exchange, group in live.items() if group}
