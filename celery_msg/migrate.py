"""Move the tasks waiting in kombu's ``redis://`` transport into celery-msg.

Switching ``broker_url`` from ``redis://`` to ``celery-msg://`` leaves every task still queued in
kombu's layout where no celery-msg worker looks. This reads that layout (a LIST per queue and
priority bucket: ``<queue>`` and ``<queue>\\x06\\x16<n>``, oldest at the right end; optionally
the ``unacked`` hash of messages kombu workers hold) and publishes each message into the
celery-msg queue of the same name, keeping its id, headers, priority and ETA.

Safe to interrupt and to run again: each message is published *before* it is removed from the
source, and published *unique* (a task id still pending in the celery-msg queue is not stored
twice), so a message is never lost, and stored twice only if it was published, then consumed and
acked by a celery-msg worker, and the run was interrupted before removing it from the source.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from .core import Broker
from .headers import due_ms
from .messages import PriorityOrder, band_of, message_id

#: kombu's redis transport: separator of priority buckets and binding fields.
KOMBU_SEP = "\x06\x16"
#: The bucket suffixes kombu can use (its priorities are 0-9; steps map into them).
KOMBU_BUCKETS = tuple(range(1, 10))
#: kombu's names for the messages its consumers hold (delivery tag -> [message, exchange, key]).
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
KOMBU_BINDINGS = "_kombu.binding."


@dataclass
class QueueReport:
    """What a migration did (or, dry, would do) for one queue."""

    waiting: int = 0
    moved: int = 0
    already_there: int = 0
    undecodable: int = 0
    scheduled: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Report:
    """Per queue, plus totals; ``dry_run`` when nothing was moved."""

    dry_run: bool
    queues: dict[str, QueueReport] = field(default_factory=dict)

    def of(self, queue: str) -> QueueReport:
        return self.queues.setdefault(queue, QueueReport())

    @property
    def total(self) -> QueueReport:
        out = QueueReport()
        for report in self.queues.values():
            for name, value in report.as_dict().items():
                setattr(out, name, getattr(out, name) + value)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "queues": {q: r.as_dict() for q, r in sorted(self.queues.items())},
            "total": self.total.as_dict(),
        }


class Migration:
    """One migration from a kombu ``redis://`` database into ``broker``'s queues."""

    def __init__(
        self,
        source: redis.Redis,
        broker: Broker,
        *,
        key_prefix: str = "",
        default_priority: int = 0,
        priority_order: PriorityOrder = "desc",
    ) -> None:
        self.source = source
        self.broker = broker
        self.key_prefix = key_prefix
        self.default_priority = default_priority
        self.priority_order = priority_order

    def queues(self) -> list[str]:
        """The queues kombu's bindings name in the source (its ``_kombu.binding.*`` sets)."""
        found: set[str] = set()
        pattern = f"{self.key_prefix}{KOMBU_BINDINGS}*"
        for key in self.source.scan_iter(match=pattern, count=1000):
            for member in self.source.smembers(key):
                parts = _text(member).split(KOMBU_SEP)
                if len(parts) == 3 and parts[2]:
                    found.add(parts[2])
        return sorted(found)

    def lists(self, queue: str) -> list[tuple[str, int]]:
        """The source LISTs of ``queue`` that hold messages, with their lengths."""
        names = [f"{self.key_prefix}{queue}"]
        names += [f"{self.key_prefix}{queue}{KOMBU_SEP}{n}" for n in KOMBU_BUCKETS]
        pipe = self.source.pipeline(transaction=False)
        for name in names:
            pipe.type(name)
        kinds = pipe.execute()
        present = [name for name, kind in zip(names, kinds, strict=True) if _text(kind) == "list"]
        pipe = self.source.pipeline(transaction=False)
        for name in present:
            pipe.llen(name)
        return list(zip(present, (int(n) for n in pipe.execute()), strict=True))

    def run(
        self,
        queues: Iterable[str],
        *,
        include_unacked: bool = False,
        dry_run: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Report:
        """Move every waiting message of ``queues`` (and, with ``include_unacked``, those
        kombu consumers hold); ``progress(n)`` is told as messages are handled."""
        report = Report(dry_run=dry_run)
        wanted = list(queues)
        for queue in wanted:
            for name, length in self.lists(queue):
                report.of(queue).waiting += length
                if not dry_run:
                    self._drain(queue, name, report.of(queue), progress)
        if include_unacked:
            self._unacked(set(wanted), report, dry_run, progress)
        return report

    def _drain(
        self, queue: str, name: str, report: QueueReport, progress: Callable[[int], None] | None
    ) -> None:
        """Oldest first (kombu pops at the right): publish, then remove that very entry."""
        while (value := self.source.lindex(name, -1)) is not None:
            raw = value if isinstance(value, bytes) else value.encode()
            self._move(queue, raw, report)
            # redis-py types LREM's value as str; the exact bytes are what must match.
            self.source.lrem(name, -1, cast(Any, raw))
            if progress is not None:
                progress(1)

    def _unacked(
        self,
        queues: set[str],
        report: Report,
        dry_run: bool,
        progress: Callable[[int], None] | None,
    ) -> None:
        held = self.source.hgetall(f"{self.key_prefix}{KOMBU_UNACKED}")
        for tag, entry in held.items():
            try:
                message, exchange, routing_key = json.loads(entry)
                raw = json.dumps(message)
            except (ValueError, TypeError):
                continue  # not kombu's: leave it where it is
            queue = routing_key if not exchange else self._bound_queue(exchange, routing_key)
            if queue is None or queue not in queues:
                continue
            report.of(queue).waiting += 1
            if dry_run:
                continue
            self._move(queue, raw.encode(), report.of(queue))
            pipe = self.source.pipeline(transaction=True)
            pipe.hdel(f"{self.key_prefix}{KOMBU_UNACKED}", tag)
            pipe.zrem(f"{self.key_prefix}{KOMBU_UNACKED_INDEX}", tag)
            pipe.execute()
            if progress is not None:
                progress(1)

    def _bound_queue(self, exchange: str, routing_key: str) -> str | None:
        for member in self.source.smembers(f"{self.key_prefix}{KOMBU_BINDINGS}{exchange}"):
            parts = _text(member).split(KOMBU_SEP)
            if len(parts) == 3 and parts[0] == routing_key:
                return parts[2]
        return None

    def _move(self, queue: str, raw: bytes, report: QueueReport) -> None:
        """Publish one source message into ``queue`` (unique: never stored twice)."""
        try:
            message = json.loads(raw)
            if not isinstance(message, dict):
                raise ValueError("not a kombu message")
        except (ValueError, UnicodeDecodeError):
            # Kept, not dropped: a celery-msg consumer dead-letters it as undecodable.
            report.undecodable += 1
            message = {}
        due = due_ms(message)
        created = self.broker.publish_once(
            queue,
            message_id(message),
            raw,
            band_of(message, self.default_priority, self.priority_order),
            due_ms=due,
        )
        if not created:
            report.already_there += 1
            return
        report.moved += 1
        if due > self.broker.now_ms():
            report.scheduled += 1


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
