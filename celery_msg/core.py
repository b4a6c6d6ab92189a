"""The broker core: messages, leases and queues on Redis, with no knowledge of kombu or Celery.

Every state change is one script call (see :mod:`celery_msg.scripts`), and :class:`Broker` is
the one place that makes them: it turns Python calls into script calls and groups them per queue
(one queue = one hash slot). It is composed of parts, one job each, all reached through it: its
publish calls (:mod:`~celery_msg.publishing`), its consumer calls (reserve, ack, requeue,
extend: :mod:`~celery_msg.consuming`), both on what they share (:mod:`~celery_msg.scriptcalls`),
and here its dead-letter and maintenance calls. Next door, none of which runs a script: sending
and error translation (:mod:`~celery_msg.redisio`), the queue registry and counts
(:mod:`~celery_msg.queues`), look-ups (:mod:`~celery_msg.lookup`) and exchange bindings
(:mod:`~celery_msg.bindings`).

A message is stored once per queue under a *key*: its ID, or ``ID/<n>`` when that ID is already
stored in the queue (a Celery retry republishes the same task id while the first delivery is
still leased). Its life: [SCHEDULED (waiting for its due time) ->] READY -> RESERVED (leased,
with a fencing token) -> ACKED (gone) | READY again (requeued, or its lease expired) | DEAD
(dead-letter store, with a reason).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis

from .bindings import Binding, Bindings, Route, Table
from .consuming import Consuming, PreparedRound, group_by_queue, lease_pairs
from .counters import reason_word
from .keys import QueueKeys, failure_record, record_json
from .leases import Delivery, Lease, ReserveRequest, Round
from .lookup import (
    UNREADABLE_RECORD,
    Lookups,
    MessageInfo,
    ScheduledMessage,
    Search,
    State,
    dead_record,
)
from .publishing import Outgoing, Publishing
from .redisio import (
    REDIS_CONNECTION_ERRORS,
    DedicatedConnection,
    Replication,
    ScriptCall,
    pack_evalsha,
    pack_head,
    translated_errors,
)
from .scripts import Code
from .shardwait import ShardWaiter
from .slots import global_prefix, is_cluster
from .transitions import Bury, DeadLetter, Promote, Purge, Reclaim, Scripts, Transition

#: Names other modules import from here, where they lived before the split (kept importable).
__all__ = [
    "REDIS_CONNECTION_ERRORS",
    "UNREADABLE_RECORD",
    "Binding",
    "Broker",
    "Delivery",
    "Lease",
    "MessageInfo",
    "Outgoing",
    "PreparedRound",
    "ReserveRequest",
    "Round",
    "Route",
    "ScheduledMessage",
    "ScriptCall",
    "Search",
    "State",
    "Table",
    "dead_record",
    "failure_record",
    "group_by_queue",
    "lease_pairs",
    "pack_evalsha",
    "pack_head",
    "translated_errors",
]


class Broker(Publishing, Consuming, Lookups, Bindings):
    """Queues of leased, ID-tracked messages on one Redis (or one Cluster slot per queue).

    ``clock`` returns seconds (``time.time`` by default) and is the only source of time: scripts
    get ``now`` as an argument, never from the server, so tests can pin it.

    Every script call is made by it: publishing (:class:`~celery_msg.publishing.Publishing`),
    consuming (:class:`~celery_msg.consuming.Consuming`), and the dead-letter and maintenance
    calls below. The plain reads and writes it also offers live in the modules it is built from:
    the queue registry and counts (:class:`~celery_msg.queues.Queues`), look-ups
    (:class:`~celery_msg.lookup.Lookups`) and bindings (:class:`~celery_msg.bindings.Bindings`).
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
        replication: Replication | None = None,
    ) -> None:
        self.client = client
        #: A Redis Cluster: work over several queues is split per slot (:mod:`.slots`).
        self.cluster = is_cluster(client)
        #: ``min_replicas``: every script call waits for replicas to confirm it.
        self.replication = replication
        self.prefix = prefix
        self.global_prefix = global_prefix(prefix, self.cluster)
        self.lease_ms = lease_ms
        self.reclaim_batch = reclaim_batch
        self.max_deliveries = max_deliveries
        self.clock = clock
        self.scripts = Scripts(client, replication)
        self._keys: dict[str, QueueKeys] = {}
        self._publish_heads: dict[str | tuple[str, str], bytes] = {}
        self._publisher = DedicatedConnection(client, replication)
        self._broken_reported: dict[str, float] = {}
        self._unconfirmed_reported = 0.0
        #: How many of a consumer's state changes replicas did not confirm (``min_replicas``):
        #: logged once a minute, counted here (a test tells a confirmed ack by it).
        self.unconfirmed = 0
        self._shard_waiter: ShardWaiter | None = None

    def close(self) -> None:
        """Give back the connection kept for publishing (the pool stays the caller's)."""
        self._publisher.close()
        if self._shard_waiter is not None:
            self._shard_waiter.close()
            self._shard_waiter = None

    # -- maintenance: purge, promote, reclaim (consumers promote and reclaim as they reserve) --

    def purge(self, queue: str, batch: int = 1000) -> int:
        """Remove every READY and SCHEDULED message of ``queue`` (in bounded steps); returns
        how many."""
        keys = self.keys(queue).all
        total = 0
        with translated_errors(f"purge {queue!r}"):
            while True:
                removed = self.scripts.purge.run(keys, Purge.args(limit=batch))
                total += removed
                if removed < batch:
                    return total

    def promote(self, queue: str, limit: int | None = None) -> int:
        """Move due scheduled messages of ``queue`` to its back; returns how many. Consumers
        do this with every fetch; this is for operators and tests."""
        batch = self.reclaim_batch if limit is None else limit
        with translated_errors(f"promote in {queue!r}"):
            args = Promote.args(now_ms=self.now_ms(), limit=batch)
            return self.scripts.promote.run(self.keys(queue).all, args)

    def reclaim(self, queue: str, limit: int | None = None) -> int:
        """Return expired leases of ``queue`` to the front of their band; returns how many."""
        batch = self.reclaim_batch if limit is None else limit
        with translated_errors(f"reclaim in {queue!r}"):
            args = Reclaim.args(now_ms=self.now_ms(), limit=batch)
            return self.scripts.reclaim.run(self.keys(queue).all, args)

    # -- dead letters: in, back out, gone, trimmed -----------------------------------------

    def dead_letter(self, lease: Lease, reason: str, detail: str = "", **extra: Any) -> bool:
        """Move a leased message to its queue's dead-letter store; False if the lease was lost.

        ``reason`` is a short word (``undecodable``, ``rejected``, ``poison``, ...), ``detail``
        a human sentence; ``extra`` adds JSON-serialisable fields.
        """
        now = self.now_ms()
        record = record_json(reason, detail, now, extra)
        with translated_errors(f"dead-letter {lease.key!r} in {lease.queue!r}"):
            args = DeadLetter.args(
                now_ms=now,
                key=lease.key,
                token=lease.token,
                record=record,
                word=reason_word(reason),
            )
            code = self.scripts.dead_letter.run(self.keys(lease.queue).all, args)
        return code == Code.OK

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
        record = record_json(reason, detail, now, extra)
        with translated_errors(f"dead-letter a copy of {message_id!r} in {queue!r}"):
            args = Bury.args(
                now_ms=now,
                message_id=message_id,
                payload=payload,
                band=band,
                deliveries=deliveries,
                record=record,
                word=reason_word(reason),
            )
            return self.scripts.bury.run(self.keys(queue).all, args)

    def replay_dead(self, queue: str, keys: Sequence[str]) -> int:
        """Dead messages of ``queue`` back to the end of their band; how many were still dead."""
        return self._dead_store(self.scripts.replay, "replay", queue, keys)

    def discard_dead(self, queue: str, keys: Sequence[str]) -> int:
        """Delete dead messages of ``queue`` for good; how many were still dead."""
        return self._dead_store(self.scripts.discard, "discard", queue, keys)

    def _dead_store(
        self, run: Transition[list[Code]], what: str, queue: str, keys: Sequence[str]
    ) -> int:
        if not keys:
            return 0
        with translated_errors(f"{what} {len(keys)} dead letters of {queue!r}"):
            codes = run.run(self.keys(queue).all, list(keys))
        return codes.count(Code.OK)

    def trim_dead(self, retention: Mapping[str, tuple[int, int]], limit: int = 1000) -> int:
        """Enforce dead-letter retention, ``{queue: (max entries, max age ms)}`` (0: no bound),
        in one round trip; returns how many dead messages were dropped."""
        if not retention:
            return 0
        now, trim = self.now_ms(), self.scripts.trim_dead
        calls: list[ScriptCall] = [
            (
                trim.script,
                self.keys(queue).all,
                trim.args(now_ms=now, max_entries=max_len, max_age_ms=max_age_ms, limit=limit),
            )
            for queue, (max_len, max_age_ms) in retention.items()
        ]
        with translated_errors("trim dead-letter stores"):
            return sum(trim.reply(n) for n in self.run_scripts(calls))
