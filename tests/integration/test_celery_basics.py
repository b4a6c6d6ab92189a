"""A real ``celery worker`` runs tasks through celery-msg: results, routing, priority, canvas."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

import pytest
from celery import chord, group
from celery_app.settings import DEFAULT_QUEUE, SECOND_QUEUE
from celery_helpers import Stack, StackFactory

from celery_msg.core import State
from celery_msg.deadletters import DeadLetters

if TYPE_CHECKING:
    pass


def test_add_delay_returns_the_sum_through_a_real_worker(stack: Stack):
    stack.worker()
    assert stack.task("add").delay(2, 3).get(timeout=10) == 5
    stack.settled(DEFAULT_QUEUE)


def test_a_failing_task_reports_its_error_and_lands_in_the_dead_letter_store(stack: Stack):
    # No policy declared: the built-in one keeps failed tasks as dead letters (ack mode as the
    # task says: Celery's default acks on receipt, so a copy is stored).
    stack.worker()
    result = stack.task("fail").delay("boom")
    with pytest.raises(ValueError, match=r"^boom$"):
        result.get(timeout=10)
    assert result.state == "FAILURE"
    stack.settled(DEFAULT_QUEUE, dead=1)
    [dead] = DeadLetters(stack.broker).iter()
    assert (dead.id, dead.queue, dead.reason, dead.detail) == (
        result.id,
        DEFAULT_QUEUE,
        "failed",
        "ValueError: boom",
    )
    assert dead.exc_type == "builtins.ValueError" and dead.exc_message == "boom"
    assert dead.task == "fail"
    assert "raise ValueError" in (dead.traceback or "")
    assert dead.headers["id"] == result.id and dead.deliveries == 1
    assert dead.first_failure == dead.last_failure > 0


def test_apply_async_with_queue_and_priority_reaches_the_worker_of_that_queue(stack: Stack):
    worker = stack.worker(queues=[SECOND_QUEUE])
    result = stack.task("describe").apply_async(queue=SECOND_QUEUE, priority=7)
    described = result.get(timeout=10)
    assert described["hostname"] == worker.nodename
    assert described["routing_key"] == SECOND_QUEUE
    assert described["priority"] == 7


def test_higher_priority_messages_are_run_first(make_stack: StackFactory):
    stack = make_stack(prefetch_multiplier=1)
    record_now = stack.task("record_now")
    for priority in (0, 3, 9, 3, 0, 9):
        record_now.apply_async(args=[f"p{priority}"], priority=priority)
    stack.worker()  # solo, prefetch 1: one message at a time, in the order the broker serves
    starts = stack.wait_for_events("start", 6, timeout=15)
    assert [e.label for e in starts] == ["p9", "p9", "p3", "p3", "p0", "p0"]


def test_a_solo_worker_reserves_the_next_batch_ahead_and_never_holds_more_than_its_prefetch(
    make_stack: StackFactory,
):
    # Prefetch 4. Without reading ahead a solo worker drains its batch, then refills: every
    # fourth task runs with only itself leased. With the next reserve sent before the last
    # task of a batch runs, that task runs beside the next batch: still never more than 4.
    stack = make_stack(prefetch_multiplier=4)
    held_now = stack.task("held_now")
    n = 200
    for i in range(n):
        held_now.delay(str(i))
    stack.worker()
    starts = stack.wait_for_events("start", n, timeout=60)
    labels, leased = zip(*(e.label.split(":") for e in starts), strict=True)
    assert sorted(labels, key=int) == [str(i) for i in range(n)]  # each ran once
    held = [int(x) for x in leased]
    assert max(held) == 4
    alone = sum(1 for x in held[: n - 4] if x == 1)
    assert alone < n // 8, f"{alone} of {n - 4} tasks ran with nothing reserved beside them"
    stack.settled(DEFAULT_QUEUE)


def test_task_routes_send_a_task_to_the_second_queue_and_only_its_consumer_runs_it(
    stack: Stack,
):
    worker = stack.worker(queues=[SECOND_QUEUE])
    described = stack.task("routed").delay().get(timeout=10)
    assert described["hostname"] == worker.nodename
    assert described["routing_key"] == SECOND_QUEUE
    # An unrouted task goes to the default queue, which this worker does not consume.
    stack.task("add").delay(1, 1)
    stack.settled(SECOND_QUEUE)
    assert stack.broker.counts(DEFAULT_QUEUE) == {
        "ready": 1,
        "reserved": 0,
        "scheduled": 0,
        "dead": 0,
    }


def test_group_and_chord_collect_their_results_through_the_redis_backend(stack: Stack):
    stack.worker(pool="prefork", concurrency=2)
    add, tsum = stack.task("add"), stack.task("tsum")
    assert group(add.s(i, i) for i in range(5)).delay().get(timeout=20) == [0, 2, 4, 6, 8]
    assert chord(add.s(i, i) for i in range(5))(tsum.s()).get(timeout=20) == 20


def test_lookup_by_task_id_shows_the_running_task_reserved_then_nothing_once_acked(
    stack: Stack,
):
    worker = stack.worker()
    result = stack.task("sleep_then_record").delay(2.0, "looked-up")
    stack.wait_for_events("start", 1, timeout=10)
    (info,) = stack.broker.lookup(result.id)
    assert info.id == result.id
    assert info.key == result.id  # task id = message id = key in its queue
    assert info.queue == DEFAULT_QUEUE
    assert info.state is State.RESERVED
    assert info.deliveries == 1
    assert info.owner is not None
    assert info.owner.startswith(f"{socket.gethostname()}:{worker.pid}:")
    assert result.get(timeout=10) == "looked-up"
    stack.settled(DEFAULT_QUEUE)  # the ack follows the result by one round trip
    assert stack.broker.lookup(result.id) == []


def test_an_idle_worker_uses_under_five_percent_of_a_core(stack: Stack):
    # A sanity check, not a benchmark: an idle consumer blocks in BLPOP between sweeps.
    worker = stack.worker(pool="prefork", concurrency=2)
    stack.task("add").delay(1, 2).get(timeout=10)  # the consumer has run a full cycle
    before = worker.cpu_seconds()
    started = time.monotonic()
    time.sleep(5.0)
    elapsed = time.monotonic() - started
    used = worker.cpu_seconds() - before
    assert used / elapsed < 0.05, f"idle worker used {used:.2f}s of CPU in {elapsed:.1f}s"
