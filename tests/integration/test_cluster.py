"""Celery on celery-msg through a Redis Cluster (issue 11): three masters started by the test
from the same server binary, queues whose slots live on different masters, real workers.
Results and the task event list live on the session's plain server, so every execution is
counted outside the broker."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from celery_helpers import (
    HOSTNAME,
    Stack,
    StackFactory,
    acked_by_its_pool_child,
    stack_factory,
    wait_until,
)
from cli_helpers import CLI
from kombu import Connection

from celery_msg.api import queue_counts
from celery_msg.bindings import Binding
from celery_msg.broadcast import stable_name
from celery_msg.connection import redis_client
from celery_msg.core import Broker, Lease, ReserveRequest
from celery_msg.errors import (
    BrokerConnectionError,
    ConfigurationError,
    PartialFanout,
    ReplicationTimeout,
    StaleRoute,
)
from celery_msg.options import TransportOptions
from celery_msg.queueargs import QueueArguments
from celery_msg.slots import queue_slot
from celery_msg.topologies import ClusterTopology

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow

#: Three queues whose slots are served by three different masters of an evenly split cluster
#: (15495, 3300 and 7365; checked by every test that relies on it).
QUEUES = ("a", "b", "c")


@pytest.fixture(scope="module")
def cluster(server: Server) -> Iterator[ClusterTopology]:
    with ClusterTopology(server.kind, masters=3) as topo:
        yield topo


def cluster_broker(cluster: ClusterTopology, prefix: str) -> Broker:
    client, _ = redis_client(Connection(cluster.broker_url()), TransportOptions())
    return Broker(client, prefix=prefix)


def masters_of(cluster: ClusterTopology, queues: tuple[str, ...] | list[str]) -> set[int]:
    return {cluster.master_for_slot(queue_slot(q)).port for q in queues}


@pytest.fixture
def make_stack(
    server: Server, prefix: str, tmp_path: Path, cluster: ClusterTopology
) -> Iterator[StackFactory]:
    with stack_factory(server.url, prefix, tmp_path) as make:

        def make_on_cluster(**settings: object) -> Stack:
            stack = make(broker_url_override=cluster.broker_url(), **settings)
            stack.broker = cluster_broker(cluster, prefix)  # counts read from the cluster
            return stack

        yield make_on_cluster


def test_a_database_other_than_0_is_refused_by_name(cluster: ClusterTopology):
    with pytest.raises(ConfigurationError, match="only database 0"):
        redis_client(Connection(cluster.broker_url() + "/1"), TransportOptions())


def test_a_broker_reserves_fairly_from_queues_on_three_shards(
    cluster: ClusterTopology, prefix: str
):
    assert len(masters_of(cluster, QUEUES)) == 3
    broker = cluster_broker(cluster, prefix)
    for queue in QUEUES:
        broker.declare(queue)
        for i in range(3):
            broker.publish(queue, f"{queue}{i}", "{}", 0)
    got = broker.reserve(list(QUEUES), 6, "me", start=1)
    # One from each queue in turn, beginning with b: b, c, a, b, c, a.
    assert sorted(d.key for d in got) == ["a0", "a1", "b0", "b1", "c0", "c1"]
    assert broker.ack([]) == []
    assert [broker.counts(q)["reserved"] for q in QUEUES] == [2, 2, 2]
    strict = broker.reserve(["c", "a", "b"], 2, "me", order="strict")
    assert [d.key for d in strict] == ["c2", "a2"]  # c drained first, then a
    assert broker.ack(got + strict) == []
    assert [broker.counts(q)["reserved"] for q in QUEUES] == [0, 0, 0]
    assert sorted(broker.queues()) == sorted(QUEUES)


def test_a_waiting_consumer_wakes_within_milliseconds_for_any_shard(
    cluster: ClusterTopology, prefix: str
):
    broker, publisher = cluster_broker(cluster, prefix), cluster_broker(cluster, prefix)
    for queue in QUEUES:
        broker.declare(queue)
    broker.wait(list(QUEUES), 0.01, consumer="me")  # subscribes (one connection per node)
    assert len(broker.shard_waiter().fds()) == 3
    for queue in QUEUES:
        assert not broker.wait(list(QUEUES), 0.05, consumer="me")  # nothing published
        published = time.monotonic()
        publisher.publish(queue, f"m-{queue}", "{}", 0)
        assert broker.wait(list(QUEUES), 10.0, consumer="me")
        assert time.monotonic() - published < 0.5
        # Until a reserve from its queue answers it, a wake-up read is still due (as a
        # marker left in a list): the next wait would return at once.
        assert broker.wait(list(QUEUES), 10.0, consumer="me")
        assert [d.key for d in broker.reserve([queue], 1, "me")] == [f"m-{queue}"]
    publisher.wake("me")
    assert broker.wait(list(QUEUES), 10.0, consumer="me")


def test_a_worker_consumes_queues_on_three_shards_and_wakes_at_once(make_stack: StackFactory):
    # A sweep far longer than the test's patience: only the wake-ups can deliver in time.
    stack = make_stack(sweep_interval=20.0)
    record = stack.task("record_now")
    worker = stack.worker(queues=QUEUES, pool="threads", concurrency=2)
    results = [record.apply_async((f"{q}{i}",), queue=q) for q in QUEUES for i in range(10)]
    assert sorted(r.get(timeout=30) for r in results) == sorted(
        f"{q}{i}" for q in QUEUES for i in range(10)
    )
    assert set(Counter(e.label for e in stack.events("start")).values()) == {1}
    for queue in QUEUES:
        # Idle now; a task on each shard in turn starts well within the sweep interval.
        sent = time.time()
        one = record.apply_async((f"late-{queue}",), queue=queue)
        assert one.get(timeout=10) == f"late-{queue}"
        [start] = [e for e in stack.events("start") if e.label == f"late-{queue}"]
        assert start.time - sent < 2.0
    for queue in QUEUES:
        stack.settled(queue)
    assert worker.running


def test_broadcast_reaches_workers_whose_queues_are_on_different_shards(
    make_stack: StackFactory, cluster: ClusterTopology
):
    stack = make_stack(broadcast="cache")
    names: list[str] = []
    taken: set[int] = set()
    while len(names) < 2:
        name = f"bc-{uuid.uuid4().hex[:6]}"
        port = cluster.master_for_slot(queue_slot(stable_name("cache", f"{name}@{HOSTNAME}"))).port
        if port not in taken:
            taken.add(port)
            names.append(name)
    workers = [stack.worker(name, queues=("celery", "cache")) for name in names]
    for label in ("x", "y"):
        stack.task("record_now").apply_async((label,), queue="cache")
    stack.wait_for_events("finish", 4, timeout=20)
    runs = Counter((e.worker, e.label) for e in stack.events("start"))
    assert runs == {(w.nodename, label): 1 for w in workers for label in ("x", "y")}
    for worker in workers:
        stack.settled(stable_name("cache", worker.nodename))


def test_dead_letters_and_the_cli_on_a_cluster(make_stack: StackFactory):
    """Tasks failing on three shards: every dead-letter store is listed, looked up and
    replayed by the CLI across the shards, and the replayed tasks run (and die) again."""
    stack = make_stack()
    worker = stack.worker(queues=QUEUES)
    results = [stack.task("fail").apply_async((f"f-{q}",), queue=q) for q in QUEUES]
    for result in results:
        with pytest.raises(ValueError):
            result.get(timeout=20)
    for queue in QUEUES:
        stack.settled(queue, dead=1)
    counts = queue_counts(stack.app)  # the look-up API, across the shards
    assert {q: counts[q]["dead"] for q in QUEUES} == {"a": 1, "b": 1, "c": 1}
    cli = CLI(stack)
    listed = cli.json("dlq", "list")
    assert sorted((r["queue"], r["id"]) for r in listed) == sorted(
        (q, r.id) for q, r in zip(QUEUES, results, strict=True)
    )
    shown = cli.json("inspect", results[2].id)
    assert [i["state"] for i in shown["instances"]] == ["DEAD"]

    assert cli.ok("dlq", "replay", "--all", "--yes").strip().startswith("replayed 3")
    # Counted by each shard's own counters: replayed once, dead twice (they failed again).
    wait_until(
        lambda: all(stack.broker.stats(q).get("dead") == 2 for q in QUEUES) or None,
        20,
        "the replayed tasks failed again",
    )
    for queue in QUEUES:
        assert stack.broker.stats(queue)["replayed"] == 1
        stack.settled(queue, dead=1)
    assert worker.running


def test_a_busy_queue_keeps_flowing_while_its_slot_moves_to_another_master(
    make_stack: StackFactory, cluster: ClusterTopology
):
    """Resharding under load: tasks published before, during and after the move of queue a's
    slot (ASK while keys move, MOVED after) each run exactly once, and the queue ends empty on
    its new master."""
    # A sweep longer than the test: after the move the worker must be woken where the slot
    # went (the old node ends its subscription; it subscribes on the new one).
    stack = make_stack(lease_timeout=5.0, sweep_interval=30.0)
    record = stack.task("record_now")
    worker = stack.worker(queues=("a",), pool="threads", concurrency=2)
    slot = queue_slot("a")
    source = cluster.master_for_slot(slot)
    target = next(m for m in cluster.masters if m is not source)
    before = [record.apply_async((f"b{i}",), queue="a") for i in range(30)]
    moved: list[int] = []
    moving = threading.Thread(
        target=lambda: moved.append(cluster.migrate_slot(slot, target, batch=2))
    )
    moving.start()
    during = []
    while moving.is_alive():
        during.append(record.apply_async((f"d{len(during)}",), queue="a"))
    moving.join()
    assert cluster.master_for_slot(slot) is target
    assert moved and moved[0] > 0 and during  # keys moved while tasks were being published
    after = [record.apply_async((f"a{i}",), queue="a") for i in range(30)]
    results = [*before, *during, *after]
    assert len([r.get(timeout=60) for r in results]) == len(results)
    runs = Counter(e.task for e in stack.events("start"))
    assert {runs[r.id] for r in results} == {1}
    stack.settled("a", timeout=10)
    assert worker.running


@pytest.fixture
def replicated_cluster(server: Server) -> Iterator[ClusterTopology]:
    with ClusterTopology(server.kind, masters=3, replicas=1) as topo:
        yield topo


def test_tasks_keep_flowing_when_a_cluster_master_is_killed_and_its_replica_takes_over(
    server: Server, prefix: str, tmp_path: Path, replicated_cluster: ClusterTopology
):
    """The master of queue a's slot is SIGKILLed mid-stream: its replica is promoted, the worker
    and the publisher find it, and every task published before (replicated first) and after
    runs; the ones not running at the kill exactly once."""
    cluster = replicated_cluster
    with stack_factory(server.url, prefix, tmp_path) as make:
        stack = make(
            broker_url_override=cluster.broker_url(), lease_timeout=3.0, sweep_interval=0.25
        )
        record = stack.task("record_now")
        worker = stack.worker(queues=QUEUES, pool="threads", concurrency=2)
        assert record.apply_async(("warm",), queue="a").get(timeout=20) == "warm"
        before = [record.apply_async((f"b{i}",), queue=q) for i in range(10) for q in QUEUES]
        slot = queue_slot("a")
        victim = cluster.master_for_slot(slot)
        cluster.replicated(victim)
        victim.kill()
        cluster.wait_for_failover(slot, victim)
        after = [record.apply_async((f"a{i}",), queue=q) for i in range(10) for q in QUEUES]
        results = [*before, *after]
        assert len([r.get(timeout=60) for r in results]) == len(results)
        runs = Counter(e.task for e in stack.events("start"))
        assert all(runs[r.id] >= 1 for r in before)
        assert {runs[r.id] for r in after} == {1}
        assert worker.running


def test_a_fan_out_that_a_dead_shard_cuts_short_says_which_queues_have_the_message(
    server: Server, prefix: str
):
    """Not atomic across shards, but never silent: the queues before the dead shard have the
    message, and the error names them and the ones that do not."""
    with ClusterTopology(server.kind, masters=3) as cluster:
        broker = cluster_broker(cluster, prefix)
        for queue in QUEUES:
            broker.declare(queue)
        cluster.master_for_slot(queue_slot("c")).kill()
        with pytest.raises(PartialFanout) as caught:
            broker.publish_many(["a", "b", "c"], "m1", "{}", 0)
        assert (caught.value.stored, caught.value.failed) == (["a", "b"], ["c"])
        assert [broker.counts(q)["ready"] for q in ("a", "b")] == [1, 1]
        with pytest.raises(BrokerConnectionError):
            broker.publish_many(["c", "a"], "m2", "{}", 0)  # the first failed: nothing stored
        assert [broker.counts(q)["ready"] for q in ("a", "b")] == [1, 1]


def test_a_round_cut_short_by_a_dead_shard_still_settles_the_acks_for_the_others(
    server: Server, prefix: str
):
    """A consumer's round needs a node that is down (its slot map still names a dead master):
    the round fails, but its acks for queues on the shards that answer are written all the
    same, so their messages, already run, do not come back when their leases expire."""
    with ClusterTopology(server.kind, masters=3) as cluster:
        broker = cluster_broker(cluster, prefix)
        for queue in QUEUES:
            broker.declare(queue)
            broker.publish(queue, f"m-{queue}", "{}", 0)
        held = broker.reserve(["b", "c"], 2, "me")
        assert sorted(d.key for d in held) == ["m-b", "m-c"]
        cluster.master_for_slot(queue_slot("a")).kill()
        acks = [Lease(d.queue, d.key, d.token) for d in held]
        with pytest.raises(BrokerConnectionError):
            broker.settle_and_reserve(acks, [ReserveRequest(["a"], 1, "me")])
        assert [broker.counts(q)["reserved"] for q in ("b", "c")] == [0, 0]
        assert [broker.stats(q).get("acked") for q in ("b", "c")] == [1, 1]


def test_bindings_and_an_unused_queue_expire_across_shards(cluster: ClusterTopology, prefix: str):
    """The global keys (registry, bindings, their versions, expiring queues) share one slot, the
    queues are elsewhere: a binding change still refuses a stale route, and a queue unused past
    its ``expires`` is deleted with its keys on its own shard."""
    now = [1_000.0]
    client, _ = redis_client(Connection(cluster.broker_url()), TransportOptions())
    broker = Broker(client, prefix=prefix, clock=lambda: now[0])
    broker.declare("a", QueueArguments(expires_ms=1000))
    broker.declare("b")
    broker.bind("ex", Binding("k", "", "a"))
    route = broker.table("ex").route
    assert route is not None
    broker.publish("a", "m1", "{}", 0, route=route)
    broker.bind("ex", Binding("k", "", "b"))
    with pytest.raises(StaleRoute):
        broker.publish("a", "m2", "{}", 0, route=route)
    assert broker.counts("a")["ready"] == 1

    now[0] += 2.0
    assert broker.expire_queues() == ["a"]
    assert sorted(broker.queues()) == ["b"]
    assert client.exists(*broker.keys("a").all) == 0


def test_min_replicas_waits_on_the_shard_that_took_the_write(
    server: Server, prefix: str, replicated_cluster: ClusterTopology
):
    """``WAIT`` counts one connection's writes, so on a Cluster each node's calls go with their
    own ``WAIT``: a lagging replica fails a publish to its master's queue, and only that one."""
    cluster = replicated_cluster
    options = TransportOptions(min_replicas=1, min_replicas_timeout=0.3)
    client, _ = redis_client(Connection(cluster.broker_url()), options)
    broker = Broker(client, prefix=prefix, replication=options.replication)
    for queue in QUEUES:
        broker.declare(queue)
    assert [broker.publish(q, f"m-{q}", "{}", 0) for q in QUEUES] == ["m-a", "m-b", "m-c"]
    [lagging] = cluster.replicas_of(cluster.master_for_slot(queue_slot("a")))
    os.kill(lagging.pid, signal.SIGSTOP)
    try:
        with pytest.raises(ReplicationTimeout):
            broker.publish("a", "late-a", "{}", 0)
        assert broker.publish("b", "late-b", "{}", 0) == "late-b"
        got = broker.reserve(["b", "c"], 10, "me")
        assert sorted(d.key for d in got) == ["late-b", "m-b", "m-c"]
    finally:
        os.kill(lagging.pid, signal.SIGCONT)
    assert broker.ack(got) == []


def test_a_sigkill_on_a_cluster_reruns_only_the_running_task_not_the_finished_ones(
    make_stack: StackFactory, cluster: ClusterTopology
):
    """The event loop's ack writer on a Cluster: each ack written at once to the master of its
    queue's slot (a connection per master), so a solo worker killed during its last
    prefetched task re-runs that task only, not the finished ones on the other shards."""
    # Three masters on a fresh cluster; two once the resharding test moved a's slot.
    assert len(masters_of(cluster, QUEUES)) >= 2
    stack = make_stack(lease_timeout=6.0, sweep_interval=0.25, prefetch_multiplier=4)
    sleeper = stack.task("sleep_then_record")
    quick = [sleeper.apply_async((0.05, f"q-{q}"), queue=q) for q in QUEUES]
    slow = sleeper.apply_async((4.0, "slow"), queue="a")
    doomed = stack.worker(queues=list(QUEUES))  # solo, prefetch 4: one round takes all four
    stack.wait_for_tasks("start", [slow.id], timeout=20)
    wait_until(
        lambda: sum(stack.broker.counts(q)["reserved"] for q in QUEUES) == 1 or None,
        0.5,
        "only the running task still reserved (the finished ones acked on their masters)",
        interval=0.01,
    )
    doomed.kill()

    stack.worker(queues=list(QUEUES), pool="threads", concurrency=2)
    assert slow.get(timeout=30) == "slow"
    for queue in QUEUES:
        stack.settled(queue)
    runs = Counter(e.task for e in stack.events("start"))
    assert runs == Counter({**{r.id: 1 for r in quick}, slow.id: 2})


def test_a_prefork_pool_child_acks_its_success_on_the_cluster_master(make_stack: StackFactory):
    """The child's own connection finds the master of the queue's slot (celery_msg/childack.py)."""
    stack = make_stack(lease_timeout=2.0, sweep_interval=0.25)
    worker, _ = acked_by_its_pool_child(stack, "cluster", timeout=6.0)
    worker.kill()
