"""What the dashboard's pages show, read through the same :class:`Broker` and
:class:`DeadLetters` as ``celery msg``: one page of a queue's messages in one state, one page of
dead letters, a message looked up by id.

Every read is bounded (a page is ``ZRANGE`` by rank plus one transaction for its messages), so
a store of 100,000 dead letters pages as fast as one of ten. Everything read from Redis is
untrusted: a message or record that does not decode is skipped and counted in the page's
``unreadable``, never raised, so one bad entry cannot take a page down.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ..core import (
    UNREADABLE_RECORD,
    Broker,
    MessageInfo,
    State,
    dead_record,
    translated_errors,
)
from ..deadletters import DeadFilter, DeadMessage, decode_body, decode_message

#: Rows on one page of messages or dead letters.
PAGE_SIZE = 50
#: Most dead letters one filtered page reads before it stops and offers "next" (a filter that
#: matches little must not make one request read a whole large store).
FILTER_SCAN_LIMIT = 5000
#: States a queue page lists, with the key part that holds them (all sorted sets).
STATE_KEYS: dict[State, str] = {
    State.READY: "ready",
    State.RESERVED: "leased",
    State.SCHEDULED: "sched",
    State.DEAD: "dead",
}


@dataclass(frozen=True)
class Row:
    """One message as a page lists it; ``when`` is the state's time (lease deadline, due time,
    time of death; None for READY, ordered by priority and publish sequence)."""

    queue: str
    key: str
    id: str
    state: State
    task: str | None
    args: str
    deliveries: int
    owner: str | None
    when: float | None


@dataclass
class Page:
    """One page of rows; ``total`` is the state's size (None when a filter makes it unknown);
    ``next_offset`` None on the last page; ``unreadable`` counts entries skipped as bad."""

    rows: list[Any]
    offset: int
    total: int | None
    next_offset: int | None = None
    next_cursor: str | None = None
    unreadable: int = 0
    scanned: int = 0
    notes: list[str] = field(default_factory=list)


def safe_infos(broker: Broker, queue: str, keys: Sequence[str]) -> tuple[list[MessageInfo], int]:
    """:meth:`Broker.infos` of ``keys``, skipping the ones whose stored fields do not decode
    (another program wrote them): the good ones, and how many were skipped."""
    try:
        return [i for i in broker.infos(queue, keys) if i is not None], 0
    except (ValueError, TypeError, UnicodeDecodeError):
        pass  # one bad message spoils the batch: read them one by one to find it
    found: list[MessageInfo] = []
    bad = 0
    for key in keys:
        try:
            info = broker.info(queue, key)
        except (ValueError, TypeError, UnicodeDecodeError):
            bad += 1
            continue
        if info is not None:
            found.append(info)
    return found, bad


def _texts(raw: Sequence[bytes]) -> tuple[list[str], int]:
    names: list[str] = []
    for item in raw:
        try:
            names.append(item.decode())
        except UnicodeDecodeError:
            continue
    return names, len(raw) - len(names)


def args_preview(payload: bytes | None, limit: int = 120) -> str:
    """A task's arguments as one short line of text (escaped by the template, never here)."""
    body = decode_body(payload or b"")
    if body.args is not None:
        text = json.dumps([body.args, body.kwargs], ensure_ascii=False, default=str)
    else:
        text = body.text if body.text is not None else f"({body.note})"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _task_of(payload: bytes | None) -> str | None:
    headers = decode_message(payload or b"").get("headers")
    task = headers.get("task") if isinstance(headers, dict) else None
    return None if task is None else str(task)


def queue_page(broker: Broker, queue: str, state: State, offset: int = 0) -> Page:
    """Messages of ``queue`` in ``state``, in the order the state keeps them: READY in the
    order they will be served, RESERVED by lease deadline, SCHEDULED by due time, DEAD by time
    of death. Two round trips: the page of keys, then their messages in one transaction."""
    offset = max(0, offset)
    key = getattr(broker.keys(queue), STATE_KEYS[state])
    with translated_errors(f"list {state} messages of {queue!r}"):
        pipe = broker.client.pipeline(transaction=False)
        pipe.zcard(key)
        pipe.zrange(key, offset, offset + PAGE_SIZE - 1, withscores=True)
        total, entries = pipe.execute()
    entries = cast(list[tuple[bytes, float]], entries)
    keys, bad_names = _texts([k for k, _ in entries])
    infos, bad = safe_infos(broker, queue, keys)
    rows = [
        Row(
            queue=queue,
            key=info.key,
            id=info.id,
            state=info.state,
            task=_task_of(info.payload),
            args=args_preview(info.payload),
            deliveries=info.deliveries,
            owner=info.owner,
            when=_when_of(info),
        )
        for info in infos
    ]
    end = offset + len(entries)
    return Page(
        rows=rows,
        offset=offset,
        total=int(total),
        next_offset=end if end < int(total) else None,
        unreadable=bad + bad_names,
    )


def _when_of(info: MessageInfo) -> float | None:
    if info.state is State.RESERVED:
        return info.lease_deadline
    if info.state is State.SCHEDULED:
        return info.due
    if info.state is State.DEAD:
        record = info.dead_reason or {}
        when = record.get("last_failure") or record.get("time")
        return when if isinstance(when, float) else None
    return None


# -- dead letters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadCursor:
    """Where a dead-letter page starts: the queue (index into the sorted queue list) and the
    rank inside its store. Rank paging is O(log n) in Redis: no page reads what it skips."""

    queue_index: int = 0
    rank: int = 0

    def encode(self) -> str:
        return f"{self.queue_index}.{self.rank}"

    @classmethod
    def decode(cls, text: str | None) -> DeadCursor:
        try:
            q, _, r = (text or "").partition(".")
            return cls(max(0, int(q)), max(0, int(r)))
        except ValueError:
            return cls()


def dead_page(
    broker: Broker, where: DeadFilter, cursor: DeadCursor, page_size: int = PAGE_SIZE
) -> Page:
    """One page of dead letters matching ``where``, oldest first within each queue (queues by
    name), as ``celery msg dlq list`` orders them.

    Without a filter other than the queue, a page is one ``ZRANGE`` by rank per queue touched
    and the total is exact (``ZCARD``). With a filter, a page reads at most
    :data:`FILTER_SCAN_LIMIT` entries and says how far it got; the total is then unknown."""
    if where.queue is not None:
        queues, unreadable = [where.queue], 0
    else:
        queues, unreadable = broker.queue_registry()
    dead_keys = [broker.keys(q).dead for q in queues]
    with translated_errors("count dead letters"):
        pipe = broker.client.pipeline(transaction=False)
        for key in dead_keys:
            pipe.zcard(key)
        sizes = [int(n) for n in pipe.execute()]
    filtered = where != DeadFilter(queue=where.queue)
    now = broker.clock()
    rows: list[DeadMessage] = []
    scanned = 0
    qi, rank = cursor.queue_index, cursor.rank
    while qi < len(queues) and len(rows) < page_size:
        budget = FILTER_SCAN_LIMIT - scanned
        if rank >= sizes[qi] or (filtered and budget <= 0):
            if rank < sizes[qi]:
                break  # the scan budget is spent: the next page goes on from here
            qi, rank = qi + 1, 0
            continue
        want = min(500, budget) if filtered else page_size - len(rows)
        with translated_errors(f"list dead letters of {queues[qi]!r}"):
            raw = cast(list[bytes], broker.client.zrange(dead_keys[qi], rank, rank + want - 1))
        if not raw:
            qi, rank = qi + 1, 0
            continue
        taken, bad = _take_dead(broker, queues[qi], raw, where, now, rows, page_size)
        unreadable += bad
        scanned += taken
        rank += taken
    more = qi < len(queues) and (rank < sizes[qi] or any(sizes[qi + 1 :]))
    page = Page(
        rows=rows,
        offset=sum(sizes[: cursor.queue_index]) + cursor.rank,
        total=None if filtered else sum(sizes),
        next_cursor=DeadCursor(qi, rank).encode() if more else None,
        unreadable=unreadable,
        scanned=scanned,
    )
    if filtered and more and len(rows) < page_size:
        page.notes.append(f"read {scanned} dead letters for this page; more may match further on")
    return page


def _take_dead(
    broker: Broker,
    queue: str,
    raw: list[bytes],
    where: DeadFilter,
    now: float,
    rows: list[DeadMessage],
    page_size: int,
) -> tuple[int, int]:
    """Append the matching dead letters of ``raw`` (keys in rank order) to ``rows`` until the
    page is full; returns how many entries of ``raw`` were consumed and how many were bad.

    A filter is first tried on the records alone (one ``HMGET``): only the entries it may
    match are read whole, so a filter that matches little reads little."""
    keys, bad = _texts(raw)
    if where != DeadFilter(queue=where.queue):
        keys = _may_match(broker, queue, keys, where, now)
    infos, bad_infos = safe_infos(broker, queue, keys)
    by_key = {info.key: info for info in infos}
    for index, name in enumerate(raw):
        info = by_key.get(name.decode("utf-8", "replace"))
        if info is None or info.state is not State.DEAD:
            continue
        message = DeadMessage.from_info(info)
        if message.reason == UNREADABLE_RECORD:
            bad += 1
        if where.matches(message, now):
            rows.append(message)
            if len(rows) >= page_size:
                return index + 1, bad + bad_infos
    return len(raw), bad + bad_infos


def _may_match(
    broker: Broker, queue: str, keys: list[str], where: DeadFilter, now: float
) -> list[str]:
    """The ``keys`` whose dead-letter record alone does not rule them out of ``where`` (a
    record without a task name keeps its key: the name may be in the message's headers)."""
    if not keys:
        return keys
    with translated_errors(f"read dead-letter records of {queue!r}"):
        records = cast(list[bytes | None], broker.client.hmget(broker.keys(queue).reason, keys))
    kept = []
    for key, raw_record in zip(keys, records, strict=True):
        record = dead_record(raw_record) if raw_record is not None else {}
        probe = DeadMessage.from_info(
            MessageInfo(key, key, queue, State.DEAD, 0, None, None, None, None, record, None)
        )
        if where.matches(probe, now) or (where.task is not None and "task" not in record):
            kept.append(key)
    return kept


def dead_message(broker: Broker, queue: str, key: str) -> DeadMessage | None:
    """The dead letter stored under ``key`` in ``queue``, or None (replayed, purged, or a
    record that does not decode)."""
    infos, _ = safe_infos(broker, queue, [key])
    for info in infos:
        if info.state is State.DEAD:
            return DeadMessage.from_info(info)
    return None
