"""Draining inside kombu's event loop (the ``Hub`` of a Celery worker), so Celery runs ``asynloop``.

Why: with a synchronous transport Celery runs ``synloop``, whose one thread blocks in the prefork
pool's ``apply_async`` while every process is busy; it then reads no remote-control message
(``inspect``, ``revoke``) until a process frees up. In ``asynloop`` the pool, the broker and the
timers share one non-blocking loop, and nothing waits for anything else.

How (kombu's redis transport does the same with BRPOP): one Redis connection of our own, out of
the shared pool, carries a ``BLPOP`` on the wake-up markers (the signal list of each consumed
queue and this consumer's wake key); it is *sent*, and its socket registered with the hub. When
the reply arrives, :meth:`EventLoopDrain.pump` runs one synchronous round on the pool (reserve,
with any buffered acks, one round trip), hands the reserved messages to kombu and sends the next
BLPOP. The same ``pump`` runs on every hub tick, so room freed in prefetch is used at once. Acks
made by the loop thread (a prefork result, a solo task) do not wait for it: the transport writes
each at once on a connection of its own (:mod:`celery_msg.acks`); only acks that met a
connection error are buffered here, to ride on the next round.

Timers: the BLPOP's own timeout is ``sweep_interval``, so an idle consumer still reclaims expired
leases; the next due time of a scheduled message (learned from each round) is a hub timer, exact
to the millisecond. A pipe (``kick``) wakes the loop when work is left after a pump (acks made by
a solo task inside the pump) or when another thread freed prefetch room.

On a Redis Cluster a BLPOP may only name keys of one slot, so the wait is the broker's sharded
subscriptions instead (:mod:`celery_msg.shardwait`: a connection per node, each socket
registered with the hub), and ``sweep_interval`` is a hub timer.

Errors: a lost connection raises :class:`BrokerConnectionError` out of the hub, which Celery
treats as a connection error: it closes the connection (:meth:`EventLoopDrain.close`) and
reconnects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Protocol

import redis

from .core import REDIS_CONNECTION_ERRORS
from .errors import BrokerConnectionError
from .options import TransportOptions
from .shardwait import ShardWaiter

logger = logging.getLogger(__name__)

#: Seconds added to a due time before the round that promotes it: the hub's timer is exact,
#: and a round a hair early would find nothing due yet and schedule itself again.
DUE_MARGIN = 0.001

#: Seconds buffered acks (those that met a connection error on the ack writer) may wait for
#: company when the round they would ride on could refill less than half the prefetch.
ACK_DELAY = 0.002

#: Seconds a sent BLPOP may stay unanswered beyond its own timeout before the connection is
#: presumed dead (no FIN from a vanished peer), when the transport has no socket timeout.
SILENCE_GRACE = 30.0

_IO_ERRORS: tuple[type[BaseException], ...] = (*REDIS_CONNECTION_ERRORS, OSError)


class Drainable(Protocol):
    """What the event loop drives: the transport's draining half (shared with ``drain_events``)."""

    options: TransportOptions
    redis: redis.Redis

    def start_draining(self) -> None:
        """Mark the calling thread as the consumer thread; start the lease renewer."""

    def holding(self) -> bool:
        """True once a warm shutdown began: deliver nothing more."""

    def has_buffered_acks(self) -> bool:
        """Whether acks made by the consumer thread wait to be written."""

    def flush_acks(self) -> None:
        """Write the buffered acks now."""

    def read_ack_replies(self) -> None:
        """Read the replies of the acks the loop thread wrote (without waiting)."""

    def room_for_a_batch(self) -> bool:
        """Whether a channel with a prefetch limit may take at least half of it."""

    def room_freed(self) -> bool:
        """Whether prefetch room came back since the last call (settling a delivery)."""

    def wait_keys(self) -> list[str]:
        """Keys to BLPOP on (wake key + signals of the consumable queues); ``[]`` when no
        channel may take a message (prefetch full, or nothing consumed)."""

    def shard_waiter(self) -> ShardWaiter | None:
        """On a Redis Cluster, the sharded subscriptions to wait on instead of a BLPOP."""

    def deliver_round(self) -> bool:
        """One round trip: buffered acks + reserve for every consumable channel."""

    def deliver_one(self) -> bool:
        """Hand one reserved message to kombu; False when none is left."""

    def send_ahead(self) -> None:
        """Before the last reserved message is handed over: send the next reserve, unread."""

    def finish_ahead(self) -> bool:
        """Read the reserve sent ahead and take its messages; True when it brought any."""

    def next_due_ms(self) -> int | None:
        """Epoch ms when the next scheduled message of the consumed queues falls due."""

    def wake(self) -> None:
        """Push this consumer's wake key (ends the BLPOP in flight)."""


class EventLoopDrain:
    """The transport's side of one kombu ``Hub``: a BLPOP in flight, a tick, a due timer."""

    def __init__(self, target: Drainable, loop: Any) -> None:
        self.target = target
        self.loop = loop
        self.shards = target.shard_waiter()
        self.conn: Any = None
        if self.shards is None:
            pool = target.redis.connection_pool
            # Not from the pool: a connection with a blocking command in flight must not be lent.
            self.conn = pool.connection_class(**pool.connection_kwargs)
        self._fd: int | None = None
        self._fds: list[int] = []
        self._sweep_entry: Any = None
        self._armed_keys: frozenset[str] | None = None
        self._armed_at = 0.0
        self._interrupted = False
        self._needs_round = False
        self._due_ms: int | None = None
        self._due_entry: Any = None
        self._ack_entry: Any = None
        self._closed = False
        self._kick_lock = threading.Lock()
        self._kick_r, self._kick_w = os.pipe()
        os.set_blocking(self._kick_r, False)
        os.set_blocking(self._kick_w, False)
        blpop_timeout = target.options.sweep_interval
        self._silence_limit = blpop_timeout + (target.options.socket_timeout or SILENCE_GRACE)
        loop.add_reader(self._kick_r, self.on_kick)
        loop.on_tick.add(self.on_tick)

    # -- hub callbacks ---------------------------------------------------------------------

    def on_tick(self) -> None:
        """Every hub iteration, before it polls: flush acks, use freed room, (re)arm BLPOP."""
        if self._closed:
            self.loop.on_tick.discard(self.on_tick)
            return
        self.pump()
        if getattr(self.loop, "_ready", None):
            # Callbacks queued with call_soon by this iteration's timers (Celery acks that
            # way, after a solo task ran from its ETA timer) wait for the next iteration:
            # do not let the poll sleep first. kombu's hub wakes only for other threads.
            self.kick()

    def on_readable(self, fileno: int) -> None:
        """The BLPOP answered (a marker, or its timeout): run a round and re-arm. On a Cluster:
        a node sent something on the subscriptions."""
        if fileno != self._fd and fileno not in self._fds:
            return
        self._disarm()
        try:
            if self.shards is not None:
                self.shards.drain()
            else:
                self.conn.read_response()
        except _IO_ERRORS as exc:
            if self.conn is not None:
                self.conn.disconnect()
            raise BrokerConnectionError(f"waiting for messages: Redis unreachable: {exc}") from exc
        self._needs_round = True
        self.pump()

    def on_sweep(self) -> None:
        """On a Cluster, ``sweep_interval`` passed without a message (BLPOP's timeout)."""
        self._sweep_entry = None
        self._disarm()
        self._needs_round = True
        if not self._closed:
            self.pump()

    def on_kick(self) -> None:
        """Someone asked for one more pump (see :meth:`kick`)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._kick_r, 4096):
                pass
        if not self._closed:
            self.pump()

    def on_due(self) -> None:
        """A scheduled message fell due: the next round promotes and delivers it."""
        self._due_entry = None
        self._due_ms = None
        self._needs_round = True
        if not self._closed:
            self.pump()

    def kick(self) -> None:
        """Make the hub iterate again at once; safe from any thread."""
        with self._kick_lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._kick_w, b"\0")

    # -- the work --------------------------------------------------------------------------

    def pump(self) -> None:
        """Do whatever is due now; cheap when nothing is."""
        target = self.target
        target.start_draining()
        target.read_ack_replies()
        if target.holding():
            # Warm shutdown: acks still go out, nothing more is delivered; what was reserved
            # goes back when the connection closes.
            target.flush_acks()
            return
        again = False
        acks = target.has_buffered_acks()
        if (
            self._needs_round
            or (not self._armed and target.wait_keys())
            or (acks and target.room_for_a_batch())
        ):
            again = self._round()
        elif acks:
            if self._ack_entry is None:
                # Acks share a round for up to ACK_DELAY while a batch would be too small.
                self._ack_entry = self.loop.call_later(ACK_DELAY, self.on_ack_delay)
                again = True
        elif target.room_freed() and not set(target.wait_keys()) <= self._armed_keys_or_empty:
            # Prefetch room came back without an ack to ride on (an ack on receipt, a reject):
            # messages may wait in a queue the BLPOP in flight does not watch.
            again = self._round()
        while not target.holding():
            # Before the last reserved message runs (a solo worker runs it right here), the
            # next reserve goes out, so that Redis leases the next batch meanwhile.
            target.send_ahead()
            if target.deliver_one() or target.finish_ahead():
                again = True
                continue
            break
        if target.holding():
            target.finish_ahead()  # what it leased goes back at close with the rest
        if self._schedule_due(target.next_due_ms()):
            again = True
        if again:
            # Iterate again before sleeping: the hub's poll timeout was computed before this
            # tick, so a timer set now (ours, or Celery's for a task with an ETA, even a due
            # one) would otherwise wait for it.
            self.kick()
        if not self._armed:
            keys = target.wait_keys()
            if keys:
                self._arm(keys)
        elif self.shards is None and time.monotonic() - self._armed_at > self._silence_limit:
            self._drop_connection()
            raise BrokerConnectionError(
                f"waiting for messages: no reply from Redis within {self._silence_limit:.0f}s"
            )

    def on_ack_delay(self) -> None:
        """Buffered acks waited ACK_DELAY for company: write them now (with a refill)."""
        self._ack_entry = None
        self._needs_round = True
        if not self._closed:
            self.pump()

    def _round(self) -> bool:
        """One round trip (acks + reserve); True when it set a timer the hub must see."""
        target = self.target
        self._needs_round = False
        target.room_freed()  # this round uses it
        if self._ack_entry is not None:
            self._ack_entry.cancel()
            self._ack_entry = None
        reserved = target.deliver_round()
        timer_set = self._schedule_due(target.next_due_ms())
        if not reserved and self._armed and not self._interrupted:
            keys = target.wait_keys()
            if not set(keys) <= self._armed_keys_or_empty:
                # A queue the BLPOP in flight does not watch may now take messages (room came
                # back after prefetch was full, or add_consumer): re-arm to watch it too.
                self._interrupted = True
                target.wake()
        return timer_set

    @property
    def _armed(self) -> bool:
        return self._armed_keys is not None

    @property
    def _armed_keys_or_empty(self) -> frozenset[str]:
        return self._armed_keys or frozenset()

    def _arm(self, keys: list[str]) -> None:
        """Send a BLPOP on ``keys`` and watch its socket."""
        if self.shards is not None:
            self._arm_shards(keys)
            return
        try:
            self.conn.send_command("BLPOP", *keys, self.target.options.sweep_interval)
        except _IO_ERRORS as exc:
            self.conn.disconnect()
            raise BrokerConnectionError(f"waiting for messages: Redis unreachable: {exc}") from exc
        sock = self.conn._sock
        if sock is None:
            raise BrokerConnectionError("waiting for messages: the connection closed at once")
        self._fd = sock.fileno()
        self._armed_keys = frozenset(keys)
        self._armed_at = time.monotonic()
        self._interrupted = False
        self.loop.add_reader(self._fd, self.on_readable, self._fd)

    def _arm_shards(self, keys: list[str]) -> None:
        """On a Cluster: listen to ``keys`` as sharded channels, watch every node's socket."""
        assert self.shards is not None
        try:
            added = self.shards.watch(keys)
        except _IO_ERRORS as exc:
            raise BrokerConnectionError(f"waiting for messages: Redis unreachable: {exc}") from exc
        self._fds = self.shards.fds()
        for fd in self._fds:
            self.loop.add_reader(fd, self.on_readable, fd)
        self._armed_keys = frozenset(keys)
        self._armed_at = time.monotonic()
        self._interrupted = False
        self._sweep_entry = self.loop.call_later(self.target.options.sweep_interval, self.on_sweep)
        if added:
            # What was published before the new subscriptions came in unannounced: look.
            self._needs_round = True
            self.kick()

    def _disarm(self) -> None:
        if self._fd is not None:
            self._remove_reader(self._fd, self.on_readable)
        for fd in self._fds:
            self._remove_reader(fd, self.on_readable)
        if self._sweep_entry is not None:
            self._sweep_entry.cancel()
        self._fd = self._sweep_entry = None
        self._fds = []
        self._armed_keys = None

    def _drop_connection(self) -> None:
        self._disarm()
        if self.conn is not None:
            self.conn.disconnect()

    def _remove_reader(self, fd: int, callback: Any) -> None:
        """Unregister ``fd`` only while it is still ours: after a hub reset the number may
        belong to somebody else's socket."""
        registered = self.loop.readers.get(fd)
        if registered is not None and registered[0] == callback:
            self.loop.remove_reader(fd)

    def _schedule_due(self, due_ms: int | None) -> bool:
        """Keep one hub timer at the next due time of the consumed queues; True if set."""
        if due_ms == self._due_ms:
            return False
        if self._due_entry is not None:
            self._due_entry.cancel()
            self._due_entry = None
        self._due_ms = due_ms
        if due_ms is None:
            return False
        delay = max(0.0, due_ms / 1000.0 - time.time()) + DUE_MARGIN
        self._due_entry = self.loop.call_later(delay, self.on_due)
        return True

    def close(self) -> None:
        """Leave the hub: no tick, no reader, no timer; the BLPOP connection is closed."""
        if self._closed:
            return
        with self._kick_lock:
            self._closed = True
        self.loop.on_tick.discard(self.on_tick)
        self._remove_reader(self._kick_r, self.on_kick)
        for entry in (self._due_entry, self._ack_entry):
            if entry is not None:
                entry.cancel()
        self._due_entry = self._ack_entry = None
        self._disarm()
        if self.conn is not None:
            with contextlib.suppress(*_IO_ERRORS):
                self.conn.disconnect()
        with self._kick_lock:  # a pool thread's kick must not write into a reused fd
            for fd in (self._kick_r, self._kick_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
