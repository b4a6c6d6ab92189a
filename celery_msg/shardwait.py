"""Waiting for messages on a Redis Cluster: one sharded pub/sub connection per node.

Why: on one server a consumer blocks in one BLPOP on the wake-up markers of all its queues. On a
Cluster a BLPOP may only name keys of one slot, and one connection can carry one blocking
command, so that would take a connection per queue. Instead the scripts announce a queue's
wake-up as a sharded pub/sub message (``SPUBLISH``, on the channel named like the queue's
``signal`` key, so in its slot: see :func:`celery_msg.scripts.source`), and the consumer keeps
one connection per node, ``SSUBSCRIBE``\\ d to the channels of its queues on that node. Any of
them becoming readable ends the wait, within milliseconds of the publish.

A subscription is kept between waits, so a message published while the consumer was busy is
waiting in the socket when it next waits: nothing is missed once subscribed. A *new*
subscription cannot know what was published before it, so :meth:`ShardWaiter.watch` says when
it made one and the caller looks once more before waiting. When a slot moves (resharding,
failover) the node ends its subscriptions with a ``sunsubscribe`` of its own: the slot map is
read again, the channel subscribed where it now lives, and the consumer looks once more.

A wake-up is a message, not a marker: a BLPOP's marker stays in its list until a consumer that
can take from the queue pops it, but a sharded message is read (and gone) whenever the socket is
read, also by a consumer whose prefetch is full at that moment, whose round then reserves nothing
from that queue. A worker thread freeing room just after that round re-arms on the same,
unchanged subscriptions, and nothing more is published: the queue's ready messages would wait
for the next sweep. So a drained wake-up stays *unanswered* until a reserve from its queue ran
(:meth:`ShardWaiter.answered`, called as a round's or a reserve's calls are made:
:mod:`celery_msg.consuming`); :meth:`ShardWaiter.watch` tells the caller to look
again while a channel it now wants has one, as a marker left in a list would.
"""

from __future__ import annotations

import contextlib
import logging
import select
from collections.abc import Sequence
from typing import Any

import redis

from .redisio import text

logger = logging.getLogger(__name__)


class ShardWaiter:
    """The sharded subscriptions of one consumer: a connection per node, a channel per key."""

    def __init__(self, client: Any) -> None:
        #: redis-py's ``RedisCluster`` (its slot map says where each channel lives).
        self.client = client
        self._conns: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        #: Channels whose wake-up was read but that no reserve has answered yet.
        self._unanswered: set[str] = set()

    def watch(self, channels: Sequence[str]) -> bool:
        """Listen to exactly ``channels``, each on the master of its slot; True when a
        subscription was added (something may have been published before it: look again) or
        one of them has a wake-up no reserve answered (see :meth:`answered`)."""
        wanted = dict.fromkeys(channels)
        due = self._unanswered.intersection(wanted)
        self._unanswered -= due  # the caller looks now
        leaving: dict[str, list[str]] = {}
        for channel, node in list(self._where.items()):
            if channel not in wanted:
                del self._where[channel]
                leaving.setdefault(node, []).append(channel)
        joining: dict[str, list[str]] = {}
        for channel in wanted:
            node = self.client.get_node_from_key(channel).name
            old = self._where.get(channel)
            if old == node:
                continue
            if old is not None:
                leaving.setdefault(old, []).append(channel)
            self._where[channel] = node
            joining.setdefault(node, []).append(channel)
        # One command per channel: SSUBSCRIBE names the channels of one slot only.
        for node, gone in leaving.items():
            conn = self._conns.get(node)
            if conn is not None:
                for channel in gone:
                    conn.send_command("SUNSUBSCRIBE", channel)
        for node, new in joining.items():
            conn = self._conn(node)
            for channel in new:
                conn.send_command("SSUBSCRIBE", channel)
        return bool(joining) or bool(due)

    def answered(self, channels: Sequence[str]) -> None:
        """A reserve from the queues of ``channels`` (and a round for the consumer's wake
        channel) ran: the wake-ups read before it are answered."""
        if self._unanswered:
            self._unanswered.difference_update(channels)

    def fds(self) -> list[int]:
        """The sockets to watch for readability (one per node with a subscription)."""
        return [c._sock.fileno() for c in self._conns.values() if c._sock is not None]

    def wait(self, timeout: float) -> bool:
        """Block until a watched channel gets a message (True), or ``timeout`` seconds pass."""
        if self.drain():
            return True
        fds = self.fds()
        if not fds:
            return False
        readable, _, _ = select.select(fds, [], [], timeout)
        return bool(readable) and self.drain()

    def drain(self) -> bool:
        """Read everything the nodes sent; True when it was a wake-up (a message, or a
        subscription the node ended because its slot moved)."""
        woken = False
        for node, conn in list(self._conns.items()):
            try:
                replies = self._read_all(conn)
            except BaseException:
                self._forget(node)  # the next watch subscribes again, on a new connection
                raise
            for reply in replies:
                if isinstance(reply, redis.ResponseError):
                    # An SSUBSCRIBE refused (MOVED: sent to where the slot was a moment ago):
                    # the channels this node was to serve are subscribed again where they are.
                    self._refused(node, reply)
                    woken = True
                    continue
                if not isinstance(reply, list) or len(reply) < 2:
                    continue
                kind, channel = text(reply[0]), text(reply[1])
                if kind == "smessage":
                    self._unanswered.add(channel)
                    woken = True
                elif kind == "sunsubscribe" and self._where.get(channel) == node:
                    # Not ours: the node gave the slot away. Learn where it went; the next
                    # watch subscribes there.
                    del self._where[channel]
                    logger.info(
                        "channel %s left node %s (slot moved); re-reading slots", channel, node
                    )
                    self.client.nodes_manager.initialize()
                    woken = True
        return woken

    @staticmethod
    def _read_all(conn: Any) -> list[Any]:
        replies = []
        while conn.can_read(timeout=0):
            try:
                # push_request: under RESP3 pub/sub messages are pushes, returned only when asked.
                replies.append(conn.read_response(push_request=True))
            except redis.ResponseError as exc:  # an error reply: the connection is fine
                replies.append(exc)
        return replies

    def _refused(self, node: str, error: redis.ResponseError) -> None:
        logger.info("node %s refused a subscription (%s); re-reading slots", node, error)
        for channel in [c for c, n in self._where.items() if n == node]:
            del self._where[channel]  # SSUBSCRIBE again is harmless where it was accepted
        self.client.nodes_manager.initialize()

    def _forget(self, node: str) -> None:
        conn = self._conns.pop(node, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()
        for channel in [c for c, n in self._where.items() if n == node]:
            del self._where[channel]

    def _conn(self, node: str) -> Any:
        conn = self._conns.get(node)
        if conn is None:
            pool = self.client.get_node(node_name=node).redis_connection.connection_pool
            # Not from the pool: a subscribed connection cannot be lent for commands.
            conn = self._conns[node] = pool.connection_class(**pool.connection_kwargs)
            conn.connect()
        return conn

    def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                conn.disconnect()
        self._conns.clear()
        self._where.clear()
        self._unanswered.clear()
