"""celery_msg.snapshot against a real server: states, oldest age, consumers and counters of
many queues in a bounded number of round trips, a corrupted queue reported and the rest served.

The broker's clock is pinned (``clock.t``, seconds), so ages and heartbeats are exact.
"""

from __future__ import annotations

import pytest
import redis
from pinned import T0, Clock

from bench.scrape import CountingConnection, counting_client, fill
from celery_msg import consumers
from celery_msg.core import Broker, Lease
from celery_msg.keys import Counter
from celery_msg.snapshot import QueueKind, queue_kind, take


def _lease(broker: Broker, queue: str, consumer: str = "c1", count: int = 1) -> list[Lease]:
    return [Lease(d.queue, d.key, d.token) for d in broker.reserve([queue], count, consumer)]


def test_a_snapshot_reads_every_state_the_oldest_age_consumers_and_counters(
    broker: Broker, clock: Clock
):
    broker.declare("jobs")
    broker.declare("idle")
    broker.publish("jobs", "a", b"A", 0)  # published at T0: the oldest
    clock.t = T0 + 2
    for i in range(4):
        broker.publish("jobs", f"b{i}", b"B", 0)
    broker.publish("jobs", "later", b"L", 0, due_ms=int((T0 + 60) * 1000))
    broker.publish("jobs", "retry", b"R", 0, retry=True)
    [first, second] = _lease(broker, "jobs", count=2)
    broker.ack([first])
    assert broker.dead_letter(second, "failed", "boom")
    consumers.heartbeat(broker, "w1", ["jobs"], 10_000)
    consumers.heartbeat(broker, "w2", ["jobs", "idle"], 10_000)
    clock.t = T0 + 5

    snap = take(broker)

    assert [q.queue for q in snap.queues] == ["idle", "jobs"]
    idle, jobs = snap.queues
    assert (idle.ready, idle.reserved, idle.scheduled, idle.dead) == (0, 0, 0, 0)
    assert (idle.oldest_ready_age, idle.consumers, idle.counters) == (None, 1, {})
    assert jobs.states() == {"ready": 4, "reserved": 0, "scheduled": 1, "dead": 1}
    assert jobs.oldest_ready_age == 3.0  # b0..b3 and retry, published at T0 + 2
    assert jobs.consumers == 2
    assert jobs.counters == {
        "published": 7,
        "retried": 1,
        "delivered": 2,
        "acked": 1,
        "dead": 1,
    }
    assert jobs.dead_by_reason == {"failed": 1}
    assert snap.taken_at == T0 + 5
    assert snap.unreadable == []


def test_a_due_message_nobody_fetched_counts_as_ready_with_its_age(broker: Broker, clock: Clock):
    broker.declare("q")
    broker.publish("q", "eta", b"E", 0, due_ms=int((T0 + 10) * 1000))
    broker.publish("q", "far", b"F", 0, due_ms=int((T0 + 99) * 1000))

    [q] = take(broker).queues
    assert (q.ready, q.scheduled, q.oldest_ready_age) == (0, 2, None)

    clock.t = T0 + 25  # no consumer promotes it: still ready 15 s
    [q] = take(broker).queues
    assert (q.ready, q.scheduled, q.oldest_ready_age) == (1, 1, 15.0)


def test_the_oldest_age_looks_past_the_head_into_lower_priority_bands(broker: Broker, clock: Clock):
    broker.declare("q")
    broker.publish("q", "low", b"L", 200)  # served last
    clock.t = T0 + 30
    broker.publish("q", "high", b"H", 0)
    clock.t = T0 + 40

    [q] = take(broker).queues

    assert q.oldest_ready_age == 40.0


def test_a_consumer_drops_out_when_its_heartbeat_runs_out_or_it_detaches(
    broker: Broker, clock: Clock
):
    broker.declare("q")
    consumers.heartbeat(broker, "w1", ["q"], 10_000)
    consumers.heartbeat(broker, "w2", ["q"], 10_000)
    consumers.heartbeat(broker, "w3", ["q"], 20_000)
    consumers.detach(broker, "w2", ["q"])
    assert take(broker).queues[0].consumers == 2

    clock.t = T0 + 10  # w1's deadline: no longer alive
    assert take(broker).queues[0].consumers == 1


def test_a_queue_with_a_corrupted_key_is_reported_unreadable_and_the_others_served(
    broker: Broker, redis_client: redis.Redis
):
    for name in ("a", "broken", "c"):
        broker.declare(name)
        broker.publish(name, "m", b"M", 0)
    redis_client.delete(broker.keys("broken").ready)
    redis_client.set(broker.keys("broken").ready, "garbage")

    snap = take(broker)

    a, broken, c = snap.queues
    assert (a.ready, c.ready) == (1, 1)
    assert broken.queue == "broken" and not broken.readable
    assert "WRONGTYPE" in (broken.error or "")
    assert snap.unreadable == [broken]


@pytest.mark.parametrize("part", ["born", "sched", "stats", "consumers", "dead"])
def test_any_corrupted_key_read_makes_only_its_queue_unreadable(
    broker: Broker, redis_client: redis.Redis, part: str
):
    broker.declare("ok")
    broker.declare("bad")
    broker.publish("ok", "m", b"M", 0)
    key = getattr(broker.keys("bad"), part)
    redis_client.delete(key)
    redis_client.rpush(key, "garbage")

    ok, bad = sorted(take(broker).queues, key=lambda q: q.queue != "ok")

    assert (ok.queue, ok.ready, ok.readable) == ("ok", 1, True)
    assert (bad.queue, bad.readable) == ("bad", False)


def test_garbage_counters_are_skipped_and_the_rest_read(broker: Broker, redis_client: redis.Redis):
    broker.declare("q")
    broker.publish("q", "m", b"M", 0)
    redis_client.hset(
        broker.keys("q").stats,
        mapping={"acked": "many", "not-a-counter": 3, b"\xff\xfe": 1, "dead:poison": 2},
    )

    [q] = take(broker).queues

    assert q.readable
    assert q.counters == {"published": 1}
    assert q.counter(Counter.ACKED) == 0
    assert q.dead_by_reason == {"poison": 2}


def test_registry_names_that_are_not_utf8_are_skipped_and_counted(
    broker: Broker, redis_client: redis.Redis, prefix: str
):
    broker.declare("q")
    redis_client.sadd(f"{prefix}queues", b"\xff\xfe")

    snap = take(broker)

    assert [q.queue for q in snap.queues] == ["q"]
    assert snap.skipped_names == 1


@pytest.mark.parametrize(("chunk", "trips"), [(1000, 2), (100, 4)])
def test_a_thousand_queues_cost_a_bounded_number_of_round_trips_and_no_scan(
    redis_client: redis.Redis, prefix: str, chunk: int, trips: int
):
    # registry: 1 round trip; then one per chunk of queues (300 queues)
    counting = counting_client(redis_client.connection_pool.connection_kwargs["port"])
    broker = Broker(counting, prefix=prefix)
    pipe = redis_client.pipeline(transaction=False)
    for i in range(300):
        pipe.sadd(f"{prefix}queues", f"q{i:04}")
    pipe.execute()
    broker.publish("q0007", "m", b"M", 0)
    take(broker)  # scripts loaded
    redis_client.config_resetstat()
    CountingConnection.sent = 0

    snap = take(broker, chunk=chunk)

    assert len(snap.queues) == 300
    assert snap.round_trips == CountingConnection.sent == trips
    stats = redis_client.info("commandstats")
    assert not {"cmdstat_keys", "cmdstat_scan"} & set(stats)
    assert stats["cmdstat_zcard"]["calls"] == 300 * 4
    counting.close()


def test_a_script_lost_by_the_server_is_loaded_again(broker: Broker, redis_client: redis.Redis):
    broker.declare("q")
    broker.publish("q", "m", b"M", 0)
    take(broker)
    redis_client.script_flush()

    snap = take(broker)

    assert snap.queues[0].oldest_ready_age == 0.0
    assert snap.round_trips == 1 + 3  # registry; pipeline, SCRIPT LOAD, pipeline again


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("celery", QueueKind.NORMAL),
        ("reports.bcast.x", QueueKind.NORMAL),
        ("w1@host.celery.pidbox", QueueKind.PIDBOX),
        ("0c2d9a1e-aaaa-4bbb-8ccc-0123456789ab.reply.celery.pidbox", QueueKind.PIDBOX),
        ("celeryev.7f3e8a5c-1111-4222-8333-444455556666", QueueKind.EVENTS),
        ("cache.w1@host.bcast", QueueKind.BROADCAST),
        ("bcast.0c2d9a1e-aaaa-4bbb-8ccc-0123456789ab", QueueKind.BROADCAST),
    ],
)
def test_queues_are_classed_by_celerys_names(name: str, kind: QueueKind):
    assert queue_kind(name) == kind


def test_the_scrape_benchmark_fills_each_queue_with_every_state(broker: Broker):
    fill(broker, ["a", "b"])

    snap = take(broker)

    assert [q.queue for q in snap.queues] == ["a", "b"]
    for q in snap.queues:
        assert q.states() == {"ready": 2, "reserved": 2, "scheduled": 1, "dead": 1}
        assert q.dead_by_reason == {"failed": 1}
