"""``min_replicas`` (issue 11): every state change ends with a ``WAIT`` on its own connection.
A master with one replica, started by the test; the replica SIGSTOPped to make it lag."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
import redis

from celery_msg.core import Broker, Lease, ReserveRequest
from celery_msg.errors import ReplicationTimeout
from celery_msg.redisio import Replication

if TYPE_CHECKING:
    from conftest import Server


@pytest.fixture
def master_and_replica(server_factory: Callable[..., Server]) -> Iterator[tuple[Server, Server]]:
    master = server_factory()
    replica = server_factory(config=[f"replicaof 127.0.0.1 {master.process.port}"])
    with master.process.client() as client:
        deadline = time.monotonic() + 20
        while client.info("replication").get("slave0", {}).get("state") != "online":
            assert time.monotonic() < deadline, "the replica never came online"
            time.sleep(0.05)
        client.set("warm-up", 1)  # until the replica acknowledges a write (its first ACK)
        while int(client.execute_command("WAIT", 1, 500)) < 1:
            assert time.monotonic() < deadline, "the replica never acknowledged a write"
    yield master, replica
    os.kill(replica.process.pid, signal.SIGCONT)


def test_an_unconfirmed_publish_fails_naming_the_option_and_a_consumer_goes_on(
    master_and_replica: tuple[Server, Server], prefix: str, caplog: pytest.LogCaptureFixture
):
    master, replica = master_and_replica
    client = redis.Redis.from_url(master.url)
    broker = Broker(client, prefix=prefix, replication=Replication(1, 1000))
    broker.declare("q")
    broker.publish("q", "confirmed", "{}", 0)
    assert broker.lookup("confirmed")

    os.kill(replica.process.pid, signal.SIGSTOP)  # a replica that lags
    started = time.monotonic()
    with pytest.raises(ReplicationTimeout, match=r"confirmed by 0 of min_replicas=1") as caught:
        broker.publish("q", "unconfirmed", "{}", 0)
    assert 0.9 <= time.monotonic() - started < 10  # it waited for the timeout
    assert caught.value.confirmed == 0
    # Not confirmed is not undone: the master has it (and loses it if it fails now).
    assert broker.counts("q")["ready"] == 2

    # A consumer logs it and goes on: a lost reserve or ack only means a redelivery.
    request = ReserveRequest(["q"], 10, "consumer-1")
    [deliveries] = broker.settle_and_reserve([], [request]).deliveries
    assert sorted(d.key for d in deliveries) == ["confirmed", "unconfirmed"]
    leases = [Lease(d.queue, d.key, d.token) for d in deliveries]
    assert broker.ack(leases) == []
    assert broker.counts("q") == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 0}
    assert "min_replicas=1" in caplog.text
    assert waits(client) >= 4  # publish x2, reserve, ack: each ended with its WAIT

    os.kill(replica.process.pid, signal.SIGCONT)
    broker.publish("q", "confirmed-again", "{}", 0)  # confirmed once the replica caught up


def waits(client: redis.Redis) -> int:
    """How many WAIT commands the server has run."""
    return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def test_without_min_replicas_no_wait_is_sent(server_factory: Callable[..., Server], prefix: str):
    """The default (``min_replicas=0``) costs nothing: no WAIT at all, on any path."""
    client = redis.Redis.from_url(server_factory().url)
    broker = Broker(client, prefix=prefix)
    broker.declare("q")
    for n in range(5):
        broker.publish("q", f"m{n}", "{}", 0)
    [deliveries] = broker.settle_and_reserve([], [ReserveRequest(["q"], 10, "c")]).deliveries
    broker.ack([Lease(d.queue, d.key, d.token) for d in deliveries])
    assert waits(client) == 0
    with_replication = Broker(client, prefix=prefix, replication=Replication(0, 100))
    with_replication.publish("q", "m-waited", "{}", 0)
    assert waits(client) == 1  # the probe sees a WAIT when one is sent
