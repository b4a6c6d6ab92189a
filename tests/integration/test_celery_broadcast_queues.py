"""Celery's own ``Broadcast`` queues (``task_queues = (..., Broadcast("cache"))``) with a real
worker: with ``configure()`` a worker's anonymous broadcast queue is named after its node name,
so a worker restarted under the same name runs, once, what was broadcast while it was down;
without it, the README's ``celeryd_after_setup`` recipe does the same."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import TYPE_CHECKING

import pytest
from celery_app.settings import DEFAULT_QUEUE
from celery_helpers import Stack, StackFactory

from celery_msg.broadcast import stable_name

if TYPE_CHECKING:
    pass


#: The broadcast exchange of the test app (``Broadcast(BROADCAST)`` in ``task_queues``).
BROADCAST = "cache"
#: A worker consumes the default queue and the broadcast one (``-Q celery,cache``: by alias).
QUEUES = (DEFAULT_QUEUE, BROADCAST)


def broadcast(stack: Stack, label: str) -> None:
    """A task routed to the broadcast exchange: every subscribed worker runs it once."""
    stack.task("record_now").apply_async((label,), queue=BROADCAST)


@pytest.mark.parametrize("stop", ["warm shutdown", "SIGKILL"])
@pytest.mark.parametrize(
    "configured", [True, False], ids=["configure", "README recipe without configure"]
)
def test_a_worker_restarted_under_its_name_runs_once_a_broadcast_task_sent_while_it_was_down(
    make_stack: StackFactory, stop: str, configured: bool
):
    stack = make_stack(broadcast=BROADCAST, binding_ttl=30.0, configure=configured)
    name = f"bcast-{uuid.uuid4().hex[:6]}"
    first = stack.worker(name, queues=QUEUES)
    broadcast(stack, "before")
    stack.wait_for_events("finish", 1, timeout=10)
    if stop == "SIGKILL":
        first.kill()
    else:
        first.terminate()
        assert first.wait_exit(15) == 0

    broadcast(stack, "while down")
    queue = stable_name(BROADCAST, first.nodename)
    assert stack.broker.counts(queue)["ready"] == 1  # it waits for the worker, by name

    second = stack.worker(name, queues=QUEUES)
    events = stack.wait_for_events("finish", 2, timeout=10)
    assert [(e.label, e.worker, e.pid) for e in events] == [
        ("before", first.nodename, first.pid),
        ("while down", second.nodename, second.pid),
    ]
    # Once: a ping round trip later, still two runs and nothing left in its queue.
    assert stack.app.control.inspect(destination=[second.nodename], timeout=5).ping()
    assert Counter(e.label for e in stack.events("start")) == {"before": 1, "while down": 1}
    stack.settled(queue)


def test_two_workers_each_run_one_copy_of_every_broadcast_task(make_stack: StackFactory):
    stack = make_stack(broadcast=BROADCAST)
    workers = [stack.worker(queues=QUEUES) for _ in range(2)]
    labels = [f"b{i}" for i in range(3)]
    for label in labels:
        broadcast(stack, label)

    stack.wait_for_events("finish", 6, timeout=15)
    for worker in workers:
        assert stack.app.control.inspect(destination=[worker.nodename], timeout=5).ping()
    runs = Counter((e.worker, e.label) for e in stack.events("start"))
    assert runs == {(w.nodename, label): 1 for w in workers for label in labels}
    for worker in workers:
        stack.settled(stable_name(BROADCAST, worker.nodename))
