"""Durable broadcast: fanout to ephemeral queues whose bindings outlive a consumer for a while.

An ephemeral queue (``auto_delete=True``, as Celery's broadcast queues) is bound with an expiry
(``binding_ttl``) that its live consumer keeps renewing. A subscriber that reconnects within it
finds what was broadcast meanwhile; one gone for longer loses its binding and its queue, at the
next publish that reads the binding table. A durable queue's binding never expires.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kombu import Exchange, Queue
from kombu_helpers import FAST, Receiver, broker, connect, ids_of, publish, scan_keys

from celery_msg.keys import bindings_key

if TYPE_CHECKING:
    from conftest import Server

EXCHANGE = Exchange("news", type="fanout")


def _ephemeral(name: str) -> Queue:
    return Queue(name, EXCHANGE, auto_delete=True)


def _bound_queues(server: Server, prefix: str) -> list[str]:
    return sorted(b.queue for b in broker(server, prefix).table(EXCHANGE.name).bindings)


def test_a_fanout_exchange_delivers_each_message_to_every_bound_queue(server: Server, prefix: str):
    with (
        connect(server, prefix) as a,
        connect(server, prefix) as b,
        connect(server, prefix, binding_cache_ttl=0) as publisher,
    ):
        sub_a = Receiver(a, [_ephemeral("news.a")])
        sub_b = Receiver(b, [_ephemeral("news.b")])
        publish(publisher, ["n1", "n2"], exchange=EXCHANGE, routing_key="")
        assert ids_of(sub_a.receive(2)) == ["n1", "n2"]
        assert ids_of(sub_b.receive(2)) == ["n1", "n2"]


def test_a_subscriber_that_reconnects_within_binding_ttl_gets_what_was_broadcast_meanwhile(
    server: Server, prefix: str
):
    options = {**FAST, "binding_ttl": 5.0}
    with (
        connect(server, prefix, binding_cache_ttl=0) as publisher,
        connect(server, prefix, **options) as b,
    ):
        sub_b = Receiver(b, [_ephemeral("news.b")])
        with connect(server, prefix, **options) as a:
            sub_a = Receiver(a, [_ephemeral("news.a")])
            publish(publisher, ["n1"], exchange=EXCHANGE, routing_key="")
            assert ids_of(sub_a.receive(1)) == ["n1"]
        # a is gone: what is broadcast now waits in its queue.
        publish(publisher, ["n2", "n3"], exchange=EXCHANGE, routing_key="")
        assert broker(server, prefix).counts("news.a") == {
            "ready": 2,
            "reserved": 0,
            "scheduled": 0,
            "dead": 0,
        }
        with connect(server, prefix, **options) as again:
            assert ids_of(Receiver(again, [_ephemeral("news.a")]).receive(2)) == ["n2", "n3"]
        assert ids_of(sub_b.receive(3)) == ["n1", "n2", "n3"]


def test_a_subscriber_gone_longer_than_binding_ttl_loses_its_binding_and_queue_at_next_publish(
    server: Server, prefix: str, redis_client
):
    options = {**FAST, "binding_ttl": 1.0}
    with (
        connect(server, prefix, binding_cache_ttl=0) as publisher,
        connect(server, prefix, **options) as b,
    ):
        sub_b = Receiver(b, [_ephemeral("news.b")])
        with connect(server, prefix, **options) as a:
            sub_a = Receiver(a, [_ephemeral("news.a")])
            publish(publisher, ["n1"], exchange=EXCHANGE, routing_key="")
            assert ids_of(sub_a.receive(1)) == ["n1"]
            assert ids_of(sub_b.receive(1)) == ["n1"]
        publish(publisher, ["n2"], exchange=EXCHANGE, routing_key="")  # a's queue keeps n2
        assert scan_keys(redis_client, f"{prefix}{{news.a}}:*")
        time.sleep(1.5)  # longer than binding_ttl; b (alive) keeps renewing its own binding

        publish(publisher, ["n3"], exchange=EXCHANGE, routing_key="")

        assert ids_of(sub_b.receive(2)) == ["n2", "n3"]
    assert _bound_queues(server, prefix) == ["news.b"]
    assert scan_keys(redis_client, f"{prefix}{{news.a}}:*") == set()
    assert "news.a" not in broker(server, prefix).queues()
    assert broker(server, prefix).lookup("n3", ["news.a"]) == []


def test_a_durable_queue_bound_to_a_fanout_exchange_never_expires(server: Server, prefix: str):
    durable = Queue("news.archive", EXCHANGE, durable=True, auto_delete=False)
    options = {**FAST, "binding_ttl": 1.0}
    with connect(server, prefix, **options) as a:
        Receiver(a, [durable]).nothing_for(0.2)
    # Its consumer is gone, and the binding is stored without a deadline (0), so no read of the
    # table ever finds it expired, however long after (a deadline in the past would be found
    # by the very next publish).
    look = broker(server, prefix)
    assert look.client.hvals(bindings_key(prefix, EXCHANGE.name)) == [b"0"]
    with connect(server, prefix, binding_cache_ttl=0) as publisher:
        publish(publisher, ["n1"], exchange=EXCHANGE, routing_key="")

    assert _bound_queues(server, prefix) == ["news.archive"]
    assert look.counts("news.archive") == {"ready": 1, "reserved": 0, "scheduled": 0, "dead": 0}
    assert look.client.hvals(bindings_key(prefix, EXCHANGE.name)) == [b"0"]


def test_a_live_subscriber_keeps_its_binding_even_when_binding_ttl_is_shorter_than_renewal(
    server: Server, prefix: str
):
    # Leases are renewed every lease_timeout / 3 (here 3.3 s); the binding must be renewed
    # before binding_ttl (1 s) runs out too, or a live subscriber silently loses broadcasts.
    options = {"lease_timeout": 10.0, "sweep_interval": 0.2, "binding_ttl": 1.0}
    with (
        connect(server, prefix, **options) as a,
        connect(server, prefix, binding_cache_ttl=0) as publisher,
    ):
        sub_a = Receiver(a, [_ephemeral("news.a")])
        publish(publisher, ["n1"], exchange=EXCHANGE, routing_key="")
        assert ids_of(sub_a.receive(1)) == ["n1"]
        sub_a.nothing_for(1.5)
        publish(publisher, ["n2"], exchange=EXCHANGE, routing_key="")
        assert ids_of(sub_a.receive(1, timeout=2.0)) == ["n2"]


def test_a_publisher_caching_the_binding_table_routes_its_next_publish_to_a_new_binding(
    server: Server, prefix: str
):
    # The cache may last a minute; every change of bindings moves the exchange's version on,
    # which the publish script checks before writing anything.
    with (
        connect(server, prefix, binding_cache_ttl=60.0) as publisher,
        connect(server, prefix) as a,
        connect(server, prefix) as b,
    ):
        Receiver(a, [_ephemeral("news.a")])
        publish(publisher, ["n1"], exchange=EXCHANGE, routing_key="")  # caches [news.a]
        Receiver(b, [_ephemeral("news.b")])
        publish(publisher, ["n2"], exchange=EXCHANGE, routing_key="")

    look = broker(server, prefix)
    assert look.size("news.a") == 2
    assert look.size("news.b") == 1


def test_a_publisher_whose_cached_table_routes_nowhere_finds_a_binding_made_since(
    server: Server, prefix: str
):
    # Celery's replies: each call binds a reply queue just before its request, and the worker
    # replies with a table cached from the call before, which has no route for the new key.
    direct = Exchange(f"{prefix}replies", type="direct")
    with (
        connect(server, prefix, binding_cache_ttl=60.0) as publisher,
        connect(server, prefix) as owner,
    ):
        Queue(f"{prefix}r1", direct, routing_key="k1")(owner.default_channel).declare()
        publish(publisher, ["m1"], exchange=direct, routing_key="k1")  # caches [k1 -> r1]
        Queue(f"{prefix}r2", direct, routing_key="k2")(owner.default_channel).declare()
        publish(publisher, ["m2"], exchange=direct, routing_key="k2")

    look = broker(server, prefix)
    assert (look.size(f"{prefix}r1"), look.size(f"{prefix}r2")) == (1, 1)


def test_a_publisher_caching_the_binding_table_never_writes_into_a_deleted_queue(
    server: Server, prefix: str
):
    direct = Exchange(f"{prefix}direct", type="direct")
    queue = Queue(f"{prefix}gone", direct, routing_key="k")
    with (
        connect(server, prefix, binding_cache_ttl=60.0) as publisher,
        connect(server, prefix) as owner,
    ):
        queue(owner.default_channel).declare()
        publish(publisher, ["m1"], exchange=direct, routing_key="k")  # caches the binding
        assert broker(server, prefix).size(queue.name) == 1
        queue(owner.default_channel).delete()
        publish(publisher, ["m2"], exchange=direct, routing_key="k")

    look = broker(server, prefix)
    assert look.counts(queue.name) == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 0}
    assert queue.name not in look.queues()


def test_a_publisher_that_never_declared_the_exchange_still_broadcasts(server: Server, prefix: str):
    # Celery publishes to a Broadcast queue's exchange without declaring it; the type the
    # consumer declared is read from Redis, so the message is not routed as direct (and lost).
    with (
        connect(server, prefix) as consumer,
        connect(server, prefix, binding_cache_ttl=0) as publisher,
    ):
        sub = Receiver(consumer, [_ephemeral("news.a")])
        producer = publisher.Producer(auto_declare=False)
        assert EXCHANGE.name not in publisher.default_channel.state.exchanges
        producer.publish(
            {"id": "n1"}, exchange=EXCHANGE.name, routing_key="anything", headers={"id": "n1"}
        )
        assert ids_of(sub.receive(1)) == ["n1"]
