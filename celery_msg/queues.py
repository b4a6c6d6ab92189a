"""The registry of queues, their arguments, counts and counters: plain Redis, no script.

Why its own module: none of this changes a message's state. Declaring a queue records it in the
registry (``<prefix>queues``, read by look-ups and the CLI instead of scanning the keyspace) and
stores its arguments; a queue declared with ``expires`` is deleted once unused past it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import redis

from .keys import Counter, QueueKeys, expiring_key, queues_key, wake_key
from .queueargs import QueueArguments
from .redisio import text, translated_errors
from .shardwait import ShardWaiter

logger = logging.getLogger(__name__)

#: Most expired queues (``expires``) one sweep, or one read of a binding table, deletes.
EXPIRE_QUEUES_BATCH = 10
#: Bounds the cache of per-queue keys: short-lived reply queues (``celery inspect``) each have a
#: name of their own.
KEYS_CACHE_SIZE = 4096


class Queues:
    """The queues under one prefix: their keys, registry, arguments and counts.

    The first part of :class:`~celery_msg.core.Broker` (which sets the attributes below);
    :class:`~celery_msg.lookup.Lookups` and :class:`~celery_msg.bindings.Bindings` build on it.
    """

    client: redis.Redis
    prefix: str
    #: The prefix of the global keys (registry, exchanges, bindings): see :mod:`.slots`.
    global_prefix: str
    #: On a Redis Cluster a queue's keys and the global keys are in different slots, so the
    #: writes that touch both cannot be one transaction (see :meth:`declare`, :meth:`delete`).
    cluster: bool
    _shard_waiter: ShardWaiter | None
    clock: Callable[[], float]
    _keys: dict[str, QueueKeys]

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def keys(self, queue: str) -> QueueKeys:
        """The keys of ``queue``, built once (a hot path); the cache is bounded because
        short-lived reply queues (``celery inspect``) each have a name of their own."""
        try:
            return self._keys[queue]
        except KeyError:
            if len(self._keys) >= KEYS_CACHE_SIZE:
                self._keys.clear()
            keys = self._keys[queue] = QueueKeys(queue, self.prefix)
            return keys

    def declare(self, queue: str, arguments: QueueArguments | None = None) -> None:
        """Remember ``queue`` in the registry of queues (used by look-ups and the CLI) and store
        its ``arguments`` (message TTL, expiry, max length; see :mod:`celery_msg.queueargs`).

        A declaration defines the queue, as in RabbitMQ: its arguments replace the stored ones
        (none given: none kept), and it counts as a use of a queue with ``expires``.
        """
        args = arguments or QueueArguments()
        keys = self.keys(queue)
        with translated_errors(f"declare queue {queue!r}"):
            # On a Cluster not one transaction: the registry is written last, so a queue is
            # listed only once its arguments are stored.
            pipe = self.client.pipeline(transaction=not self.cluster)
            pipe.hgetall(keys.args)
            pipe.delete(keys.args)
            stored = args.to_redis()
            if stored:
                pipe.hset(keys.args, mapping=stored)  # type: ignore[arg-type]
            if args.expires_ms is None:
                pipe.zrem(expiring_key(self.global_prefix), queue)
            else:
                pipe.zadd(
                    expiring_key(self.global_prefix), {queue: self.now_ms() + args.expires_ms}
                )
            pipe.sadd(queues_key(self.global_prefix), queue)
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
                pipe.zadd(expiring_key(self.global_prefix), {queue: now + expires_ms}, xx=True)
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
                    expiring_key(self.global_prefix),
                    "-inf",
                    f"({self.now_ms()}",
                    start=0,
                    num=limit,
                ),
            )
        names = [text(q) for q in due]
        return [q for q in names if self.expire_queue_if_unused(q)]

    def expire_queue_if_unused(self, queue: str) -> bool:
        """Delete ``queue`` if it is still unused past its expiry (a consumer may have touched
        it, or another process deleted it, since it was found)."""
        registry = expiring_key(self.global_prefix)
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
                if self.cluster:
                    # The queue's keys are in another slot: take it out of the registries in
                    # the transaction (a touch from now on is a no-op), then delete its keys.
                    self._unregister_in(pipe, queue)
                else:
                    self._delete_in(pipe, queue)
                pipe.execute()
            except redis.WatchError:
                return False  # touched (or deleted) meanwhile: look again next time
            if self.cluster:
                self.client.delete(*self.keys(queue).all)
        logger.info("queue %s expired: unused for longer than its expires; deleted", queue)
        return True

    def queues(self) -> list[str]:
        return self.queue_registry()[0]

    def queue_registry(self) -> tuple[list[str], int]:
        """The registered queue names, and how many registered names were skipped because
        they are not UTF-8 (written by something else: a bad migration, a buggy tool)."""
        with translated_errors("list queues"):
            raw = self.client.smembers(queues_key(self.global_prefix))
        names: list[str] = []
        for name in raw:
            try:
                names.append(text(name))
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
            return bool(self.client.sismember(queues_key(self.global_prefix), queue))

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
        return {text(k): int(v) for k, v in raw.items()}

    def count(self, queue: str, counter: Counter, n: int = 1) -> None:
        """Add ``n`` to one of ``queue``'s lifetime counters (see :meth:`stats`)."""
        with translated_errors(f"count {counter} in {queue!r}"):
            self.client.hincrby(self.keys(queue).stats, counter, n)

    def delete(self, queue: str) -> None:
        """Remove ``queue`` with everything in it, leased and dead messages included."""
        with translated_errors(f"delete {queue!r}"):
            pipe = self.client.pipeline(transaction=not self.cluster)
            self._delete_in(pipe, queue)
            pipe.execute()

    def _delete_in(self, pipe: Any, queue: str) -> None:
        keys = self.keys(queue)
        if self.cluster:
            for key in (*keys.all, *keys.side):  # a Cluster pipeline sends no multi-key DEL
                pipe.delete(key)
        else:
            pipe.delete(*keys.all, *keys.side)
        self._unregister_in(pipe, queue)

    def _unregister_in(self, pipe: Any, queue: str) -> None:
        pipe.srem(queues_key(self.global_prefix), queue)
        pipe.zrem(expiring_key(self.global_prefix), queue)

    # -- waiting: the wake-up markers a publish pushes, and a consumer's own wake key ---

    def wait_keys(self, queues: Sequence[str], *, consumer: str | None = None) -> list[str]:
        """What a consumer blocks on: its own wake key (``consumer``), then the wake-up marker
        of each of ``queues`` (a publish pushes it). On a Cluster they name sharded pub/sub
        channels (see :mod:`.shardwait`)."""
        keys = [] if consumer is None else [wake_key(self.prefix, consumer)]
        keys.extend(self.keys(q).signal for q in queues)
        return keys

    def wait(self, queues: Sequence[str], timeout: float, *, consumer: str | None = None) -> bool:
        """Block until something may be ready in ``queues``, ``consumer`` is woken
        (:meth:`wake`), or ``timeout`` seconds pass.

        Costs nothing while waiting: one BLPOP on the wake-up markers (on a Cluster, the
        sharded subscriptions, one connection per node). True when woken.
        """
        keys = self.wait_keys(queues, consumer=consumer)
        if not keys:
            time.sleep(timeout)
            return False
        with translated_errors(f"wait on {list(queues)!r}"):
            if self.cluster:
                waiter = self.shard_waiter()
                return waiter.watch(keys) or waiter.wait(timeout)
            return self.client.blpop(keys, timeout=timeout) is not None

    def shard_waiter(self) -> ShardWaiter:
        """On a Cluster: this broker's sharded subscriptions, made on first use."""
        if self._shard_waiter is None:
            self._shard_waiter = ShardWaiter(self.client)
        return self._shard_waiter

    def wake(self, consumer: str) -> None:
        """End ``consumer``'s :meth:`wait` (its wake key expires after a minute if unread)."""
        key = wake_key(self.prefix, consumer)
        with translated_errors(f"wake consumer {consumer!r}"):
            if self.cluster:
                self.client.spublish(key, 1)  # its waiter listens (sharded pub/sub)
                return
            pipe = self.client.pipeline(transaction=False)
            pipe.lpush(key, 1)
            pipe.expire(key, 60)
            pipe.execute()
