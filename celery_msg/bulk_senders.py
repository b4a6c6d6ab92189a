"""The senders of a bulk block (:mod:`celery_msg.bulk_publish`): pipelined batches of publish
scripts to one server, or to each master of a Redis Cluster, their replies read one by one.

Why a module of its own: the block's contract (what is buffered, when it is flushed, what a
retry sends) is one job; getting a batch into Redis and telling per message what happened to it
(stored, a stale route, a lost script, a redirection, a lost connection) is another.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import redis

from .core import REDIS_CONNECTION_ERRORS, Broker, Outgoing, Route
from .errors import BrokerConnectionError, ReplicationTimeout
from .redisio import is_stale, text
from .scripts import Code

if TYPE_CHECKING:
    from .routing import RoutingChannel as Channel

logger = logging.getLogger(__name__)

#: Cluster replies that mean "the script did not run here": sent again where the slot is.
_REDIRECTS: tuple[type[BaseException], ...] = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)
_ASKING = b"*1\r\n$6\r\nASKING\r\n"


@dataclass(frozen=True, slots=True)
class Unsent:
    """A message the block could not confirm in one queue, and why."""

    message_id: str
    queue: str
    reason: str


class Status(Enum):
    """What is known of one message in one queue."""

    PENDING = "not sent yet"
    STORED = "stored"
    STALE = "its exchange's bindings changed"
    NO_SCRIPT = "the publish script was not loaded (Redis restarted?)"
    LOST = "reply lost"
    REFUSED = "refused by Redis"
    UNCONFIRMED = "stored on the master, not confirmed by min_replicas replicas"
    MOVED = "its slot moved or is moving (Cluster: MOVED, ASK, TRYAGAIN, CLUSTERDOWN)"


@dataclass(slots=True, eq=False)
class Origin:
    """A message as published into the block: enough to route it again when it goes stale."""

    channel: Channel
    message: dict[str, Any]
    exchange: str
    routing_key: str
    #: Queues it has an entry for (stored, or on its way): routing again skips them.
    queues: set[str] = field(default_factory=set)


@dataclass(slots=True, eq=False)
class Entry:
    """One message into one queue, and what is known of it."""

    out: Outgoing
    route: Route | None
    origin: Origin
    status: Status = Status.PENDING
    #: True once a send of it may have stored it (its reply was lost): send it unique then.
    maybe_stored: bool = False
    detail: str = ""
    #: On a Cluster, the node (``host:port``) an ``ASK`` sent it to: its next send there goes
    #: after ``ASKING``.
    ask: str | None = None

    def unique(self) -> bool:
        """Whether its next send is a unique publish: its policy's, or a resend that must not
        store it twice (except a Celery retry, whose id is pending by design)."""
        if self.out.unique or not self.maybe_stored:
            return self.out.unique
        headers = self.origin.message.get("headers")
        return not (isinstance(headers, dict) and headers.get("retries"))

    def unsent(self) -> Unsent:
        reason = self.status.value + (f": {self.detail}" if self.detail else "")
        return Unsent(self.out.message_id, self.out.queue, reason)


class Sender:
    """Pipelined publish scripts on one connection of one broker: writes a batch, reads its
    replies one by one (so a dropped link tells exactly which were confirmed).

    The first batch on a connection (a new one, or after it dropped: Redis may have restarted
    and lost its scripts) starts with ``SCRIPT LOAD`` of the publish script in the same
    pipeline, so no batch is refused for want of it and no round trip is added."""

    def __init__(self, broker: Broker, client: redis.Redis | None = None) -> None:
        self.broker = broker
        #: Where the connection comes from: the broker's client, or on a Cluster one node's
        #: (:class:`ClusterSender`), whose publishes carry no bindings version key (another
        #: slot): their routes are checked before the batch is written.
        self.client = broker.client if client is None else client
        self._conn: Any = None
        self._in_flight: list[Entry] = []
        self._fresh = True  # the next write is the first on its connection
        self._loading = False  # a SCRIPT LOAD reply is due before the batch's replies

    def write(self, entries: Sequence[Entry]) -> list[Entry]:
        """Send ``entries`` after reading the replies of the batch in flight (Redis ran it
        while the caller filled this one); returns the entries that need another send."""
        again = self.read()
        if not entries:
            return again
        pack, routed = self.broker.pack_publish, not self.broker.cluster
        packed: list[bytes] = []
        for e in entries:
            if e.ask is not None:
                packed.append(_ASKING)  # the slot is being migrated to this node: one command
            packed.append(pack(e.out, e.route if routed else None, unique=e.unique()))
        try:
            conn = self._connection()
            if self._fresh:
                script = self.broker.scripts.publish.script.script  # the source
                packed[:0] = conn.pack_command("SCRIPT", "LOAD", script)
            replication = self.broker.replication
            if replication is not None:
                packed.append(replication.packed())  # min_replicas: the batch ends with WAIT
            conn.send_packed_command(packed, check_health=False)
        except REDIS_CONNECTION_ERRORS as exc:
            self._lost(entries, exc)
            return again + list(entries)
        self._loading, self._fresh = self._fresh, False
        self._in_flight = list(entries)
        return again

    def read(self) -> list[Entry]:
        """Read the replies of the batch in flight; returns its entries that need another
        send (stale route, script not loaded, reply lost, error reply)."""
        entries, self._in_flight = self._in_flight, []
        again: list[Entry] = []
        if self._loading:
            self._loading = False
            try:
                self._conn.read_response()
            except redis.ResponseError:
                pass  # refused (ACL?): the EVALSHAs say so, each in its reply
            except REDIS_CONNECTION_ERRORS as exc:
                self._lost(entries, exc)
                return list(entries)
        for i, entry in enumerate(entries):
            try:
                if entry.ask is not None:
                    entry.ask = None
                    self._conn.read_response()  # ASKING's OK
                reply = self._conn.read_response()
            except _REDIRECTS as exc:
                # The slot moved (MOVED), is moving (ASK: this key is on the target already;
                # TRYAGAIN: the queue's keys are split between both), or has no master right
                # now (CLUSTERDOWN): the script did not run. Sent again where the slot is.
                entry.status, entry.detail = Status.MOVED, str(exc)
                if isinstance(exc, redis.exceptions.AskError):
                    entry.ask = f"{exc.host}:{exc.port}"
                again.append(entry)
                continue
            except redis.exceptions.NoScriptError:
                entry.status = Status.NO_SCRIPT
                again.append(entry)
                continue
            except redis.ResponseError as exc:
                entry.status, entry.detail = Status.REFUSED, str(exc)
                again.append(entry)
                continue
            except REDIS_CONNECTION_ERRORS as exc:
                self._lost(entries[i:], exc)
                return again + list(entries[i:])
            if int(reply[1]) == Code.STALE_ROUTE:
                entry.status = Status.STALE
                again.append(entry)
            else:  # 1: stored; 0: a unique publish found it stored already
                entry.status = Status.STORED
        replication = self.broker.replication
        if replication is not None and entries:
            try:
                replication.check(self._conn.read_response(), f"{len(entries)} publishes")
            except ReplicationTimeout as exc:
                # Stored on the master, not confirmed: sent again (unique, so a no-op that
                # waits for the replicas again), and reported if they never confirm.
                for entry in entries:
                    if entry.status is Status.STORED:
                        entry.status, entry.detail = Status.UNCONFIRMED, str(exc)
                        entry.maybe_stored = True
                        again.append(entry)
            except REDIS_CONNECTION_ERRORS as exc:
                self._lost(entries, exc)
                return list(entries)
        if any(e.status is Status.NO_SCRIPT for e in again):
            self._load_script()
        return again

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self.client.connection_pool.get_connection()
            self._fresh = True
        elif is_stale(self._conn):
            # Closed by the server while idle, with nothing in flight: reconnecting is safe.
            self._conn.disconnect()
            self._fresh = True
        return self._conn

    def _load_script(self) -> None:
        script = self.broker.scripts.publish.script
        # Unreachable: the next send finds the link down and reports its messages.
        with contextlib.suppress(*REDIS_CONNECTION_ERRORS):
            script.sha = text(self.client.script_load(script.script))

    def _lost(self, entries: Sequence[Entry], exc: BaseException) -> None:
        for entry in entries:
            entry.status, entry.maybe_stored = Status.LOST, True
            entry.detail = f"Redis unreachable ({exc}); it may be stored"
            entry.ask = None
        self._fresh, self._loading = True, False
        if self._conn is not None:
            self._conn.disconnect()

    def close(self) -> None:
        if self._conn is not None:
            if self._in_flight:
                self._conn.disconnect()  # unread replies must not reach the pool's next user
                self._in_flight = []
            self.client.connection_pool.release(self._conn)
            self._conn = None


class ClusterSender:
    """Bulk publishing on a Redis Cluster: each message goes to the master of its queue's slot,
    through one :class:`Sender` per master (its own connection, pipelined batches, replies
    read one by one, and with ``min_replicas`` its own ``WAIT``, which counts that connection's
    writes only).

    What a node refuses without running it is sent again where the slot is: ``MOVED`` after
    the slot map is read again, ``ASK`` to the migration's target behind ``ASKING``,
    ``TRYAGAIN`` / ``CLUSTERDOWN`` after a short wait (:meth:`Buffer.flush`). A lost node
    (killed, failing over) loses its replies as one server would, and the slot map is read
    again before the next write, so a resend goes to the replica that took over.

    A routed publish cannot check its exchange's bindings version inside ``publish.lua`` (the
    version key lives in the global slot): each route of a batch is checked just before the
    batch is written, as :meth:`Broker.publish` does on a Cluster, one ``GET`` per exchange."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._nodes: dict[str, Sender] = {}
        #: Read the slot map again before the next write (a slot moved, a node was lost).
        self._reread = False

    def write(self, entries: Sequence[Entry]) -> list[Entry]:
        again = self.read()
        if not entries:
            return again
        if self._reread:
            self._read_slots()
        by_node: dict[str, list[Entry]] = {}
        for entry, current in zip(entries, self._routes_current(entries), strict=True):
            if not current:
                again.append(entry)  # STALE or LOST: set by _routes_current
                continue
            node = entry.ask or self._node_of(entry)
            if node is not None:
                by_node.setdefault(node, []).append(entry)
            else:
                again.append(entry)
        for node, group in by_node.items():
            sender = self._sender(node)
            if sender is None:
                for entry in group:
                    entry.status, entry.ask = Status.MOVED, None
                    entry.detail = f"node {node} is not in the slot map"
                again.extend(group)
                self._reread = True
            else:
                again.extend(sender.write(group))
        self._note(again)
        return again

    def read(self) -> list[Entry]:
        again: list[Entry] = []
        for sender in self._nodes.values():
            again.extend(sender.read())
        self._note(again)
        return again

    def _note(self, again: Sequence[Entry]) -> None:
        """A node lost, or a slot that moved (not an ASK: the map is right during a move):
        the slot map is read again before the next write."""
        if any(
            e.status is Status.LOST or (e.status is Status.MOVED and e.ask is None) for e in again
        ):
            self._reread = True

    def _read_slots(self) -> None:
        try:
            self.broker.client.nodes_manager.initialize()  # type: ignore[attr-defined]
        except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
            # Reconfiguring (a failover not done yet): the map is read again next time.
            logger.info("bulk publish: the Cluster's slot map could not be read: %s", exc)
            return
        self._reread = False

    def _routes_current(self, entries: Sequence[Entry]) -> list[bool]:
        """Whether each entry's route (if any) is still its exchange's bindings version; marks
        the others STALE (routed again) or LOST (the global slot's master unreachable)."""
        known: dict[tuple[str, int], bool | str] = {}
        out: list[bool] = []
        for entry in entries:
            route = entry.route
            if route is None:
                out.append(True)
                continue
            key = (route.exchange, route.version)
            if key not in known:
                try:
                    known[key] = self.broker._route_is_current(route)
                except BrokerConnectionError as exc:
                    known[key] = str(exc)
            state = known[key]
            if state is True:
                out.append(True)
                continue
            if state is False:
                entry.status = Status.STALE
            else:  # nothing was sent: sent again after the retry policy's wait
                entry.status, entry.detail = Status.LOST, str(state)
            out.append(False)
        return out

    def _node_of(self, entry: Entry) -> str | None:
        """The master of the entry's queue's slot (None, marked LOST: no master serves it)."""
        key = self.broker.keys(entry.out.queue).publish[0]
        try:
            return str(self.broker.client.get_node_from_key(key).name)  # type: ignore[attr-defined]
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            entry.status, entry.detail = Status.LOST, f"no master serves its slot: {exc}"
            self._reread = True
            return None

    def _sender(self, node: str) -> Sender | None:
        sender = self._nodes.get(node)
        if sender is None:
            found = self.broker.client.get_node(node_name=node)  # type: ignore[attr-defined]
            if found is None or found.redis_connection is None:
                return None
            sender = self._nodes[node] = Sender(self.broker, found.redis_connection)
        return sender

    def close(self) -> None:
        for sender in self._nodes.values():
            sender.close()
