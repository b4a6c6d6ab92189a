"""The broker core: messages, leases and queues on Redis, with no knowledge of kombu or Celery.

Every state change is one script call (see :mod:`celery_msg.scripts`), and :class:`Broker` is
the one place that makes them: it turns Python calls into script calls and groups them per queue
(one queue = one hash slot). Its other jobs live next door, each in a module of its own, and are
reached through it: sending and error translation (:mod:`~celery_msg.redisio`), the queue
registry and counts (:mod:`~celery_msg.queues`), look-ups (:mod:`~celery_msg.lookup`) and
exchange bindings (:mod:`~celery_msg.bindings`), none of which runs a script.

A message is stored once per queue under a *key*: its ID, or ``ID/<n>`` when that ID is already
stored in the queue (a Celery retry republishes the same task id while the first delivery is
still leased). Its life: [SCHEDULED (waiting for its due time) ->] READY -> RESERVED (leased,
with a fencing token) -> ACKED (gone) | READY again (requeued, or its lease expired) | DEAD
(dead-letter store, with a reason).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Literal, NamedTuple

import redis

from .bindings import Binding, Bindings, Route, Table
from .counters import reason_word
from .errors import PartialFanout, ReplicationTimeout, StaleRoute
from .keys import QueueKeys, bindings_version_key, failure_record, record_json
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
from .queues import KEYS_CACHE_SIZE
from .redisio import (
    BUSY,
    REDIS_CONNECTION_ERRORS,
    DedicatedConnection,
    Replication,
    ScriptCall,
    bulk,
    pack_evalsha,
    pack_head,
    run_scripts,
    script_replies,
    translated,
    translated_errors,
)
from .scripts import MISSING_BODY_GROUP, Code
from .shardwait import ShardWaiter
from .slots import global_prefix, is_cluster, plan
from .transitions import (
    UNROUTED,
    Ack,
    Bury,
    DeadLetter,
    Extend,
    Promote,
    Publish,
    Published,
    Purge,
    Reclaim,
    Requeue,
    Reserve,
    ReserveReply,
    Scripts,
    Transition,
    Unlock,
)

logger = logging.getLogger(__name__)

#: Names other modules import from here, where they lived before the split (kept importable).
__all__ = [
    "REDIS_CONNECTION_ERRORS",
    "UNREADABLE_RECORD",
    "Binding",
    "Broker",
    "Delivery",
    "Lease",
    "MessageInfo",
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

#: Seconds between two log lines about the same broken queue.
BROKEN_REPORT_INTERVAL = 60.0


class Outgoing(NamedTuple):
    """One message on its way into one queue: the arguments of :meth:`Broker.publish`."""

    queue: str
    message_id: str
    payload: bytes | str
    band: int
    due_ms: int
    unique: bool
    lock_until_ms: int
    #: A Celery retry (its ``retries`` header is above 0): counted as ``retried`` too.
    retry: bool = False


class Broker(Lookups, Bindings):
    """Queues of leased, ID-tracked messages on one Redis (or one Cluster slot per queue).

    ``clock`` returns seconds (``time.time`` by default) and is the only source of time: scripts
    get ``now`` as an argument, never from the server, so tests can pin it.

    Every script call is made here. The plain reads and writes it also offers live in the
    modules it is built from: the queue registry and counts (:class:`~celery_msg.queues.Queues`),
    look-ups (:class:`~celery_msg.lookup.Lookups`) and bindings
    (:class:`~celery_msg.bindings.Bindings`).
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

    # -- scripts: every state change is one call of a script ----------------------------

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

    def run_scripts(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Script calls in one pipelined round trip (see :func:`redisio.run_scripts`)."""
        return run_scripts(self.client, calls, self.replication)

    def script_replies(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """:meth:`run_scripts`, error replies left in the list (one broken queue must not keep
        the others' replies from being read)."""
        return script_replies(self.client, calls, self.replication)

    def _unconfirmed(self, exc: ReplicationTimeout) -> list[Any]:
        """A consumer's state change that replicas did not confirm in time: log it and go on
        with its replies (what is at stake is a redelivery, not a loss)."""
        self.unconfirmed += 1
        now = time.monotonic()
        if now >= self._unconfirmed_reported:
            self._unconfirmed_reported = now + BROKEN_REPORT_INTERVAL
            logger.warning("%s (a consumer goes on; reported once a minute)", exc)
        return exc.results

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
        args = self._publish_args(
            message_id,
            payload,
            band,
            due_ms,
            unique=unique,
            route=route,
            lock_until_ms=lock_until_ms,
            retry=retry,
        )
        publish = self.scripts.publish
        if self.cluster:
            return self._publish_on_cluster(queue, args, route).key
        try:
            raw = self._publisher.execute(
                publish.script, head + b"".join(bulk(arg) for arg in args)
            )
            if raw is BUSY:
                raw = publish.script(keys=self._publish_keys(queue, route), args=args)
        except Exception as exc:
            ours = translated(exc, f"publish to {queue!r}")
            if ours is None:
                raise
            raise ours from exc
        reply = publish.reply(raw)
        if route is not None and reply.code == Code.STALE_ROUTE:
            raise StaleRoute(route.exchange, [queue])
        return reply.key

    def _route_is_current(self, route: Route) -> bool:
        """On a Cluster: whether ``route``'s bindings version is still the exchange's.

        The version key is global, in another slot than the queue, so publish.lua cannot read
        it; it is read just before the publish instead. A change of the bindings between that
        read and the publish is not caught: the publish then counts as made before the change.
        """
        with translated_errors(f"read bindings version of {route.exchange!r}"):
            raw = self.client.get(bindings_version_key(self.global_prefix, route.exchange))
        try:
            return int(raw or 0) == route.version
        except ValueError:
            return False

    def _publish_on_cluster(
        self, queue: str, args: Sequence[Any], route: Route | None
    ) -> Published:
        """A publish on a Cluster: the route checked first, then publish.lua without the
        version key (see :meth:`_route_is_current`)."""
        if route is not None and not self._route_is_current(route):
            raise StaleRoute(route.exchange, [queue])
        with translated_errors(f"publish to {queue!r}"):
            return self.scripts.publish.run(self.keys(queue).publish, args)

    def pack_publish(self, out: Outgoing, route: Route | None, *, unique: bool) -> bytes:
        """The ``EVALSHA`` of :meth:`publish` for ``out``, packed for a pipeline of many
        (:mod:`celery_msg.bulk_publish`). ``unique`` overrides ``out.unique`` (a resend is
        unique, so a message whose reply was lost is not stored twice)."""
        head_key = out.queue if route is None else (out.queue, route.exchange)
        try:
            head = self._publish_heads[head_key]
        except KeyError:
            head = self._publish_head(head_key, out.queue, route)
        args = self._publish_args(
            out.message_id,
            out.payload,
            out.band,
            out.due_ms,
            unique=unique,
            route=route,
            lock_until_ms=out.lock_until_ms,
            retry=out.retry,
        )
        return head + b"".join(bulk(arg) for arg in args)

    def publish_once(
        self, queue: str, message_id: str, payload: bytes | str, band: int, *, due_ms: int = 0
    ) -> bool:
        """A unique publish (see :meth:`publish`) that says whether it stored the message
        (False: ``message_id`` was still pending in ``queue``). For tools, not the hot path."""
        args = self._publish_args(message_id, payload, band, due_ms, unique=True)
        with translated_errors(f"publish to {queue!r}"):
            return self.scripts.publish.run(self._publish_keys(queue, None), args).stored

    def unlock(self, queue: str, message_ids: Sequence[str]) -> int:
        """Let unique publishes of ``message_ids`` into ``queue`` through again (their task
        started or succeeded); returns how many were locked."""
        if not message_ids:
            return 0
        with translated_errors(f"unlock {len(message_ids)} ids in {queue!r}"):
            return self.scripts.unlock.run(self.keys(queue).all, Unlock.args(message_ids))

    def _publish_args(
        self,
        message_id: str,
        payload: bytes | str,
        band: int,
        due_ms: int,
        *,
        unique: bool = False,
        route: Route | None = None,
        lock_until_ms: int = 0,
        retry: bool = False,
    ) -> tuple[Any, ...]:
        """publish.lua's ARGV: a due time already past is now; a lock only for a unique one;
        ``retry``: a Celery retry (counted as ``retried`` too)."""
        now = self.now_ms()
        return Publish.args(
            message_id=message_id,
            payload=payload,
            band=band,
            due_ms=due_ms if due_ms > now else 0,
            unique=unique,
            route_version=UNROUTED if route is None else route.version,
            now_ms=now,
            lock_until_ms=lock_until_ms if unique else 0,
            retry=retry,
        )

    def _publish_keys(self, queue: str, route: Route | None) -> tuple[str, ...]:
        keys = self.keys(queue).publish
        if route is None:
            return keys
        return (*keys, bindings_version_key(self.global_prefix, route.exchange))

    def _publish_head(
        self, head_key: str | tuple[str, str], queue: str, route: Route | None
    ) -> bytes:
        if len(self._publish_heads) >= KEYS_CACHE_SIZE:
            self._publish_heads.clear()
        head = self._publish_heads[head_key] = pack_head(
            self.scripts.publish.script, self._publish_keys(queue, route), Publish.ARGC
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
        retry: bool = False,
    ) -> list[str]:
        """Publish one message into several queues (a broadcast) in one round trip.

        With ``route``, a queue whose publish found the bindings changed stores nothing; they
        are raised together as :class:`StaleRoute` (the others were stored)."""
        if not queues:
            return []
        args = self._publish_args(message_id, payload, band, due_ms, route=route, retry=retry)
        publish = self.scripts.publish
        if self.cluster:
            return self._publish_many_on_cluster(list(queues), args, route)
        with translated_errors(f"publish to {len(queues)} queues"):
            raw = self.run_scripts(
                [(publish.script, self._publish_keys(q, route), args) for q in queues]
            )
        replies = [publish.reply(r) for r in raw]
        if route is not None:
            refused = [
                q for q, r in zip(queues, replies, strict=True) if r.code == Code.STALE_ROUTE
            ]
            if refused:
                raise StaleRoute(route.exchange, refused)
        return [r.key for r in replies]

    def _publish_many_on_cluster(
        self, queues: list[str], args: Sequence[Any], route: Route | None
    ) -> list[str]:
        """A fan-out on a Cluster: one publish per queue (each its own slot), in order.

        Not atomic across shards: if one fails, the queues before it have the message and the
        error says so (:class:`PartialFanout`), instead of a half-done fan-out passing as a
        failed one (or as a success)."""
        if route is not None and not self._route_is_current(route):
            raise StaleRoute(route.exchange, queues)
        keys: list[str] = []
        for i, queue in enumerate(queues):
            try:
                keys.append(self._publish_on_cluster(queue, args, None).key)
            except Exception as exc:
                if not keys:
                    raise
                raise PartialFanout(queues[:i], queues[i:], exc) from exc
        return keys

    def promote(self, queue: str, limit: int | None = None) -> int:
        """Move due scheduled messages of ``queue`` to its back; returns how many. Consumers
        do this with every fetch; this is for operators and tests."""
        batch = self.reclaim_batch if limit is None else limit
        with translated_errors(f"promote in {queue!r}"):
            args = Promote.args(now_ms=self.now_ms(), limit=batch)
            return self.scripts.promote.run(self.keys(queue).all, args)

    def reserve(
        self,
        queues: Sequence[str],
        count: int,
        consumer: str,
        *,
        order: Literal["fair", "strict"] = "fair",
        start: int = 0,
    ) -> list[Delivery]:
        """Lease up to ``count`` messages from ``queues`` in one script call (on a Cluster, one
        per slot: see :mod:`celery_msg.slots`).

        Expired leases of those queues are reclaimed and due scheduled messages promoted
        first. With ``order="strict"`` earlier
        queues are drained first; with ``"fair"`` one message is taken from each queue in turn,
        beginning with ``queues[start]``.
        """
        request = ReserveRequest(list(queues), count, consumer, order, start)
        first, followers = plan(request, self.cluster)
        out: list[Delivery] = []
        for sub in first:
            out.extend(self._reserve_one(sub))
        for sub in followers:
            want = request.count - len(out)
            if want <= 0:
                break
            out.extend(self._reserve_one(replace(sub, count=want)))
        return out

    def _reserve_one(self, request: ReserveRequest) -> list[Delivery]:
        with translated_errors(f"reserve from {request.queues!r}"):
            reply = self.scripts.reserve.run(
                self._reserve_keys(request), self._reserve_args(request)
            )
        return _deliveries(request, reply)

    def settle_and_reserve(
        self, acks: Sequence[Lease], requests: Sequence[ReserveRequest]
    ) -> Round:
        """Ack ``acks`` and serve every request in a single round trip (a consumer's hot path;
        on a Cluster, requests over queues on several slots may take more, see
        :mod:`celery_msg.slots`)."""
        by_queue = group_by_queue(acks)
        wanted = [r for r in requests if r.count > 0 and r.queues]
        if not by_queue and not wanted:
            return Round([[] for _ in requests], [], None)
        plans = {id(r): plan(r, self.cluster) for r in wanted}
        ack, reserve = self.scripts.ack, self.scripts.reserve
        calls: list[ScriptCall] = [
            (ack.script, self.keys(queue).all, ack.args(_held(group)))
            for queue, group in by_queue.items()
        ]
        subs = [sub for r in wanted for sub in plans[id(r)][0]]
        calls.extend((reserve.script, self._reserve_keys(r), self._reserve_args(r)) for r in subs)
        with translated_errors("ack and reserve"):
            try:
                results = self.script_replies(calls)
            except ReplicationTimeout as exc:
                results = self._unconfirmed(exc)
            except REDIS_CONNECTION_ERRORS:
                self._ack_where_reachable(calls[: len(by_queue)])
                raise
        broken: dict[str, str] = {}
        acked = results[: len(by_queue)]
        for i, (queue, group) in enumerate(by_queue.items()):
            if isinstance(acked[i], redis.ResponseError):
                broken[queue] = str(acked[i])
                acked[i] = [Code.LEASE_LOST] * len(group)  # not settled: they come back
        lost = _lost(by_queue.values(), [ack.reply(codes) for codes in acked])
        served = iter(results[len(by_queue) :])
        out: list[list[Delivery]] = []
        soonest: int | None = None
        for request in requests:
            if not (request.count > 0 and request.queues):
                out.append([])
                continue
            first, followers = plans[id(request)]
            deliveries: list[Delivery] = []
            dues: list[int] = []
            for sub in first:
                got, due = self._served(sub, next(served), broken)
                deliveries.extend(got)
                dues.append(due)
            for sub in followers:
                want = request.count - len(deliveries)
                if want <= 0:
                    break
                got, due = self._reserve_remainder(replace(sub, count=want), broken)
                deliveries.extend(got)
                dues.append(due)
            out.append(deliveries)
            for due in dues:
                if due and (soonest is None or due < soonest):
                    soonest = due
        for queue, error in broken.items():
            self._report_broken(queue, error)
        return Round(out, lost, soonest)

    def _ack_where_reachable(self, calls: Sequence[ScriptCall]) -> None:
        """A round failed for a node it needed (on a Cluster: a master down, or one the slot
        map still names after a failover). redis-py's Cluster pipeline connects to every node
        before it sends anything, so the round's acks for the other shards were not written;
        the caller has taken them out of its buffers. They are written here one by one where
        their node answers: else their messages, already run, would come back when the leases
        expire and run again. An ack written twice is refused by its token, not run twice."""
        if not self.cluster:
            return  # one server: the connection that failed is the only one
        for call in calls:
            try:
                self.script_replies([call])
            except ReplicationTimeout as exc:
                self._unconfirmed(exc)
            except REDIS_CONNECTION_ERRORS:
                continue  # that queue's node is the one down: its messages come back

    def _served(
        self, request: ReserveRequest, raw: Any, broken: dict[str, str]
    ) -> tuple[list[Delivery], int]:
        """One reserve reply of a round: its deliveries and the next due time."""
        if isinstance(raw, redis.ResponseError):
            return self._reserve_around_broken(request, raw, broken)
        reply = self.scripts.reserve.reply(raw)
        return _deliveries(request, reply), reply.next_due_ms

    def _reserve_remainder(
        self, request: ReserveRequest, broken: dict[str, str]
    ) -> tuple[list[Delivery], int]:
        """A Cluster's follow-up reserve on one slot (what the first calls left unfilled)."""
        reserve = self.scripts.reserve
        call = (reserve.script, self._reserve_keys(request), self._reserve_args(request))
        with translated_errors(f"reserve from {request.queues!r}"):
            try:
                [raw] = self.script_replies([call])
            except ReplicationTimeout as exc:
                [raw] = self._unconfirmed(exc)
        return self._served(request, raw, broken)

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
            reserve = self.scripts.reserve
            call = (reserve.script, self._reserve_keys(alone), self._reserve_args(alone))
            with translated_errors(f"reserve from {queue!r}"):
                [raw] = self.script_replies([call])
            if isinstance(raw, redis.ResponseError):
                broken[queue] = str(raw)
                continue
            reply = reserve.reply(raw)
            deliveries.extend(_deliveries(alone, reply))
            due = reply.next_due_ms
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
        return Reserve.args(
            now_ms=self.now_ms(),
            lease_ms=self.lease_ms,
            count=request.count,
            consumer=request.consumer,
            order=request.order,
            start=request.start,
            reclaim_batch=self.reclaim_batch,
            max_deliveries=self.max_deliveries,
        )

    def ack(self, leases: Iterable[Lease]) -> list[Lease]:
        """Settle deliveries as done; returns the leases that were lost (nothing changed)."""
        return self._settle(leases, self.scripts.ack, "ack", Ack.args)

    def requeue(self, leases: Iterable[Lease], *, uncount: bool = False) -> list[Lease]:
        """Put deliveries back at the front of their band; returns the lost leases.

        ``uncount`` takes the delivery back from the delivery count: for messages that were
        prefetched but never started, so that they do not look like poison.
        """
        return self._settle(
            leases, self.scripts.requeue, "requeue", partial(Requeue.args, uncount=uncount)
        )

    def extend(self, leases: Iterable[Lease]) -> list[Lease]:
        """Renew leases for another ``lease_ms``; returns the ones that were lost."""
        args = partial(Extend.args, now_ms=self.now_ms(), lease_ms=self.lease_ms)
        return self._settle(leases, self.scripts.extend, "extend", args)

    def _settle(
        self,
        leases: Iterable[Lease],
        run: Transition[list[Code]],
        what: str,
        args: Callable[..., list[Any]],
    ) -> list[Lease]:
        """Run a per-message script over leases, one call per queue, pipelined if several;
        ``args(held=...)`` builds its ARGV."""
        by_queue = group_by_queue(leases)
        if not by_queue:
            return []
        calls: list[ScriptCall] = [
            (run.script, self.keys(q).all, args(held=_held(group))) for q, group in by_queue.items()
        ]
        with translated_errors(f"{what} {sum(map(len, by_queue.values()))} messages"):
            if len(calls) == 1 and self.replication is None:
                ((_, keys, argv),) = calls
                results = [run.run(keys, argv)]
            else:
                try:
                    raw = self.run_scripts(calls)
                except ReplicationTimeout as exc:
                    raw = self._unconfirmed(exc)
                results = [run.reply(r) for r in raw]
        return _lost(by_queue.values(), results)

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

    def reclaim(self, queue: str, limit: int | None = None) -> int:
        """Return expired leases of ``queue`` to the front of their band; returns how many."""
        batch = self.reclaim_batch if limit is None else limit
        with translated_errors(f"reclaim in {queue!r}"):
            args = Reclaim.args(now_ms=self.now_ms(), limit=batch)
            return self.scripts.reclaim.run(self.keys(queue).all, args)


def _deliveries(request: ReserveRequest, reply: ReserveReply) -> list[Delivery]:
    queues = request.queues
    out: list[Delivery] = []
    for m in reply.messages:
        if m.group == MISSING_BODY_GROUP:
            logger.error(
                "message %s was ready in one of %s but its body is gone; recorded as dead "
                "('missing-body')",
                m.key,
                queues,
            )
            continue
        out.append(Delivery(queues[m.group], m.key, m.token, m.deliveries, m.payload))
    return out


def group_by_queue(leases: Iterable[Lease]) -> dict[str, list[Lease]]:
    """Leases per queue: one script call settles one queue's (its keys share a slot)."""
    by_queue: dict[str, list[Lease]] = {}
    for lease in leases:
        by_queue.setdefault(lease.queue, []).append(lease)
    return by_queue


def _lost(groups: Iterable[list[Lease]], results: Sequence[list[Code]]) -> list[Lease]:
    lost: list[Lease] = []
    for group, codes in zip(groups, results, strict=True):
        lost.extend(lease for lease, code in zip(group, codes, strict=True) if code != Code.OK)
    return lost


def _held(leases: Iterable[Lease]) -> list[tuple[str, int]]:
    return [(lease.key, lease.token) for lease in leases]


def lease_pairs(leases: Iterable[Lease]) -> list[Any]:
    """ack.lua's ARGV for ``leases`` of one queue: key, token, key, token, ..."""
    return Ack.args(_held(leases))
