"""What one consumer channel holds: its leases by delivery tag, and acks not yet written.

Three threads touch it: the consumer thread (reserves, delivers, acks a solo task), pool
threads (ack prefork tasks) and the renewer (renews everything, flushes buffered acks). One
lock, and no method that hands out the live collections.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from .core import Lease


class Holdings:
    """Leases held by one channel, and acks buffered to ride on the next round trip."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._acks: list[Lease] = []

    def add(self, tag: str, lease: Lease) -> None:
        with self._lock:
            self._leases[tag] = lease

    def holds(self, tag: str) -> bool:
        with self._lock:
            return tag in self._leases

    def settle(self, tag: str) -> Lease | None:
        """Stop holding ``tag``: its lease, to settle now (None when it was lost)."""
        with self._lock:
            return self._leases.pop(tag, None)

    def buffer_ack(self, tag: str) -> bool:
        """Stop holding ``tag`` and keep its ack for the next flush; False if it was lost."""
        with self._lock:
            lease = self._leases.pop(tag, None)
            if lease is None:
                return False
            self._acks.append(lease)
            return True

    def settle_many(self, tags: Iterable[str]) -> list[Lease]:
        with self._lock:
            return [self._leases.pop(tag) for tag in tags if tag in self._leases]

    def has_acks(self) -> bool:
        """Whether acks wait to be written (checked on every event-loop tick: no copy)."""
        with self._lock:
            return bool(self._acks)

    def take_acks(self) -> list[Lease]:
        with self._lock:
            acks, self._acks = self._acks, []
        return acks

    def take_all(self) -> list[Lease]:
        """Every lease still held (not the buffered acks), emptying the book."""
        with self._lock:
            leases = list(self._leases.values())
            self._leases.clear()
        return leases

    def renewable(self) -> list[Lease]:
        """Held leases plus buffered acks: both must stay leased until written."""
        with self._lock:
            return [*self._leases.values(), *self._acks]

    def drop_queue(self, queue: str) -> None:
        """Forget leases and buffered acks of ``queue``: it was deleted with its messages."""
        with self._lock:
            for tag in [t for t, lease in self._leases.items() if lease.queue == queue]:
                del self._leases[tag]
            self._acks = [lease for lease in self._acks if lease.queue != queue]

    def forget(self, lost: Iterable[Lease]) -> list[Lease]:
        """Drop leases the server says are lost: nobody may settle them any more. Returns the
        ones this book still held or had buffered: a lease settled meanwhile (an ack written
        while its renewal was in flight) was not lost, and is not reported."""
        gone = set(lost)
        with self._lock:
            dropped = [lease for lease in self._leases.values() if lease in gone]
            for tag in [t for t, lease in self._leases.items() if lease in gone]:
                del self._leases[tag]
            dropped.extend(lease for lease in self._acks if lease in gone)
        return dropped
