"""Bulk publishing: ``with celery_msg.bulk(app):`` buffers every task message this thread
publishes and sends them as pipelined rounds of publish scripts.

One publish is one round trip (kombu's contract: ``publish`` returns when Redis holds the
message). Inside the block the guarantee moves to the block's edge: leaving it returns only
when Redis holds every message published inside, or raises :class:`BulkPublishError` naming
those it could not confirm. Meanwhile messages wait in this process (up to ``batch`` of them;
a full batch is written at once and its replies are read while the next one fills), so a
process that dies inside the block loses what it had not sent, as a process that dies before
calling ``publish`` would.

Exactly once into Redis, also across a lost connection: a message whose reply was lost (Redis
restarted, the link dropped) may or may not be stored. It is sent again as a *unique* publish
(ARGV[5] of publish.lua): stored if absent, a no-op while its id is pending (ready, reserved or
scheduled) in that queue; a message with a :class:`~celery_msg.policy.Unique` policy keeps its
lock, which refuses the resend. Two limits: a Celery retry message (``retries`` header) is sent
again as a plain publish (its id is pending by design: the failed delivery is still leased),
and a message consumed *and acked* between the lost reply and the resend is stored again.

Threads: the buffer belongs to the thread that opened the block. A publish from another thread
goes out at once, as outside any block, even on the same connection or channel: the block sends
on a connection of its own and only reads the channel's routing table.

Only Celery task messages (a ``task`` header) are buffered: remote control, events and replies
go out at once, so a ``celery inspect`` inside the block still gets its answers. An exception
inside the block still sends what was published before it (as without the block).

kombu's own ``Producer.batch()`` (kombu >= 5.7) uses the same buffer (:class:`PublishBatch`),
for every message of that producer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar, cast

import redis

from .core import REDIS_CONNECTION_ERRORS, Broker, Outgoing, Route
from .errors import BrokerConnectionError, CeleryMsgError, ConfigurationError, ReplicationTimeout
from .redisio import is_stale, text
from .registration import URL_SCHEMES
from .scripts import Code

if TYPE_CHECKING:
    from celery import Celery

    from .routing import RoutingChannel as Channel

logger = logging.getLogger(__name__)

#: Messages per pipelined round (and most messages kept in this process at a time).
DEFAULT_BATCH = 1000

#: Times a stale route is routed again within one flush (as :data:`transport.ROUTE_ATTEMPTS`).
ROUTE_ATTEMPTS = 5

#: On a Cluster, rounds of sending again what a node redirected (MOVED, ASK) or asked to try
#: again (TRYAGAIN while a queue's keys are split by a slot migration, CLUSTERDOWN) within one
#: flush; the n-th waits ``min(REDIRECT_WAIT_MAX, n * REDIRECT_WAIT_STEP)`` seconds first.
REDIRECT_ATTEMPTS = 60
REDIRECT_WAIT_STEP = 0.01
REDIRECT_WAIT_MAX = 0.1

#: Cluster replies that mean "the script did not run here": sent again where the slot is.
_REDIRECTS: tuple[type[BaseException], ...] = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)
_ASKING = b"*1\r\n$6\r\nASKING\r\n"

_local = threading.local()

T = TypeVar("T")


def bulk_buffer(message: dict[str, Any]) -> Buffer | None:
    """The open block's buffer if this thread is inside one and ``message`` is a task; the
    transport's publish hook (every publish calls it, so it is cheap when no block is open)."""
    buffer: Buffer | None = getattr(_local, "buffer", None)
    if buffer is None:
        return None
    headers = message.get("headers")
    return buffer if isinstance(headers, dict) and "task" in headers else None


def current_buffer() -> Buffer | None:
    """The buffer of the bulk block open in this thread, if any."""
    buffer: Buffer | None = getattr(_local, "buffer", None)
    return buffer


@dataclass(frozen=True, slots=True)
class Unsent:
    """A message the block could not confirm in one queue, and why."""

    message_id: str
    queue: str
    reason: str


class BulkPublishError(CeleryMsgError):
    """Leaving a bulk block, some messages were not confirmed as stored (see ``unsent``).

    Those lost in a dropped connection may be stored or not; :meth:`retry` sends them again
    (unique: none is stored twice) and raises this again for any still unconfirmed. Messages
    a script refused (``reason`` has the Redis error) are sent again too."""

    def __init__(self, unsent: list[Unsent], retry: Buffer) -> None:
        shown = ", ".join(f"{u.message_id} -> {u.queue}" for u in unsent[:10])
        more = f" and {len(unsent) - 10} more" if len(unsent) > 10 else ""
        super().__init__(
            f"{len(unsent)} messages not confirmed as stored ({shown}{more}); "
            f"first reason: {unsent[0].reason}"
        )
        self.unsent = unsent
        self._buffer = retry

    def retry(self) -> None:
        """Send the unconfirmed messages again (unique publishes); raises this error again,
        naming those still unconfirmed."""
        try:
            self._buffer.flush()
        finally:
            self._buffer.close()


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
class _Message:
    """A message as published into the block: enough to route it again when it goes stale."""

    channel: Channel
    message: dict[str, Any]
    exchange: str
    routing_key: str
    #: Queues it has an entry for (stored, or on its way): routing again skips them.
    queues: set[str] = field(default_factory=set)


@dataclass(slots=True, eq=False)
class _Entry:
    """One message into one queue, and what is known of it."""

    out: Outgoing
    route: Route | None
    origin: _Message
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


class _Sender:
    """Pipelined publish scripts on one connection of one broker: writes a batch, reads its
    replies one by one (so a dropped link tells exactly which were confirmed).

    The first batch on a connection (a new one, or after it dropped: Redis may have restarted
    and lost its scripts) starts with ``SCRIPT LOAD`` of the publish script in the same
    pipeline, so no batch is refused for want of it and no round trip is added."""

    def __init__(self, broker: Broker, client: redis.Redis | None = None) -> None:
        self.broker = broker
        #: Where the connection comes from: the broker's client, or on a Cluster one node's
        #: (:class:`_ClusterSender`), whose publishes carry no bindings version key (another
        #: slot): their routes are checked before the batch is written.
        self.client = broker.client if client is None else client
        self._conn: Any = None
        self._in_flight: list[_Entry] = []
        self._fresh = True  # the next write is the first on its connection
        self._loading = False  # a SCRIPT LOAD reply is due before the batch's replies

    def write(self, entries: Sequence[_Entry]) -> list[_Entry]:
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

    def read(self) -> list[_Entry]:
        """Read the replies of the batch in flight; returns its entries that need another
        send (stale route, script not loaded, reply lost, error reply)."""
        entries, self._in_flight = self._in_flight, []
        again: list[_Entry] = []
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

    def _lost(self, entries: Sequence[_Entry], exc: BaseException) -> None:
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


class _ClusterSender:
    """Bulk publishing on a Redis Cluster: each message goes to the master of its queue's slot,
    through one :class:`_Sender` per master (its own connection, pipelined batches, replies
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
        self._nodes: dict[str, _Sender] = {}
        #: Read the slot map again before the next write (a slot moved, a node was lost).
        self._reread = False

    def write(self, entries: Sequence[_Entry]) -> list[_Entry]:
        again = self.read()
        if not entries:
            return again
        if self._reread:
            self._read_slots()
        by_node: dict[str, list[_Entry]] = {}
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

    def read(self) -> list[_Entry]:
        again: list[_Entry] = []
        for sender in self._nodes.values():
            again.extend(sender.read())
        self._note(again)
        return again

    def _note(self, again: Sequence[_Entry]) -> None:
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

    def _routes_current(self, entries: Sequence[_Entry]) -> list[bool]:
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

    def _node_of(self, entry: _Entry) -> str | None:
        """The master of the entry's queue's slot (None, marked LOST: no master serves it)."""
        key = self.broker.keys(entry.out.queue).publish[0]
        try:
            return str(self.broker.client.get_node_from_key(key).name)  # type: ignore[attr-defined]
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            entry.status, entry.detail = Status.LOST, f"no master serves its slot: {exc}"
            self._reread = True
            return None

    def _sender(self, node: str) -> _Sender | None:
        sender = self._nodes.get(node)
        if sender is None:
            found = self.broker.client.get_node(node_name=node)  # type: ignore[attr-defined]
            if found is None or found.redis_connection is None:
                return None
            sender = self._nodes[node] = _Sender(self.broker, found.redis_connection)
        return sender

    def close(self) -> None:
        for sender in self._nodes.values():
            sender.close()


@dataclass(frozen=True)
class RetryPolicy:
    """How a flush sends again the messages whose reply was lost (the fields of Celery's
    ``task_publish_retry_policy``): up to ``max_retries`` rounds, waiting ``interval_start``
    seconds before the first, ``interval_step`` more before each next, at most
    ``interval_max`` (defaults: Celery's)."""

    max_retries: int = 3
    interval_start: float = 0.0
    interval_step: float = 0.2
    interval_max: float = 1.0

    @classmethod
    def of(cls, app: Celery) -> RetryPolicy:
        """The app's: ``task_publish_retry`` (off: no retries) and its policy."""
        if not app.conf.task_publish_retry:
            return cls(max_retries=0)
        given = dict(app.conf.task_publish_retry_policy or {})
        names = ("max_retries", "interval_start", "interval_step", "interval_max")
        return cls(**{name: given[name] for name in names if given.get(name) is not None})

    def wait(self, attempt: int) -> float:
        return min(self.interval_max, self.interval_start + attempt * self.interval_step)


class Buffer:
    """The messages of one bulk block (one thread) not yet confirmed."""

    def __init__(self, batch: int, policy: RetryPolicy) -> None:
        self.batch = batch
        self.policy = policy
        self._pending: list[_Entry] = []
        self._again: list[_Entry] = []
        self._senders: dict[int, _Sender | _ClusterSender] = {}
        self._held: dict[int, tuple[Any, Callable[[Any], None]]] = {}
        self._oldest = 0.0
        #: The longest a message of this buffer waited in the process before it was written
        #: (seconds): the window the block opens (the guarantee moves to the block's edge).
        self.longest_wait = 0.0

    def add(self, channel: Channel, message: dict[str, Any], exchange: str, key: str) -> None:
        """Route ``message`` as :meth:`Channel.basic_publish` would and buffer it for each of
        its queues; a full batch is written at once."""
        if not self._pending:
            self._oldest = time.monotonic()
        self._route(_Message(channel, message, exchange, key), fresh=False)
        if len(self._pending) >= self.batch:
            self._write()
            # Redis lost the script (restarted, or it is new there): reloaded; they go again
            # with the next batch. Lost replies and stale routes wait for the flush.
            again = self._again
            self._pending.extend(e for e in again if e.status is Status.NO_SCRIPT)
            self._again = [e for e in again if e.status is not Status.NO_SCRIPT]

    def _route(self, origin: _Message, *, fresh: bool) -> None:
        channel = origin.channel
        if not origin.exchange:  # the default exchange: the routing key names the queue
            queues, route = [origin.routing_key], None
        else:
            queues, route, cached = channel.route(origin.exchange, origin.routing_key, fresh=fresh)
            if not queues and cached:
                # As basic_publish: a cached table that routes nowhere may lack a new binding.
                queues, route, _ = channel.route(origin.exchange, origin.routing_key, fresh=True)
        for queue in queues:
            if queue not in origin.queues:
                origin.queues.add(queue)
                self._pending.append(_Entry(channel.outgoing(queue, origin.message), route, origin))

    def _write(self) -> None:
        """Write the pending entries, one pipelined batch per broker, each broker's batch in
        flight read first."""
        pending, self._pending = self._pending, []
        if pending:
            self.longest_wait = max(self.longest_wait, time.monotonic() - self._oldest)
        batches: dict[int, list[_Entry]] = {}
        for entry in pending:
            broker = entry.origin.channel.broker
            if id(broker) not in self._senders:
                sender = _ClusterSender(broker) if broker.cluster else _Sender(broker)
                self._senders[id(broker)] = sender
            batches.setdefault(id(broker), []).append(entry)
        for key, sender in self._senders.items():
            self._again.extend(sender.write(batches.get(key, ())))

    def flush(self) -> None:
        """Send everything and wait until Redis confirmed every message: stale routes are
        routed again, lost replies sent again (unique) as the retry policy says; raises
        :class:`BulkPublishError` naming the rest (which the next flush sends again)."""
        attempt = routed = reloads = redirects = 0
        failed: list[_Entry] = []
        while True:
            self._write()
            for sender in self._senders.values():
                self._again.extend(sender.read())
            if not self._again:
                break
            again, self._again = self._again, []
            kinds = {entry.status for entry in again}
            for entry in again:
                if entry.status is Status.STALE and routed < ROUTE_ATTEMPTS:
                    entry.origin.queues.discard(entry.out.queue)  # nothing stored there
                    self._route(entry.origin, fresh=True)
                elif (
                    (entry.status is Status.NO_SCRIPT and reloads < ROUTE_ATTEMPTS)
                    or (entry.status is Status.MOVED and redirects < REDIRECT_ATTEMPTS)
                    or (entry.status is Status.LOST and attempt < self.policy.max_retries)
                ):
                    self._pending.append(entry)
                else:
                    failed.append(entry)
            routed += Status.STALE in kinds
            reloads += Status.NO_SCRIPT in kinds
            if Status.MOVED in kinds and redirects < REDIRECT_ATTEMPTS:
                time.sleep(min(REDIRECT_WAIT_MAX, redirects * REDIRECT_WAIT_STEP))
                redirects += 1
            if Status.LOST in kinds and attempt < self.policy.max_retries:
                time.sleep(self.policy.wait(attempt))
                attempt += 1
        if failed:
            self._pending = failed  # what the next flush (a retry) sends
            raise BulkPublishError([entry.unsent() for entry in failed], self)

    def discard(self) -> None:
        """Forget the messages not written yet (a batch already written may be stored)."""
        self._pending.clear()

    def hold(self, owner: object, acquire: Callable[[], T], release: Callable[[T], None]) -> T:
        """A resource of ``owner`` kept for the block's life (an app's producer: every
        ``.delay()`` in the block would take one from the pool and give it back), taken on
        first use and released when the block closes."""
        held = self._held.get(id(owner))
        if held is None:
            resource = acquire()
            self._held[id(owner)] = (resource, release)
            return resource
        return cast(T, held[0])

    def close(self) -> None:
        """Give the connections and held resources back (after a flush; a retry takes new
        connections)."""
        for sender in self._senders.values():
            sender.close()
        held, self._held = self._held, {}
        for resource, release in held.values():
            release(resource)


class PublishBatch:
    """kombu's publish batch protocol (``Producer.batch()``, kombu >= 5.7) on celery-msg: the
    producer's publishes are buffered and sent as a bulk block's are, every message confirmed
    one by one. kombu's contract on an exception inside ``Producer.batch()``: what was not
    sent yet is discarded (a bulk block sends it instead)."""

    def __init__(self, channel: Channel, max_size: int) -> None:
        self.channel = channel
        self._buffer = Buffer(max_size, RetryPolicy())

    def publish(self, message: dict[str, Any], exchange: str, routing_key: str, **_: Any) -> None:
        self.channel.prepare_for_publish(message, exchange, routing_key)
        self._buffer.add(self.channel, message, exchange, routing_key)

    def flush(self) -> None:
        self._buffer.flush()

    def discard(self) -> None:
        self._buffer.discard()

    def close(self) -> None:
        self._buffer.close()


def uses_celery_msg(app: Celery) -> bool:
    """Whether ``app``'s broker URL selects the celery-msg transport."""
    url = str(app.conf.broker_url or "")
    return url.startswith(tuple(f"{scheme}://" for scheme in URL_SCHEMES))


@contextmanager
def bulk(
    app: Celery, batch: int = DEFAULT_BATCH, retry_policy: RetryPolicy | None = None
) -> Iterator[Buffer]:
    """Buffer every task this thread publishes inside the block (any Celery API: ``delay``,
    ``apply_async``, ``send_task``, groups, chords, chunks) and send them in pipelined batches
    of ``batch``; on leaving, return once Redis holds them all, or raise
    :class:`BulkPublishError`. A block opened inside another joins it (the outer one sends).

    ``retry_policy``: how messages whose reply was lost are sent again (default: the app's
    ``task_publish_retry`` / ``task_publish_retry_policy``)."""
    if not uses_celery_msg(app):
        scheme = str(app.conf.broker_url or "").split("://")[0]
        raise ConfigurationError(f"celery_msg.bulk: the app's broker is {scheme}://, not ours")
    if batch < 1:
        raise ConfigurationError(f"batch: must be at least 1, got {batch!r}")
    outer: Buffer | None = getattr(_local, "buffer", None)
    if outer is not None:
        yield outer
        return
    buffer = _local.buffer = Buffer(batch, retry_policy or RetryPolicy.of(app))
    try:
        yield buffer
    finally:
        _local.buffer = None
        try:
            buffer.flush()
        finally:
            buffer.close()
