"""The dead-letter store of every queue: read it, filter it, replay it, purge it, bound it.

A dead message keeps its body (the whole kombu message: headers included) under its key in the
queue, and a JSON record of why it died (``reason``: ``failed``, ``poison``, ``expired``,
``undecodable``, ``rejected`` ...; for a failed task the exception type, message and traceback;
``first_failure`` / ``last_failure``, stored in epoch ms, public in seconds like every time).
Replay and purge are scripts that act on a key only while it is still dead, so two operators
working at once never enqueue a message twice. Records are read defensively: one written badly
by another program is counted (:attr:`DeadLetters.unreadable`), never raised.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .core import UNREADABLE_RECORD, Broker, MessageInfo, State
from .errors import MessageNotFound
from .keys import RecordField


@dataclass(frozen=True)
class DeadMessage:
    """One message in a dead-letter store, with its record unpacked."""

    id: str
    key: str
    queue: str
    task: str | None
    reason: str
    detail: str
    exc_type: str | None
    exc_message: str | None
    traceback: str | None
    deliveries: int
    retries: int
    first_failure: float
    last_failure: float
    headers: dict[str, Any]
    payload: bytes

    @classmethod
    def from_info(cls, info: MessageInfo) -> DeadMessage:
        # Everything here was read from Redis: a field of the wrong type is shown, not raised.
        record = info.dead_reason or {}
        message = decode_message(info.payload or b"")
        headers = message.get("headers") if isinstance(message.get("headers"), dict) else {}
        last = _seconds(record.get(RecordField.LAST_FAILURE)) or _seconds(
            record.get(RecordField.TIME)
        )
        first = _seconds(record.get(RecordField.FIRST_FAILURE)) or last
        return cls(
            id=info.id,
            key=info.key,
            queue=info.queue,
            task=_text_or_none(record.get("task")) or _text_or_none((headers or {}).get("task")),
            reason=str(record.get(RecordField.REASON, "unknown")),
            detail=str(record.get("detail", "")),
            exc_type=_text_or_none(record.get("exc_type")),
            exc_message=_text_or_none(record.get("exc_message")),
            traceback=_text_or_none(record.get("traceback")),
            deliveries=info.deliveries,
            retries=int(_seconds((headers or {}).get("retries"))),
            first_failure=first,
            last_failure=last,
            headers=dict(headers or {}),
            payload=info.payload or b"",
        )

    def as_dict(self, *, with_body: bool = False) -> dict[str, Any]:
        """A JSON-ready view (``--json`` output of the CLI)."""
        out: dict[str, Any] = {
            "id": self.id,
            "key": self.key,
            "queue": self.queue,
            "task": self.task,
            "reason": self.reason,
            "detail": self.detail,
            "exc_type": self.exc_type,
            "exc_message": self.exc_message,
            "deliveries": self.deliveries,
            "retries": self.retries,
            "first_failure": self.first_failure,
            "last_failure": self.last_failure,
        }
        if with_body:
            out["traceback"] = self.traceback
            out["headers"] = self.headers
            out["message"] = decode_message(self.payload) or self.payload.decode("utf-8", "replace")
        return out


@dataclass(frozen=True)
class DeadFilter:
    """Which dead messages an operation applies to; every criterion given must match.

    ``task`` is a glob (``"reports.*"``); ``exc_type`` matches the exception's class name or
    its full dotted name; ages are seconds since the last failure.
    """

    queue: str | None = None
    task: str | None = None
    exc_type: str | None = None
    reason: str | None = None
    older_than: float | None = None
    newer_than: float | None = None

    def matches(self, message: DeadMessage, now: float) -> bool:
        if self.task is not None and not fnmatch.fnmatchcase(message.task or "", self.task):
            return False
        if self.exc_type is not None:
            name = message.exc_type or ""
            if self.exc_type not in (name, name.rpartition(".")[2]):
                return False
        if self.reason is not None and message.reason != self.reason:
            return False
        age = now - message.last_failure
        if self.older_than is not None and age < self.older_than:
            return False
        return not (self.newer_than is not None and age > self.newer_than)


class DeadLetters:
    """The dead-letter stores of every queue a :class:`Broker` knows."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        #: Records skipped or shown as ``unreadable-record`` by the listings so far (keys or
        #: queue names that are not UTF-8, records that are not JSON objects).
        self.unreadable = 0

    def iter(self, where: DeadFilter | None = None, batch: int = 500) -> Iterator[DeadMessage]:
        """Dead messages matching ``where``, oldest first within each queue."""
        where = where or DeadFilter()
        now = self.broker.clock()
        if where.queue is not None:
            queues = [where.queue]
        else:
            queues, skipped = self.broker.queue_registry()
            self.unreadable += skipped
        for queue in queues:
            for message in self._scan(queue, batch):
                if where.matches(message, now):
                    yield message

    def _scan(self, queue: str, batch: int) -> Iterator[DeadMessage]:
        last: float | None = None
        while True:
            # Page by score (the time of death), so that replays and purges between two pages
            # do not make us skip anything.
            page = self.broker.dead_page(queue, last, batch)
            if not page:
                return
            yield from self._dead(queue, self._names([key for key, _ in page]))
            if len(page) < batch:
                return
            last = page[-1][1]
            # Several messages may share the last score: fetch the rest of that score at once.
            seen = {key for key, _ in page}
            same = self.broker.dead_at(queue, last)
            yield from self._dead(queue, self._names([key for key in same if key not in seen]))

    def _names(self, raw: list[bytes]) -> list[str]:
        """Message keys as text; ones that are not UTF-8 are counted and skipped."""
        names = []
        for key in raw:
            try:
                names.append(key.decode())
            except UnicodeDecodeError:
                self.unreadable += 1
        return names

    def _dead(self, queue: str, keys: list[str]) -> Iterator[DeadMessage]:
        """The dead ones of ``keys`` (one round trip), as DeadMessages."""
        for info in self.broker.infos(queue, keys):
            if info is not None and info.state is State.DEAD:
                message = DeadMessage.from_info(info)
                if message.reason == UNREADABLE_RECORD:
                    self.unreadable += 1
                yield message

    def get(self, message_id: str, queue: str | None = None) -> DeadMessage:
        """The newest dead instance of ``message_id`` (a task id, or a key ``id/<n>``)."""
        queues = None if queue is None else [queue]
        dead = [i for i in self.broker.lookup(message_id, queues) if i.state is State.DEAD]
        if not dead:
            for q in queues or self.broker.queues():
                info = self.broker.info(q, message_id)
                if info is not None and info.state is State.DEAD:
                    dead.append(info)
        if not dead:
            raise MessageNotFound(f"no dead message with id {message_id!r}")
        return DeadMessage.from_info(dead[-1])

    def replay(
        self,
        messages: Iterable[DeadMessage],
        progress: Callable[[int], None] | None = None,
        batch: int = 200,
    ) -> int:
        """Re-enqueue dead messages at the back of their queue; returns how many were replayed
        (a message replayed or purged meanwhile by someone else is skipped)."""
        return self._apply("replay", messages, progress, batch)

    def purge(
        self,
        messages: Iterable[DeadMessage],
        progress: Callable[[int], None] | None = None,
        batch: int = 200,
    ) -> int:
        """Delete dead messages for good; returns how many were removed."""
        return self._apply("discard", messages, progress, batch)

    def _apply(
        self,
        what: str,
        messages: Iterable[DeadMessage],
        progress: Callable[[int], None] | None,
        batch: int,
    ) -> int:
        settle = self.broker.replay_dead if what == "replay" else self.broker.discard_dead
        done = 0
        pending: dict[str, list[str]] = {}

        def flush(queue: str) -> None:
            nonlocal done
            keys = pending.pop(queue, [])
            if not keys:
                return
            done += settle(queue, keys)
            if progress is not None:
                progress(len(keys))

        for message in messages:
            group = pending.setdefault(message.queue, [])
            group.append(message.key)
            if len(group) >= batch:
                flush(message.queue)
        for queue in list(pending):
            flush(queue)
        return done

    def trim(self, retention: Mapping[str, tuple[int, int]], limit: int = 1000) -> int:
        """Enforce retention per queue: ``{queue: (max entries, max age ms)}``, 0 = no bound.
        One round trip for every queue; returns how many dead messages were dropped."""
        if not retention:
            return 0
        return self.broker.trim_dead(retention, limit)


def decode_message(payload: bytes) -> dict[str, Any]:
    """A stored kombu message as a dict; {} when it is not JSON (an undecodable message)."""
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _seconds(value: object) -> float:
    """A number read from Redis, or 0.0 when it is not one."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class DecodedBody:
    """A stored message's body made readable: a Celery task's ``args`` and ``kwargs``, else
    its text; ``note`` says what it is when it is neither."""

    args: Any = None
    kwargs: Any = None
    text: str | None = None
    note: str = ""


def decode_body(payload: bytes) -> DecodedBody:
    """Undo kombu's body encoding (base64) and the content type (JSON) of a stored message.

    Everything is untrusted: any step that fails gives a note, never an exception."""
    message = decode_message(payload)
    if not message:
        return DecodedBody(note=f"not a kombu message: {len(payload)} bytes")
    body = message.get("body")
    properties = message.get("properties")
    encoding = properties.get("body_encoding") if isinstance(properties, dict) else None
    content_type = str(message.get("content-type") or "")
    raw: bytes
    if encoding == "base64" and isinstance(body, str):
        try:
            raw = base64.b64decode(body, validate=True)
        except (ValueError, binascii.Error):
            return DecodedBody(text=body, note="body_encoding base64, but not base64")
    elif isinstance(body, str):
        raw = body.encode("utf-8", "surrogateescape")
    else:
        return DecodedBody(text=json.dumps(body, default=str), note="body not a string")
    if content_type != "application/json":
        text = raw.decode("utf-8", "replace")
        return DecodedBody(text=text, note=f"content type {content_type or 'unknown'}")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return DecodedBody(text=raw.decode("utf-8", "replace"), note="JSON content type, not JSON")
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], list):
        return DecodedBody(args=value[0], kwargs=value[1], note="")
    return DecodedBody(text=json.dumps(value, indent=2, default=str), note="JSON")
