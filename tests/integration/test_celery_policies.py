"""Policies with a real ``celery worker``: ack modes per queue, poison messages, retry policies,
expired messages and unique publishes (see :mod:`celery_app.policies` for the profiles).

Executions are counted through the task event list (``start`` / ``fail`` / ``finish``), never
inferred from results; crashes are real SIGKILLs, of the solo worker or of a prefork child.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from celery.exceptions import WorkerLostError
from celery_app.errors import Fatal, Transient
from celery_app.policies import EARLY_QUEUE, LATE_QUEUE, ON_SUCCESS_QUEUE
from celery_app.settings import DEFAULT_QUEUE
from celery_helpers import Stack, StackFactory, wait_until

from celery_msg.deadletters import DeadFilter, DeadLetters, DeadMessage
from celery_msg.errors import PoisonMessage
from celery_msg.headers import UNIQUE_HEADER

if TYPE_CHECKING:
    pass


#: Short leases where a redelivery after a crash is awaited.
LEASE, SWEEP = 2.0, 0.25
#: A prefork pool fails the job of a dead child after this (Celery's default: 10 s).
LOST_WAIT = 0.5
ACK_QUEUES = (EARLY_QUEUE, LATE_QUEUE, ON_SUCCESS_QUEUE)


def dead_letters(stack: Stack, queue: str) -> list[DeadMessage]:
    return list(DeadLetters(stack.broker).iter(DeadFilter(queue=queue)))


def runs(stack: Stack, task_id: str, event: str = "start") -> list[float]:
    return [e.time for e in stack.events(event) if e.task == task_id]


# -- ack modes -------------------------------------------------------------------------------


def test_early_ack_a_task_that_kills_its_solo_worker_is_not_run_again(make_stack: StackFactory):
    stack = make_stack(policies="ack_modes", lease_timeout=LEASE, sweep_interval=SWEEP)
    result = stack.task("kill_once").apply_async(("early",), queue=EARLY_QUEUE)
    first = stack.worker(queues=[EARLY_QUEUE])
    assert first.wait_exit(10) == -9  # SIGKILLed by its own task
    # Acked before it ran: no lease is left for a second worker to be handed once it expires.
    stack.settled(EARLY_QUEUE)
    assert stack.broker.lookup(result.id) == []
    assert stack.broker.stats(EARLY_QUEUE).get("acked") == 1
    assert len(runs(stack, result.id)) == 1, stack.logs()


def test_late_ack_a_failure_is_dead_lettered_by_an_atomic_move_and_the_result_is_failure(
    make_stack: StackFactory,
):
    stack = make_stack(policies="ack_modes")
    stack.worker(queues=[LATE_QUEUE])
    result = stack.task("always_fail").apply_async(("late",), queue=LATE_QUEUE)
    with pytest.raises(Transient, match="always late"):
        result.get(timeout=10)
    assert result.state == "FAILURE"
    stack.settled(LATE_QUEUE, dead=1)
    [dead] = dead_letters(stack, LATE_QUEUE)
    assert (dead.id, dead.reason, dead.exc_type) == (
        result.id,
        "failed",
        "celery_app.errors.Transient",
    )
    assert dead.deliveries == 1 and dead.retries == 0
    stats = stack.broker.stats(LATE_QUEUE)
    # Moved while still leased (reject without requeue), never acked and copied.
    assert stats.get("acked", 0) == 0 and stats["dead"] == 1, stats
    assert len(runs(stack, result.id)) == 1


def test_the_same_task_behaves_per_the_ack_mode_of_its_queue_when_its_pool_child_is_killed(
    make_stack: StackFactory,
):
    stack = make_stack(
        policies="ack_modes", lease_timeout=LEASE, sweep_interval=SWEEP, worker_lost_wait=LOST_WAIT
    )
    worker = stack.worker(queues=ACK_QUEUES, pool="prefork", concurrency=1)
    killer = stack.task("kill_once")
    results = {q: killer.apply_async((q,), queue=q) for q in ACK_QUEUES}

    # on_success: the lost child's message is requeued at once and its second run succeeds.
    # One pool process runs the three in turn, and in the event loop Celery's prefork pool
    # may notice a killed child only at its 5 s pool maintenance (its sentinel raced the
    # reaping): up to 3 x 5 s before the second run.
    assert results[ON_SUCCESS_QUEUE].get(timeout=25) == 2
    # early and late: acked (on receipt / when the task ended): the lost run is final.
    for queue in (EARLY_QUEUE, LATE_QUEUE):
        with pytest.raises(WorkerLostError):
            results[queue].get(timeout=15)
        assert results[queue].state == "FAILURE"
    # No lease left behind in any queue (so nothing can be redelivered), then the runs.
    stack.settled(ON_SUCCESS_QUEUE)
    for queue in (EARLY_QUEUE, LATE_QUEUE):
        stack.settled(queue, dead=1)
        [dead] = dead_letters(stack, queue)
        assert (dead.id, dead.reason) == (results[queue].id, "failed")
        assert dead.exc_type == "billiard.exceptions.WorkerLostError", dead
    assert Counter(e.label for e in stack.events("start")) == {
        EARLY_QUEUE: 1,
        LATE_QUEUE: 1,
        ON_SUCCESS_QUEUE: 2,
    }, stack.logs()
    assert [e.label for e in stack.events("finish")] == [ON_SUCCESS_QUEUE]
    assert worker.running
    # early stored a copy of an acked message, late moved the leased one.
    assert stack.broker.stats(EARLY_QUEUE).get("acked", 0) == 1
    assert stack.broker.stats(LATE_QUEUE).get("acked", 0) == 0


# -- poison ----------------------------------------------------------------------------------


def _assert_poison(stack: Stack, task_id: str, result: object) -> None:
    [dead] = wait_until(lambda: dead_letters(stack, DEFAULT_QUEUE) or None, 15, "a dead letter")
    assert (dead.id, dead.reason) == (task_id, "poison"), dead
    with pytest.raises(PoisonMessage):
        result.get(timeout=10)  # type: ignore[attr-defined]
    assert result.state == "FAILURE"  # type: ignore[attr-defined]
    stack.settled(DEFAULT_QUEUE, dead=1)
    assert len(runs(stack, task_id)) == 2  # two deliveries ran, the third never did


def test_a_task_that_kills_its_solo_worker_is_poison_after_two_deliveries(
    make_stack: StackFactory,
):
    stack = make_stack(policies="poison", lease_timeout=LEASE, sweep_interval=SWEEP)
    result = stack.task("kill_always").delay()
    for _ in range(2):
        doomed = stack.worker()
        assert doomed.wait_exit(LEASE + 10) == -9, doomed.log_tail()
    survivor = stack.worker()
    _assert_poison(stack, result.id, result)
    assert survivor.running
    assert stack.task("add").delay(1, 2).get(timeout=10) == 3


def test_a_task_that_kills_its_prefork_child_is_poison_after_two_deliveries(
    make_stack: StackFactory,
):
    stack = make_stack(
        policies="poison", lease_timeout=LEASE, sweep_interval=SWEEP, worker_lost_wait=LOST_WAIT
    )
    worker = stack.worker(pool="prefork", concurrency=1)
    result = stack.task("kill_always").delay()
    _assert_poison(stack, result.id, result)
    assert worker.running
    assert stack.task("add").delay(1, 2).get(timeout=10) == 3


# -- retry policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("queue", [DEFAULT_QUEUE, LATE_QUEUE, ON_SUCCESS_QUEUE])
def test_a_task_failing_twice_succeeds_on_its_third_run_each_retry_after_the_backoff(
    make_stack: StackFactory, queue: str
):
    stack = make_stack(policies="retry")
    stack.worker(queues=[queue])
    result = stack.task("attempt").apply_async((2, queue), queue=queue)
    assert result.get(timeout=15) == 3
    assert result.state == "SUCCESS"
    starts, fails = runs(stack, result.id), runs(stack, result.id, "fail")
    assert len(starts) == 3 and len(fails) == 2, stack.events()
    for failed, retried in zip(fails, starts[1:], strict=True):
        assert retried - failed >= 0.5, (starts, fails)
    stack.settled(queue)


@pytest.mark.parametrize("queue", [DEFAULT_QUEUE, LATE_QUEUE, ON_SUCCESS_QUEUE])
def test_a_task_that_always_fails_runs_max_retries_plus_one_then_is_dead_lettered_once(
    make_stack: StackFactory, queue: str
):
    stack = make_stack(policies="retry")
    stack.worker(queues=[queue])
    result = stack.task("always_fail").apply_async((queue,), queue=queue)
    with pytest.raises(Transient):
        result.get(timeout=15)
    assert result.state == "FAILURE"
    stack.settled(queue, dead=1)  # dead-lettered, nothing left queued: no fourth run can come
    fails = runs(stack, result.id, "fail")
    assert len(runs(stack, result.id)) == 3 and len(fails) == 3
    [dead] = dead_letters(stack, queue)
    assert (dead.id, dead.reason, dead.retries) == (result.id, "failed", 2)
    assert dead.exc_type == "celery_app.errors.Transient"
    assert dead.first_failure < dead.last_failure
    # The record spans the retries: from the first failure to the last.
    assert fails[0] - 0.05 <= dead.first_failure <= fails[1], (dead, fails)
    assert fails[2] - 0.05 <= dead.last_failure <= fails[2] + 1.0, (dead, fails)


def test_an_exception_in_give_up_on_is_not_retried_and_is_dead_lettered_at_once(
    make_stack: StackFactory,
):
    stack = make_stack(policies="retry")
    stack.worker(queues=[LATE_QUEUE])
    result = stack.task("fatal").apply_async(("x",), queue=LATE_QUEUE)
    with pytest.raises(Fatal):
        result.get(timeout=10)
    stack.settled(LATE_QUEUE, dead=1)  # dead at once, nothing queued for a retry
    assert len(runs(stack, result.id)) == 1
    [dead] = dead_letters(stack, LATE_QUEUE)
    assert (dead.id, dead.reason, dead.retries) == (result.id, "failed", 0)
    assert dead.exc_type == "celery_app.errors.Fatal"


def test_a_task_with_celerys_own_autoretry_for_is_retried_by_celery_only(
    make_stack: StackFactory,
):
    # The default policy would allow 5 retries; the task's retry_kwargs say 2.
    stack = make_stack(policies="retry")
    stack.worker()
    result = stack.task("autoretry").delay("a")
    with pytest.raises(Transient):
        result.get(timeout=15)
    # Dead-lettered, nothing queued or scheduled: neither mechanism has a retry left to run.
    stack.settled(DEFAULT_QUEUE, dead=1)
    assert len(runs(stack, result.id)) == 3, stack.events()


# -- expired messages ------------------------------------------------------------------------


def _expired_then_another(stack: Stack) -> Any:
    """Publish a task already past its ``expires``, start a worker, and run one queued behind
    it: once that ran, the expired message has been handled. Returns the expired one's result."""
    past = datetime.now(UTC) - timedelta(seconds=5)
    expired = stack.task("record_now").apply_async(("expired",), expires=past)
    stack.worker()
    assert stack.task("record_now").delay("after").get(timeout=10) == "after"
    return expired


def test_an_expired_task_is_not_run_and_is_dead_lettered_as_expired_and_revoked(
    make_stack: StackFactory,
):
    stack = make_stack(policies="expired_dead_lettered")
    expired = _expired_then_another(stack)
    stack.settled(DEFAULT_QUEUE, dead=1)
    assert [e.label for e in stack.events("start")] == ["after"]
    [dead] = dead_letters(stack, DEFAULT_QUEUE)
    assert (dead.id, dead.reason) == (expired.id, "expired")
    assert expired.state == "REVOKED"
    assert stack.broker.stats(DEFAULT_QUEUE).get("expired") == 1


def test_an_expired_task_is_only_counted_when_its_policy_keeps_no_expired_dead_letters(
    make_stack: StackFactory,
):
    stack = make_stack(policies="expired_counted")
    expired = _expired_then_another(stack)
    stack.settled(DEFAULT_QUEUE)  # nothing dead
    assert [e.label for e in stack.events("start")] == ["after"]
    assert stack.broker.stats(DEFAULT_QUEUE).get("expired") == 1
    assert expired.state == "REVOKED"  # Celery's own expiry check


# -- unique ----------------------------------------------------------------------------------


def test_a_unique_task_id_is_published_once_while_pending_and_again_after_it_ran(
    make_stack: StackFactory,
):
    stack = make_stack(policies="unique")
    recorder, add = stack.task("record_now"), stack.task("add")
    task_id = f"unique-{uuid.uuid4().hex}"
    first = recorder.apply_async(("one",), task_id=task_id)
    recorder.apply_async(("two",), task_id=task_id)
    assert stack.broker.counts(DEFAULT_QUEUE)["ready"] == 1
    # Without the policy the same id is stored twice.
    other_id = f"plain-{uuid.uuid4().hex}"
    add.apply_async((1, 1), task_id=other_id)
    add.apply_async((1, 1), task_id=other_id)
    assert stack.broker.counts(DEFAULT_QUEUE)["ready"] == 3

    stack.worker()
    assert first.get(timeout=10) == "one"
    stack.settled(DEFAULT_QUEUE)
    assert [e.label for e in stack.events("start")] == ["one"]

    recorder.apply_async(("three",), task_id=task_id)
    stack.wait_for_events("finish", 2, timeout=10)
    assert [e.label for e in stack.events("start")] == ["one", "three"]
    stack.settled(DEFAULT_QUEUE)


@pytest.mark.parametrize("asked", [True, "start"], ids=["until success", "until start"])
def test_a_task_unique_by_its_own_header_is_unlocked_by_the_worker_without_a_unique_policy(
    make_stack: StackFactory, asked: Any
):
    # No policy names unique ids here: only the message's header asks (the worker's check
    # of a start or a success for an id to unlock must still look at it).
    stack = make_stack()
    recorder = stack.task("record_now")
    task_id = f"asked-{uuid.uuid4().hex}"
    headers = {UNIQUE_HEADER: asked}
    first = recorder.apply_async(("one",), task_id=task_id, headers=headers)
    recorder.apply_async(("two",), task_id=task_id, headers=headers)
    assert stack.broker.counts(DEFAULT_QUEUE)["ready"] == 1

    stack.worker()
    assert first.get(timeout=10) == "one"
    stack.settled(DEFAULT_QUEUE)
    # Unlocked when it started or succeeded: the same id is stored and runs again.
    recorder.apply_async(("three",), task_id=task_id, headers=headers)
    stack.wait_for_events("finish", 2, timeout=10)
    assert [e.label for e in stack.events("start")] == ["one", "three"]
    stack.settled(DEFAULT_QUEUE)


@pytest.mark.parametrize(
    ("profile", "runs_of_the_second_publish"),
    [("unique_until_success", 0), ("unique_until_start", 1)],
    ids=["until success", "until start"],
)
def test_an_early_acked_unique_task_is_not_published_again_while_it_runs(
    make_stack: StackFactory, profile: str, runs_of_the_second_publish: int
):
    # The Flask example's welcome e-mail: ack early (never twice on a crash), unique (a form
    # sent twice sends one e-mail). The ack ends the pending window at receipt; the lock does
    # not end before the task succeeded (or, by choice, started).
    stack = make_stack(policies=profile)
    sleeper = stack.task("sleep_then_record")
    task_id = f"welcome-{uuid.uuid4().hex}"
    stack.worker()
    first = sleeper.apply_async((1.0, "first"), task_id=task_id)
    stack.wait_for_events("start", 1, timeout=10)
    assert stack.broker.counts(DEFAULT_QUEUE)["reserved"] == 0  # acked on receipt

    sleeper.apply_async((0.0, "while running"), task_id=task_id)
    assert first.get(timeout=10) == "first"
    expected = ["first"] + ["while running"] * runs_of_the_second_publish
    stack.wait_for_events("finish", len(expected), timeout=10)
    stack.settled(DEFAULT_QUEUE)
    assert [e.label for e in stack.events("start")] == expected

    # Once it succeeded, the id is free again.
    sleeper.apply_async((0.0, "later"), task_id=task_id)
    stack.wait_for_events("finish", len(expected) + 1, timeout=10)
    assert [e.label for e in stack.events("start")] == [*expected, "later"]
