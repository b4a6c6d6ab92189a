"""ETA / countdown tasks with a real ``celery worker``: they wait in Redis (SCHEDULED), not in
the worker's memory, start on time, run once each, and survive the worker's SIGKILL."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING

from celery_app.settings import DEFAULT_QUEUE
from celery_helpers import Stack, StackFactory

if TYPE_CHECKING:
    pass


COUNT = 20
#: How late (seconds) a due task may start on a loaded 2-core machine.
LATE = 1.0
LEASE, SWEEP = 2.0, 0.25


def _eta(token: str) -> float:
    return datetime.fromisoformat(token).timestamp()


def _assert_waiting_in_redis(stack: Stack, until: float) -> None:
    """Until ``until`` (epoch seconds), every task is SCHEDULED in Redis and none started."""
    samples = 0
    while time.time() < until:
        counts = stack.broker.counts(DEFAULT_QUEUE)
        assert counts == {"ready": 0, "reserved": 0, "scheduled": COUNT, "dead": 0}, counts
        assert stack.events("start") == []
        samples += 1
        time.sleep(0.1)
    assert samples >= 3


def test_countdown_tasks_wait_in_redis_and_each_starts_once_on_time(make_stack: StackFactory):
    stack = make_stack()
    stack.worker()
    recorder = stack.task("record_eta")
    sent = time.time()
    ids = {recorder.apply_async((f"t{i}",), countdown=2).id for i in range(COUNT)}
    _assert_waiting_in_redis(stack, sent + 1.5)

    starts = stack.wait_for_tasks("start", ids, timeout=10)
    stack.settled(DEFAULT_QUEUE)
    assert Counter(e.task for e in stack.events("start")) == Counter(ids)
    for event in starts:
        lateness = event.time - _eta(event.token)
        assert 0 <= lateness < LATE, (event, lateness)


def test_countdown_tasks_survive_a_sigkill_of_the_worker_while_they_are_scheduled(
    make_stack: StackFactory,
):
    stack = make_stack(lease_timeout=LEASE, sweep_interval=SWEEP)
    doomed = stack.worker()
    recorder = stack.task("record_eta")
    sent = time.time()
    ids = {recorder.apply_async((f"t{i}",), countdown=2.5).id for i in range(COUNT)}
    _assert_waiting_in_redis(stack, sent + 1.0)
    doomed.kill()
    stack.worker()

    starts = stack.wait_for_tasks("start", ids, timeout=10)
    stack.settled(DEFAULT_QUEUE)
    assert Counter(e.task for e in stack.events("start")) == Counter(ids)
    for event in starts:
        assert 0 <= event.time - _eta(event.token) < LATE, event


def test_countdown_tasks_survive_a_sigkill_of_the_worker_while_they_are_due_and_running(
    make_stack: StackFactory,
):
    stack = make_stack(lease_timeout=LEASE, sweep_interval=SWEEP)
    doomed = stack.worker()
    sleeper = stack.task("sleep_then_record")  # acks_late: a killed run is run again
    countdown, seconds, count = 1.0, 0.25, 12
    sent = time.time()
    ids = {sleeper.apply_async((seconds, f"t{i}"), countdown=countdown).id for i in range(count)}
    # Due together; one at a time on the solo worker: kill it with about a third done.
    stack.wait_for_events("finish", 4, timeout=10)
    doomed.kill()
    assert 0 < len(stack.events("finish")) < count
    stack.worker()

    stack.wait_for_tasks("finish", ids, timeout=LEASE + SWEEP + 10)
    stack.settled(DEFAULT_QUEUE)
    finishes = Counter(e.task for e in stack.events("finish"))
    assert finishes == Counter(ids)  # each finished exactly once
    starts = Counter(e.task for e in stack.events("start"))
    # Started once each, except the task that was running when its worker was killed.
    again = {task for task, n in starts.items() if n > 1}
    assert set(starts) == ids and all(n <= 2 for n in starts.values()), starts
    assert len(again) <= 1, starts
    done_by_doomed = {e.task for e in stack.events("finish") if e.worker == doomed.nodename}
    assert not again & done_by_doomed
    assert all(e.time >= sent + countdown for e in stack.events("start"))


def test_inspect_scheduled_lists_the_countdown_tasks_waiting_in_redis_with_their_etas(
    make_stack: StackFactory,
):
    stack = make_stack()
    worker = stack.worker()
    recorder = stack.task("record_eta")
    sent = time.time()
    ids = [recorder.apply_async((f"t{i}",), countdown=60 + i).id for i in range(3)]
    # A payload no worker could read, in the same schedule: left out, never a failed reply.
    stack.broker.publish(
        DEFAULT_QUEUE, "junk", b"\xff not a message", 0, due_ms=int(sent + 61) * 1000
    )
    assert stack.broker.counts(DEFAULT_QUEUE)["scheduled"] == 4

    replies = stack.app.control.inspect(destination=[worker.nodename], timeout=5).scheduled()

    assert replies is not None and list(replies) == [worker.nodename]
    entries = replies[worker.nodename]
    assert [e["request"]["id"] for e in entries] == ids  # soonest first
    headers = {
        info.id: json.loads(info.payload or b"{}")["headers"]
        for info in (stack.broker.get(task_id) for task_id in ids)
    }
    for entry, task_id, countdown in zip(entries, ids, (60, 61, 62), strict=True):
        assert entry["eta"] == headers[task_id]["eta"]
        assert sent + countdown - 1 <= _eta(entry["eta"]) <= time.time() + countdown
        assert entry["request"]["name"] == "record_eta"
        assert entry["request"]["args"] == [f"t{countdown - 60}"]
        assert entry["request"]["hostname"] == worker.nodename
        assert set(entry) == {"eta", "priority", "request"}
    assert stack.events("start") == []
