"""A reserve sent ahead (celery_msg.readahead) on a real server: its replies, and its failures.

The worker-level outcome (a solo worker never holds more than its prefetch while rounds go
ahead) is in test_celery_basics.py; here the subject is what happens between sending and
reading: a script Redis lost meanwhile, a connection killed meanwhile.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import redis
from pinned import LEASE_MS
from redis.backoff import NoBackoff
from redis.retry import Retry
from waiting import wait_until

from bench.proxy import TcpProxy
from celery_msg.core import Broker, ReserveRequest, Round
from celery_msg.readahead import ReadAhead
from celery_msg.redisio import Replication

if TYPE_CHECKING:
    from pinned import Clock

    from tests.conftest import Server


def _publish(broker: Broker, queue: str, n: int) -> list[str]:
    broker.declare(queue)
    ids = [f"id-{i}" for i in range(n)]
    for message_id in ids:
        broker.publish(queue, message_id, message_id.encode(), 0)
    return ids


def _request(queue: str, count: int) -> list[ReserveRequest]:
    return [ReserveRequest([queue], count, "c1")]


def _sent_ahead(broker: Broker, *, published: int) -> tuple[list[str], ReadAhead]:
    """``published`` messages in ``q``, a round for two of them sent ahead and run (leased),
    its reply not read yet: the ids published and the :class:`ReadAhead` holding the reply."""
    ids = _publish(broker, "q", published)
    ahead = ReadAhead(broker)
    assert ahead.send(broker.prepare_round([], _request("q", 2)))
    wait_until(lambda: broker.counts("q")["reserved"] == 2, what="the reserve sent ahead ran")
    return ids, ahead


def _read(ahead: ReadAhead) -> tuple[Round, float]:
    read = ahead.read()
    assert read is not None
    assert not ahead.pending
    return read


def test_a_round_sent_ahead_leases_in_publish_order_and_reads_back_like_a_round(broker: Broker):
    ids = _publish(broker, "q", 5)
    ahead = ReadAhead(broker)
    assert ahead.send(broker.prepare_round([], _request("q", 3)))
    assert ahead.pending

    round_, _ = _read(ahead)

    [deliveries] = round_.deliveries
    assert [d.key for d in deliveries] == ids[:3]
    assert [d.payload for d in deliveries] == [i.encode() for i in ids[:3]]
    assert broker.counts("q")["reserved"] == 3
    ahead.close()


def test_a_script_redis_lost_before_the_round_ran_is_loaded_and_the_round_served(
    broker: Broker, redis_client: redis.Redis
):
    ids = _publish(broker, "q", 2)
    redis_client.script_flush()
    ahead = ReadAhead(broker)
    assert ahead.send(broker.prepare_round([], _request("q", 2)))

    round_, _ = _read(ahead)

    assert [d.key for d in round_.deliveries[0]] == ids  # served once, not twice
    counts = broker.counts("q")
    assert (counts["ready"], counts["reserved"]) == (0, 2)
    ahead.close()


def test_a_reply_lost_with_its_connection_gives_nothing_and_the_leases_come_back(
    server: Server, prefix: str, redis_client: redis.Redis, clock: Clock
):
    with TcpProxy(server.process.port) as proxy:
        client = redis.Redis(host="127.0.0.1", port=proxy.port, retry=Retry(NoBackoff(), 0))
        broker = Broker(client, prefix=prefix, lease_ms=LEASE_MS, clock=clock)
        ids = _publish(broker, "q", 3)
        broker.reserve(["q"], 0, "c0")  # a first round: the script is loaded, as in a worker
        ahead = ReadAhead(broker)
        ahead.conn.connect()  # its handshake needs a reply
        proxy.hold_replies()
        assert ahead.send(broker.prepare_round([], _request("q", 3)))
        # The reserve ran; its reply never comes: the link dies first.
        leased = broker.keys("q").leased
        wait_until(lambda: redis_client.zcard(leased) == 3, what="the reserve sent ahead ran")
        proxy.drop_all()

        assert ahead.read() is None
        assert not ahead.pending
        ahead.close()

    # Nobody renews those leases: once they expire, a reserve reclaims them, each once.
    clock.t += LEASE_MS / 1000 + 1
    again = Broker(redis_client, prefix=prefix, lease_ms=LEASE_MS, clock=clock)
    delivered = again.reserve(["q"], 10, "c2")
    assert sorted(d.key for d in delivered) == sorted(ids)
    assert all(d.deliveries == 2 for d in delivered)


def test_a_reply_read_after_the_leases_expired_drops_what_another_consumer_took_meanwhile(
    broker: Broker, clock: Clock
):
    # A solo worker's last task ran longer than the lease: nobody renewed what the reserve
    # sent ahead had leased (its reply was unread), another consumer reclaimed some of it.
    ids, ahead = _sent_ahead(broker, published=4)
    clock.t += LEASE_MS / 1000 + 1
    taken = broker.reserve(["q"], 1, "c2")  # reclaims both, serves the first back to c2
    assert [d.key for d in taken] == [ids[0]]

    round_, _ = _read(ahead)

    assert round_.deliveries == [[]]  # both leases were taken back: neither is delivered here
    ahead.close()


def test_a_reply_read_within_a_renewal_interval_is_delivered_without_renewing(
    broker: Broker, clock: Clock, redis_client: redis.Redis
):
    ids, ahead = _sent_ahead(broker, published=2)
    clock.t += LEASE_MS / 1000 / 3 - 0.5
    redis_client.config_resetstat()
    before_read = time.monotonic()

    round_, granted_at = _read(ahead)

    assert [d.key for d in round_.deliveries[0]] == ids
    assert "cmdstat_evalsha" not in redis_client.info("commandstats")  # no extend was needed
    assert granted_at < before_read  # their age counts from the send, not from the read
    ahead.close()


def test_a_reply_read_after_a_renewal_interval_renews_the_leases_it_keeps(
    broker: Broker, clock: Clock
):
    ids, ahead = _sent_ahead(broker, published=2)
    clock.t += LEASE_MS / 1000 - 1  # about to expire
    before_read = time.monotonic()

    round_, granted_at = _read(ahead)

    assert [d.key for d in round_.deliveries[0]] == ids
    assert granted_at >= before_read  # renewed by the read: their age counts from there
    clock.t += 2  # past the first deadline: renewed, so nobody can reclaim them
    assert broker.reserve(["q"], 10, "c2") == []
    ahead.close()


def test_a_round_sent_ahead_is_refused_where_rounds_must_stay_synchronous(
    redis_client: redis.Redis, prefix: str
):
    assert ReadAhead.usable(Broker(redis_client, prefix=prefix))
    replicated = Broker(redis_client, prefix=prefix, replication=Replication(1, 100))
    assert not ReadAhead.usable(replicated)
