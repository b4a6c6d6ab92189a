"""Acks written the moment a task finishes, replies read later: the crash window is one write.

Why: an ack that waits for company (the next fetch, a 2 ms timer) is an ack a SIGKILL can still
take away, and its task then runs again elsewhere although it finished. A solo worker runs a
whole prefetched batch inline before its loop fetches again, so it lost up to a batch of acks
per kill (3.9 re-runs per SIGKILL against kombu's 0.1). Waiting for Redis's reply to each ack
instead would cost a round trip per task (~100 us of a ~600 us solo task here).

How: the event-loop thread writes each ack's ``EVALSHA`` the moment Celery settles the task (a
prefork result, a solo task's return, a task Celery ran from its ETA timer), on a connection of
its own, and does not wait for the reply. Once written, the command is in the kernel's socket
buffer: it reaches Redis even if the process is SIGKILLed the next instant (a killed process's
queued bytes are still sent; only unread *incoming* data makes Linux reset a socket, and Redis
has taken the command long before its reply could arrive). Replies are read, without blocking,
on every turn of the loop (no wake-up of their own), and all of them when the consumer closes.

What a reply can say:
* OK / LEASE_LOST / GONE per delivery, as for a synchronous ack (lost ones are logged; GONE,
  acked already by the pool child that ran the task, is not);
* NOSCRIPT (Redis restarted, ``SCRIPT FLUSH``): the script is loaded again and only those acks
  are sent again;
* another error (a corrupted queue): logged, and those leases are given up; they expire and
  come back, as when the consumer dies.
On a Redis Cluster each ack goes to the master of its queue's slot, on a connection per master
(replies come back in order per connection). A reply that says the slot moved (``MOVED``,
``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``) means that ack did not run: it is handed back like one
that met a connection error, and the next round writes it through the cluster client, which
follows the redirection.

A connection error leaves the acks in flight unconfirmed: they are handed back to the caller
(:meth:`AckSender.take_unconfirmed`), which writes them with its next round trip, through the
same error handling as any other round (a reconnect when Redis is gone). An ack that did land
before the error then finds its message GONE: nothing to do, and nothing logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import redis

from .consuming import lost_of
from .core import REDIS_CONNECTION_ERRORS, Broker, Lease, group_by_queue, lease_pairs, pack_evalsha
from .redisio import load_script

logger = logging.getLogger(__name__)

#: Seconds to wait for one reply when all of them must be read (closing, a full buffer).
REPLY_TIMEOUT = 5.0

#: Most acks sent but not yet confirmed before :meth:`AckSender.send` reads replies itself: a
#: Redis that stops answering must not make the buffer grow without bound.
MAX_IN_FLIGHT = 10_000

_IO_ERRORS: tuple[type[BaseException], ...] = (*REDIS_CONNECTION_ERRORS, OSError)

#: Replies of a Cluster node that did not run the ack there (the slot is elsewhere, or moving).
_REDIRECTED: tuple[type[BaseException], ...] = (
    redis.exceptions.AskError,  # MOVED too (a subclass)
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


class _Line:
    """One connection and the ack groups written on it, oldest first (replies come in order)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.in_flight: deque[list[Lease]] = deque()


class AckSender:
    """One consumer's acks on connections of their own (one per master on a Cluster),
    pipelined without waiting.

    Used from the event-loop thread only (the thread that settles deliveries in a Celery
    worker); other threads ack synchronously.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        on_lost: Callable[[list[Lease]], None] | None = None,
    ) -> None:
        self.broker = broker
        #: By node name on a Cluster, else one under "".
        self._lines: dict[str, _Line] = {}
        self._in_flight_count = 0
        self._unconfirmed: list[Lease] = []
        self._on_lost = on_lost

    def add(self, leases: list[Lease]) -> None:
        """Write these acks now. Not kept for the end of the loop's turn: Celery runs a task
        whose ETA it holds from a timer, and several such timers fire in one turn, so a kept
        ack could wait for the tasks that run after it (and a SIGKILL meanwhile re-runs it)."""
        self.send(leases)

    def flush(self) -> None:
        """Read whatever replies have arrived, without waiting (every turn of the loop)."""
        if self._in_flight_count:
            self.read_replies()

    def send(self, leases: list[Lease]) -> None:
        """Write the acks of ``leases`` now; never raises for a connection error (the acks are
        then kept for :meth:`take_unconfirmed`)."""
        if not leases:
            return
        if self._in_flight_count >= MAX_IN_FLIGHT:
            self.read_replies(block=True)
        ack = self.broker.scripts.ack.script
        by_line: dict[str, list[tuple[list[Lease], bytes]]] = {}
        for queue, group in group_by_queue(leases).items():
            keys = self.broker.keys(queue).all
            packed = pack_evalsha(ack, keys, lease_pairs(group))
            by_line.setdefault(self._line_name(keys[0]), []).append((group, packed))
        for name, writes in by_line.items():
            try:
                line = self._line(name)
                line.conn.send_packed_command([p for _, p in writes], check_health=False)
            except _IO_ERRORS as exc:
                logger.debug("ack connection failed while sending: %s", exc)
                for group, _ in writes:
                    self._unconfirmed.extend(group)
                self._fail(name)
                continue
            for group, _ in writes:
                line.in_flight.append(group)
                self._in_flight_count += len(group)

    def read_replies(self, block: bool = False) -> None:
        """Read the replies that arrived (``block``: all of them, waiting for each)."""
        resend: list[Lease] = []
        lost: list[Lease] = []
        for name in list(self._lines):
            resend.extend(self._read_line(name, block, lost))
        if lost and self._on_lost is not None:
            self._on_lost(lost)
        if resend:
            self._reload_script(resend[0].queue)
            self.send(resend)

    def has_unconfirmed(self) -> bool:
        return bool(self._unconfirmed)

    def take_unconfirmed(self) -> list[Lease]:
        """Acks that met a connection error (or a Cluster redirection): their caller writes
        them again."""
        taken, self._unconfirmed = self._unconfirmed, []
        return taken

    def close(self) -> None:
        """Read every outstanding reply (unconfirmed acks stay for :meth:`take_unconfirmed`),
        then close the connections."""
        self.read_replies(block=True)
        for line in self._lines.values():
            with contextlib.suppress(*_IO_ERRORS):
                line.conn.disconnect()
        self._lines.clear()

    # -- internals -------------------------------------------------------------------------

    def _read_line(self, name: str, block: bool, lost: list[Lease]) -> list[Lease]:
        """Read one connection's replies; returns the acks whose script Redis had lost."""
        line = self._lines[name]
        resend: list[Lease] = []
        while line.in_flight:
            try:
                if not line.conn.can_read(timeout=REPLY_TIMEOUT if block else 0):
                    if block:
                        raise redis.TimeoutError(f"no ack reply within {REPLY_TIMEOUT:.0f}s")
                    break
                reply = line.conn.read_response()
            except redis.exceptions.NoScriptError:
                resend.extend(self._pop(line))
                continue
            except _REDIRECTED as exc:
                logger.debug("ack redirected (%s): written again with the next round", exc)
                self._unconfirmed.extend(self._pop(line))
                continue
            except redis.ResponseError as exc:
                group = self._pop(line)
                logger.error(
                    "queue %s: ack of %d messages failed: %s; their leases expire and they "
                    "come back",
                    group[0].queue,
                    len(group),
                    exc,
                )
                continue
            except _IO_ERRORS as exc:
                logger.debug("ack connection failed while reading: %s", exc)
                self._fail(name)
                break
            group = self._pop(line)
            codes = reply if isinstance(reply, list) else []
            if len(codes) != len(group):
                logger.error("ack of %d messages: unexpected reply %r", len(group), reply)
                continue
            lost.extend(lost_of(group, codes))
        return resend

    def _pop(self, line: _Line) -> list[Lease]:
        group = line.in_flight.popleft()
        self._in_flight_count -= len(group)
        return group

    def _line_name(self, key: str) -> str:
        """The node that serves ``key`` ("" off a Cluster)."""
        if not self.broker.cluster:
            return ""
        return str(self.broker.client.get_node_from_key(key).name)  # type: ignore[attr-defined]

    def _line(self, name: str) -> _Line:
        """The connection to node ``name``, connected (and the ack script loaded) if needed."""
        line = self._lines.get(name)
        if line is None:
            client: Any = self.broker.client
            if name:
                client = client.get_node(node_name=name).redis_connection
            pool = client.connection_pool
            # Not from the pool: replies stay unread on it between calls.
            line = self._lines[name] = _Line(pool.connection_class(**pool.connection_kwargs))
        if line.conn._sock is None:
            self._connect(line.conn)
        return line

    def _fail(self, name: str) -> None:
        """A connection broke: everything in flight on it is unconfirmed; it is built anew
        next time (on a Cluster the node may be gone for good after a failover)."""
        line = self._lines.pop(name, None)
        if line is None:
            return
        while line.in_flight:
            self._unconfirmed.extend(self._pop(line))
        with contextlib.suppress(*_IO_ERRORS):
            line.conn.disconnect()

    def _connect(self, conn: Any) -> None:
        """Connect, and load the ack script first: a NOSCRIPT reply would otherwise wait,
        unread, for as long as the loop is busy (a solo worker running a long task), and
        its acks with it. A new connection is what a Redis restart leads to."""
        conn.connect()
        script = self.broker.scripts.ack.script
        conn.send_command("SCRIPT", "LOAD", script.script)
        conn.read_response()

    def _reload_script(self, queue: str) -> None:
        """Load the ack script again, on a pooled connection (on a Cluster: on the masters):
        these may have replies outstanding. A failure shows up as the resent acks' own
        error."""
        with contextlib.suppress(*_IO_ERRORS, redis.ResponseError):
            load_script(
                self.broker.client, self.broker.scripts.ack.script, self.broker.keys(queue).all
            )
