"""A typed reading of many queues at once: what metrics and the dashboard show.

For each queue: messages by state (ready, reserved, scheduled, dead), the age of its oldest
ready message, the consumers attached to it and its lifetime counters (``stats``). The queues
come from the registry every declaration writes (``<prefix>queues``), never from a scan of the
keyspace; all queues are read in one pipelined round trip per ``chunk`` of queues, plus one
``SCRIPT LOAD`` after a server restart. A queue whose keys are corrupted (a wrong type, garbage
counters) is reported as unreadable, with the reason, and the others are served.

Queues are classed by name (:class:`QueueKind`) so that exporters can label or leave out what
Celery itself declares: remote-control mailboxes and their replies (``*.pidbox``), event
receivers (``celeryev.*``) and broadcast queues (``<exchange>.<node>.bcast``, see
:mod:`celery_msg.broadcast`, or kombu's anonymous ``bcast.<uuid>``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis

from .broadcast import ANONYMOUS_NAME
from .core import Broker, translated_errors
from .counters import DEAD_REASON_PREFIX
from .keys import Counter
from .transitions import Oldest

logger = logging.getLogger(__name__)

#: Queues read per pipelined round trip: 1,000 queues are 8,000 commands, a few hundred KB.
CHUNK = 1000

_COMMANDS_PER_QUEUE = 8


class QueueKind(StrEnum):
    """What a queue is for, from its name."""

    #: a task queue
    NORMAL = "normal"
    #: one worker's copy of a broadcast exchange
    BROADCAST = "broadcast"
    #: Celery's remote-control mailbox of a worker (``<node>.celery.pidbox``) or the reply
    #: queue of a ``celery inspect`` / ``control`` client (``<id>.reply.celery.pidbox``)
    PIDBOX = "pidbox"
    #: an event receiver's queue (``celery events``, Flower): ``celeryev.<id>``
    EVENTS = "events"


def queue_kind(name: str) -> QueueKind:
    """The kind of queue ``name`` (Celery's default names; see :class:`QueueKind`)."""
    if name.endswith(".pidbox"):
        return QueueKind.PIDBOX
    if name.startswith("celeryev."):
        return QueueKind.EVENTS
    if name.endswith(".bcast") or ANONYMOUS_NAME.fullmatch(name):
        return QueueKind.BROADCAST
    return QueueKind.NORMAL


@dataclass(frozen=True)
class QueueSnapshot:
    """One queue as read at ``Snapshot.taken_at``.

    ``error`` is set when the queue could not be read (its keys hold the wrong types): then
    every number is 0 and only ``queue``, ``kind`` and ``error`` mean something.
    """

    queue: str
    kind: QueueKind
    #: waiting to be served, due scheduled messages included (the next fetch promotes them)
    ready: int = 0
    reserved: int = 0
    #: waiting for a due time still ahead (ETA, countdown, a retry's delay)
    scheduled: int = 0
    dead: int = 0
    #: seconds the oldest ready message has waited (since published, or due; over-reported by
    #: less than ``scripts.CLOCK_MS``: the queue's clock), None when the queue has no ready
    #: message (or none whose enqueue time is known)
    oldest_ready_age: float | None = None
    #: consumers whose heartbeat is alive (see :mod:`celery_msg.consumers`)
    consumers: int = 0
    #: lifetime counters by name (``Counter`` values; fields written by hand that are not
    #: counters are left out, so are the per-reason dead counts: see ``dead_by_reason``)
    counters: Mapping[str, int] = field(default_factory=dict)
    #: dead-lettered messages per reason (``poison``, ``failed``, ...) since counted
    dead_by_reason: Mapping[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def readable(self) -> bool:
        return self.error is None

    def counter(self, name: Counter) -> int:
        return self.counters.get(name, 0)

    def states(self) -> dict[str, int]:
        """Messages by state, as the ``state`` label of metrics names them."""
        return {
            "ready": self.ready,
            "reserved": self.reserved,
            "scheduled": self.scheduled,
            "dead": self.dead,
        }


@dataclass(frozen=True)
class Snapshot:
    """Every queue read, in name order."""

    #: when it was taken (seconds since the epoch, the broker's clock)
    taken_at: float
    queues: tuple[QueueSnapshot, ...]
    #: registered queue names skipped because they are not UTF-8
    skipped_names: int = 0
    #: network round trips it took (pipelines sent, script loads included)
    round_trips: int = 0

    def by_kind(self, *kinds: QueueKind) -> list[QueueSnapshot]:
        return [q for q in self.queues if q.kind in kinds]

    @property
    def unreadable(self) -> list[QueueSnapshot]:
        return [q for q in self.queues if not q.readable]


def take(
    broker: Broker,
    queues: Sequence[str] | None = None,
    *,
    chunk: int = CHUNK,
) -> Snapshot:
    """Read ``queues`` (default: every registered queue) of ``broker``.

    Raises :class:`~celery_msg.errors.BrokerConnectionError` when Redis cannot be reached; a
    queue with corrupted keys comes back with ``error`` set instead."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, not {chunk!r}")
    skipped = 0
    trips = 0
    if queues is None:
        queues, skipped = broker.queue_registry()
        trips += 1
    now_ms = broker.now_ms()
    read: list[QueueSnapshot] = []
    for start in range(0, len(queues), chunk):
        part = list(queues[start : start + chunk])
        replies, used = _read(broker, part, now_ms)
        trips += used
        read.extend(
            _decode(queue, replies[i * _COMMANDS_PER_QUEUE : (i + 1) * _COMMANDS_PER_QUEUE], now_ms)
            for i, queue in enumerate(part)
        )
    for q in read:
        if q.error is not None:
            logger.warning("queue %s is unreadable: %s", q.queue, q.error)
    return Snapshot(now_ms / 1000.0, tuple(read), skipped, trips)


def _read(broker: Broker, queues: list[str], now_ms: int) -> tuple[list[Any], int]:
    """The raw replies for ``queues`` (errors in place) and the round trips they took."""
    script = broker.scripts.oldest.script
    trips = 0
    with translated_errors(f"snapshot of {len(queues)} queues"):
        for _ in range(2):  # a second time only after loading a script Redis had lost
            pipe = broker.client.pipeline(transaction=False)
            for queue in queues:
                keys = broker.keys(queue)
                pipe.zcard(keys.ready)
                pipe.zcard(keys.leased)
                pipe.zcard(keys.sched)
                pipe.zcard(keys.dead)
                pipe.hgetall(keys.stats)
                pipe.zcount(keys.consumers, f"({now_ms}", "+inf")
                pipe.zcount(keys.sched, "-inf", now_ms)
                read = Oldest.keys(keys)
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", script.sha, len(read), *read, *Oldest.args(now_ms=now_ms)
                )
            replies = list(pipe.execute(raise_on_error=False))
            trips += 1
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                return replies, trips
            script.sha = _text(broker.client.script_load(script.script))
            trips += 1
    raise AssertionError("unreachable: the script was loaded")  # pragma: no cover


def _decode(queue: str, replies: Sequence[Any], now_ms: int) -> QueueSnapshot:
    kind = queue_kind(queue)
    errors = [r for r in replies if isinstance(r, Exception)]
    if errors:
        return QueueSnapshot(queue, kind, error=str(errors[0]))
    ready, reserved, scheduled, dead, stats, consumers, due, oldest = replies
    counters, by_reason, bad = _counters(stats)
    if bad:
        logger.warning("queue %s: skipped %d stats field(s) that are not counters", queue, bad)
    born = int(oldest)
    return QueueSnapshot(
        queue,
        kind,
        # Due scheduled messages are ready: the next fetch serves them (none, with no consumer).
        ready=int(ready) + int(due),
        reserved=int(reserved),
        scheduled=int(scheduled) - int(due),
        dead=int(dead),
        oldest_ready_age=max(0.0, (now_ms - born) / 1000.0) if born > 0 else None,
        consumers=int(consumers),
        counters=counters,
        dead_by_reason=by_reason,
    )


_KNOWN = frozenset(Counter)


def _counters(raw: Mapping[bytes, bytes]) -> tuple[dict[str, int], dict[str, int], int]:
    """(counters, dead per reason, fields skipped) from a ``stats`` hash, read defensively:
    a field or value that is not UTF-8 or not an integer is skipped, not a failure."""
    counters: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    bad = 0
    for raw_name, raw_value in raw.items():
        try:
            name = _text(raw_name)
            value = int(raw_value)
        except (UnicodeDecodeError, ValueError):
            bad += 1
            continue
        if name.startswith(DEAD_REASON_PREFIX):
            by_reason[name[len(DEAD_REASON_PREFIX) :]] = value
        elif name in _KNOWN:
            counters[name] = value
        else:
            bad += 1
    return counters, by_reason, bad


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
