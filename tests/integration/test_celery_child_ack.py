"""A prefork pool child acks its own ``acks_late`` success (celery_msg/childack.py).

The task SIGSTOPs its own worker (the pool child's parent) before it returns, so the worker
never reads the result: whatever is acked meanwhile was acked by the child. Executions are
counted from the task event list (outside the broker).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Literal

import pytest
from celery_app.settings import DEFAULT_QUEUE
from celery_helpers import (
    Stack,
    StackFactory,
    acked_by_its_pool_child,
    stopped_by_its_task,
    wait_until,
)

from celery_msg.core import State

LEASE, SWEEP = 2.0, 0.25


def _starts(stack: Stack, task_id: str) -> int:
    return len([e for e in stack.events("start") if e.task == task_id])


@pytest.mark.slow
def test_a_prefork_success_is_acked_by_its_child_so_killing_the_worker_does_not_rerun_it(
    make_stack: StackFactory,
):
    stack = make_stack(lease_timeout=LEASE, sweep_interval=SWEEP)
    # The worker is stopped and never read the result: only its child can have acked.
    worker, task_id = acked_by_its_pool_child(stack, "once", timeout=3 * LEASE)
    assert stack.broker.stats(DEFAULT_QUEUE)["acked"] == 1

    worker.kill()  # the whole group, stopped or not
    stack.worker(pool="prefork", concurrency=1)
    after = stack.task("record_now").delay("after")
    stack.wait_for_tasks("finish", [after.id], timeout=20)
    stack.settled(DEFAULT_QUEUE)
    assert _starts(stack, task_id) == 1
    assert len([e for e in stack.events("finish") if e.task == task_id]) == 1


@pytest.mark.slow
def test_the_worker_stays_quiet_about_a_success_its_child_acked_though_its_lease_ran_out(
    make_stack: StackFactory,
):
    stack = make_stack(lease_timeout=LEASE, sweep_interval=SWEEP)
    worker, task_id = acked_by_its_pool_child(stack, "quiet", timeout=3 * LEASE)
    # Stopped past the lease: on resuming, a renewal round and the worker's own ack both
    # find the message gone.
    time.sleep(LEASE)
    os.kill(worker.pid, signal.SIGCONT)

    # One more task through the same pool: the worker has read the first result before.
    after = stack.task("sleep_then_record").delay(0.0, "after")
    stack.wait_for_tasks("finish", [after.id], timeout=20)
    stack.settled(DEFAULT_QUEUE)
    time.sleep(LEASE / 3)  # a renewal round after both acks (renewals run every lease / 3)

    assert "lease lost" not in worker.log()
    assert "lease_lost" not in stack.broker.stats(DEFAULT_QUEUE)
    assert stack.broker.stats(DEFAULT_QUEUE)["acked"] == 2
    assert _starts(stack, task_id) == 1


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["fail", "retry"])
def test_a_prefork_failure_or_retry_is_left_to_the_worker_not_acked_by_the_child(
    make_stack: StackFactory, outcome: Literal["fail", "retry"]
):
    stack = make_stack(lease_timeout=LEASE, sweep_interval=SWEEP)
    worker, task_id = stopped_by_its_task(stack, outcome, outcome)

    # The child's trace is over and the worker is stopped: the delivery is still leased.
    found = stack.broker.lookup(task_id, [DEFAULT_QUEUE])
    assert [m.state for m in found if m.key == task_id] == [State.RESERVED]

    os.kill(worker.pid, signal.SIGCONT)

    def settled() -> bool:
        found = stack.broker.lookup(task_id, [DEFAULT_QUEUE])
        return all(m.state != State.RESERVED for m in found if m.key == task_id)

    wait_until(settled, 10, "the worker to settle the delivery")
    assert "lease lost" not in worker.log()
    assert _starts(stack, task_id) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pool", "child"), [("prefork", True), ("solo", False), ("threads", False)]
)
def test_only_a_prefork_pool_child_acks_its_own_successes(
    make_stack: StackFactory, pool: Literal["prefork", "solo", "threads"], child: bool
):
    stack = make_stack(lease_timeout=LEASE, sweep_interval=SWEEP)
    worker = stack.worker(pool=pool, concurrency=2)
    results = [stack.task("pool_child").delay(str(i)) for i in range(6)]

    assert [r.get(timeout=20) for r in results] == [child] * 6
    stack.settled(DEFAULT_QUEUE)
    stats = stack.broker.stats(DEFAULT_QUEUE)
    assert stats["acked"] == 6 and "lease_lost" not in stats
    assert "lease lost" not in worker.log()
    assert len(stack.events("start")) == 6
