"""Reading messages without changing them: by id, by state, the schedule, the dead letters.

Why its own module: look-ups are plain reads (no script, no state change) for operators, the
CLI, the API and the tests. A message can be stored under several keys of one queue (a retry
republished while the first delivery was still leased is ``<id>/<n>``); a look-up finds them
all. Everything read is untrusted: a record that is not JSON is reported, not raised.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple, cast

from .errors import MessageNotFound, ScriptError
from .keys import RecordField
from .queues import Queues
from .redisio import text, translated_errors
from .scripts import BAND, MID

logger = logging.getLogger(__name__)


class State(StrEnum):
    """Where a message is in its life."""

    SCHEDULED = "SCHEDULED"
    READY = "READY"
    RESERVED = "RESERVED"
    DEAD = "DEAD"


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


class Search(NamedTuple):
    """What :meth:`Lookups.search` found, and the queues it could not read (name -> error)."""

    found: list[MessageInfo]
    skipped: dict[str, str]


@dataclass(frozen=True, slots=True)
class ScheduledMessage:
    """A message waiting in a queue's schedule, as :meth:`Broker.scheduled` lists it."""

    queue: str
    key: str
    #: When it becomes due (epoch ms): it enters its queue then.
    due_ms: int
    payload: bytes


class Lookups(Queues):
    """Reading messages without changing them (a part of :class:`~celery_msg.core.Broker`)."""

    def lookup(self, message_id: str, queues: Sequence[str] | None = None) -> list[MessageInfo]:
        """Every stored instance of ``message_id`` in ``queues`` (default: all known queues).

        Acked messages leave no trace, so an empty list means acked, purged or never published.
        """
        return self.search(message_id, queues).found

    def search(self, message_id: str, queues: Sequence[str] | None = None) -> Search:
        """:meth:`lookup`, saying which queues could not be read: when searching every queue,
        one whose keys are corrupted (a wrong type) is skipped and named, not raised, so it
        cannot hide the others; a queue asked for by name still raises."""
        result = Search([], {})
        for queue in self.queues() if queues is None else queues:
            try:
                for key in self._keys_of(queue, message_id):
                    info = self.info(queue, key)
                    if info is not None:
                        result.found.append(info)
            except ScriptError as exc:
                if queues is not None:
                    raise
                logger.warning("look-up skipped queue %r: %s", queue, exc)
                result.skipped[queue] = str(exc)
        return result

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
                if _lenient_text(owner_id) == message_id:
                    keys.append(_lenient_text(field))
            if len(keys) < 2:
                return keys
            pipe = self.client.pipeline(transaction=True)
            pipe.hmget(k.order, keys)
            for key in keys:
                pipe.zscore(k.ready, key)
            orders, *scores = pipe.execute()
        seq = {
            key: _sequence(_placement(placed, score))
            for key, placed, score in zip(keys, orders, scores, strict=True)
        }
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
            keys = [text(key) for key, _ in due]
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
        return [info for info in self.infos(queue, [text(k) for k in raw]) if info is not None]

    def dead_page(self, queue: str, after: float | None, limit: int) -> list[tuple[bytes, float]]:
        """Up to ``limit`` dead keys of ``queue`` with their time of death (ms), oldest first,
        after time ``after`` (exclusive; None: from the start). Paging by score, not rank:
        replays and purges between two pages cannot make a listing skip anything."""
        low = "-inf" if after is None else f"({after}"
        with translated_errors(f"list dead letters of {queue!r}"):
            return cast(
                list[tuple[bytes, float]],
                self.client.zrangebyscore(
                    self.keys(queue).dead, low, "+inf", start=0, num=limit, withscores=True
                ),
            )

    def dead_at(self, queue: str, score: float) -> list[bytes]:
        """Every dead key of ``queue`` that died at ``score`` (ms)."""
        with translated_errors(f"list dead letters of {queue!r}"):
            return cast(list[bytes], self.client.zrangebyscore(self.keys(queue).dead, score, score))


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
        id=key if dup_of is None else _lenient_text(dup_of),
        key=key,
        queue=queue,
        state=state,
        deliveries=_count_field(deliv) or 0,
        priority_band=_band_field(_placement(order, ready)),
        owner=None if owner is None else _lenient_text(owner),
        lease_deadline=None if leased is None else float(leased) / 1000.0,
        due=None if due is None else float(due) / 1000.0,
        dead_reason=None if reason is None else dead_record(reason),
        payload=body,
    )


def _count_field(raw: Any) -> int | None:
    """A counter read from a hash field; None when it is not a number (a corrupted field must
    not break a look-up or a listing: the message is shown, the count is not)."""
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def _placement(order: Any, ready: Any) -> Any:
    """Where a message's band and publish sequence number are kept: its ``order`` entry, or,
    for a READY message (which has none: see celery_msg/lua/_queue.lua), its ``ready`` score;
    a READY message stored by an older version has both, equal in band and sequence."""
    return order if order is not None else ready


def _sequence(raw: Any) -> int:
    """Publish sequence of an ``order`` entry or a ``ready`` score, front (came back) or back
    (0 when missing or not a number)."""
    try:
        return int(float(raw or 0)) % MID
    except (TypeError, ValueError, OverflowError):
        return 0


def _band_field(raw: Any) -> int | None:
    """The priority band of an ``order`` entry or a ``ready`` score (a number); None when it is
    missing or not one."""
    if raw is None:
        return None
    try:
        return int(float(raw)) // BAND
    except (TypeError, ValueError, OverflowError):
        return None


def _lenient_text(value: bytes | str) -> str:
    """Text of a field another program may have written: bytes that are not UTF-8 are shown
    escaped rather than raising."""
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


#: Reason given to a dead-letter record that is not a JSON object (written by something else).
UNREADABLE_RECORD = "unreadable-record"
#: Fields of a dead-letter record kept in epoch milliseconds in Redis; look-ups give seconds.
_RECORD_TIMES = (RecordField.TIME, RecordField.FIRST_FAILURE, RecordField.LAST_FAILURE)


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


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
