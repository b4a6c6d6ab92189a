"""One typed wrapper per Lua script: its ARGV built from keyword arguments, its reply parsed.

Why: a script's contract (the order of its ARGV, the shape of its reply) used to be written in
its header, built again in the broker and once more in the Lua tests, and its reply parsed
twice. Here it is written once, next to the header it mirrors, and both
:class:`~celery_msg.core.Broker` and ``tests/lua`` call it; a changed ARGV is a changed
signature that mypy follows to every caller.

Each wrapper has ``args(...)`` (keyword arguments, in the header's order), ``reply(raw)`` (the
typed reply) and ``run(keys, args)`` (one call and its typed reply). A pipelined caller sends
``(wrapper.script, keys, args)`` itself and parses each reply with ``wrapper.reply``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar

import redis
from redis.commands.core import Script

from .keys import QueueKeys
from .redisio import Replication, evalsha, run_scripts
from .scripts import Code, source
from .slots import is_cluster

R = TypeVar("R")

#: ``(key, fencing token)`` of one held delivery.
Held = tuple[str, int]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _flat(pairs: Iterable[Held]) -> list[Any]:
    out: list[Any] = []
    for key, token in pairs:
        out.append(key)
        out.append(token)
    return out


def _codes(raw: Any) -> list[Code]:
    return [Code(int(code)) for code in raw]


class Transition(Generic[R]):
    """A registered script and its typed reply (subclasses add ``args``)."""

    name: ClassVar[str]

    def __init__(self, client: redis.Redis, replication: Replication | None = None) -> None:
        self.client = client
        self.replication = replication
        self.script: Script = client.register_script(
            source(self.name, shard_signal=is_cluster(client))
        )

    def reply(self, raw: Any) -> R:
        raise NotImplementedError

    def run(self, keys: Sequence[str], args: Sequence[Any]) -> R:
        """One call (EVALSHA, loading the script again if Redis lost it) and its reply; with
        ``replication``, its WAIT in the same round trip (a :class:`ReplicationTimeout` then
        carries the raw reply)."""
        if self.replication is None:
            return self.reply(evalsha(self.client, self.script, keys, args))
        [raw] = run_scripts(self.client, [(self.script, keys, args)], self.replication)
        return self.reply(raw)


class _Count(Transition[int]):
    """A script that returns how many messages (or ids) it moved."""

    def reply(self, raw: Any) -> int:
        return int(raw)


class _PerHeld(Transition[list[Code]]):
    """A script over ``(key, token)`` pairs that returns one code per pair."""

    def reply(self, raw: Any) -> list[Code]:
        return _codes(raw)


class _PerKey(Transition[list[Code]]):
    """A script over message keys of the dead-letter store: one code per key."""

    def reply(self, raw: Any) -> list[Code]:
        return _codes(raw)

    @staticmethod
    def args(keys: Iterable[str]) -> list[Any]:
        return list(keys)


@dataclass(frozen=True, slots=True)
class Published:
    """publish.lua's reply: the key the message is (or already was) stored under, and
    ``OK`` (stored), ``NOT_STORED`` (a unique publish whose id was pending or locked) or
    ``STALE_ROUTE`` (the bindings changed since the caller routed: nothing stored)."""

    key: str
    code: int

    @property
    def stored(self) -> bool:
        return self.code == Code.OK


#: publish.lua's ``code`` for a unique publish that stored nothing.
NOT_STORED = 0
#: publish.lua's ARGV[6] when the publish is not routed through an exchange (no guard key).
UNROUTED = ""


class Publish(Transition[Published]):
    name = "publish"
    ARGC = 9

    @staticmethod
    def args(
        *,
        message_id: str,
        payload: bytes | str,
        band: int,
        due_ms: int,
        unique: bool,
        route_version: int | str,
        now_ms: int,
        lock_until_ms: int,
        retry: bool = False,
    ) -> tuple[Any, ...]:
        return (
            message_id,
            payload,
            band,
            due_ms,
            1 if unique else 0,
            route_version,
            now_ms,
            lock_until_ms,
            1 if retry else 0,
        )

    def reply(self, raw: Any) -> Published:
        return Published(_text(raw[0]), int(raw[1]))


@dataclass(frozen=True, slots=True)
class Reserved:
    """One message reserve.lua leased: ``group`` is the index of its queue in the request
    (:data:`~celery_msg.scripts.MISSING_BODY_GROUP` for a ready id whose body was gone)."""

    group: int
    key: str
    token: int
    deliveries: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ReserveReply:
    messages: list[Reserved]
    #: The earliest due time (ms) still scheduled in the requested queues, or 0.
    next_due_ms: int


class Reserve(Transition[ReserveReply]):
    name = "reserve"

    @staticmethod
    def args(
        *,
        now_ms: int,
        lease_ms: int,
        count: int,
        consumer: str,
        order: Literal["fair", "strict"] | str,
        start: int,
        reclaim_batch: int,
        max_deliveries: int,
    ) -> list[Any]:
        return [now_ms, lease_ms, count, consumer, order, start, reclaim_batch, max_deliveries]

    def reply(self, raw: Any) -> ReserveReply:
        """Five entries per message (group, key, token, deliveries, payload), then the next
        due time."""
        messages = [
            Reserved(int(raw[i]), _text(raw[i + 1]), int(raw[i + 2]), int(raw[i + 3]), raw[i + 4])
            for i in range(0, len(raw) - 1, 5)
        ]
        return ReserveReply(messages, int(raw[-1]))


class Ack(_PerHeld):
    name = "ack"

    @staticmethod
    def args(held: Iterable[Held]) -> list[Any]:
        return _flat(held)


class Extend(_PerHeld):
    name = "extend"

    @staticmethod
    def args(*, now_ms: int, lease_ms: int, held: Iterable[Held]) -> list[Any]:
        return [now_ms, lease_ms, *_flat(held)]


class Requeue(_PerHeld):
    name = "requeue"

    @staticmethod
    def args(*, uncount: bool, held: Iterable[Held]) -> list[Any]:
        return [1 if uncount else 0, *_flat(held)]


class DeadLetter(Transition[Code]):
    name = "dead_letter"

    @staticmethod
    def args(*, now_ms: int, key: str, token: int, record: str, word: str) -> list[Any]:
        """``word``: the reason counted (``dead:<word>``; see :func:`counters.reason_word`)."""
        return [now_ms, key, token, record, word]

    def reply(self, raw: Any) -> Code:
        return Code(int(raw))


class Bury(Transition[str]):
    name = "bury"

    @staticmethod
    def args(
        *,
        now_ms: int,
        message_id: str,
        payload: bytes | str,
        band: int,
        deliveries: int,
        record: str,
        word: str,
    ) -> list[Any]:
        return [now_ms, message_id, payload, band, deliveries, record, word]

    def reply(self, raw: Any) -> str:
        return _text(raw)


class Reclaim(_Count):
    name = "reclaim"

    @staticmethod
    def args(*, now_ms: int, limit: int) -> list[Any]:
        return [now_ms, limit]


class Promote(_Count):
    name = "promote"

    @staticmethod
    def args(*, now_ms: int, limit: int) -> list[Any]:
        return [now_ms, limit]


class Purge(_Count):
    name = "purge"

    @staticmethod
    def args(*, limit: int) -> list[Any]:
        return [limit]


class TrimDead(_Count):
    name = "trim_dead"

    @staticmethod
    def args(*, now_ms: int, max_entries: int, max_age_ms: int, limit: int) -> list[Any]:
        return [now_ms, max_entries, max_age_ms, limit]


class Unlock(_Count):
    name = "unlock"

    @staticmethod
    def args(message_ids: Iterable[str]) -> list[Any]:
        return list(message_ids)


class Replay(_PerKey):
    name = "replay"


class Discard(_PerKey):
    name = "discard"


class Oldest(Transition[int]):
    """Read only: when the oldest ready (or overdue scheduled) message was enqueued (ms, 0:
    none). KEYS are the queue's ``ready``, ``born``, ``sched`` and ``clock`` (:meth:`keys`)."""

    name = "oldest"

    @staticmethod
    def keys(keys: QueueKeys) -> list[str]:
        return [keys.ready, keys.born, keys.sched, keys.clock]

    @staticmethod
    def args(*, now_ms: int) -> list[Any]:
        return [now_ms]

    def reply(self, raw: Any) -> int:
        return int(raw)


class Scripts:
    """The scripts of one Redis client, registered once, one typed wrapper per transition."""

    def __init__(self, client: redis.Redis, replication: Replication | None = None) -> None:
        self.publish = Publish(client, replication)
        self.reserve = Reserve(client, replication)
        self.ack = Ack(client, replication)
        self.extend = Extend(client, replication)
        self.requeue = Requeue(client, replication)
        self.dead_letter = DeadLetter(client, replication)
        self.reclaim = Reclaim(client, replication)
        self.purge = Purge(client, replication)
        self.promote = Promote(client, replication)
        self.bury = Bury(client, replication)
        self.replay = Replay(client, replication)
        self.discard = Discard(client, replication)
        self.trim_dead = TrimDead(client, replication)
        self.unlock = Unlock(client, replication)
        self.oldest = Oldest(client, replication)

    def all(self) -> list[Transition[Any]]:
        return [value for value in vars(self).values() if isinstance(value, Transition)]
