"""The key schema. Every key lives under one prefix; every key of a queue shares its hash tag.

For a queue ``q`` and the default prefix, the keys are ``celery-msg:{q}:<part>``, so one queue
always maps to one Redis Cluster slot and every script touches a single slot. The parts, in the
order in which scripts receive them in ``KEYS`` (see ``QUEUE_KEY_PARTS``):

=========  ======  ===================================================================
ready      ZSET    message key -> score: priority band * 2^44 + publish sequence, + 2^43
                   unless it came back (requeued, reclaimed): those go first
leased     ZSET    message key -> lease deadline (ms)
body       HASH    message key -> payload (the kombu message as JSON)
order      HASH    message key -> the score it was published with: its priority band
                   (score // 2^44, 0 is served first) and publish sequence in one number;
                   only for a message that is not READY (leased, scheduled, dead), whose
                   ``ready`` score holds both: reserve.lua writes it when it takes one
                   (a READY message of an older version has one too: unread, overwritten)
deliv      HASH    message key -> delivery count
token      HASH    message key -> fencing token of the current lease
owner      HASH    message key -> consumer holding the current lease
seq        STRING  counter: back-of-queue sequence numbers and fencing tokens
signal     LIST    wake-up marker for blocked consumers (at most one element)
dead       ZSET    message key -> time it was dead-lettered (ms)
reason     HASH    message key -> why it was dead-lettered (JSON; its ``reason``: ``Reason``)
stats      HASH    counters (``Counter``): published, delivered, redelivered, acked,
                   requeued, reclaimed, promoted, retried, dead and ``dead:<reason>``,
                   lease_lost, duplicates, expired (message TTL, or Celery's ``expires``
                   header), dropped (``max_length``: the head gave way to a new message),
                   replayed, dead_trimmed (dead-letter retention)
dups       HASH    message key -> message id, for keys ``id/<n>`` (the id was already stored)
sched      ZSET    message key -> due time (ms): ETA / countdown / retry messages not yet due
alias      HASH    message id -> its newest ``id/<n>`` key (for unique publishes)
args       HASH    the queue's arguments (``celery_msg.queueargs.QueueArg``): message_ttl
                   (ms), expires (ms), max_length; written at declare, read by publish.lua
ttl        ZSET    message key -> expiry deadline (ms), for a queue with a message TTL: only
                   READY / SCHEDULED messages never delivered yet (a delivery removes it)
uniq       ZSET    message id -> until when (ms) a unique publish of that id is refused: set
                   by a unique publish, removed when its policy says (the task started,
                   succeeded, or failed for good) or when the message goes (purged, expired,
                   dropped, dead-lettered)
born       HASH    message key -> when it was enqueued (ms), for the age of the oldest ready
                   message: a promoted one's due time, a taken one's (copied from ``clock``
                   by reserve.lua, kept through requeue, reclaim, death and replay), a
                   buried one's; none for a message waiting as published (``clock``)
clock      ZSET    time (ms) -> sequence number: a tick, written by a publish that found the
                   last one ``CLOCK_MS`` (1 s) old or more; a message waiting at the back of
                   its band without a ``born`` entry was enqueued at the time of the last tick
                   at or before its sequence number, or less than ``CLOCK_MS`` later. Ticks
                   before the one the oldest such message maps to go at the next tick
=========  ======  ===================================================================

One more key per queue is written by consumers, never by a script (so it is not in ``KEYS``):

consumers  ZSET    consumer id -> until when (ms) it counts as attached: a live consumer's
                   renewer refreshes it every round (see ``celery_msg.consumers``)
=========  ======  ===================================================================

Global keys (no hash tag on one server, one of their own on a Redis Cluster, ``<prefix>{:global}:``
as :mod:`celery_msg.slots` says, so that their transactions stay in one slot; only the bindings
version is read by a script, and on a Cluster not even that: see ``Broker._route_is_current``):
``<prefix>queues``
(SET of queue names), ``<prefix>exchanges`` (HASH exchange -> type, so that a publisher that
never declared an exchange still routes by its type), ``<prefix>bindings:<exchange>`` (HASH
binding -> expiry ms, 0 = permanent), ``<prefix>bindings-version:<exchange>`` (STRING counter,
incremented by every change of that exchange's bindings; publish.lua checks it, so that a
publisher caching the table never routes with a stale one), ``<prefix>expiring`` (ZSET queue ->
time it expires unless used again (ms), for queues declared with ``expires``) and
``<prefix>wake:<consumer>`` (LIST: wakes one consumer blocked while its prefetch was full;
expires after a minute).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any

QUEUE_KEY_PARTS: tuple[str, ...] = (
    "ready",
    "leased",
    "body",
    "order",
    "deliv",
    "token",
    "owner",
    "seq",
    "signal",
    "dead",
    "reason",
    "stats",
    "dups",
    "sched",
    "alias",
    "args",
    "ttl",
    "uniq",
    "born",
    "clock",
)

#: Keys of a queue that no script takes (written by Python alone), deleted with the queue.
SIDE_KEY_PARTS: tuple[str, ...] = ("consumers",)


class Counter(StrEnum):
    """The fields of a queue's ``stats`` hash. The scripts get them as ``STAT_<NAME>`` from the
    generated preamble, so Python and Lua count under the same names."""

    #: stored by publish (a new message; a refused duplicate is ``duplicates``)
    PUBLISHED = "published"
    #: handed to a consumer under a lease (every delivery, first or not)
    DELIVERED = "delivered"
    #: deliveries of a message delivered before (its lease expired, it was requeued)
    REDELIVERED = "redelivered"
    ACKED = "acked"
    #: given back by its consumer (reject with requeue, a warm shutdown, a lost connection)
    REQUEUED = "requeued"
    #: leases that expired and went back to ready (the consumer died or hung)
    RECLAIMED = "reclaimed"
    #: scheduled messages (ETA, countdown, retry) that fell due and became ready
    PROMOTED = "promoted"
    #: publishes of a Celery retry (the message's ``retries`` header is above 0)
    RETRIED = "retried"
    #: dead-lettered, for any reason (``dead:<reason>`` counts each reason apart)
    DEAD = "dead"
    #: acks, renewals, requeues and dead-letterings refused: the lease was no longer held
    LEASE_LOST = "lease_lost"
    #: unique publishes refused: the id was still pending or locked (deduplicated)
    DUPLICATES = "duplicates"
    #: removed unserved: past their message TTL or Celery's ``expires``
    EXPIRED = "expired"
    #: dropped from the head of a queue over its ``max_length``
    DROPPED = "dropped"
    #: dead messages put back into their queue
    REPLAYED = "replayed"
    #: dead messages removed by the dead-letter store's retention
    DEAD_TRIMMED = "dead_trimmed"


class Reason(StrEnum):
    """Why a message is dead (the ``reason`` of its record). The scripts write two of them
    (``REASON_POISON``, ``REASON_MISSING_BODY``, from the generated preamble); the others are
    the Celery layer's and the transport's."""

    #: The task failed for good (retries exhausted, or not retried).
    FAILED = "failed"
    #: Delivered more than ``max_deliveries`` times without an ack.
    POISON = "poison"
    #: Its ``expires`` passed before it could run.
    EXPIRED = "expired"
    #: The body could not be decoded.
    UNDECODABLE = "undecodable"
    #: Rejected without requeue, with no reason given.
    REJECTED = "rejected"
    #: A ready id whose body was gone (written by something else).
    MISSING_BODY = "missing-body"
    NO_TASK_HEADERS = "no-task-headers"
    UNKNOWN_TASK = "unknown-task"
    INVALID_TASK = "invalid-task"
    CONTENT_TYPE_NOT_ACCEPTED = "content-type-not-accepted"


#: The Redis type of each part, as ``TYPE`` names it. Every script checks the keys it is given
#: against it before its first write (Redis does not roll a failed script back).
KEY_TYPES: dict[str, str] = {
    "ready": "zset",
    "leased": "zset",
    "body": "hash",
    "order": "hash",
    "deliv": "hash",
    "token": "hash",
    "owner": "hash",
    "seq": "string",
    "signal": "list",
    "dead": "zset",
    "reason": "hash",
    "stats": "hash",
    "dups": "hash",
    "sched": "zset",
    "alias": "hash",
    "args": "hash",
    "ttl": "zset",
    "uniq": "zset",
    "born": "hash",
    "clock": "zset",
    "consumers": "zset",
}


#: The parts publish.lua touches, in its ``KEYS`` order: every publisher's hot path sends only
#: these (fewer arguments to pack, send, parse and turn into Lua strings).
PUBLISH_KEY_PARTS: tuple[str, ...] = (
    "body",
    "order",
    "ready",
    "sched",
    "seq",
    "dups",
    "alias",
    "dead",
    "stats",
    "signal",
    "deliv",
    "args",
    "ttl",
    "uniq",
    "born",
    "clock",
)


class _Part:
    """A key of a queue named after its part (``keys.ready`` is ``<base>ready``): declared in
    the class, so that go-to-definition and mypy see every part; a typo is an AttributeError."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.part = name

    def __get__(self, keys: QueueKeys, owner: type | None = None) -> str:
        return keys.base + self.part


@dataclass(frozen=True)
class QueueKeys:
    """The keys of one queue, in script ``KEYS`` order."""

    queue: str
    prefix: str

    ready = _Part()
    leased = _Part()
    body = _Part()
    order = _Part()
    deliv = _Part()
    token = _Part()
    owner = _Part()
    seq = _Part()
    signal = _Part()
    dead = _Part()
    reason = _Part()
    stats = _Part()
    dups = _Part()
    sched = _Part()
    alias = _Part()
    args = _Part()
    ttl = _Part()
    uniq = _Part()
    born = _Part()
    clock = _Part()
    consumers = _Part()  # a side key (SIDE_KEY_PARTS): not in ``all``

    @cached_property
    def base(self) -> str:
        return f"{self.prefix}{{{self.queue}}}:"

    @cached_property
    def all(self) -> tuple[str, ...]:
        """Every key of the queue, in script ``KEYS`` order (built once: a hot path)."""
        base = self.base
        return tuple(base + part for part in QUEUE_KEY_PARTS)

    @cached_property
    def publish(self) -> tuple[str, ...]:
        """The keys publish.lua takes, in its ``KEYS`` order (``PUBLISH_KEY_PARTS``)."""
        base = self.base
        return tuple(base + part for part in PUBLISH_KEY_PARTS)

    @cached_property
    def side(self) -> tuple[str, ...]:
        """The keys no script takes (``SIDE_KEY_PARTS``): deleted with the queue."""
        return tuple(self.base + part for part in SIDE_KEY_PARTS)


def queues_key(prefix: str) -> str:
    return f"{prefix}queues"


def exchanges_key(prefix: str) -> str:
    return f"{prefix}exchanges"


def bindings_key(prefix: str, exchange: str) -> str:
    return f"{prefix}bindings:{exchange}"


def bindings_version_key(prefix: str, exchange: str) -> str:
    return f"{prefix}bindings-version:{exchange}"


def expiring_key(prefix: str) -> str:
    return f"{prefix}expiring"


def wake_key(prefix: str, consumer: str) -> str:
    return f"{prefix}wake:{consumer}"


class RecordField(StrEnum):
    """The fields every dead-letter record has (the ``reason`` hash holds one per dead message).

    Python writes them (:func:`failure_record`) and so does reserve.lua (``failure_record`` in
    ``_queue.lua``, for ``poison`` and ``missing-body``), with these names from the generated
    preamble (``RECORD_*``), so the two cannot drift; a test holds a record the script wrote to
    :func:`failure_record`'s."""

    #: The :class:`Reason` word.
    REASON = "reason"
    #: A sentence for people.
    DETAIL = "detail"
    #: When it was dead-lettered (epoch ms).
    TIME = "time"
    #: When it first failed (epoch ms): the first of its retries, else this failure.
    FIRST_FAILURE = "first_failure"
    #: When it last failed (epoch ms): this failure.
    LAST_FAILURE = "last_failure"


def failure_record(reason: str, detail: str, now_ms: int, **extra: Any) -> dict[str, Any]:
    """The JSON record kept with a dead message: why, and when it first and last failed.

    ``first_failure`` comes from ``extra`` when the message failed before (its retries);
    otherwise this failure is the first.
    """
    record: dict[str, Any] = {
        RecordField.REASON: reason,
        RecordField.DETAIL: detail,
        RecordField.TIME: now_ms,
    }
    record.update(extra)
    record.setdefault(RecordField.FIRST_FAILURE, now_ms)
    record[RecordField.LAST_FAILURE] = now_ms
    return record


def record_json(reason: str, detail: str, now_ms: int, extra: Mapping[str, Any]) -> str:
    """The record as stored (JSON; anything not serialisable as its text)."""
    return json.dumps(failure_record(reason, detail, now_ms, **extra), default=str)
