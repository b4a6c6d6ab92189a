"""A real ``celery worker`` under faults: SIGKILL mid-task, tasks longer than their lease,
warm shutdown with prefetched messages, and Redis restarted under the worker."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pytest
from celery_app.settings import DEFAULT_QUEUE
from celery_helpers import StackFactory, stack_factory, wait_until

from celery_msg.core import State
from celery_msg.errors import PoisonMessage

if TYPE_CHECKING:
    from conftest import Server


#: Seconds Redis is down: within redis-py's own reconnect retries, or long enough that the
#: consumer loses its connection and Celery reconnects (and leases of running tasks expire).
SHORT_OUTAGE, LONG_OUTAGE = 1.5, 8.0


@pytest.mark.slow
def test_tasks_of_a_sigkilled_worker_all_complete_on_a_new_worker_within_the_lease(
    make_stack: StackFactory,
):
    lease, sweep = 3.0, 0.5
    stack = make_stack(lease_timeout=lease, sweep_interval=sweep, prefetch_multiplier=2)
    sleeper = stack.task("sleep_then_record")
    # prefork -c 2 with prefetch multiplier 2 reserves 4: two running, two prefetched.
    results = [sleeper.delay(2.0, f"t{i}") for i in range(4)]
    ids = {r.id for r in results}
    doomed = stack.worker(pool="prefork", concurrency=2)
    stack.wait_for_events("start", 2, timeout=15)
    assert stack.broker.counts(DEFAULT_QUEUE) == {
        "ready": 0,
        "reserved": 4,
        "scheduled": 0,
        "dead": 0,
    }

    doomed.kill()
    killed_at = time.time()
    assert stack.events("finish") == []
    # Threads start every reclaimed task at once, so start times measure redelivery alone.
    survivor = stack.worker(pool="threads", concurrency=4)
    ready_after = time.time() - killed_at

    stack.wait_for_tasks("finish", ids, timeout=lease + 15)
    assert sorted(r.get(timeout=10) for r in results) == ["t0", "t1", "t2", "t3"]
    stack.settled(DEFAULT_QUEUE)
    finishes = stack.events("finish")
    assert Counter(e.task for e in finishes) == Counter(ids)  # each finished exactly once
    assert {e.worker for e in finishes} == {survivor.nodename}
    starts = stack.events("start")
    assert len([e for e in starts if e.worker == doomed.nodename]) == 2
    redelivered = [e for e in starts if e.worker == survivor.nodename]
    assert Counter(e.task for e in redelivered) == Counter(ids)
    latest = lease + sweep + ready_after + 1.0
    # The dead worker renewed every lease/3, so no lease can have ended before 2/3 of it.
    earliest = lease * 2 / 3 - 0.2
    for event in redelivered:
        assert earliest <= event.time - killed_at <= latest, (event, earliest, latest)


@pytest.mark.slow
def test_a_task_that_kills_its_worker_is_dead_lettered_as_poison_not_run_again(
    make_stack: StackFactory,
):
    stack = make_stack(lease_timeout=2.0, sweep_interval=0.25, max_deliveries=1)
    killer = stack.task("die").delay()
    first = stack.worker()
    assert first.wait_exit(10) == -9  # SIGKILLed by its own task
    second = stack.worker()
    (dead,) = wait_until(
        lambda: stack.broker.dead_letters(DEFAULT_QUEUE) or None, 10, "a dead letter"
    )
    assert dead.id == killer.id
    assert dead.dead_reason is not None and dead.dead_reason["reason"] == "poison"
    assert [e.worker for e in stack.events("start")] == [first.nodename]
    assert second.running
    # The transport option becomes the app's default policy: the result backend learns of it.
    with pytest.raises(PoisonMessage, match="without an ack"):
        killer.get(timeout=10)
    assert stack.task("add").delay(1, 2).get(timeout=10) == 3
    stack.settled(DEFAULT_QUEUE, dead=1)


@pytest.mark.slow
def test_a_task_running_three_leases_runs_exactly_once_with_two_workers_on_its_queue(
    make_stack: StackFactory,
):
    stack = make_stack(lease_timeout=2.0, sweep_interval=0.25)
    sleeper = stack.task("sleep_then_record")
    first = stack.worker()
    second = stack.worker()
    results = [sleeper.delay(6.0, "long-a"), sleeper.delay(6.0, "long-b")]
    assert sorted(r.get(timeout=20) for r in results) == ["long-a", "long-b"]
    starts = stack.events("start")
    assert Counter(e.task for e in starts) == Counter(r.id for r in results)
    assert {e.worker for e in starts} == {first.nodename, second.nodename}
    stack.settled(DEFAULT_QUEUE)
    for worker in (first, second):
        assert "lease lost" not in worker.log()


@pytest.mark.slow
def test_messages_prefetched_behind_a_long_task_on_a_solo_worker_are_not_redelivered(
    make_stack: StackFactory,
):
    # A solo worker runs each task inside the delivery callback; the messages it prefetched
    # with the long one wait meanwhile and their leases must be renewed like the running one's.
    stack = make_stack(lease_timeout=2.0, sweep_interval=0.25, prefetch_multiplier=4)
    sleeper = stack.task("sleep_then_record")
    long_task = sleeper.delay(6.0, "long")
    short = [sleeper.delay(0.1, f"short{i}") for i in range(3)]
    holder = stack.worker()
    stack.wait_for_events("start", 1, timeout=10)
    assert stack.broker.counts(DEFAULT_QUEUE) == {
        "ready": 0,
        "reserved": 4,
        "scheduled": 0,
        "dead": 0,
    }
    other = stack.worker()  # would take any lease that expires

    assert long_task.get(timeout=20) == "long"
    assert sorted(r.get(timeout=20) for r in short) == ["short0", "short1", "short2"]
    stack.settled(DEFAULT_QUEUE)
    starts = stack.events("start")
    assert Counter(e.task for e in starts) == Counter([long_task.id, *(r.id for r in short)])
    assert {e.worker for e in starts} == {holder.nodename}
    assert "lease lost" not in holder.log() + other.log()


@pytest.mark.slow
def test_warm_shutdown_returns_prefetched_unstarted_messages_to_ready_at_once(
    make_stack: StackFactory,
):
    stack = make_stack(lease_timeout=30.0, prefetch_multiplier=4)
    sleeper = stack.task("sleep_then_record")
    long_task = sleeper.delay(2.0, "long")
    short = [sleeper.delay(0.1, f"short{i}") for i in range(3)]
    worker = stack.worker()  # solo: runs "long", holds the three others prefetched
    stack.wait_for_events("start", 1, timeout=10)
    assert stack.broker.counts(DEFAULT_QUEUE) == {
        "ready": 0,
        "reserved": 4,
        "scheduled": 0,
        "dead": 0,
    }

    worker.terminate()
    assert worker.wait_exit(15) == 0
    # The running task was allowed to finish; the prefetched ones are READY now, long before
    # their 30 s lease would have expired, and not counted as delivered.
    assert [(e.event, e.label) for e in stack.events()] == [("start", "long"), ("finish", "long")]
    assert stack.broker.counts(DEFAULT_QUEUE) == {
        "ready": 3,
        "reserved": 0,
        "scheduled": 0,
        "dead": 0,
    }
    for result in short:
        (info,) = stack.broker.lookup(result.id)
        assert (info.state, info.deliveries) == (State.READY, 0)

    stack.worker()
    assert sorted(r.get(timeout=10) for r in short) == ["short0", "short1", "short2"]
    starts = stack.events("start")
    assert Counter(e.task for e in starts) == Counter([long_task.id, *(r.id for r in short)])
    stack.settled(DEFAULT_QUEUE)


@pytest.mark.slow
@pytest.mark.parametrize("outage", [SHORT_OUTAGE, LONG_OUTAGE], ids=["short-outage", "long-outage"])
def test_tasks_sent_before_during_and_after_a_redis_restart_all_complete(
    server_factory: Callable[..., Server], prefix: str, tmp_path: Path, outage: float
):
    server = server_factory(appendonly=True, appendfsync="always")
    with stack_factory(server.url, prefix, tmp_path) as make:
        stack = make(lease_timeout=3.0, sweep_interval=0.5)
        sleeper = stack.task("sleep_then_record")
        worker = stack.worker(pool="prefork", concurrency=2)
        # ignore_result: completion is read from the event list; a result subscription would
        # outlive this server and retry reconnecting at teardown.
        before = [sleeper.apply_async([1.0, f"before{i}"], ignore_result=True) for i in range(4)]
        stack.wait_for_events("start", 1, timeout=10)

        server.process.kill()
        during: list[str] = []
        retry = {
            "max_retries": 100,
            "interval_start": 0.1,
            "interval_step": 0.1,
            "interval_max": 0.3,
        }

        def publish_while_down() -> None:
            for i in range(3):
                result = sleeper.apply_async(
                    args=[0.2, f"during{i}"], retry=True, retry_policy=retry, ignore_result=True
                )
                during.append(result.id)

        publisher = threading.Thread(target=publish_while_down)
        publisher.start()
        time.sleep(outage)
        server.process.restart()
        publisher.join(30)
        assert not publisher.is_alive()
        after = [sleeper.apply_async([0.2, f"after{i}"], ignore_result=True) for i in range(3)]

        ids = [*(r.id for r in before), *during, *(r.id for r in after)]
        assert len(ids) == 10
        # At least once: a task running through a long outage outlives its lease and runs again.
        stack.wait_for_tasks("finish", ids, timeout=40)
        stack.settled(DEFAULT_QUEUE, timeout=15)
        if outage == LONG_OUTAGE:
            assert worker.log().count("Connected to celery-msg://") == 2


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["solo", "prefork", "threads"])
def test_a_sigkill_reruns_only_the_running_task_not_the_finished_prefetched_ones(
    make_stack: StackFactory, pool: Literal["solo", "prefork", "threads"]
):
    """Acks are written when a task finishes, not with the next fetch: a solo worker runs its
    whole prefetched batch inline before it fetches again, and used to lose those acks (each
    finished task ran again after a SIGKILL: 3.9 per kill in bench/chaos.py)."""
    lease = 6.0  # the renewer (every lease/3) must not be what writes the acks in time
    stack = make_stack(lease_timeout=lease, sweep_interval=0.25, prefetch_multiplier=4)
    sleeper = stack.task("sleep_then_record")
    quick = [sleeper.delay(0.05, f"q{i}") for i in range(3)]
    slow = sleeper.delay(4.0, "slow")
    # Concurrency 1: one reserve round takes all four, and they run one after another.
    doomed = stack.worker(pool=pool, concurrency=1)
    stack.wait_for_tasks("start", [slow.id], timeout=20)
    counts = wait_until(
        lambda: (c := stack.broker.counts(DEFAULT_QUEUE))["reserved"] == 1 and c,
        0.5,
        "only the running task still reserved (the finished ones acked)",
        interval=0.01,
    )
    assert counts == {"ready": 0, "reserved": 1, "scheduled": 0, "dead": 0}
    doomed.kill()

    stack.worker(pool="threads", concurrency=2)
    assert slow.get(timeout=lease + 20) == "slow"
    stack.settled(DEFAULT_QUEUE)
    runs = Counter(e.task for e in stack.events("start"))
    assert runs == Counter({**{r.id: 1 for r in quick}, slow.id: 2})


def test_what_a_solo_worker_reserved_ahead_of_a_task_longer_than_the_lease_runs_once(
    make_stack: StackFactory,
):
    """The next reserve goes out before the last reserved task runs (celery_msg.readahead);
    its reply waits, unread, until that task returns, and nobody renews what it leased
    meanwhile. A task longer than the lease lets those leases expire: another worker reclaims
    and runs the message, and the first one must then drop it, not run it a second time."""
    lease = 2.0
    stack = make_stack(lease_timeout=lease, sweep_interval=0.25, prefetch_multiplier=2)
    sleeper = stack.task("sleep_then_record")
    first = sleeper.delay(0.01, "first")
    long = sleeper.delay(2 * lease + 1, "long")
    after = sleeper.delay(0.01, "after")  # reserved ahead while "long" runs
    stack.worker()  # solo, prefetch 2: reserves first and long, then after, ahead
    stack.wait_for_tasks("start", [long.id], timeout=20)
    wait_until(
        lambda: stack.broker.counts(DEFAULT_QUEUE)["ready"] == 0 or None,
        5,
        "the message after the long task reserved ahead",
    )
    stack.worker()  # reclaims "after" once its unrenewed lease expires, and runs it
    stack.wait_for_tasks("finish", [long.id, after.id], timeout=4 * lease + 20)
    stack.settled(DEFAULT_QUEUE, timeout=10)
    runs = Counter(e.task for e in stack.events("start"))
    assert runs == Counter({first.id: 1, long.id: 1, after.id: 1})
    assert "reserved ahead were taken back" in stack.logs()
