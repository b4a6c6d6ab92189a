"""The broker core: messages, leases and queues on Redis, with no knowledge of kombu or Celery.

Every state change is one script call (see :mod:`celery_msg.scripts`); this module turns Python
calls into script calls, groups them per queue (one queue = one hash slot), pipelines what can
be pipelined, and translates redis-py errors into :mod:`celery_msg.errors`.

A message is stored once per queue under a *key*: its ID, or ``ID/<n>`` when that ID is already
stored in the queue (a Celery retry republishes the same task id while the first delivery is
still leased). Its life: [SCHEDULED (waiting for its due time) ->] READY -> RESERVED (leased,
with a fencing token) -> ACKED (gone) | READY again (requeued, or its lease expired) | DEAD
(dead-letter store, with a reason).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, NamedTuple, cast

import redis
from redis.commands.core import Script

from .counters import Counter, reason_word
from .errors import (
    AuthenticationFailed,
    BrokerConnectionError,
    MessageNotFound,
    PermissionDenied,
    ScriptError,
    StaleRoute,
)
from .keys import (
    QueueKeys,
    bindings_key,
    bindings_version_key,
    exchanges_key,
    expiring_key,
    queues_key,
)
from .queueargs import QueueArguments
from .scripts import BAND, MISSING_BODY_GROUP, Code, Scripts, where

logger = logging.getLogger(__name__)

#: redis-py errors that mean "the connection, not the command, failed".
REDIS_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
    OSError,
)

_BINDING_SEP = "\x06\x16"

#: How Redis and Valkey word an ACL refusal inside a script (a plain error reply there).
_ACL_DENIED = re.compile(r"can't run this command|ACL failure in script|no permissions", re.I)
#: publish.lua's ARGV[6] when the publish is not routed through an exchange (no guard key).
_UNROUTED = ""
#: Seconds between two log lines about the same broken queue.
BROKEN_REPORT_INTERVAL = 60.0
#: Most expired queues (``expires``) one sweep deletes.
EXPIRE_QUEUES_BATCH = 10


class State(StrEnum):
    """Where a message is in its life."""

    SCHEDULED = "SCHEDULED"
    READY = "READY"
    RESERVED = "RESERVED"
    DEAD = "DEAD"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to one consumer: it holds the lease until ack, requeue or expiry."""

    queue: str
    key: str
    token: int
    deliveries: int
    payload: bytes


class Round(NamedTuple):
    """The outcome of one :meth:`Broker.settle_and_reserve` round trip."""

    #: The deliveries of each request, in request order.
    deliveries: list[list[Delivery]]
    #: Acks refused because their lease was lost.
    lost: list[Lease]
    #: Earliest due time (ms) of a scheduled message in the requested queues, or None.
    next_due_ms: int | None


@dataclass(frozen=True, slots=True)
class Lease:
    """What a consumer needs to settle a delivery (ack, requeue, dead-letter, renew)."""

    queue: str
    key: str
    token: int


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """What one consumer wants in a combined round (see :meth:`Broker.settle_and_reserve`)."""

    queues: list[str]
    count: int
    consumer: str
    order: Literal["fair", "strict"] = "fair"
    start: int = 0


@dataclass(frozen=True)
class MessageInfo:
    """A message as :meth:`Broker.lookup` finds it."""

    id: str
    key: str
    queue: str
    state: State
    deliveries: int
    priority_band: int | None
    owner: str | None
    lease_deadline: float | None
    #: When a SCHEDULED message becomes due (seconds since the epoch).
    due: float | None
    dead_reason: dict[str, Any] | None
    payload: bytes | None


@dataclass(frozen=True, slots=True)
class ScheduledMessage:
    """A message waiting in a queue's schedule, as :meth:`Broker.scheduled` lists it."""

    queue: str
    key: str
    #: When it becomes due (epoch ms): it enters its queue then.
    due_ms: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Binding:
    """A route from an exchange to a queue (kombu's ``(routing_key, pattern, queue)``)."""

    routing_key: str
    pattern: str
    queue: str

    def encode(self) -> str:
        return _BINDING_SEP.join((self.routing_key, self.pattern, self.queue))

    @classmethod
    def decode(cls, raw: bytes | str) -> Binding:
        text = raw.decode() if isinstance(raw, bytes) else raw
        routing_key, pattern, queue = text.split(_BINDING_SEP)
        return cls(routing_key, pattern, queue)


@dataclass(frozen=True, slots=True)
class Route:
    """Which binding table a publish was routed with: the exchange and its bindings version."""

    exchange: str
    version: int


class Table(NamedTuple):
    """An exchange's live bindings, read at one bindings version (None: the stored version is
    not a number; such a table is routed with unguarded and never cached)."""

    route: Route | None
    bindings: list[Binding]


@contextmanager
def translated_errors(what: str) -> Iterator[None]:
    """Re-raise redis-py errors as celery-msg errors, keeping the cause."""
    try:
        yield
    except Exception as exc:
        ours = translated(exc, what)
        if ours is None:
            raise
        raise ours from exc


def translated(exc: BaseException, what: str) -> Exception | None:
    """The celery-msg error for a redis-py error (None: not one to translate). NoScriptError
    is left alone: the caller loads the script again."""
    if isinstance(exc, redis.exceptions.NoScriptError):
        return None
    if isinstance(exc, redis.exceptions.NoPermissionError) or (
        isinstance(exc, redis.ResponseError) and _ACL_DENIED.search(str(exc))
    ):
        # Inside a script Redis 7.0 does not name the command: name the script line instead.
        line = where(str(exc))
        return PermissionDenied(
            f"{what}: the broker URL's ACL user may not run this (see README, Security): {exc}"
            + (f" [{line}]" if line else "")
        )
    if isinstance(exc, redis.ResponseError):
        return ScriptError(f"{what}: {exc}")
    if isinstance(exc, redis.AuthenticationError):  # a ConnectionError in redis-py
        return AuthenticationFailed(f"{what}: Redis refused the credentials: {exc}")
    if isinstance(exc, REDIS_CONNECTION_ERRORS):
        return BrokerConnectionError(f"{what}: Redis unreachable: {exc}")
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class DedicatedConnection:
    """One Redis connection kept out of the pool for a hot path (publishing).

    redis-py checks a connection out of its pool and back in for every command, which costs
    more Python than the command itself on a small machine; a publisher sends one command at
    a time, so it keeps one connection. One thread uses it at a time: a caller that finds it
    busy gets ``None`` and uses the pool. After a fork the child takes a connection of its own.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = os.getpid()

    def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self.execute(script, pack_evalsha(script, keys, args))

    def execute(self, script: Script, packed: bytes) -> Any:
        """Send one already packed ``EVALSHA`` of ``script`` and read its reply; ``_BUSY``
        when another thread holds the connection."""
        if not self._lock.acquire(blocking=False):
            return _BUSY
        try:
            if self._pid != os.getpid():
                self._conn, self._pid = None, os.getpid()  # the parent's socket is not ours
            conn = self._conn
            if conn is None:
                conn = self._conn = self.client.connection_pool.get_connection()
            try:
                if _stale(conn):
                    # Closed by the server while idle (restart, idle timeout, a proxy): nothing
                    # was sent yet, so reconnecting is safe, as redis-py's pool does.
                    conn.disconnect()
                return self._call(conn, script, packed)
            except redis.ResponseError:
                raise  # an error reply: the connection itself is fine
            except BaseException:
                self._conn = None
                conn.disconnect()
                self.client.connection_pool.release(conn)
                raise
        finally:
            self._lock.release()

    def _call(self, conn: Any, script: Script, packed: bytes) -> Any:
        try:
            conn.send_packed_command((packed,))
            return conn.read_response()
        except redis.exceptions.NoScriptError:
            # Redis restarted or SCRIPT FLUSH: load it again, on this connection. The same text
            # has the same SHA1, so the packed command stays valid.
            conn.send_command("SCRIPT", "LOAD", script.script)
            if _text(conn.read_response()) != script.sha:
                raise
            conn.send_packed_command((packed,))
            return conn.read_response()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self.client.connection_pool.release(self._conn)
                self._conn = None


_BUSY = object()

#: One script call: the script, its KEYS, its ARGV.
ScriptCall = tuple[Script, Sequence[str], Sequence[Any]]
_KEYS_CACHE_SIZE = 4096


def _bulk(value: bytes | str | int) -> bytes:
    """One RESP bulk string, encoded as redis-py encodes arguments (str as UTF-8, int as text)."""
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, int):
        value = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack_head(script: Script, keys: Sequence[str], argc: int) -> bytes:
    """The fixed part of ``EVALSHA sha numkeys keys...`` that ``argc`` arguments will follow."""
    head = [b"*%d\r\n" % (3 + len(keys) + argc), _bulk("EVALSHA"), _bulk(script.sha)]
    head.append(_bulk(len(keys)))
    head.extend(_bulk(key) for key in keys)
    return b"".join(head)


def pack_evalsha(script: Script, keys: Sequence[str], args: Sequence[Any]) -> bytes:
    return pack_head(script, keys, len(args)) + b"".join(_bulk(arg) for arg in args)


def _stale(conn: Any) -> bool:
    """True when an idle connection has something to read: EOF or unexpected data."""
    try:
        return bool(conn.can_read())
    except (redis.ConnectionError, OSError):
        return True


class Broker:
    """Queues of leased, ID-tracked messages on one Redis (or one Cluster slot per queue).

    ``clock`` returns seconds (``time.time`` by default) and is the only source of time: scripts
    get ``now`` as an argument, never from the server, so tests can pin it.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "celery-msg:",
        lease_ms: int = 10_000,
        reclaim_batch: int = 100,
        max_deliveries: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_ms = lease_ms
        self.reclaim_batch = reclaim_batch
        self.max_deliveries = max_deliveries
        self.clock = clock
        self.scripts = Scripts(client)
        self._keys: dict[str, QueueKeys] = {}
        self._publish_heads: dict[str | tuple[str, str], bytes] = {}
        self._publisher = DedicatedConnection(client)
        self._broken_reported: dict[str, float] = {}

    def close(self) -> None:
        """Give back the connection kept for publishing (the pool stays the caller's)."""
        self._publisher.close()

    # -- helpers ---------------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def keys(self, queue: str) -> QueueKeys:
        """The keys of ``queue``, built once (a hot path); the cache is bounded because
        short-lived reply queues (``celery inspect``) each have a name of their own."""
        try:
            return self._keys[queue]
        except KeyError:
            if len(self._keys) >= _KEYS_CACHE_SIZE:
                self._keys.clear()
            keys = self._keys[queue] = QueueKeys(queue, self.prefix)
            return keys

    # -- queues ----------------------------------------------------------------------------

    def declare(self, queue: str, arguments: QueueArguments | None = None) -> None:
        """Remember ``queue`` in the registry of queues (used by look-ups and the CLI) and store
        its ``arguments`` (message TTL, expiry, max length; see :mod:`celery_msg.queueargs`).

        A declaration defines the queue, as in RabbitMQ: its arguments replace the stored ones
        (none given: none kept), and it counts as a use of a queue with ``expires``.
        """
        args = arguments or QueueArguments()
        keys = self.keys(queue)
        with translated_errors(f"declare queue {queue!r}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(keys.args)
            pipe.delete(keys.args)
            stored = args.to_redis()
            if stored:
                pipe.hset(keys.args, mapping=stored)  # type: ignore[arg-type]
            if args.expires_ms is None:
                pipe.zrem(expiring_key(self.prefix), queue)
            else:
                pipe.zadd(expiring_key(self.prefix), {queue: self.now_ms() + args.expires_ms})
            pipe.sadd(queues_key(self.prefix), queue)
            before = QueueArguments.from_redis(pipe.execute()[0])
        if before != args and before != QueueArguments():
            logger.info("queue %s redeclared with arguments %s (were %s)", queue, args, before)

    def queue_arguments(self, queue: str) -> QueueArguments:
        """The arguments ``queue`` was declared with (a garbage stored value reads as unset)."""
        with translated_errors(f"read arguments of {queue!r}"):
            return QueueArguments.from_redis(self.client.hgetall(self.keys(queue).args))

    def touch(self, expiring: Mapping[str, int]) -> None:
        """Mark queues declared with ``expires`` (queue -> expires ms) as used now: a live
        consumer does this for the queues it consumes. A queue already deleted stays deleted."""
        if not expiring:
            return
        now = self.now_ms()
        with translated_errors(f"touch {len(expiring)} queues"):
            pipe = self.client.pipeline(transaction=False)
            for queue, expires_ms in expiring.items():
                pipe.zadd(expiring_key(self.prefix), {queue: now + expires_ms}, xx=True)
            pipe.execute()

    def expire_queues(self, limit: int = EXPIRE_QUEUES_BATCH) -> list[str]:
        """Delete up to ``limit`` queues unused for longer than their ``expires``; their names.

        Whoever reads an exchange's bindings (every publisher, about once per
        ``binding_cache_ttl``) and every live consumer's renewer call this, so an unused queue
        goes away even when nothing else ever touches it."""
        with translated_errors("find expired queues"):
            due = cast(
                list[bytes],
                self.client.zrangebyscore(
                    expiring_key(self.prefix), "-inf", f"({self.now_ms()}", start=0, num=limit
                ),
            )
        names = [_text(q) for q in due]
        return [q for q in names if self._expire_queue(q)]

    def _expire_queue(self, queue: str) -> bool:
        """Delete ``queue`` if it is still unused past its expiry (a consumer may have touched
        it, or another process deleted it, since it was found)."""
        registry = expiring_key(self.prefix)
        with (
            translated_errors(f"expire queue {queue!r}"),
            self.client.pipeline(transaction=True) as pipe,
        ):
            try:
                pipe.watch(registry)  # type: ignore[no-untyped-call]
                deadline = pipe.zscore(registry, queue)
                if deadline is None or deadline >= self.now_ms():
                    return False
                pipe.multi()
                self._delete_in(pipe, queue)
                pipe.execute()
            except redis.WatchError:
                return False  # touched (or deleted) meanwhile: look again next time
        logger.info("queue %s expired: unused for longer than its expires; deleted", queue)
        return True

    def queues(self) -> list[str]:
        return self.queue_registry()[0]

    def queue_registry(self) -> tuple[list[str], int]:
        """The registered queue names, and how many registered names were skipped because
        they are not UTF-8 (written by something else: a bad migration, a buggy tool)."""
        with translated_errors("list queues"):
            raw = self.client.smembers(queues_key(self.prefix))
        names: list[str] = []
        for name in raw:
            try:
                names.append(_text(name))
            except UnicodeDecodeError:
                continue
        skipped = len(raw) - len(names)
        if skipped:
            logger.warning(
                "skipped %d queue name(s) that are not UTF-8 in %s", skipped, self.prefix
            )
        return sorted(names), skipped

    def exists(self, queue: str) -> bool:
        with translated_errors(f"check queue {queue!r}"):
            return bool(self.client.sismember(queues_key(self.prefix), queue))

    def size(self, queue: str) -> int:
        """Number of READY messages (what kombu and Celery call the queue's size)."""
        with translated_errors(f"size of {queue!r}"):
            return int(self.client.zcard(self.keys(queue).ready))

    def counts(self, queue: str) -> dict[str, int]:
        """READY, RESERVED, SCHEDULED and DEAD counts of ``queue`` in one round trip."""
        keys = self.keys(queue)
        with translated_errors(f"counts of {queue!r}"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zcard(keys.ready)
            pipe.zcard(keys.leased)
            pipe.zcard(keys.sched)
            pipe.zcard(keys.dead)
            ready, reserved, scheduled, dead = pipe.execute()
        return {
            "ready": int(ready),
            "reserved": int(reserved),
            "scheduled": int(scheduled),
            "dead": int(dead),
        }

    def stats(self, queue: str) -> dict[str, int]:
        """Lifetime counters of ``queue``: published, acked, requeued, reclaimed, dead, ..."""
        with translated_errors(f"stats of {queue!r}"):
            raw = self.client.hgetall(self.keys(queue).stats)
        return {_text(k): int(v) for k, v in raw.items()}

    def count(self, queue: str, counter: Counter, n: int = 1) -> None:
        """Add ``n`` to one of ``queue``'s lifetime counters (see :meth:`stats`)."""
        with translated_errors(f"count {counter} in {queue!r}"):
            self.client.hincrby(self.keys(queue).stats, counter, n)

    def purge(self, queue: str, batch: int = 1000) -> int:
        """Remove every READY and SCHEDULED message of ``queue`` (in bounded steps); returns
        how many."""
        keys = self.keys(queue).all
        total = 0
        with translated_errors(f"purge {queue!r}"):
            while True:
                removed = int(self.scripts.purge(keys=keys, args=[batch]))
                total += removed
                if removed < batch:
                    return total

    def delete(self, queue: str) -> None:
        """Remove ``queue`` with everything in it, leased and dead messages included."""
        with translated_errors(f"delete {queue!r}"):
            pipe = self.client.pipeline(transaction=True)
            self._delete_in(pipe, queue)
            pipe.execute()

    def _delete_in(self, pipe: Any, queue: str) -> None:
        keys = self.keys(queue)
        pipe.delete(*keys.all, *keys.side)
        pipe.srem(queues_key(self.prefix), queue)
        pipe.zrem(expiring_key(self.prefix), queue)

    def run_scripts(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run script calls in one pipelined round trip; their replies, in order.

        redis-py's own pipelining of scripts asks ``SCRIPT EXISTS`` first: a second round trip
        on every call, on the consumer's hot path. Here each ``EVALSHA`` goes as it is; a script
        Redis lost (restart, ``SCRIPT FLUSH``) is loaded again and only its calls are sent
        again (the others have run). An error reply is raised, as redis-py would.
        """
        results = self.script_replies(calls)
        for reply in results:
            if isinstance(reply, redis.ResponseError):
                raise reply
        return results

    def script_replies(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """:meth:`run_scripts`, but an error reply stays in the list (one broken queue must not
        keep the calls of the others from being read); connection errors still raise."""
        results: list[Any] = self._evalsha_all(calls)
        missing = [
            i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)
        ]
        if missing:
            for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
                script.sha = _text(self.client.script_load(script.script))
            replies = self._evalsha_all([calls[i] for i in missing])
            for i, reply in zip(missing, replies, strict=True):
                results[i] = reply
        return results

    def _evalsha_all(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """One pipeline of EVALSHA calls; error replies come back in the list, not raised."""
        pipe = self.client.pipeline(transaction=False)
        for script, keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
        return list(pipe.execute(raise_on_error=False))

    # -- message life ----------------------------------------------------------------------

    def publish(
        self,
        queue: str,
        message_id: str,
        payload: bytes | str,
        band: int,
        *,
        due_ms: int = 0,
        unique: bool = False,
        lock_until_ms: int = 0,
        route: Route | None = None,
        retry: bool = False,
    ) -> str:
        """Append a message to its priority band, or schedule it when ``due_ms`` (epoch ms) is
        in the future; returns its key in this queue.

        ``unique``: if ``message_id`` is still pending in this queue (ready, reserved or
        scheduled), store nothing and return it (an idempotent ``.delay()``); with
        ``lock_until_ms`` (epoch ms), the id is refused instead while it is locked, and a
        stored message locks it until then or until :meth:`unlock`.
        ``retry``: the message is a Celery retry (counted as ``retried`` as well).
        ``route``: the binding table this queue was chosen from; if the exchange's bindings
        changed since, nothing is stored and :class:`StaleRoute` is raised."""
        # Every publisher's hot path: the command's fixed part (script and keys) is packed once
        # per queue, the rest here, and errors are translated inline (no context manager).
        head_key = queue if route is None else (queue, route.exchange)
        try:
            head = self._publish_heads[head_key]
        except KeyError:
            head = self._publish_head(head_key, queue, route)
        now = self.now_ms()
        due = due_ms if due_ms > now else 0
        version = _UNROUTED if route is None else route.version
        lock = lock_until_ms if unique else 0
        args = (message_id, payload, band, due, 1 if unique else 0, version, now, lock, int(retry))
        try:
            reply = self._publisher.execute(
                self.scripts.publish, head + b"".join(_bulk(arg) for arg in args)
            )
            if reply is _BUSY:
                reply = self.scripts.publish(keys=self._publish_keys(queue, route), args=args)
        except Exception as exc:
            ours = translated(exc, f"publish to {queue!r}")
            if ours is None:
                raise
            raise ours from exc
        if route is not None and int(reply[1]) == Code.STALE_ROUTE:
            raise StaleRoute(route.exchange, [queue])
        return _text(reply[0])

    def publish_once(
        self, queue: str, message_id: str, payload: bytes | str, band: int, *, due_ms: int = 0
    ) -> bool:
        """A unique publish (see :meth:`publish`) that says whether it stored the message
        (False: ``message_id`` was still pending in ``queue``). For tools, not the hot path."""
        now = self.now_ms()
        due = due_ms if due_ms > now else 0
        args = (message_id, payload, band, due, 1, _UNROUTED, now, 0)
        with translated_errors(f"publish to {queue!r}"):
            reply = self.scripts.publish(keys=self._publish_keys(queue, None), args=args)
        return int(reply[1]) == 1

    def unlock(self, queue: str, message_ids: Sequence[str]) -> int:
        """Let unique publishes of ``message_ids`` into ``queue`` through again (their task
        started or succeeded); returns how many were locked."""
        if not message_ids:
            return 0
        with translated_errors(f"unlock {len(message_ids)} ids in {queue!r}"):
            return int(self.scripts.unlock(keys=self.keys(queue).all, args=list(message_ids)))

    def _publish_keys(self, queue: str, route: Route | None) -> tuple[str, ...]:
        keys = self.keys(queue).publish
        if route is None:
            return keys
        return (*keys, bindings_version_key(self.prefix, route.exchange))

    def _publish_head(
        self, head_key: str | tuple[str, str], queue: str, route: Route | None
    ) -> bytes:
        if len(self._publish_heads) >= _KEYS_CACHE_SIZE:
            self._publish_heads.clear()
        head = self._publish_heads[head_key] = pack_head(
            self.scripts.publish, self._publish_keys(queue, route), 9
        )
        return head

    def publish_many(
        self,
        queues: Sequence[str],
        message_id: str,
        payload: bytes | str,
        band: int,
        *,
        due_ms: int = 0,
        route: Route | None = None,
    ) -> list[str]:
        """Publish one message into several queues (a broadcast) in one round trip.

        With ``route``, a queue whose publish found the bindings changed stores nothing; they
        are raised together as :class:`StaleRoute` (the others were stored)."""
        if not queues:
            return []
        now = self.now_ms()
        version = _UNROUTED if route is None else route.version
        args = [message_id, payload, band, due_ms if due_ms > now else 0, 0, version, now, 0]
        publish = self.scripts.publish
        with translated_errors(f"publish to {len(queues)} queues"):
            replies = self.run_scripts(
                [(publish, self._publish_keys(q, route), args) for q in queues]
            )
        if route is not None:
            refused = [
                q for q, r in zip(queues, replies, strict=True) if int(r[1]) == Code.STALE_ROUTE
            ]
            if refused:
                raise StaleRoute(route.exchange, refused)
        return [_text(r[0]) for r in replies]

    def promote(self, queue: str, limit: int | None = None) -> int:
        """Move due scheduled messages of ``queue`` to its back; returns how many. Consumers
        do this with every fetch; this is for operators and tests."""
        batch = self.reclaim_batch if limit is None else limit
        with translated_errors(f"promote in {queue!r}"):
            return int(self.scripts.promote(keys=self.keys(queue).all, args=[self.now_ms(), batch]))

    def reserve(
        self,
        queues: Sequence[str],
        count: int,
        consumer: str,
        *,
        order: Literal["fair", "strict"] = "fair",
        start: int = 0,
    ) -> list[Delivery]:
        """Lease up to ``count`` messages from ``queues`` in one script call.

        Expired leases of those queues are reclaimed and due scheduled messages promoted
        first. With ``order="strict"`` earlier
        queues are drained first; with ``"fair"`` one message is taken from each queue in turn,
        beginning with ``queues[start]``.
        """
        request = ReserveRequest(list(queues), count, consumer, order, start)
        with translated_errors(f"reserve from {list(queues)!r}"):
            flat = self.scripts.reserve(
                keys=self._reserve_keys(request), args=self._reserve_args(request)
            )
        return _deliveries(request, flat)

    def settle_and_reserve(
        self, acks: Sequence[Lease], requests: Sequence[ReserveRequest]
    ) -> Round:
        """Ack ``acks`` and serve every request in a single round trip (a consumer's hot path)."""
        by_queue = _group(acks)
        wanted = [r for r in requests if r.count > 0 and r.queues]
        if not by_queue and not wanted:
            return Round([[] for _ in requests], [], None)
        calls: list[ScriptCall] = [
            (self.scripts.ack, self.keys(queue).all, _pairs(group))
            for queue, group in by_queue.items()
        ]
        calls.extend(
            (self.scripts.reserve, self._reserve_keys(r), self._reserve_args(r)) for r in wanted
        )
        with translated_errors("ack and reserve"):
            results = self.script_replies(calls)
        broken: dict[str, str] = {}
        acked = results[: len(by_queue)]
        for i, (queue, group) in enumerate(by_queue.items()):
            if isinstance(acked[i], redis.ResponseError):
                broken[queue] = str(acked[i])
                acked[i] = [Code.LEASE_LOST] * len(group)  # not settled: they come back
        lost = _lost(by_queue.values(), acked)
        served = iter(results[len(by_queue) :])
        out: list[list[Delivery]] = []
        soonest: int | None = None
        for request in requests:
            if not (request.count > 0 and request.queues):
                out.append([])
                continue
            flat = next(served)
            if isinstance(flat, redis.ResponseError):
                deliveries, due = self._reserve_around_broken(request, flat, broken)
            else:
                deliveries, due = _deliveries(request, flat), int(flat[-1])
            out.append(deliveries)
            if due and (soonest is None or due < soonest):
                soonest = due
        for queue, error in broken.items():
            self._report_broken(queue, error)
        return Round(out, lost, soonest)

    def _reserve_around_broken(
        self, request: ReserveRequest, error: redis.ResponseError, broken: dict[str, str]
    ) -> tuple[list[Delivery], int]:
        """A reserve over several queues failed (a key of one of them is corrupt): serve the
        request queue by queue, so that the sound queues are not starved by the broken one."""
        if len(request.queues) == 1:
            broken[request.queues[0]] = str(error)
            return [], 0
        deliveries: list[Delivery] = []
        soonest = 0
        for queue in request.queues:
            want = request.count - len(deliveries)
            if want <= 0:
                break
            alone = ReserveRequest([queue], want, request.consumer, request.order, 0)
            call = (self.scripts.reserve, self._reserve_keys(alone), self._reserve_args(alone))
            with translated_errors(f"reserve from {queue!r}"):
                [reply] = self.script_replies([call])
            if isinstance(reply, redis.ResponseError):
                broken[queue] = str(reply)
                continue
            deliveries.extend(_deliveries(alone, reply))
            due = int(reply[-1])
            if due and (not soonest or due < soonest):
                soonest = due
        return deliveries, soonest

    def _report_broken(self, queue: str, error: str) -> None:
        """Log a queue whose scripts fail, at most once a minute per queue."""
        now = time.monotonic()
        if now < self._broken_reported.get(queue, 0.0):
            return
        self._broken_reported[queue] = now + BROKEN_REPORT_INTERVAL
        logger.error(
            "queue %s is skipped: its scripts fail (a key of it is corrupt?): %s; "
            "the other queues are served",
            queue,
            error,
        )

    def _reserve_keys(self, request: ReserveRequest) -> list[str]:
        keys: list[str] = []
        for queue in request.queues:
            keys.extend(self.keys(queue).all)
        return keys

    def _reserve_args(self, request: ReserveRequest) -> list[Any]:
        return [
            self.now_ms(),
            self.lease_ms,
            request.count,
            request.consumer,
            request.order,
            request.start,
            self.reclaim_batch,
            self.max_deliveries,
        ]

    def ack(self, leases: Iterable[Lease]) -> list[Lease]:
        """Settle deliveries as done; returns the leases that were lost (nothing changed)."""
        return self._settle(leases, self.scripts.ack, "ack", [])

    def requeue(self, leases: Iterable[Lease], *, uncount: bool = False) -> list[Lease]:
        """Put deliveries back at the front of their band; returns the lost leases.

        ``uncount`` takes the delivery back from the delivery count: for messages that were
        prefetched but never started, so that they do not look like poison.
        """
        return self._settle(leases, self.scripts.requeue, "requeue", [1 if uncount else 0])

    def extend(self, leases: Iterable[Lease]) -> list[Lease]:
        """Renew leases for another ``lease_ms``; returns the ones that were lost."""
        return self._settle(leases, self.scripts.extend, "extend", [self.now_ms(), self.lease_ms])

    def _settle(
        self, leases: Iterable[Lease], run: Script, what: str, head: list[Any]
    ) -> list[Lease]:
        """Run a per-message script over leases, one call per queue, pipelined if several."""
        by_queue = _group(leases)
        if not by_queue:
            return []
        with translated_errors(f"{what} {sum(map(len, by_queue.values()))} messages"):
            if len(by_queue) == 1:
                ((queue, group),) = by_queue.items()
                results = [run(keys=self.keys(queue).all, args=head + _pairs(group))]
            else:
                results = self.run_scripts(
                    [(run, self.keys(q).all, head + _pairs(group)) for q, group in by_queue.items()]
                )
        return _lost(by_queue.values(), results)

    def dead_letter(self, lease: Lease, reason: str, detail: str = "", **extra: Any) -> bool:
        """Move a leased message to its queue's dead-letter store; False if the lease was lost.

        ``reason`` is a short word (``undecodable``, ``rejected``, ``poison``, ...), ``detail``
        a human sentence; ``extra`` adds JSON-serialisable fields.
        """
        now = self.now_ms()
        record = _record_json(reason, detail, now, extra)
        with translated_errors(f"dead-letter {lease.key!r} in {lease.queue!r}"):
            code = self.scripts.dead_letter(
                keys=self.keys(lease.queue).all,
                args=[now, lease.key, lease.token, record, reason_word(reason)],
            )
        return int(code) == Code.OK

    def bury(
        self,
        queue: str,
        message_id: str,
        payload: bytes | str,
        *,
        band: int,
        deliveries: int,
        reason: str,
        detail: str,
        **extra: Any,
    ) -> str:
        """Store a copy of a message that is no longer leased (acked on receipt, or acked on a
        time limit) as dead, with a record as :meth:`dead_letter` writes; returns its key."""
        now = self.now_ms()
        record = _record_json(reason, detail, now, extra)
        with translated_errors(f"dead-letter a copy of {message_id!r} in {queue!r}"):
            key = self.scripts.bury(
                keys=self.keys(queue).all,
                args=[now, message_id, payload, band, deliveries, record, reason_word(reason)],
            )
        return _text(key)

    def reclaim(self, queue: str, limit: int | None = None) -> int:
        """Return expired leases of ``queue`` to the front of their band; returns how many."""
        batch = self.reclaim_batch if limit is None else limit
        with translated_errors(f"reclaim in {queue!r}"):
            return int(self.scripts.reclaim(keys=self.keys(queue).all, args=[self.now_ms(), batch]))

    def wait(self, queues: Sequence[str], timeout: float) -> bool:
        """Block until something may be ready in ``queues`` or ``timeout`` seconds pass.

        Costs nothing while waiting: one BLPOP on the queues' wake-up markers. True when woken.
        """
        if not queues:
            time.sleep(timeout)
            return False
        keys = [self.keys(q).signal for q in queues]
        with translated_errors(f"wait on {list(queues)!r}"):
            return self.client.blpop(keys, timeout=timeout) is not None

    # -- look-ups --------------------------------------------------------------------------

    def lookup(self, message_id: str, queues: Sequence[str] | None = None) -> list[MessageInfo]:
        """Every stored instance of ``message_id`` in ``queues`` (default: all known queues).

        Acked messages leave no trace, so an empty list means acked, purged or never published.
        """
        found: list[MessageInfo] = []
        for queue in self.queues() if queues is None else queues:
            for key in self._keys_of(queue, message_id):
                info = self.info(queue, key)
                if info is not None:
                    found.append(info)
        return found

    def get(self, message_id: str, queues: Sequence[str] | None = None) -> MessageInfo:
        """The newest stored instance of ``message_id``; raises :class:`MessageNotFound`."""
        found = self.lookup(message_id, queues)
        if not found:
            raise MessageNotFound(f"no message with id {message_id!r} is stored")
        return found[-1]

    def _keys_of(self, queue: str, message_id: str) -> list[str]:
        """Keys of ``message_id`` in ``queue``, oldest first (by publish sequence)."""
        k = self.keys(queue)
        pattern = _glob_escape(message_id) + "/*"
        with translated_errors(f"look up {message_id!r} in {queue!r}"):
            pipe = self.client.pipeline(transaction=False)
            pipe.hexists(k.body, message_id)
            pipe.zscore(k.dead, message_id)  # dead ids may have lost their body
            pipe.hexists(k.dups, message_id)
            has_body, dead_at, is_dup_key = pipe.execute()
            stored = has_body or dead_at is not None
            # A key that is some other id's duplicate slot is not this id's message.
            keys = [message_id] if stored and not is_dup_key else []
            for field, owner_id in self.client.hscan_iter(k.dups, match=pattern):
                if _text(owner_id) == message_id:
                    keys.append(_text(field))
            if len(keys) < 2:
                return keys
            scores = self.client.hmget(k.order, keys)
        seq = {key: int(float(s or 0)) % BAND for key, s in zip(keys, scores, strict=True)}
        return sorted(keys, key=seq.__getitem__)

    def info(self, queue: str, key: str) -> MessageInfo | None:
        """The message stored under ``key`` in ``queue`` (one round trip), or None."""
        return self.infos(queue, [key])[0]

    def infos(self, queue: str, keys: Sequence[str]) -> list[MessageInfo | None]:
        """:meth:`info` of many keys of ``queue`` in one round trip (a transaction, so that
        each message is read in one consistent state)."""
        k = self.keys(queue)
        with translated_errors(f"look up {len(keys)} messages in {queue!r}"):
            pipe = self.client.pipeline(transaction=True)
            for key in keys:
                pipe.hget(k.body, key)
                pipe.zscore(k.ready, key)
                pipe.zscore(k.leased, key)
                pipe.zscore(k.dead, key)
                pipe.zscore(k.sched, key)
                pipe.hget(k.deliv, key)
                pipe.hget(k.order, key)
                pipe.hget(k.owner, key)
                pipe.hget(k.reason, key)
                pipe.hget(k.dups, key)
            replies = pipe.execute() if keys else []
        n = len(replies) // max(1, len(keys))
        return [
            _message_info(queue, key, replies[i * n : (i + 1) * n]) for i, key in enumerate(keys)
        ]

    def scheduled(self, queue: str, limit: int = 100) -> list[ScheduledMessage]:
        """The ``limit`` soonest SCHEDULED messages of ``queue`` (ETA, countdown, retries),
        soonest first, with their raw payloads (undecoded: the caller decides what it trusts).

        Two reads: a message promoted or consumed in between is left out (its body is gone) or
        listed once more as scheduled; this is a view for operators, not a transition.
        """
        if limit <= 0:
            return []
        k = self.keys(queue)
        with translated_errors(f"list scheduled messages of {queue!r}"):
            due = cast(
                list[tuple[bytes, float]],
                self.client.zrange(k.sched, 0, limit - 1, withscores=True),
            )
            if not due:
                return []
            keys = [_text(key) for key, _ in due]
            bodies = cast(list[bytes | None], self.client.hmget(k.body, keys))
        return [
            ScheduledMessage(queue, key, int(score), body)
            for key, (_, score), body in zip(keys, due, bodies, strict=True)
            if body is not None
        ]

    def dead_letters(self, queue: str, limit: int = 100) -> list[MessageInfo]:
        """The oldest ``limit`` dead messages of ``queue``."""
        with translated_errors(f"list dead letters of {queue!r}"):
            raw = cast(list[bytes], self.client.zrange(self.keys(queue).dead, 0, limit - 1))
        return [info for info in self.infos(queue, [_text(k) for k in raw]) if info is not None]

    # -- bindings --------------------------------------------------------------------------

    def declare_exchange(self, exchange: str, kind: str) -> None:
        """Record ``exchange``'s type (direct, topic, fanout) for every process."""
        with translated_errors(f"declare exchange {exchange!r}"):
            self.client.hset(exchanges_key(self.prefix), exchange, kind)

    def exchange_type(self, exchange: str) -> str | None:
        """The type ``exchange`` was declared with by any process, or None."""
        with translated_errors(f"read exchange {exchange!r}"):
            kind = self.client.hget(exchanges_key(self.prefix), exchange)
        return None if kind is None else _text(kind)

    def bind(self, exchange: str, binding: Binding, ttl_ms: int | None = None) -> None:
        """Add a route; with ``ttl_ms`` it expires unless :meth:`refresh_bindings` renews it."""
        expires = 0 if ttl_ms is None else self.now_ms() + ttl_ms
        with translated_errors(f"bind {binding.queue!r} to {exchange!r}"):
            pipe = self.client.pipeline(transaction=True)
            # Registered (as kombu's default type, unless declared) so that unbind_queue finds
            # every exchange that has bindings without scanning the keyspace.
            pipe.hsetnx(exchanges_key(self.prefix), exchange, "direct")
            pipe.hset(bindings_key(self.prefix, exchange), binding.encode(), expires)
            pipe.incr(bindings_version_key(self.prefix, exchange))
            pipe.execute()

    def unbind(self, exchange: str, binding: Binding) -> None:
        with translated_errors(f"unbind {binding.queue!r} from {exchange!r}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(bindings_key(self.prefix, exchange), binding.encode())
            pipe.incr(bindings_version_key(self.prefix, exchange))
            pipe.execute()

    def unbind_queue(self, queue: str) -> None:
        """Remove every binding to ``queue`` from every exchange.

        Rare (a queue deleted); it walks the registry of exchanges, never the keyspace: no
        SCAN, so an ACL user needs no keyspace-wide command and sees no other app's keys."""
        with translated_errors(f"unbind {queue!r}"):
            exchanges = sorted(_text(e) for e in self.client.hkeys(exchanges_key(self.prefix)))
            pipe = self.client.pipeline(transaction=False)
            for exchange in exchanges:
                pipe.hkeys(bindings_key(self.prefix, exchange))
            for exchange, fields in zip(exchanges, pipe.execute(), strict=True):
                mine = [f for f in fields if _binding_queue(f) == queue]
                if mine:
                    tx = self.client.pipeline(transaction=True)
                    tx.hdel(bindings_key(self.prefix, exchange), *mine)
                    tx.incr(bindings_version_key(self.prefix, exchange))
                    tx.execute()

    def refresh_bindings(self, bindings: Mapping[str, Mapping[Binding, int]]) -> None:
        """Renew expiring bindings of live consumers (exchange -> binding -> its TTL in ms), in
        one round trip.

        A binding that had expired and was removed meanwhile comes back, and its exchange's
        bindings version moves on, so that cached tables see it."""
        now = self.now_ms()
        with translated_errors("refresh bindings"):
            pipe = self.client.pipeline(transaction=False)
            exchanges: list[str] = []
            for exchange, group in bindings.items():
                for binding, ttl_ms in group.items():
                    pipe.hset(bindings_key(self.prefix, exchange), binding.encode(), now + ttl_ms)
                    exchanges.append(exchange)
            added = {
                exchange for exchange, new in zip(exchanges, pipe.execute(), strict=True) if new
            }
            if added:
                pipe = self.client.pipeline(transaction=False)
                for exchange in sorted(added):
                    pipe.incr(bindings_version_key(self.prefix, exchange))
                pipe.execute()

    def table(self, exchange: str) -> Table:
        """The live bindings of ``exchange``, with the bindings version they were read at.

        Expired ones are removed with their queues; a field that is not a binding (written by
        hand, or by another program) is skipped and logged, never routed to."""
        key = bindings_key(self.prefix, exchange)
        now = self.now_ms()
        with translated_errors(f"read bindings of {exchange!r}"):
            # Every publisher comes here (about once per binding_cache_ttl): a good moment to
            # look for queues unused past their ``expires``, in the same round trip.
            pipe = self.client.pipeline(transaction=True)
            pipe.get(bindings_version_key(self.prefix, exchange))
            pipe.hgetall(key)
            pipe.zrangebyscore(
                expiring_key(self.prefix), "-inf", f"({now}", start=0, num=EXPIRE_QUEUES_BATCH
            )
            version, raw, unused = pipe.execute()
        gone = {_text(q) for q in unused if self._expire_queue(_text(q))}
        live: list[Binding] = []
        expired: list[Binding] = []
        for field, expires in raw.items():
            try:
                binding = Binding.decode(field)
                deadline = int(expires)
            except (ValueError, UnicodeDecodeError):
                logger.warning(
                    "exchange %s: skipping a malformed binding %r -> %r", exchange, field, expires
                )
                continue
            if binding.queue in gone:
                self.unbind(exchange, binding)  # its queue expired: route nothing there
                continue
            (expired if deadline and deadline < now else live).append(binding)
        for binding in expired:
            # Moves the version on: a publish routed with this table is refused as stale and
            # routed again with the table as it is then.
            self._expire_binding(exchange, binding)
        number = _version(version)
        return Table(None if number is None else Route(exchange, number), live)

    def _expire_binding(self, exchange: str, binding: Binding) -> None:
        """Remove an expired binding and its queue, unless a consumer renewed it meanwhile."""
        key = bindings_key(self.prefix, exchange)
        field = binding.encode()
        with (
            translated_errors(f"expire binding of {binding.queue!r}"),
            self.client.pipeline(transaction=True) as pipe,
        ):
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                expires = int(pipe.hget(key, field) or 0)
                if not expires or expires >= self.now_ms():
                    return
                pipe.multi()
                pipe.hdel(key, field)
                pipe.incr(bindings_version_key(self.prefix, exchange))
                pipe.execute()
            except redis.WatchError:
                return  # changed under us: it was renewed (or removed); look again next time
        logger.info(
            "binding of queue %s to exchange %s expired: its consumer is gone; deleting the queue",
            binding.queue,
            exchange,
        )
        self.delete(binding.queue)


def failure_record(reason: str, detail: str, now_ms: int, **extra: Any) -> dict[str, Any]:
    """The JSON record kept with a dead message: why, and when it first and last failed.

    ``first_failure`` comes from ``extra`` when the message failed before (its retries);
    otherwise this failure is the first.
    """
    record: dict[str, Any] = {"reason": reason, "detail": detail, "time": now_ms}
    record.update(extra)
    record.setdefault("first_failure", now_ms)
    record["last_failure"] = now_ms
    return record


def _message_info(queue: str, key: str, replies: Sequence[Any]) -> MessageInfo | None:
    body, ready, leased, dead, due, deliv, order, owner, reason, dup_of = replies
    if body is None and dead is None:
        return None  # a dead id keeps its record when its body is gone ('missing-body')
    if leased is not None:
        state = State.RESERVED
    elif dead is not None:
        state = State.DEAD
    elif ready is not None:
        state = State.READY
    elif due is not None:
        state = State.SCHEDULED
    else:
        return None
    return MessageInfo(
        id=key if dup_of is None else _text(dup_of),
        key=key,
        queue=queue,
        state=state,
        deliveries=int(deliv or 0),
        priority_band=None if order is None else int(float(order)) // BAND,
        owner=None if owner is None else _text(owner),
        lease_deadline=None if leased is None else float(leased) / 1000.0,
        due=None if due is None else float(due) / 1000.0,
        dead_reason=None if reason is None else dead_record(reason),
        payload=body,
    )


#: Reason given to a dead-letter record that is not a JSON object (written by something else).
UNREADABLE_RECORD = "unreadable-record"
#: Fields of a dead-letter record kept in epoch milliseconds in Redis; look-ups give seconds.
_RECORD_TIMES = ("time", "first_failure", "last_failure")


def dead_record(raw: bytes | str) -> dict[str, Any]:
    """A stored dead-letter record as look-ups return it: times in seconds since the epoch
    (floats, as every public time); one that is not a JSON object is reported, not raised, as
    reason :data:`UNREADABLE_RECORD`, so that one bad record cannot break a listing."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        return {
            "reason": UNREADABLE_RECORD,
            "detail": f"dead-letter record is not a JSON object: {raw[:60]!r}",
        }
    for name in _RECORD_TIMES:
        if name in value:
            try:
                value[name] = float(value[name]) / 1000.0
            except (TypeError, ValueError):
                value[name] = None
    return value


def _record_json(reason: str, detail: str, now_ms: int, extra: Mapping[str, Any]) -> str:
    return json.dumps(failure_record(reason, detail, now_ms, **extra), default=str)


def _deliveries(request: ReserveRequest, flat: list[Any]) -> list[Delivery]:
    queues = request.queues
    out: list[Delivery] = []
    for i in range(0, len(flat) - 1, 5):  # the last entry is the next due time
        group, key = int(flat[i]), _text(flat[i + 1])
        if group == MISSING_BODY_GROUP:
            logger.error(
                "message %s was ready in one of %s but its body is gone; recorded as dead "
                "('missing-body')",
                key,
                queues,
            )
            continue
        out.append(Delivery(queues[group], key, int(flat[i + 2]), int(flat[i + 3]), flat[i + 4]))
    return out


def _group(leases: Iterable[Lease]) -> dict[str, list[Lease]]:
    by_queue: dict[str, list[Lease]] = {}
    for lease in leases:
        by_queue.setdefault(lease.queue, []).append(lease)
    return by_queue


def _lost(groups: Iterable[list[Lease]], results: Sequence[Any]) -> list[Lease]:
    lost: list[Lease] = []
    for group, codes in zip(groups, results, strict=True):
        lost.extend(lease for lease, code in zip(group, codes, strict=True) if code != Code.OK)
    return lost


def _pairs(leases: Iterable[Lease]) -> list[Any]:
    out: list[Any] = []
    for lease in leases:
        out.append(lease.key)
        out.append(lease.token)
    return out


def _version(raw: bytes | str | None) -> int | None:
    """A bindings version as stored (None when it is not a number: written by hand)."""
    try:
        return int(raw or 0)
    except ValueError:
        logger.warning("bindings version %r is not a number; routing without a cache", raw)
        return None


def _binding_queue(field: bytes | str) -> str | None:
    """The queue of an encoded binding, or None when the field is not one."""
    try:
        return Binding.decode(field).queue
    except (ValueError, UnicodeDecodeError):
        return None


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
