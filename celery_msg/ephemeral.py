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
        self._queues: dict[str, int] = {}
        self._bindings: dict[str, set[Binding]] = {}

    def declare(self, queue: str, ttl_ms: int) -> None:
        """``queue`` is auto-delete or expiring: its bindings expire ``ttl_ms`` after their last
        renewal (its ``expires``, else ``binding_ttl``)."""
        with self._lock:
            self._queues[queue] = ttl_ms

    def ttl_of(self, queue: str) -> int | None:
        """The binding TTL of an ephemeral queue (ms), None for a durable one."""
        with self._lock:
            return self._queues.get(queue)

    def add(self, exchange: str, binding: Binding) -> None:
        with self._lock:
            self._bindings.setdefault(exchange, set()).add(binding)

    def discard(self, exchange: str, binding: Binding) -> None:
        with self._lock:
            self._bindings.get(exchange, set()).discard(binding)

    def forget_queue(self, queue: str) -> None:
        """``queue`` was deleted: nothing of it is renewed any more."""
        with self._lock:
            self._queues.pop(queue, None)
            for group in self._bindings.values():
                group.difference_update({b for b in group if b.queue == queue})

    def live(self, consumed: Iterable[str]) -> dict[str, dict[Binding, int]]:
        """The bindings to renew now, those of the queues in ``consumed``: exchange -> binding
        -> its TTL (ms)."""
        queues = set(consumed)
        with self._lock:
            live = {
                exchange: {b: self._queues[b.queue] for b in group if b.queue in queues}
                for exchange, group in self._bindings.items()
            }
        return {exchange: group for exchange, group in live.items() if group}
