"""Groups, chunks and chord headers publish in bulk once ``configure()`` ran: pinned against
Celery's own code paths (``group._apply_tasks``), and run through a real ``celery worker``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import chord, group
from celery.signals import after_task_publish, before_task_publish
from celery_app.settings import DEFAULT_QUEUE
from celery_app.tasks import runs_key
from celery_helpers import StackFactory

import celery_msg
from celery_msg.bulk_publish import bulk_buffer


@pytest.fixture
def published() -> Iterator[list[tuple[str, bool]]]:
    """(signal, whether a bulk block was open) for every task publish of this test."""
    seen: list[tuple[str, bool]] = []

    def before(sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
        seen.append(("before", bulk_buffer({"headers": {"task": sender}}) is not None))

    def after(sender: Any = None, **kwargs: Any) -> None:
        seen.append(("after", bulk_buffer({"headers": {"task": sender}}) is not None))

    before_task_publish.connect(before, weak=False)
    after_task_publish.connect(after, weak=False)
    yield seen
    before_task_publish.disconnect(before)
    after_task_publish.disconnect(after)


def in_bulk(seen: list[tuple[str, bool]], n: int) -> bool:
    """Every one of ``n`` tasks sent both signals, each inside a bulk block."""
    return seen == [("before", True), ("after", True)] * n


def test_a_groups_tasks_are_published_inside_a_bulk_block_by_celerys_own_code(
    make_stack: StackFactory, published: list[tuple[str, bool]]
):
    stack = make_stack()
    add = stack.task("add")
    result = group(add.s(i, i) for i in range(30)).apply_async()
    assert in_bulk(published, 30)
    # All stored when apply_async returned, under the ids of the group's results.
    stored = stack.redis.hkeys(stack.broker.keys(DEFAULT_QUEUE).body)
    assert sorted(k.decode() for k in stored) == sorted(r.id for r in result.results)


def test_chunks_and_a_chord_header_are_published_inside_a_bulk_block(
    make_stack: StackFactory, published: list[tuple[str, bool]]
):
    stack = make_stack()
    add, tsum = stack.task("add"), stack.task("tsum")
    add.chunks([(i, i) for i in range(20)], 5).apply_async()
    assert in_bulk(published, 4)
    published.clear()
    chord(add.s(i, i) for i in range(10))(tsum.s())
    assert in_bulk(published, 10)  # the body is sent by the worker when the header is done
    assert stack.broker.counts(DEFAULT_QUEUE)["ready"] == 14


def test_an_app_not_configured_publishes_its_groups_one_by_one(
    make_stack: StackFactory, published: list[tuple[str, bool]]
):
    stack = make_stack(configure=False)
    group(stack.task("add").s(i, i) for i in range(3)).apply_async()
    assert published == [("before", False), ("after", False)] * 3


def test_a_group_of_10000_tasks_runs_every_task_once_through_a_real_worker(
    make_stack: StackFactory,
):
    stack = make_stack(prefetch_multiplier=100)
    result = group(stack.task("counted").s(i) for i in range(10_000)).apply_async()
    stack.worker()
    assert result.get(timeout=180) == list(range(10_000))
    runs = {k.decode(): int(v) for k, v in stack.redis.hgetall(runs_key(stack.settings)).items()}
    assert runs == {r.id: 1 for r in result.results}
    stack.settled(DEFAULT_QUEUE, timeout=30)


def test_a_chord_of_bulk_published_tasks_completes(make_stack: StackFactory):
    stack = make_stack()
    add, tsum = stack.task("add"), stack.task("tsum")
    stack.worker()
    assert chord(add.s(i, i) for i in range(200))(tsum.s()).get(timeout=60) == 2 * sum(range(200))
    chunked = add.chunks([(i, 1) for i in range(100)], 10).apply_async()
    assert sum(sum(part) for part in chunked.get(timeout=60)) == sum(range(100)) + 100


def test_the_tasks_of_a_block_take_one_producer_from_the_apps_pool(make_stack: StackFactory):
    # Celery's send_task takes a producer from the pool per task (producer_or_acquire) unless
    # given one; inside a block the configured app hands out one, held for the block's life.
    stack = make_stack()
    add, pool = stack.task("add"), stack.app.producer_pool
    add.delay(0, 0)  # the pool is made and connected outside the count
    taken: list[object] = []
    acquire = pool.acquire

    def counting_acquire(*args: Any, **kwargs: Any) -> Any:
        taken.append(producer := acquire(*args, **kwargs))
        return producer

    pool.acquire = counting_acquire
    with celery_msg.bulk(stack.app):
        for i in range(20):
            add.delay(i, i)
        group(add.s(i, i) for i in range(5)).apply_async()
    assert len(taken) == 1
    for i in range(3):
        add.delay(i, i)
    assert len(taken) == 4  # outside a block: one per task, as Celery does
    assert stack.broker.counts(DEFAULT_QUEUE)["ready"] == 1 + 25 + 3
