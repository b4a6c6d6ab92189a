"""Keeping a live consumer's leases alive: the background thread and what one round does.

It is what turns a visibility timeout into a lease: while the process lives, everything it
holds is renewed in one batched call per round, so a task may run for hours; when the process
dies, renewal stops and the leases expire, so its messages come back within one lease. A round
(:meth:`LeaseRenewal.renew`) also flushes buffered acks, keeps this consumer's ephemeral
bindings and ``expires`` queues alive, trims the consumed queues' dead-letter stores and
heartbeats on them (:mod:`celery_msg.consumers`: the consumers metrics count).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import consumers
from .core import Broker
from .deadletters import DeadLetters
from .ephemeral import EphemeralBindings
from .errors import BrokerConnectionError, CeleryMsgError
from .holdings import Holdings, log_lost
from .options import TransportOptions, to_ms

logger = logging.getLogger(__name__)


class Renewable(Protocol):
    """What the renewer drives (the transport)."""

    options: TransportOptions

    def renew(self) -> None:
        """One round: flush buffered acks, renew held leases, refresh live bindings."""

    def renew_interval(self) -> float:
        """Seconds until the next round (it may change as queues are consumed)."""


class Renewer(threading.Thread):
    """Calls ``renew()`` every ``renew_interval()`` (a third of the shortest of the lease, the
    binding TTL and the consumed queues' ``expires``) until stopped."""

    def __init__(self, target: Renewable, name: str) -> None:
        super().__init__(name=f"celery-msg-renewer-{name}", daemon=True)
        self.target = target
        self.stopped = threading.Event()
        self._woken = threading.Event()
        self.interval = target.renew_interval()

    def wake(self) -> None:
        """Run the next round now (acks were buffered that should not wait for it)."""
        self._woken.set()

    def run(self) -> None:
        while True:
            self._woken.wait(self.interval)
            self._woken.clear()
            if self.stopped.is_set():
                return
            try:
                self.target.renew()
                self.interval = self.target.renew_interval()
            except BrokerConnectionError as exc:
                logger.warning("lease renewal failed, retrying in %.1fs: %s", self.interval, exc)
            except Exception:
                logger.exception("lease renewal failed; retrying in %.1fs", self.interval)

    def stop(self) -> None:
        """Stop, and wait for a round in progress (its acks) to finish."""
        self.stopped.set()
        self._woken.set()
        if self is not threading.current_thread():
            self.join(timeout=self.target.options.socket_timeout or None)


#: Seconds between two trims of the consumed queues' dead-letter stores (by the renewer).
TRIM_INTERVAL = 60.0


class LeaseRenewal:
    """The renewal rounds of one connection (a mixin of the transport, which provides the
    attributes below and the drain loop's ``_flush_acks``)."""

    broker: Broker
    options: TransportOptions
    consumer_id: str
    channels: list[Any]
    ephemeral: EphemeralBindings
    dead_letters: DeadLetters
    redis: Any

    #: The transport's (:class:`celery_msg.drain.DrainLoop`); declared, not defined, so that
    #: the mixin order cannot hide the real one.
    _flush_acks: Callable[[], None]

    def _init_renewal(self) -> None:
        self._renewer: Renewer | None = None
        self._next_trim = 0.0
        #: Queues this consumer heartbeats on (counted as attached to them).
        self._attached: set[str] = set()
        #: The books of channels closed with a connection given up after an error (see
        #: :meth:`linger`): Celery still runs and settles what they hold.
        self._left: list[Holdings] = []
        #: Acks that could not be confirmed when the connection was given up.
        self.carried = Holdings(self.broker)
        #: Set by :meth:`linger`: no more consuming; the renewer outlives the connection.
        self.abandoned = False

    def books(self) -> list[Holdings]:
        """Every book whose leases this connection renews and whose acks it writes."""
        return [*(channel.holdings for channel in list(self.channels)), *self._left, self.carried]

    def linger(self, books: list[Holdings]) -> None:
        """Keep renewing ``books`` and writing their acks after the connection was given up
        (Celery reconnects with a new transport, but the tasks it was handed go on running
        here and are settled through their old channel); the renewer stops, and the Redis
        connections close, once nothing is held and no ack waits."""
        self.abandoned = True
        self._left.extend(books)
        if self._lingering_over():
            self._stop_lingering()
            return
        self._ensure_renewer()
        renewer = self._renewer
        if renewer is not None:
            for book in books:
                book.on_buffered = renewer.wake
            renewer.wake()  # the acks that could not be confirmed: now

    def _lingering_over(self) -> bool:
        return all(book.empty() for book in self.books())

    def _stop_lingering(self) -> None:
        if self._renewer is not None:
            self._renewer.stopped.set()  # the renewer's own thread may be the caller
            self._renewer.wake()
            self._renewer = None
        with contextlib.suppress(CeleryMsgError):
            consumers.detach(self.broker, self.consumer_id, self._attached)
        self._attached = set()
        self.broker.close()
        self.redis.close()

    def _stop_renewer(self) -> None:
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = None
        self.carried.flush_acks()  # acks a failed round kept (they are lost if Redis is down)
        with contextlib.suppress(CeleryMsgError):  # its heartbeats run out on their own
            consumers.detach(self.broker, self.consumer_id, self._attached)
        self._attached = set()

    def _ensure_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            # Counted as attached from the start, not from the renewer's first round; only
            # metrics read it, so a failure here never stops consuming (the renewer retries).
            try:
                self._attach({q for c in self.channels for q in c._active_queues})
            except CeleryMsgError as exc:
                logger.warning("could not mark this consumer attached to its queues: %s", exc)
            self._renewer = Renewer(self, self.consumer_id)
            self._renewer.start()

    def _attach(self, queues: set[str]) -> None:
        """Heartbeat on the consumed ``queues`` (see :mod:`celery_msg.consumers`); leave the
        ones no longer consumed."""
        left = self._attached - queues
        if left:
            consumers.detach(self.broker, self.consumer_id, left)
        consumers.heartbeat(self.broker, self.consumer_id, queues, self.options.lease_ms)
        self._attached = set(queues)

    def renew(self) -> None:
        """One renewal round: flush buffered acks, renew leases, refresh bindings."""
        channels = list(self.channels)
        self._flush_acks()
        books = self.books()
        started = time.monotonic()
        held = [lease for book in books for lease in book.renewable()]
        renewal = self.broker.renew(held)
        if renewal.lost:
            log_lost([lease for book in books for lease in book.forget(renewal.lost)], "renew")
        for book in books:
            book.forget_gone(renewal.gone)  # acked by a pool child (childack): quietly
        renewed = set(held) - set(renewal.not_renewed)
        for book in books:
            book.mark_confirmed(started, renewed)
        if self.abandoned:
            if self._lingering_over():
                self._stop_lingering()
            return
        # Renewed while any channel consumes the queue, whichever channel bound it.
        consumed = {queue for channel in channels for queue in channel._active_queues}
        bindings = self.ephemeral.live(consumed)
        if bindings:
            self.broker.refresh_bindings(bindings)
        expiring = {q: ms for channel in channels for q, ms in channel.expiring_queues().items()}
        self.broker.touch(expiring)
        self.broker.expire_queues()
        queues = {queue for channel in channels for queue in channel._active_queues}
        if queues and time.monotonic() >= self._next_trim:
            # Retention is counted in days: once a minute is plenty.
            self._next_trim = time.monotonic() + TRIM_INTERVAL
            self.dead_letters.trim({queue: self._retention(queue) for queue in queues})
        self._attach(queues)  # last: only metrics depend on it

    def renew_interval(self) -> float:
        """Seconds between renewal rounds: a third of the shortest of the lease, the binding
        TTL and the ``expires`` of a consumed queue, so none runs out while this consumer
        lives."""
        shortest = min(self.options.lease_timeout, self.options.binding_ttl)
        for channel in list(self.channels):
            for ms in channel.expiring_queues().values():
                shortest = min(shortest, ms / 1000.0)
        return shortest / 3

    def _retention(self, queue: str) -> tuple[int, int]:
        """(most entries, most age in ms) of ``queue``'s dead-letter store; 0 = unbounded."""
        policy = self.options.policies.resolve(None, queue).dead_letter
        max_age = 0 if policy.max_age is None else to_ms(policy.max_age)
        return policy.max_length or 0, max_age
