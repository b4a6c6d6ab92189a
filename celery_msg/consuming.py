"""Consuming: the Broker's calls of the scripts a consumer runs on its leases: reserve (the
fetch *is* the lease), ack, requeue and extend, and a round of acks and reserves in one trip.

Why its own module: this is every consumer's hot path, with concerns of its own: a request over
queues on several Cluster slots cut into one per slot (:mod:`~celery_msg.slots`), one broken
queue kept from starving the others, replicas that confirm a consumer's change too late logged
and gone on from. :class:`Consuming` is a part of :class:`~celery_msg.core.Broker`, the one
place that calls scripts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, NamedTuple

import redis

from .errors import ReplicationTimeout
from .leases import Delivery, Lease, ReserveRequest, Round
from .redisio import REDIS_CONNECTION_ERRORS, ScriptCall, translated_errors
from .scriptcalls import BROKEN_REPORT_INTERVAL, ScriptCalls
from .scripts import MISSING_BODY_GROUP, Code
from .slots import plan
from .transitions import Ack, Extend, Requeue, Reserve, ReserveReply, Transition

logger = logging.getLogger(__name__)


class Consuming(ScriptCalls):
    """Leasing and settling messages (a part of :class:`~celery_msg.core.Broker`, which sets
    the attributes below)."""

    _broken_reported: dict[str, float]

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
        if count > 0:
            self._answered([request])
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
        prepared = self.prepare_round(acks, requests)
        if not prepared.calls:
            return Round([[] for _ in requests], [], None)
        with translated_errors("ack and reserve"):
            try:
                results = self.script_replies(prepared.calls)
            except ReplicationTimeout as exc:
                results = self._unconfirmed(exc)
            except REDIS_CONNECTION_ERRORS:
                self._ack_where_reachable(prepared.calls[: len(prepared.acks)])
                raise
        return self.finish_round(prepared, results)

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

    def prepare_round(
        self, acks: Sequence[Lease], requests: Sequence[ReserveRequest]
    ) -> PreparedRound:
        """The script calls of a round (its acks, then the reserves), not sent yet: a worker's
        event loop sends them ahead and reads the replies later (:mod:`celery_msg.readahead`)."""
        by_queue = group_by_queue(acks)
        wanted = [r for r in requests if r.count > 0 and r.queues]
        plans = {id(r): plan(r, self.cluster) for r in wanted}
        ack, reserve = self.scripts.ack, self.scripts.reserve
        calls: list[ScriptCall] = [
            (ack.script, self.keys(queue).all, ack.args(_held(group)))
            for queue, group in by_queue.items()
        ]
        subs = [sub for r in wanted for sub in plans[id(r)][0]]
        calls.extend((reserve.script, self._reserve_keys(r), self._reserve_args(r)) for r in subs)
        self._answered(wanted)
        return PreparedRound(list(requests), by_queue, plans, calls)

    def _answered(self, requests: Sequence[ReserveRequest]) -> None:
        """On a Cluster: the wake-ups read so far for the queues of ``requests`` (and their
        consumers' wake channels) are answered by the reserves about to be sent (see
        :mod:`.shardwait`: a wake-up read by a round that could not reserve from its queue
        makes the next wait look again). Marked before sending: one read while the reserve is
        under way may announce a message it did not see."""
        if self._shard_waiter is not None:
            for request in requests:
                self._shard_waiter.answered(
                    self.wait_keys(request.queues, consumer=request.consumer)
                )

    def finish_round(self, prepared: PreparedRound, results: Sequence[Any]) -> Round:
        """A round's outcome from the replies of :meth:`prepare_round`'s calls (error replies
        included: a broken queue is reported and served around, the others go on)."""
        by_queue, plans, ack = prepared.acks, prepared.plans, self.scripts.ack
        broken: dict[str, str] = {}
        acked = list(results[: len(by_queue)])
        for i, (queue, group) in enumerate(by_queue.items()):
            if isinstance(acked[i], redis.ResponseError):
                broken[queue] = str(acked[i])
                acked[i] = [Code.LEASE_LOST] * len(group)  # not settled: they come back
        lost = _lost(by_queue.values(), [ack.reply(codes) for codes in acked])
        served = iter(results[len(by_queue) :])
        out: list[list[Delivery]] = []
        soonest: int | None = None
        for request in prepared.requests:
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

    def _reserve_keys(self, request: ReserveRequest) -> tuple[str, ...]:
        """A tuple: its packed ``EVALSHA`` head is cached (:func:`redisio.pack_head`)."""
        if len(request.queues) == 1:
            return self.keys(request.queues[0]).all
        return tuple(key for queue in request.queues for key in self.keys(queue).all)

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
        """Renew leases for another ``lease_ms``; returns the ones not renewed (lost, or gone:
        either way this consumer must not run them)."""
        return self.renew(leases).not_renewed

    def renew(self, leases: Iterable[Lease]) -> Renewal:
        """:meth:`extend`, telling a lost lease from a message gone from its queue (acked
        already, by the pool child that ran it: :mod:`celery_msg.childack`; or purged)."""
        args = partial(Extend.args, now_ms=self.now_ms(), lease_ms=self.lease_ms)
        codes = self._codes(leases, self.scripts.extend, "extend", args)
        return Renewal(
            lost=[lease for lease, code in codes if code == Code.LEASE_LOST],
            gone=[lease for lease, code in codes if code == Code.GONE],
        )

    def _settle(
        self,
        leases: Iterable[Lease],
        run: Transition[list[Code]],
        what: str,
        args: Callable[..., list[Any]],
    ) -> list[Lease]:
        """:meth:`_codes`, returning the leases refused as lost."""
        codes = self._codes(leases, run, what, args)
        return [lease for lease, code in codes if code == Code.LEASE_LOST]

    def _codes(
        self,
        leases: Iterable[Lease],
        run: Transition[list[Code]],
        what: str,
        args: Callable[..., list[Any]],
    ) -> list[tuple[Lease, Code]]:
        """Run a per-message script over leases, one call per queue, pipelined if several;
        ``args(held=...)`` builds its ARGV. Each lease with its code."""
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
        return [
            (lease, Code(code))
            for group, codes in zip(by_queue.values(), results, strict=True)
            for lease, code in zip(group, codes, strict=True)
        ]


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a renewal (extend.lua) did not renew: ``lost`` (LEASE_LOST: another consumer may
    hold it; logged and counted) and ``gone`` (GONE: no longer stored, acked already or
    purged; nobody holds it, so nothing to report)."""

    lost: list[Lease]
    gone: list[Lease]

    @property
    def not_renewed(self) -> list[Lease]:
        return [*self.lost, *self.gone]


class PreparedRound(NamedTuple):
    """A round's script calls, and what reading their replies needs (see
    :meth:`Consuming.prepare_round`)."""

    requests: list[ReserveRequest]
    #: The acks, per queue (one call each, first in ``calls``).
    acks: dict[str, list[Lease]]
    #: Each wanted request's plan (by ``id``): the calls sent at once, the follow-ups (Cluster).
    plans: dict[int, tuple[list[ReserveRequest], list[ReserveRequest]]]
    calls: list[ScriptCall]


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


def lost_of(group: Iterable[Lease], codes: Iterable[Code | int]) -> list[Lease]:
    """The leases of one settle or renew call that the server refused as lost (LEASE_LOST).
    GONE is no loss: the message was acked already (by the pool child that ran it, see
    :mod:`celery_msg.childack`) or purged, and nobody else holds it."""
    return [lease for lease, code in zip(group, codes, strict=True) if code == Code.LEASE_LOST]


def _lost(groups: Iterable[list[Lease]], results: Sequence[list[Code]]) -> list[Lease]:
    lost: list[Lease] = []
    for group, codes in zip(groups, results, strict=True):
        lost.extend(lost_of(group, codes))
    return lost


def _held(leases: Iterable[Lease]) -> list[tuple[str, int]]:
    return [(lease.key, lease.token) for lease in leases]


def lease_pairs(leases: Iterable[Lease]) -> list[Any]:
    """ack.lua's ARGV for ``leases`` of one queue: key, token, key, token, ..."""
    return Ack.args(_held(leases))
