"""What one consumer channel holds, and how it lets go: delivery tag -> lease -> settlement.

A channel hands kombu a delivery tag; the lease behind it (queue, key, fencing token) lives
here until the delivery is settled: acked (now, through the event loop's ack writer, or buffered
to ride on the next round trip), requeued, dead-lettered or restored. Settling takes the lease
out of the book first, so each delivery is settled at most once whichever thread gets there
first; a tag whose lease was lost is logged, never settled; one whose message a renewal found
gone (acked already by the prefork pool child that ran it: :mod:`celery_msg.childack`) is
dropped quietly, and so is its settlement.

Three threads touch it: the consumer thread (reserves, delivers, acks a solo task), pool
threads (ack prefork tasks) and the renewer (renews everything, flushes buffered acks). One
lock, and no method that hands out the live collections.

A lease is only as good as its last confirmation: the reserve that granted it, or a renewal
the server answered. A consumer cut off from Redis for longer than the lease (a partition, a
Redis restart) still holds tags whose leases lapsed and were handed to another consumer; so
before a reserved message is handed over (:meth:`Holdings.confirmed`), a book whose last
confirmation is older than :data:`FRESH_FRACTION` of the lease renews everything first and
drops, without delivering or acking, what the server says it lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

from .core import Broker, Lease
from .errors import BrokerConnectionError

logger = logging.getLogger(__name__)

#: A lease confirmed (granted or renewed) longer ago than this fraction of the lease is renewed
#: before its message is handed over: the renewer renews every third of the lease, so a
#: confirmation older than two thirds means renewals failed (partition, Redis down).
FRESH_FRACTION = 2 / 3


class Holdings:
    """Leases held by one channel, and acks buffered to ride on the next round trip."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._acks: list[Lease] = []
        #: Acks a pool thread is writing and waiting for (:meth:`ack_now`): still leased, and
        #: the book is not empty meanwhile (a connection given up at that moment lingers
        #: until they are written or kept).
        self._writing: list[Lease] = []
        #: When the server last confirmed each held lease (monotonic s): granted or renewed.
        self._confirmed: dict[str, float] = {}
        #: Tags a renewal found GONE (acked already, by the prefork pool child that ran the
        #: task: celery_msg.childack; or purged): dropped from the book, and their settlement,
        #: still to come from Celery, is no lost lease to report.
        self._gone: set[str] = set()
        self._fresh_s = broker.lease_ms / 1000.0 * FRESH_FRACTION
        #: Called after an ack is buffered (set while the book lingers: the renewer then
        #: writes the ack at once instead of at its next round, a SIGKILL's window).
        self.on_buffered: Callable[[], None] | None = None

    def add(self, tag: str, lease: Lease, granted_at: float | None = None) -> None:
        """Hold ``lease``; ``granted_at`` (monotonic s, default now): when the server granted or
        last renewed it (a reserve sent ahead was granted before its reply was read)."""
        with self._lock:
            self._leases[tag] = lease
            self._confirmed[tag] = time.monotonic() if granted_at is None else granted_at

    def holds(self, tag: str) -> bool:
        with self._lock:
            return tag in self._leases

    def confirmed(self, tag: str) -> bool:
        """Whether ``tag`` is still held *according to the server*, to be asked right before
        its message is handed over. A lease confirmed recently enough is taken as held; an
        older one means renewals failed meanwhile: everything held is renewed now (one round
        trip) and what the server says is lost is dropped (logged), so that a consumer cut off
        for longer than the lease never runs a message that was redelivered elsewhere. Raises
        :class:`BrokerConnectionError` when Redis still cannot be reached (the caller's
        reconnect then gives the message up with the connection)."""
        with self._lock:
            confirmed = self._confirmed.get(tag)
        if confirmed is None:
            return False
        if time.monotonic() - confirmed < self._fresh_s:
            return True
        self.renew()
        if self.holds(tag):
            return True
        with self._lock:
            self._gone.discard(tag)  # never handed over: nothing will settle it
        return False

    def renew(self) -> list[Lease]:
        """Renew every held lease and buffered ack in one call; drop (and return) the lost,
        and quietly the gone."""
        started = time.monotonic()
        held = self.renewable()
        renewal = self.broker.renew(held)
        dropped = self.forget(renewal.lost)
        log_lost(dropped, "renew")
        self.forget_gone(renewal.gone)
        not_renewed = set(renewal.not_renewed)
        self.mark_confirmed(started, [lease for lease in held if lease not in not_renewed])
        return dropped

    def mark_confirmed(self, at: float, leases: Iterable[Lease]) -> None:
        """The server renewed ``leases`` in a call sent at ``at`` (monotonic s)."""
        renewed = set(leases)
        with self._lock:
            for tag, lease in self._leases.items():
                if lease in renewed:
                    self._confirmed[tag] = max(self._confirmed.get(tag, at), at)

    def settle(self, tag: str) -> Lease | None:
        """Stop holding ``tag``: its lease, to settle now (None when it was lost)."""
        with self._lock:
            self._confirmed.pop(tag, None)
            return self._leases.pop(tag, None)

    def buffer_ack(self, tag: str) -> bool:
        """Stop holding ``tag`` and keep its ack for the next flush; False if it was lost."""
        with self._lock:
            self._confirmed.pop(tag, None)
            lease = self._leases.pop(tag, None)
            if lease is None:
                return False
            self._acks.append(lease)
            return True

    def settle_many(self, tags: Iterable[str]) -> list[Lease]:
        tags = list(tags)
        with self._lock:
            for tag in tags:
                self._confirmed.pop(tag, None)
                self._gone.discard(tag)
            return [self._leases.pop(tag) for tag in tags if tag in self._leases]

    def has_acks(self) -> bool:
        """Whether acks wait to be written (checked on every event-loop tick: no copy)."""
        with self._lock:
            return bool(self._acks)

    def take_acks(self) -> list[Lease]:
        with self._lock:
            acks, self._acks = self._acks, []
        return acks

    def keep_acks(self, acks: Iterable[Lease]) -> None:
        """Buffer acks again that could not be written (Redis unreachable): they stay leased
        (:meth:`renewable`) and go with the next flush."""
        with self._lock:
            self._acks.extend(acks)

    def empty(self) -> bool:
        """Nothing held and no ack waiting or being written."""
        with self._lock:
            return not self._leases and not self._acks and not self._writing

    def take_all(self) -> list[Lease]:
        """Every lease still held (not the buffered acks), emptying the book."""
        with self._lock:
            leases = list(self._leases.values())
            self._leases.clear()
            self._confirmed.clear()
            self._gone.clear()
        return leases

    def renewable(self) -> list[Lease]:
        """Held leases plus buffered acks and acks being written: all must stay leased until
        written."""
        with self._lock:
            return [*self._leases.values(), *self._acks, *self._writing]

    def drop_queue(self, queue: str) -> None:
        """Forget leases and buffered acks of ``queue``: it was deleted with its messages."""
        with self._lock:
            for tag in [t for t, lease in self._leases.items() if lease.queue == queue]:
                del self._leases[tag]
                self._confirmed.pop(tag, None)
            self._acks = [lease for lease in self._acks if lease.queue != queue]

    def forget_gone(self, gone: Iterable[Lease]) -> None:
        """Drop leases whose messages a renewal found GONE (no longer stored: acked by the pool
        child that ran the task, or purged). Nothing to renew or settle any more, and nothing
        to report: Celery's settlement of such a tag, still to come, is ignored quietly."""
        gone = set(gone)
        if not gone:
            return
        with self._lock:
            for tag in [t for t, lease in self._leases.items() if lease in gone]:
                del self._leases[tag]
                self._confirmed.pop(tag, None)
                self._gone.add(tag)
            self._acks = [lease for lease in self._acks if lease not in gone]

    def _ignored(self, tag: str, action: str) -> None:
        """A settlement of ``tag`` found no lease: logged as lost, unless a renewal found its
        message GONE (then nothing is wrong and nothing is said)."""
        if not self._was_gone(tag):
            log_ignored(tag, action)

    def _was_gone(self, tag: str) -> bool:
        """Whether ``tag`` was dropped as GONE (once: its settlement is the last word)."""
        with self._lock:
            if tag in self._gone:
                self._gone.discard(tag)
                return True
            return False

    def forget(self, lost: Iterable[Lease]) -> list[Lease]:
        """Drop leases the server says are lost: nobody may settle them any more. Returns the
        ones this book still held or had buffered: a lease settled meanwhile (an ack written
        while its renewal was in flight) was not lost, and is not reported."""
        gone = set(lost)
        with self._lock:
            dropped = [lease for lease in self._leases.values() if lease in gone]
            for tag in [t for t, lease in self._leases.items() if lease in gone]:
                del self._leases[tag]
                self._confirmed.pop(tag, None)
            dropped.extend(lease for lease in self._acks if lease in gone)
            self._acks = [lease for lease in self._acks if lease not in gone]
        return dropped

    # -- settlement ------------------------------------------------------------------------

    def release(self, tag: str, action: str) -> Lease | None:
        """:meth:`settle`, logging a tag whose lease was lost (nothing to settle)."""
        lease = self.settle(tag)
        if lease is None:
            self._ignored(tag, action)
        return lease

    def buffer_ack_or_log(self, tag: str) -> None:
        if not self.buffer_ack(tag):
            self._ignored(tag, "ack")
        elif self.on_buffered is not None:
            self.on_buffered()

    def ack_through(self, tag: str, send: Callable[[list[Lease]], Any]) -> None:
        """Hand the ack to a writer that sends it without waiting (the event loop's)."""
        lease = self.release(tag, "ack")
        if lease is not None:
            send([lease])

    def ack_now(self, tag: str) -> bool:
        """Write the ack and wait for it; True when there was a lease to ack.

        While the ack is on its way the lease stays in the book (:attr:`_writing`): renewed,
        and the book not empty. A pool thread's ack can wait for a socket timeout while Celery
        gives the connection up; the connection's renewer lingers only while some book is not
        empty, so a book that looked empty then would have stopped it, and the ack kept a
        moment later would never have been written (the task ran again when its lease lapsed).
        """
        with self._lock:
            self._confirmed.pop(tag, None)
            lease = self._leases.pop(tag, None)
            if lease is not None:
                self._writing.append(lease)
        if lease is None:
            self._ignored(tag, "ack")
            return False
        kept = False
        try:
            log_lost(self.broker.ack([lease]), "ack")
        except BrokerConnectionError as exc:
            # Not dropped: a pool thread's ack must not fail its task's settlement (kombu's
            # prefetch slot would stay taken, and the lease, no longer held, expire: the task
            # would run again). Kept for the next round or the renewer's, as a buffered ack.
            logger.warning("ack of %s kept for the next round: %s", lease.key, exc)
            kept = True
        finally:
            with self._lock:
                self._writing.remove(lease)
                if kept:
                    self._acks.append(lease)
        if kept and self.on_buffered is not None:
            self.on_buffered()  # a lingering renewer writes it now, not a round later
        return True

    def requeue(self, tag: str) -> None:
        lease = self.release(tag, "requeue")
        if lease is not None:
            log_lost(self.broker.requeue([lease]), "requeue")

    def dead_letter(self, tag: str, reason: str, detail: str, **extra: Any) -> None:
        lease = self.release(tag, "dead-letter")
        if lease is None:
            return
        if self.broker.dead_letter(lease, reason, detail, **extra):
            logger.warning(
                "queue %s message %s dead-lettered: %s: %s", lease.queue, lease.key, reason, detail
            )
        else:
            log_lost([lease], "dead-letter")

    def restore(self, tags: Iterable[str], crashed: Collection[str]) -> None:
        """Back to the front of their queues, uncounted (never started, or a clean close),
        except ``crashed`` ones (handling them raised): those count as a delivery, so
        ``max_deliveries`` ends a crash loop."""
        tags = list(tags)
        plain = [tag for tag in tags if tag not in crashed]
        log_lost(self.broker.requeue(self.settle_many(plain), uncount=True), "restore")
        leases = self.settle_many([tag for tag in tags if tag in crashed])
        if leases:
            for lease in leases:
                logger.warning(
                    "queue %s message %s: its handling raised; back in the queue, counted as a "
                    "delivery",
                    lease.queue,
                    lease.key,
                )
            log_lost(self.broker.requeue(leases), "restore")

    def flush_acks(self) -> None:
        """Write the buffered acks (at close: an unreachable Redis is logged, not raised)."""
        acks = self.take_acks()
        try:
            log_lost(self.broker.ack(acks), "ack")
        except BrokerConnectionError as exc:
            logger.warning("could not flush %d acks at close: %s", len(acks), exc)

    def give_back(self, tags: Iterable[str]) -> None:
        """Stop holding ``tags`` (reserved, never handed over) and put them back, uncounted; when
        Redis cannot be reached their leases lapse instead, with the same effect."""
        leases = self.settle_many(tags)
        if leases:
            with contextlib.suppress(BrokerConnectionError):
                log_lost(self.broker.requeue(leases, uncount=True), "restore")

    def requeue_all(self) -> None:
        """Everything still held back to its queue, uncounted (a channel closing)."""
        leftovers = self.take_all()
        if leftovers:
            with contextlib.suppress(BrokerConnectionError):
                self.broker.requeue(leftovers, uncount=True)


def log_ignored(tag: str, action: str) -> None:
    logger.warning("delivery %s: %s ignored, its lease was lost", tag, action)


def log_lost(lost: list[Lease], action: str) -> None:
    for lease in lost:
        logger.warning(
            "queue %s message %s: %s refused, lease lost (token %d): it was presumed dead and "
            "redelivered, or purged",
            lease.queue,
            lease.key,
            action,
            lease.token,
        )
