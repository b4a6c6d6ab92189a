"""The drain loop: how a consumer connection reserves, hands over and waits for messages.

Why its own module: the kombu adapter (:mod:`celery_msg.transport`) maps kombu's contract onto
the core; *when* to ask Redis for messages is a job of its own. Both ways of consuming share the
round trip here (:meth:`DrainLoop.deliver_round`: buffered acks plus one reserve for every
consumable channel): a plain kombu consumer through :meth:`DrainLoop.drain_events`, which blocks
in one BLPOP on the wake-up markers of its queues, and a Celery worker through its event loop
(:mod:`celery_msg.eventloop`, registered by :meth:`DrainLoop.register_with_event_loop`), which
sends that BLPOP without blocking the loop.

:class:`DrainLoop` is a mixin of :class:`~celery_msg.transport.Transport`: it uses the
transport's broker, options and channels and is reached as the transport's own methods (kombu
and Celery call ``drain_events`` / ``register_with_event_loop`` on the transport).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from .acks import AckSender
from .core import Broker, Lease, ReserveRequest, Round
from .errors import BrokerConnectionError
from .eventloop import EventLoopDrain
from .holdings import Holdings, log_lost
from .options import TransportOptions
from .readahead import ReadAhead
from .shardwait import ShardWaiter

logger = logging.getLogger(__name__)

#: How long before a due time a consumer stops blocking in Redis and sleeps in the client:
#: Redis ends a blocking command's timeout up to 1/hz (100 ms by default) late.
DUE_SLACK = 0.1


class DrainLoop:
    """Reserving, handing over and waiting, for every channel of one connection."""

    # Provided by the transport.
    broker: Broker
    options: TransportOptions
    consumer_id: str
    channels: list[Any]
    redis: redis.Redis
    #: The transport's (:class:`celery_msg.renewer.LeaseRenewal`); declared, not defined, so
    #: that the mixin order cannot hide the real one.
    _ensure_renewer: Callable[[], None]
    books: Callable[[], list[Holdings]]
    linger: Callable[[list[Holdings]], None]
    abandoned: bool
    carried: Holdings

    def _init_drain(self) -> None:
        self._drain_thread: int | None = None
        self._waiting_for_room = False
        self._turn = 0
        self._holding = False
        self._next_due_ms: int | None = None
        self._event_loop: EventLoopDrain | None = None
        #: The event loop's ack writer (None outside an event loop).
        self.ack_sender: AckSender | None = None
        #: The event loop's reserve sent ahead (None outside an event loop, on a Cluster and
        #: with min_replicas), and the channels it asked for.
        self.read_ahead: ReadAhead | None = None
        #: Whether to use it: set by the Celery worker's consumer for a solo pool only (the one
        #: pool that runs tasks inside the event loop, where a reserve can overlap a task).
        self.reads_ahead = False
        self._ahead_channels: list[Any] = []
        self._room = False

    def hold_deliveries(self) -> None:
        """Deliver nothing more (a warm shutdown began); reserved messages go back at close.

        Celery's loop drains once more after it sees the stop flag; without this, a solo
        worker would start one more prefetched task while it is shutting down.
        """
        self._holding = True

    def _take_acks(self) -> list[Lease]:
        """Buffered acks of every channel, and (in the loop thread) the ack writer's acks that
        met a connection error."""
        acks = [lease for book in self.books() for lease in book.take_acks()]
        if self.ack_sender is not None and self.in_drain_thread():
            acks.extend(self.ack_sender.take_unconfirmed())
        return acks

    def _flush_acks(self) -> None:
        acks = self._take_acks()
        if acks:
            try:
                log_lost(self.broker.ack(acks), "ack")
            except BrokerConnectionError:
                # Written again with the next flush (an ack is fenced by its token: one that
                # did land is refused the second time, harmlessly); they stay leased meanwhile.
                self.carried.keep_acks(acks)
                raise

    def abandon(self) -> None:
        """The connection is given up after a connection error (kombu's ``collect``; Celery
        then reconnects with a new transport). What kombu handed to Celery is still run by
        this process and settled through its old channel: it is *not* put back in the queue
        (another worker would run it a second time). Its leases stay renewed and its acks are
        written by this transport's renewer, which lingers until nothing is held
        (:meth:`~celery_msg.renewer.LeaseRenewal.linger`); what was reserved but never handed
        over goes back. Acks in flight that were not confirmed are written again."""
        channels = list(self.channels)
        self.abandoned = True
        self.unregister_from_event_loop(None, None)
        for channel in channels:
            channel.close()
        self.linger([channel.holdings for channel in channels])

    def in_drain_thread(self) -> bool:
        return self._drain_thread == threading.get_ident()

    def wake_if_waiting(self) -> None:
        """Wake the draining thread if it sleeps because prefetch was full (an ack freed room)."""
        if self._event_loop is not None:
            self._event_loop.kick()
        elif self._waiting_for_room:
            with contextlib.suppress(BrokerConnectionError):
                self.broker.wake(self.consumer_id)

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Drain inside ``loop`` (a kombu ``Hub``): Celery's worker calls this on every
        (re)connection, then runs ``asynloop`` instead of calling :meth:`drain_events`."""
        self.unregister_from_event_loop(connection, loop)
        self._event_loop = EventLoopDrain(self, loop)
        if self.broker.replication is None:
            # With min_replicas an ack must be confirmed before it counts as done: acks are
            # then written and confirmed one turn at a time (no writer that does not wait).
            self.ack_sender = AckSender(self.broker, on_lost=lambda lost: log_lost(lost, "ack"))
        if ReadAhead.usable(self.broker):
            self.read_ahead = ReadAhead(self.broker)

    def unregister_from_event_loop(self, connection: Any, loop: Any) -> None:
        ahead, self.read_ahead = self.read_ahead, None
        if ahead is not None:
            if ahead.pending and not self.abandoned:
                # Take what it leased: it goes back with the rest of the reserved messages.
                # (Given up after an error, the reply may never come: those leases expire.)
                with contextlib.suppress(BrokerConnectionError):
                    self._accept_ahead(self._ahead_channels, ahead.read())
            ahead.close()
        sender, self.ack_sender = self.ack_sender, None
        if sender is not None:
            sender.close()
            unconfirmed = sender.take_unconfirmed()
            if unconfirmed and self.abandoned:
                self.carried.keep_acks(unconfirmed)  # the lingering renewer writes them
            elif unconfirmed:
                try:
                    log_lost(self.broker.ack(unconfirmed), "ack")
                except BrokerConnectionError as exc:
                    logger.warning(
                        "could not confirm %d acks (%s): if they did not reach Redis, their "
                        "messages come back when their leases expire",
                        len(unconfirmed),
                        exc,
                    )
        if self._event_loop is not None:
            self._event_loop.close()
            self._event_loop = None

    def on_readable(self, fileno: int) -> None:
        """kombu's hook for a readable socket of this transport (the BLPOP in flight)."""
        if self._event_loop is not None:
            self._event_loop.on_readable(fileno)

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Deliver at least one message, or raise ``socket.timeout`` after ``timeout``."""
        self.start_draining()
        if self._holding:
            self._flush_acks()
            raise TimeoutError()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.deliver_one():
                return
            if self.deliver_round() and self.deliver_one():
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError()
            wait = self.options.sweep_interval
            if deadline is not None:
                wait = min(wait, deadline - now)
            due_in = self._due_in()
            if due_in is not None and due_in <= wait:
                if due_in <= DUE_SLACK:
                    # Too close for a blocking timeout: Redis checks those about every 100 ms
                    # (hz 10), so BLPOP would wake up to that late. Sleep here instead.
                    time.sleep(due_in)
                    continue
                wait = due_in - DUE_SLACK
            self._wait(max(wait, 0.001))

    # The draining half that both drain_events and the event loop use (eventloop.Drainable).

    def start_draining(self) -> None:
        """The calling thread is the consumer thread (its acks ride on the next round)."""
        self._drain_thread = threading.get_ident()
        self._ensure_renewer()

    def holding(self) -> bool:
        return self._holding

    def has_buffered_acks(self) -> bool:
        sender = self.ack_sender
        if sender is not None and sender.has_unconfirmed():
            return True
        return any(channel.holdings.has_acks() for channel in self.channels)

    def flush_acks(self) -> None:
        self._flush_acks()

    def read_ack_replies(self) -> None:
        """Read the replies of the acks the loop thread wrote (see celery_msg.acks)."""
        if self.ack_sender is not None:
            self.ack_sender.flush()

    def next_due_ms(self) -> int | None:
        return self._next_due_ms

    def wake(self) -> None:
        """End the wait of this consumer's BLPOP in flight (it watches the wake key)."""
        self.broker.wake(self.consumer_id)

    def deliver_round(self) -> bool:
        """One round trip: flush buffered acks and reserve for every consumable channel.

        Reserving also reclaims expired leases of the queues, so an idle consumer, woken at
        least every ``sweep_interval``, brings a dead consumer's messages back.
        """
        self.finish_ahead()  # never two rounds in flight: prefetch would not hold
        acks = self._take_acks()
        channels, requests = self._requests()
        try:
            round_ = self.broker.settle_and_reserve(acks, requests)
        except BrokerConnectionError:
            self.carried.keep_acks(acks)  # as in _flush_acks
            raise
        return self._accept_round(channels, round_)

    def _requests(self) -> tuple[list[Any], list[ReserveRequest]]:
        """The consumable channels and what each may reserve now."""
        channels = [c for c in self.channels if c.consumable()]
        requests = [
            ReserveRequest(
                list(c._active_queues),
                c.want(),
                c.consumer_id,
                self.options.queue_order,
                c.next_start(),
            )
            for c in channels
        ]
        return channels, requests

    def _accept_round(
        self, channels: list[Any], round_: Round | None, granted_at: float | None = None
    ) -> bool:
        """Hand a round's deliveries to their channels; True when any was accepted.
        ``granted_at``: when Redis granted their leases (monotonic s), if not just now."""
        if round_ is None:
            return False
        log_lost(round_.lost, "ack")
        # Only a round that asked for messages learns when the next one is due; a full consumer
        # must not wake early for messages it could not take anyway.
        self._next_due_ms = round_.next_due_ms if channels else None
        accepted = zip(channels, round_.deliveries, strict=True)
        return sum(int(c.accept_all(d, granted_at)) for c, d in accepted) > 0

    def send_ahead(self) -> None:
        """Send the next round's reserve now and read it later (:mod:`celery_msg.readahead`):
        the event loop calls this before it hands over the last reserved message, when the
        channels may take a worthwhile batch and no ack waits to ride on a round."""
        ahead = self.read_ahead
        if ahead is None or ahead.pending or self._holding or not self.reads_ahead:
            return
        # Cheapest first: this runs before every message the loop hands over.
        if sum(len(c._ready) for c in self.channels) != 1 or self.has_buffered_acks():
            return
        if not self.room_for_a_batch():
            return
        channels, requests = self._requests()
        prepared = self.broker.prepare_round([], requests)
        if prepared.calls and ahead.send(prepared):
            self._ahead_channels = channels

    def finish_ahead(self) -> bool:
        """Read the round sent ahead, if any, and take its messages; True when it brought any."""
        ahead = self.read_ahead
        if ahead is None or not ahead.pending:
            return False
        channels, self._ahead_channels = self._ahead_channels, []
        return self._accept_ahead(channels, ahead.read())

    def _accept_ahead(self, channels: list[Any], read: tuple[Round, float] | None) -> bool:
        return read is not None and self._accept_round(channels, *read)

    def _due_in(self) -> float | None:
        """Seconds until the next scheduled message of the consumed queues falls due (the next
        round then promotes and delivers it), or None when nothing is scheduled."""
        if self._next_due_ms is None:
            return None
        return max(0.0, self._next_due_ms / 1000.0 - time.time())

    def deliver_one(self) -> bool:
        """Hand over one already reserved message, taking channels in turn."""
        channels = list(self.channels)
        for i in range(len(channels)):
            channel = channels[(self._turn + i) % len(channels)]
            if channel.deliver_one():
                self._turn = (self._turn + i + 1) % len(channels)
                return True
        return False

    def room_for_a_batch(self) -> bool:
        """Whether a channel with a prefetch limit may take at least half of it: then a round
        for buffered acks refills a worthwhile batch (channels without a limit, such as the
        remote-control mailbox, are woken by their queue's signal instead)."""
        for channel in self.channels:
            limit = channel.qos.prefetch_count
            if limit and channel._active_queues and channel.want() >= max(1, limit // 2):
                return True
        return False

    def note_room(self) -> None:
        """A delivery was settled, so prefetch has room again: the event loop looks (and is
        woken when this runs in another thread, e.g. a threads pool)."""
        self._room = True
        if self._event_loop is not None and not self.in_drain_thread():
            self._event_loop.kick()

    def room_freed(self) -> bool:
        room, self._room = self._room, False
        return room

    def wait_keys(self) -> list[str]:
        """The keys to BLPOP on: this consumer's wake key and the signal of every queue a
        channel may take a message from; ``[]`` when none may (prefetch full, no consumer)."""
        queues = self._consumable_queues()
        if not queues:
            return []
        return self.broker.wait_keys(queues, consumer=self.consumer_id)

    def shard_waiter(self) -> ShardWaiter | None:
        """On a Redis Cluster, the broker's sharded subscriptions (the event loop waits on
        them instead of a BLPOP); None on one server."""
        return self.broker.shard_waiter() if self.broker.cluster else None

    def _consumable_queues(self) -> list[str]:
        queues = [
            q
            for c in self.channels
            if c._active_queues and c.consumable()
            for q in c._active_queues
        ]
        return list(dict.fromkeys(queues))

    def _wait(self, timeout: float) -> None:
        """Sleep until a consumed queue may have something, an ack frees room, or timeout."""
        queues = self._consumable_queues()
        self._waiting_for_room = any(
            channel._active_queues and not channel.consumable() for channel in self.channels
        )
        try:
            self.broker.wait(queues, timeout, consumer=self.consumer_id)
        finally:
            self._waiting_for_room = False
