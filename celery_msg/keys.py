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
                   (score // 2^44, 0 is served first) and publish sequence in one number
deliv      HASH    message key -> delivery count
token      HASH    message key -> fencing token of the current lease
owner      HASH    message key -> consumer holding the current lease
seq        STRING  counter: back-of-queue sequence numbers and fencing tokens
signal     LIST    wake-up marker for blocked consumers (at most one element)
dead       ZSET    message key -> time it was dead-lettered (ms)
reason     HASH    message key -> why it was dead-lettered (JSON)
stats      HASH    counters (``celery_msg.counters.Counter``): published, delivered,
                   redelivered, acked, requeued, reclaimed, promoted, retried, dead and
                   ``dead:<reason>``, replayed, lease_lost, duplicates, expired (message TTL,
                   or Celery's ``expires`` header), dropped (``max_length``: the head gave way
                   to a new message), dead_trimmed
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
born       HASH    message key -> when it was enqueued (ms): published, or promoted from
                   the schedule (due); read for the age of the oldest ready message (metrics)
=========  ======  ===================================================================

One more key per queue is written by consumers, never by a script (so it is not in ``KEYS``):

=========  ======  ===================================================================
consumers  ZSET    consumer id -> until when (ms) it counts as attached: a live consumer's
                   renewer refreshes it every round (see ``Broker.heartbeat``)
=========  ======  ===================================================================

Global keys (no hash tag; only the bindings version is read by a script): ``<prefix>queues``
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

from dataclasses import dataclass
from functools import cached_property

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
)

#: Keys of a queue that no script takes (written by Python alone), deleted with the queue.
SIDE_KEY_PARTS: tuple[str, ...] = ("consumers",)


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
)


@dataclass(frozen=True)
class QueueKeys:
    """The keys of one queue, in script ``KEYS`` order."""

    queue: str
    prefix: str

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

    def __getattr__(self, part: str) -> str:
        if part in QUEUE_KEY_PARTS or part in SIDE_KEY_PARTS:
            return self.base + part
        raise AttributeError(part)


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
