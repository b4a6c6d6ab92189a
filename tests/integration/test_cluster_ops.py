"""Operating celery-msg on a Redis Cluster (issue 11): bulk publishing grouped per master, a slot
moving under a bulk, a master killed in the middle of one, and ``msg migrate`` from kombu's
``redis://`` into a Cluster. Three masters started by the test, real workers; every execution
is counted outside the broker (on the session's plain server)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from celery import Celery, group
from celery.signals import before_task_publish
from celery_app.tasks import runs_key
from celery_helpers import Stack, StackFactory, stack_factory
from cli_helpers import CLI
from kombu import Connection
from test_cluster import (
    QUEUES,
    cluster,
    cluster_broker,
    make_stack,
    masters_of,
    replicated_cluster,
)

import celery_msg
from celery_msg.bulk_publish import BulkPublishError, RetryPolicy, current_buffer
from celery_msg.connection import redis_client
from celery_msg.core import Broker
from celery_msg.errors import ConfigurationError
from celery_msg.options import TransportOptions
from celery_msg.slots import queue_slot
from celery_msg.topologies import ClusterTopology

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow

__all__ = ["cluster", "make_stack", "replicated_cluster"]  # fixtures, used by name


def declare(stack: Stack, queues: tuple[str, ...] | list[str]) -> None:
    with stack.app.connection_for_write() as conn:
        for queue in queues:
            conn.default_channel.queue_declare(queue)


def stored(broker: Broker, queue: str) -> list[str]:
    """Every message key in ``queue`` (``id``, or ``id/<n>`` for a second copy), leased here."""
    return sorted(d.key for d in broker.reserve([queue], 100_000, "check"))


def test_a_group_of_3000_tasks_over_three_shards_is_published_in_bulk_and_each_runs_once(
    make_stack: StackFactory, cluster: ClusterTopology
):
    assert len(masters_of(cluster, QUEUES)) == 3
    stack = make_stack(prefetch_multiplier=100)
    counted = stack.task("counted")
    declare(stack, QUEUES)
    in_block: list[bool] = []

    def seen(**_: object) -> None:
        in_block.append(current_buffer() is not None)

    before_task_publish.connect(seen, weak=False)
    try:
        result = group(counted.s(i).set(queue=QUEUES[i % 3]) for i in range(3000)).apply_async()
    finally:
        before_task_publish.disconnect(seen)
    assert in_block == [True] * 3000  # a celery-msg+cluster:// app's group goes out in bulk
    # Stored on their three masters by the time apply_async returned.
    assert [stack.broker.counts(q)["ready"] for q in QUEUES] == [1000, 1000, 1000]
    stack.worker(queues=QUEUES, concurrency=2)
    assert result.get(timeout=180) == list(range(3000))
    runs = {k.decode(): int(v) for k, v in stack.redis.hgetall(runs_key(stack.settings)).items()}
    assert runs == {r.id: 1 for r in result.results}
    for queue in QUEUES:
        stack.settled(queue, timeout=30)


def test_a_bulk_follows_its_queues_slot_while_it_moves_and_after_it_moved(
    make_stack: StackFactory, cluster: ClusterTopology
):
    """ASK and TRYAGAIN while the keys move, MOVED once the publisher's slot map is stale: every
    task of the bulk is stored exactly once on the master that ends up with the slot."""
    stack = make_stack()
    record = stack.task("record_now")
    queue = "moving"
    declare(stack, [queue])
    slot = queue_slot(queue)
    home = cluster.master_for_slot(slot)
    away = next(m for m in cluster.masters if m is not home)
    ids = [record.apply_async(("warm",), queue=queue).id]  # the slot map is read now
    for i in range(300):  # keys for the migration to move
        ids.append(record.apply_async((f"w{i}",), queue=queue).id)
    moving = threading.Thread(target=lambda: cluster.migrate_slot(slot, away, batch=1))
    with celery_msg.bulk(stack.app, batch=20):
        moving.start()
        while moving.is_alive() or len(ids) < 1000:
            ids.append(record.apply_async(("during",), queue=queue).id)
    moving.join()
    assert cluster.master_for_slot(slot) is away
    # Moved back by another client: this publisher's map still says `away` (MOVED).
    cluster.migrate_slot(slot, home)
    with celery_msg.bulk(stack.app, batch=20):
        ids.extend(record.apply_async(("after",), queue=queue).id for _ in range(100))
    assert stored(stack.broker, queue) == sorted(ids)
    stack.worker(queues=(queue,), concurrency=2)
    stack.wait_for_events("start", len(ids), timeout=120)
    assert sorted(e.task for e in stack.events("start")) == sorted(ids)  # each ran once


def test_connections_dropped_in_the_middle_of_a_bulk_are_resent_and_each_task_stored_once(
    make_stack: StackFactory, cluster: ClusterTopology
):
    """Every master closes its clients (the block's connections among them) twice in the middle
    of a block: the next batch to each finds its link down and is sent again on a new one
    (unique publishes, since a batch whose reply was lost may have run), each task stored once.
    (Replies lost after a batch ran are shown on one server through a proxy that holds them:
    test_bulk_publish.py.)"""
    stack = make_stack()
    record = stack.task("record_now")
    declare(stack, QUEUES)
    sent: dict[str, list[str]] = {q: [] for q in QUEUES}
    killed: list[int] = []
    with celery_msg.bulk(stack.app, batch=60):
        for i in range(1500):
            queue = QUEUES[i % 3]
            sent[queue].append(record.apply_async((f"t{i}",), queue=queue).id)
            if i in (500, 1000):
                for master in cluster.masters:
                    with master.client() as client:
                        kill = ("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                        killed.append(int(client.execute_command(*kill)))
    assert all(killed)
    assert [stack.broker.stats(q)["published"] for q in QUEUES] == [500, 500, 500]
    for queue in QUEUES:
        assert stored(stack.broker, queue) == sorted(sent[queue]), queue


@pytest.fixture
def replicated_stack(
    server: Server, prefix: str, tmp_path: Path, replicated_cluster: ClusterTopology
) -> Iterator[Stack]:
    """A stack on the cluster with a replica per master, publishing with ``min_replicas=1``."""
    with stack_factory(server.url, prefix, tmp_path) as make:
        stack = make(broker_url_override=replicated_cluster.broker_url())
        stack.broker = cluster_broker(replicated_cluster, prefix)
        app: Celery = stack.app
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "min_replicas": 1,
            "min_replicas_timeout": 2.0,
            "socket_timeout": 2.0,
        }
        yield stack


def test_a_master_killed_in_a_bulk_names_the_unsent_tasks_and_a_retry_stores_each_once(
    replicated_stack: Stack, replicated_cluster: ClusterTopology
):
    """With ``min_replicas=1`` each master's batches end with their own WAIT: what the block
    confirmed is on a replica. The master of queue a is SIGKILLed mid-block: the error names
    queue a's tasks it could not confirm (every one published after the kill among them), and
    after the failover ``retry()`` stores each of them once, beside the ones already there
    (whose confirmation by a replica kept them through the failover)."""
    stack, cluster = replicated_stack, replicated_cluster
    record = stack.task("record_now")
    declare(stack, QUEUES)
    slot = queue_slot("a")
    victim = cluster.master_for_slot(slot)
    sent: dict[str, list[str]] = {q: [] for q in QUEUES}
    after_kill: list[str] = []
    with (
        pytest.raises(BulkPublishError) as caught,
        celery_msg.bulk(stack.app, batch=90, retry_policy=RetryPolicy(max_retries=0)),
    ):
        for i in range(1800):
            queue = QUEUES[i % 3]
            sent[queue].append(record.apply_async((f"t{i}",), queue=queue).id)
            if i == 900:
                victim.kill()
            if i > 900 and queue == "a":
                after_kill.append(sent[queue][-1])
    unsent = caught.value.unsent
    assert {u.queue for u in unsent} == {"a"}
    assert set(after_kill) <= {u.message_id for u in unsent} <= set(sent["a"])
    cluster.wait_for_failover(slot, victim)
    victim.restart()  # it comes back as the new master's replica: min_replicas=1 holds again
    cluster.wait_until_settled()
    caught.value.retry()
    for queue in QUEUES:
        assert stored(stack.broker, queue) == sorted(sent[queue]), queue


def test_tasks_waiting_in_kombus_redis_transport_migrate_into_a_cluster_and_run_once(
    make_stack: StackFactory, server: Server, prefix: str, cluster: ClusterTopology
):
    old = Celery("old", broker=f"{server.url}/0", set_as_current=False)
    old.conf.broker_transport_options = {"global_keyprefix": f"{prefix}kombu:"}
    try:
        ids = {
            q: [old.send_task("record_now", (f"{q}{i}",), queue=q).id for i in range(50)]
            for q in QUEUES
        }
        later = old.send_task("record_now", ("later",), queue="a", countdown=3600).id
    finally:
        old.close()
    stack = make_stack()
    cli = CLI(stack)
    source = ["--from", f"{server.url}/0", "--global-keyprefix", f"{prefix}kombu:"]
    done = cli.json("migrate", *source, "--yes")
    assert done["total"] == {
        "waiting": 151, "moved": 151, "already_there": 0, "undecodable": 0, "scheduled": 1,
    }  # fmt: skip
    assert cli.json("migrate", *source, "--yes")["total"]["waiting"] == 0
    assert [stack.broker.counts(q)["ready"] for q in QUEUES] == [50, 50, 50]
    assert stack.broker.counts("a")["scheduled"] == 1
    stack.worker(queues=QUEUES, concurrency=2)
    every = [i for q in QUEUES for i in ids[q]]
    starts = stack.wait_for_tasks("start", every, timeout=60)
    assert sorted(e.task for e in starts) == sorted(every)
    for queue in QUEUES:
        stack.settled(queue, timeout=20, **({"scheduled": 1} if queue == "a" else {}))
    assert later not in {e.task for e in stack.events("start")}


def test_a_worker_whose_prefetch_fills_takes_the_next_tasks_without_waiting_for_the_sweep(
    make_stack: StackFactory,
):
    """A wake-up is a sharded message, read whenever the socket is: a round whose prefetch was
    full reads it and reserves nothing, and a task finishing just after frees room without
    anything more being published. The wake-up stays unanswered until a reserve from its
    queue runs, so the worker looks again at once instead of at the next sweep (30 s here:
    bursts of 80 tasks on a worker of two threads stalled there in 3 of 5 tries before)."""
    stack = make_stack(sweep_interval=30.0)
    record = stack.task("record_now")
    stack.worker(queues=("a",), pool="threads", concurrency=2)
    for burst in range(5):
        started = time.monotonic()
        results = [record.apply_async((f"{burst}-{i}",), queue="a") for i in range(80)]
        for result in results:
            result.get(timeout=max(0.1, 15.0 - (time.monotonic() - started)))
    stack.settled("a")


def test_a_worker_is_woken_on_the_new_master_each_time_its_queues_slot_moves(
    make_stack: StackFactory, cluster: ClusterTopology
):
    """The old master ends the subscription when the slot leaves (or refuses a new one with
    MOVED): the worker subscribes where the slot went before the next task comes, busy or idle
    during the move; a sweep of 30 s never delivers here."""
    stack = make_stack(lease_timeout=5.0, sweep_interval=30.0)
    record = stack.task("record_now")
    stack.worker(queues=("a",), pool="threads", concurrency=2)
    assert record.apply_async(("warm",), queue="a").get(timeout=20) == "warm"
    slot = queue_slot("a")
    home = cluster.master_for_slot(slot)
    away = next(m for m in cluster.masters if m is not home)
    try:
        for move, target in enumerate([away, home, away, home]):
            busy = [record.apply_async((f"{move}-before-{i}",), queue="a") for i in range(20)]
            cluster.migrate_slot(slot, target)
            assert cluster.master_for_slot(slot) is target
            busy += [record.apply_async((f"{move}-after-{i}",), queue="a") for i in range(20)]
            for result in busy:
                result.get(timeout=15)
            stack.settled("a")
            sent = time.time()  # idle now, on the new master
            assert record.apply_async((f"{move}-idle",), queue="a").get(timeout=15)
            [start] = [e for e in stack.events("start") if e.label == f"{move}-idle"]
            assert start.time - sent < 5.0
    finally:
        if cluster.master_for_slot(slot) is not home:
            cluster.migrate_slot(slot, home)


@pytest.mark.parametrize(
    ("option", "value"), [("sentinel_kwargs", {"password": "x"}), ("min_other_sentinels", 1)]
)
def test_a_sentinel_option_on_a_cluster_url_is_refused_by_name(
    cluster: ClusterTopology, option: str, value: object
):
    with pytest.raises(ConfigurationError, match=f"^{option}: only used with"):
        redis_client(Connection(cluster.broker_url()), TransportOptions(**{option: value}))
