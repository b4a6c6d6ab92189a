"""Celery on celery-msg through Redis Sentinel (issue 11): a master, a replica and three
sentinels started by the test from the same server binary, a real worker, and the master
killed or demoted under it. Results and the task event list live on the session's plain
server, which nothing here kills, so every execution is counted outside the broker."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from celery import group
from celery.signals import before_task_publish
from celery_app.tasks import runs_key
from celery_helpers import Stack, StackFactory, acked_by_its_pool_child, stack_factory, wait_until
from kombu import Connection, Queue

from bench.failover import drain as drain_through
from bench.failover import publish_stream
from celery_msg.bulk_publish import current_buffer
from celery_msg.core import Broker
from celery_msg.errors import AuthenticationFailed
from celery_msg.topologies import SentinelTopology

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow


@pytest.fixture
def topology(server: Server) -> Iterator[SentinelTopology]:
    with SentinelTopology(server.kind) as topo:
        yield topo


@pytest.fixture
def make_stack(
    server: Server, prefix: str, tmp_path: Path, topology: SentinelTopology
) -> Iterator[StackFactory]:
    with stack_factory(server.url, prefix, tmp_path) as make:

        def make_on_sentinels(**settings: object) -> Stack:
            return make(
                broker_url_override=topology.broker_url(),
                master_name=topology.master_name,
                **settings,
            )

        yield make_on_sentinels


def master_broker(topology: SentinelTopology, prefix: str) -> Broker:
    return Broker(topology.master.client(), prefix=prefix)


def test_tasks_run_through_sentinels_and_survive_the_master_being_killed(
    make_stack: StackFactory, topology: SentinelTopology, prefix: str
):
    stack = make_stack(lease_timeout=3.0, sweep_interval=0.25)
    add, sleeper = stack.task("add"), stack.task("sleep_then_record")
    worker = stack.worker(pool="threads", concurrency=2)
    assert add.delay(1, 2).get(timeout=20) == 3

    # A task runs through the failover (its lease lives in the data set), others wait.
    slow = sleeper.delay(4.0, "slow")
    stack.wait_for_tasks("start", [slow.id], timeout=20)
    before = [sleeper.apply_async((0.05, f"b{i}"), countdown=1) for i in range(20)]
    topology.replicated()
    old = topology.master_port()
    topology.server_on(old).kill()
    killed = time.monotonic()
    topology.wait_for_failover(old)
    # The publisher finds the new master by itself (kombu's publish retry reconnects).
    after = [sleeper.delay(0.05, f"a{i}") for i in range(20)]

    results = [slow, *before, *after]
    assert sorted(r.get(timeout=60) for r in results) == sorted(
        ["slow", *(f"b{i}" for i in range(20)), *(f"a{i}" for i in range(20))]
    )
    took = time.monotonic() - killed
    runs = Counter(e.task for e in stack.events("start"))
    # Exactly once for every task that was not running when the connection broke; the
    # running one may run again (at least once, as README's Guarantees says).
    assert {runs[r.id] for r in [*before, *after]} == {1}
    assert runs[slow.id] >= 1
    assert worker.running
    counts = wait_until(
        lambda: (
            (c := master_broker(topology, prefix).counts("celery"))["ready"] == 0
            and c["reserved"] == 0
            and c
        ),
        20,
        "the queue on the new master settled",
    )
    assert counts == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 0}
    assert took < 60


def test_an_idle_worker_behind_sentinels_is_woken_by_the_master_at_once(
    make_stack: StackFactory, topology: SentinelTopology
):
    """The worker waits in a BLPOP on a connection of its own, made outside redis-py's pool:
    it must find the master through the sentinels too (redis-py's Sentinel connection does
    that only when its pool connects it; else it went to localhost:6379)."""
    stack = make_stack(sweep_interval=20.0)  # only a wake-up can deliver in time
    record = stack.task("record_now")
    worker = stack.worker(pool="threads", concurrency=2)
    assert record.delay("warm").get(timeout=30) == "warm"
    for i in range(3):
        sent = time.time()
        assert record.delay(f"late{i}").get(timeout=10) == f"late{i}"
        [start] = [e for e in stack.events("start") if e.label == f"late{i}"]
        assert start.time - sent < 2.0
    with topology.master.client() as client:
        blocked = [c for c in client.client_list() if c.get("cmd") == "blpop"]
    assert blocked, "no BLPOP waiting on the master"
    assert worker.running


def test_a_demoted_master_is_a_reconnect_not_a_crash(
    make_stack: StackFactory, topology: SentinelTopology, server: Server
):
    """SENTINEL FAILOVER keeps the old master running as a replica: connections still open to
    it get READONLY on their next write, which must send the worker and the publisher to the
    new master, not stop them."""
    stack = make_stack(lease_timeout=3.0, sweep_interval=0.25)
    sleeper = stack.task("sleep_then_record")
    worker = stack.worker(pool="prefork", concurrency=2)
    first = [sleeper.delay(0.01, f"f{i}") for i in range(20)]
    assert len([r.get(timeout=20) for r in first]) == 20
    topology.replicated()

    old = topology.master_port()
    with topology.sentinels[0].client() as client:
        client.execute_command("SENTINEL", "FAILOVER", topology.master_name)
    topology.wait_for_failover(old)
    demoted = topology.server_on(old)
    assert demoted.running
    wait_until(lambda: _role(demoted) == "slave" or None, 20, "the old master running as a replica")

    second = [sleeper.delay(0.01, f"s{i}") for i in range(20)]
    assert sorted(r.get(timeout=60) for r in second) == sorted(f"s{i}" for i in range(20))
    runs = Counter(e.task for e in stack.events("start"))
    assert {runs[r.id] for r in [*first, *second]} == {1}
    assert worker.running
    assert "Unrecoverable error" not in worker.log()


def _role(server_process: object) -> str | None:
    try:
        with server_process.client() as client:  # type: ignore[attr-defined]
            return str(client.info("replication")["role"])
    except (redis.RedisError, OSError):
        return None


@pytest.fixture
def two_replicas(server: Server) -> Iterator[SentinelTopology]:
    """After a failover one replica is left to confirm writes (min_replicas=1 goes on)."""
    with SentinelTopology(server.kind, replicas=2) as topo:
        yield topo


def test_with_min_replicas_no_publish_that_returned_is_lost_when_the_master_is_killed(
    two_replicas: SentinelTopology, prefix: str
):
    """The replicas lag (SIGSTOPped for 0.5 s) when the master is SIGKILLed: with
    ``min_replicas=1`` no publish that returned is lost (the ones the replicas did not confirm
    waited or failed). Without it, that lag loses up to all the publishes it saw:
    ``python -m bench.failover`` measures how many (README, Running on Sentinel)."""
    min_replicas = 1
    topology = two_replicas
    options = {
        "master_name": topology.master_name,
        "key_prefix": prefix,
        "min_replicas": min_replicas,
        "min_replicas_timeout": 2.0,
        "socket_timeout": 2.0,
    }
    queue = Queue("replicated")
    returned: list[int] = []
    failed: list[str] = []
    stop = threading.Event()
    publisher = threading.Thread(
        target=publish_stream,
        args=(topology.broker_url(), options, queue, returned, failed, stop),
        daemon=True,
    )
    publisher.start()
    wait_until(lambda: len(returned) >= 300 or None, 30, "300 confirmed publishes")
    old = topology.master_port()
    with topology.replicas_lagging(0.5):
        topology.server_on(old).kill()  # at whatever moment the publisher is in
    topology.wait_for_failover(old)
    at_failover = len(returned)
    wait_until(lambda: len(returned) >= at_failover + 300 or None, 60, "publishing resumed")
    stop.set()
    publisher.join(30)
    assert not publisher.is_alive()

    received = drain(topology, options, queue)
    lost = sorted(set(returned) - set(received))
    assert lost == [], f"{len(lost)} confirmed publishes lost: {lost[:20]} ({failed=})"


def drain(topology: SentinelTopology, options: dict[str, object], queue: Queue) -> list[int]:
    """Every message left in ``queue``, read by a consumer through the sentinels."""
    return drain_through(topology.broker_url(), options, queue)


def test_acl_users_on_the_sentinels_and_on_the_data_nodes(server: Server, prefix: str):
    """The URL's user is the data nodes' (as in kombu); the sentinels' own user comes from the
    ``sentinel_kwargs`` transport option."""
    with SentinelTopology(
        server.kind,
        password="replication-pw",
        config=["user app on >app-pw ~* &* +@all"],
        sentinel_password="sentinels-pw",
        sentinel_config=["user watcher on >watcher-pw +@all"],
    ) as topology:
        url = ";".join(
            f"celery-msg+sentinel://app:app-pw@127.0.0.1:{s.port}/0" for s in topology.sentinels
        )
        options: dict[str, object] = {
            "master_name": topology.master_name,
            "key_prefix": prefix,
            "sentinel_kwargs": {"username": "watcher", "password": "watcher-pw"},
        }
        queue = Queue("acl")
        with Connection(url, transport_options=options) as conn:
            producer = conn.Producer()
            for n in range(10):
                producer.publish({"n": n}, routing_key=queue.name, declare=[queue])
        assert sorted(drain_through(url, options, queue)) == list(range(10))
        # The data nodes need the URL's user; the sentinels need theirs.
        no_user = url.replace("app:app-pw@", "")
        with (
            Connection(no_user, transport_options=options) as conn,
            pytest.raises(AuthenticationFailed, match="credentials"),
        ):
            conn.ensure_connection(max_retries=1)
        anonymous = {**options, "sentinel_kwargs": {}}
        with (
            Connection(url, transport_options=anonymous) as conn,
            pytest.raises(Exception, match="sentinels"),
        ):
            conn.ensure_connection(max_retries=1)


def test_a_group_on_a_sentinel_url_is_published_in_bulk_and_each_task_runs_once(
    make_stack: StackFactory,
):
    stack = make_stack(prefetch_multiplier=50)
    in_block: list[bool] = []

    def seen(**_: object) -> None:
        in_block.append(current_buffer() is not None)

    before_task_publish.connect(seen, weak=False)
    try:
        result = group(stack.task("counted").s(i) for i in range(500)).apply_async()
    finally:
        before_task_publish.disconnect(seen)
    assert in_block == [True] * 500  # a celery-msg+sentinel:// app's group goes out in bulk
    stack.worker()
    assert result.get(timeout=60) == list(range(500))
    runs = {k.decode(): int(v) for k, v in stack.redis.hgetall(runs_key(stack.settings)).items()}
    assert runs == {r.id: 1 for r in result.results}


def test_a_prefork_pool_child_acks_its_success_on_the_sentinel_master(make_stack: StackFactory):
    """The child's own connection finds the master the sentinels name (celery_msg/childack.py)."""
    stack = make_stack(lease_timeout=2.0, sweep_interval=0.25)
    worker, _ = acked_by_its_pool_child(stack, "sentinel", timeout=6.0)
    worker.kill()
