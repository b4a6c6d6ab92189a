"""Celery's side of bulk publishing, installed by :func:`celery_msg.configure`.

1. Groups publish in bulk: every ``group(...).apply_async()`` of a configured app (so also
   ``chunks``, ``starmap`` over a group, and the header of a ``chord``) publishes its tasks
   inside one :func:`celery_msg.bulk` block.
2. Inside a block, the app's ``producer_or_acquire()`` (what ``Task.apply_async`` /
   ``send_task`` call to get a producer) hands out one producer of the app's pool, held for
   the block's life, instead of taking one from the pool and giving it back per task.
3. In or out of a block, the pool's producers are :class:`~celery_msg.producer.DeclaringProducer`
   s: a queue kombu has cached as declared costs no bound copies per publish.
4. In or out of a block, the app's settings are a :class:`~celery_msg.settings.FastSettings`:
   Celery's own answers, without the ``KeyError`` per spelling and map of every read.
5. Task messages' ``argsrepr`` / ``kwargsrepr`` are written by
   :func:`celery_msg.reprs.saferepr`: Celery's text, through ``repr`` for flat arguments.
6. Inside a block, tasks sent one by one (``.delay()``, ``apply_async``, ``send_task``) go
   through the app's own ``send_task`` (:mod:`celery_msg.send_template`), which derives their
   messages past the first two of each shape, as a group's are.

The hook is Celery's ``group._apply_tasks``: the generator ``group.apply_async`` exhausts (with
``list``) to publish the group's tasks one by one with one producer, after freezing them (ids,
group id, chord size) and before building the ``GroupResult``. Wrapped in a bulk block, the
messages reach Redis in pipelined batches, all of them before ``apply_async`` returns; and past
the first two tasks of each shape, a task's message is derived from the one Celery built
(:mod:`celery_msg.group_template`, which says when and how that is shown equal to Celery's),
instead of built again by ``Task.apply_async`` -> ``amqp.send_task_message``. Celery's loop
itself (freezing, results, barrier, chord size) is unchanged.

What this relies on is pinned by ``tests/integration/test_bulk_groups.py`` (a group's, a
chunk's and a chord header's tasks are published inside the block, in Celery's own code; the
tasks of a block take one producer from the pool): an upgrade that renames or stops using
``_apply_tasks`` or ``producer_or_acquire`` fails those tests, and :func:`install` logs a
warning instead of wrapping something else.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

from celery import Celery
from celery.canvas import group

from .bulk_publish import bulk, current_buffer, uses_celery_msg
from .group_template import GroupPublisher, publisher_for
from .producer import adopt
from .reprs import install as install_reprs
from .send_template import install as install_send_task
from .settings import adopt as adopt_settings

logger = logging.getLogger(__name__)

_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_MARK = "__celery_msg_bulk__"
_last = threading.local()


def last_publisher() -> GroupPublisher | None:
    """The publisher of this thread's last group published in bulk (its ``derived`` count says
    how many of its messages were derived), None where they were all built by Celery; for
    tests and benchmarks."""
    publisher: GroupPublisher | None = getattr(_last, "publisher", None)
    return publisher


def install(app: Celery) -> None:
    """Publish ``app``'s groups in bulk (wraps ``group._apply_tasks`` once per process), hold
    one producer per bulk block (wraps ``app.producer_or_acquire``) and derive the messages of
    tasks sent one by one in a block (``app.send_task``)."""
    _hold_producer(app)
    install_send_task(app)
    install_reprs()
    original = getattr(group, "_apply_tasks", None)
    if original is None:
        logger.warning(
            "celery.canvas.group has no _apply_tasks (a Celery version celery-msg does not "
            "know): groups are published one task at a time"
        )
        return
    _apps.add(app)
    if not getattr(original, _MARK, False):
        wrapped = _bulk_apply_tasks(original)
        setattr(wrapped, _MARK, True)
        group._apply_tasks = wrapped


def _hold_producer(app: Celery) -> None:
    original = app.producer_or_acquire
    if getattr(original, _MARK, False):
        return

    def acquire() -> Any:
        pool = app.producer_pool
        adopt(pool)
        return pool.acquire(block=True, timeout=app.conf.broker_pool_acquire_timeout)

    def producer_or_acquire(producer: Any = None) -> Any:
        adopt_settings(app)  # again: Celery makes a new settings object when it finalizes
        if producer is None:
            buffer = current_buffer()
            if buffer is None:
                adopt(app.producer_pool)
                return original(producer)
            producer = buffer.hold(app, acquire, _release)
        # What Celery's FallbackContext does with a given producer (yields it, releases
        # nothing), without reading the configuration for every task (a group's are given one).
        return nullcontext(producer)

    setattr(producer_or_acquire, _MARK, True)
    app.producer_or_acquire = producer_or_acquire


def _release(producer: Any) -> None:
    producer.release()


def uninstall(app: Celery) -> None:
    """Publish ``app``'s groups one task at a time again."""
    _apps.discard(app)


def _bulk_apply_tasks(original: Any) -> Any:
    @functools.wraps(original)
    def _apply_tasks(
        self: Any, tasks: Any, producer: Any = None, app: Any = None, *args: Any, **kwargs: Any
    ) -> Iterator[Any]:
        target = app or self.app
        if target not in _apps or not uses_celery_msg(target):
            yield from original(self, tasks, producer, app, *args, **kwargs)
            return
        with bulk(target) as buffer:
            publisher = _last.publisher = publisher_for(target, buffer)
            if publisher is not None:
                tasks = publisher.tasks(tasks)
            yield from original(self, tasks, producer, app, *args, **kwargs)

    return _apply_tasks
