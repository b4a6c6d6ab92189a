"""A small Python API over a Celery app's broker: look a message up by ID, count queues.

It reuses the app's own broker URL and transport options, so it reads the same keys as the
workers. The CLI and dashboard of later issues build on these functions.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery

from .core import Broker, MessageInfo
from .deadletters import DeadFilter, DeadLetters, DeadMessage
from .errors import ConfigurationError
from .outcome import broker_of


@contextmanager
def broker_for(app: Celery) -> Iterator[Broker]:
    """The :class:`~celery_msg.core.Broker` of ``app``'s celery-msg connection."""
    with app.connection_for_write() as conn:
        broker = broker_of(conn)
        if broker is None:
            raise ConfigurationError(
                f"broker_url of app {app.main!r} does not use celery-msg:// "
                f"(transport is {type(conn.transport).__module__})"
            )
        yield broker


def lookup(app: Celery, message_id: str) -> list[MessageInfo]:
    """Every stored instance of ``message_id`` (a Celery task id) in any queue of ``app``.

    Each :class:`~celery_msg.core.MessageInfo` gives state (READY, RESERVED, DEAD), queue,
    delivery count, lease owner and deadline. Acked messages leave no trace: ``[]``.
    """
    with broker_for(app) as broker:
        return broker.lookup(message_id)


def queue_counts(app: Celery) -> dict[str, dict[str, int]]:
    """READY / RESERVED / DEAD counts of every queue ``app``'s broker knows."""
    with broker_for(app) as broker:
        return {queue: broker.counts(queue) for queue in broker.queues()}


def dead_letters(
    app: Celery, where: DeadFilter | None = None, limit: int = 1000
) -> list[DeadMessage]:
    """Up to ``limit`` dead messages of ``app``'s queues matching ``where``, oldest first per
    queue; each carries its reason, exception, traceback, failure times and the whole message."""
    with broker_for(app) as broker:
        return list(itertools.islice(DeadLetters(broker).iter(where), limit))


def replay(app: Celery, messages: list[DeadMessage]) -> int:
    """Put dead messages back at the end of their queues, each at most once; returns how many
    were replayed (ones replayed or purged meanwhile are skipped)."""
    with broker_for(app) as broker:
        return DeadLetters(broker).replay(messages)
