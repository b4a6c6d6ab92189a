"""Queue arguments through kombu: ``Queue(message_ttl=, max_length=, expires=)`` are honoured.

kombu turns them into ``x-message-ttl`` / ``x-max-length`` / ``x-expires``; the transport
stores them with the queue at declaration, so every publisher honours them: a message older
than the TTL is never delivered (counted ``expired``), a queue nobody consumes stays bounded
(by rate x TTL, or by its max length, dropping the head), and a queue unused for ``expires``
is deleted with its messages. Celery's event queues (5 s TTL, 60 s expiry) rely on this.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from celery import Celery
from kombu import Exchange, Queue
from kombu_helpers import (
    FAST,
    Receiver,
    broker,
    connect,
    direct_queue,
    ids_of,
    publish,
    scan_keys,
    url,
    wait_until,
)

from celery_msg import ConfigurationError
from celery_msg.keys import expiring_key
from celery_msg.queueargs import QueueArguments

if TYPE_CHECKING:
    from conftest import Server
    from kombu import Connection


def _declare(conn: Connection, queue: Queue) -> None:
    queue(conn.default_channel).declare()


def test_the_arguments_of_a_kombu_queue_are_stored_with_it_in_milliseconds(
    server: Server, prefix: str
):
    with connect(server, prefix) as conn:
        _declare(conn, direct_queue("q", message_ttl=1.5, expires=60, max_length=100))

    assert broker(server, prefix).queue_arguments("q") == QueueArguments(
        message_ttl_ms=1_500, expires_ms=60_000, max_length=100
    )


def test_messages_published_longer_ago_than_the_ttl_are_never_delivered_and_count_expired(
    server: Server, prefix: str
):
    look = broker(server, prefix)
    with connect(server, prefix, **FAST) as conn:
        _declare(conn, direct_queue("q", message_ttl=1))
        publish(conn, ["old1", "old2", "old3"], routing_key="q")
        time.sleep(1.05)  # the TTL itself must pass: no consumer, nobody else looks at them
        publish(conn, ["new"], routing_key="q")

        receiver = Receiver(conn, [direct_queue("q", message_ttl=1)])
        assert ids_of(receiver.receive(1)) == ["new"]

    assert look.counts("q") == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 0}
    assert look.stats("q")["expired"] == 3
    assert look.lookup("old1") == []


def _over_rate_times_ttl(samples: list[tuple[float, int, int]], ttl: float) -> list[Any]:
    """The samples ``(time, sent so far, queue size)`` whose size exceeds what was sent within
    the TTL before them (the local rate x TTL), with some slack for the clock and for the ten
    expired messages one publish removes at most."""
    over = []
    for at, sent, size in samples:
        before = [n for t, n, _ in samples if t < at - ttl - 0.05]
        recent = sent - (before[-1] if before else 0)
        if size > recent + 20:
            over.append((at, sent, size, recent))
    return over


def test_a_ttl_queue_with_a_publisher_and_no_consumer_stays_near_rate_times_ttl(
    server: Server, prefix: str
):
    look = broker(server, prefix)
    ttl = 0.5
    samples: list[tuple[float, int, int]] = []
    with connect(server, prefix) as conn:
        _declare(conn, direct_queue("q", message_ttl=ttl))
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < 4 * ttl:
            publish(conn, [f"m{sent + i}" for i in range(20)], routing_key="q")
            sent += 20
            samples.append((time.monotonic(), sent, look.size("q")))

    # Without a TTL the queue would hold all `sent`; with it, what one TTL brings.
    assert _over_rate_times_ttl(samples, ttl) == []
    assert look.size("q") < sent / 2
    assert look.stats("q")["expired"] + look.size("q") == sent
    assert look.client.zcard(look.keys("q").ttl) == look.size("q")


def test_a_queue_over_its_max_length_drops_the_oldest_and_counts_them(server: Server, prefix: str):
    look = broker(server, prefix)
    with connect(server, prefix) as conn:
        _declare(conn, direct_queue("q", max_length=3))
        publish(conn, [f"m{i}" for i in range(5)], routing_key="q")

        receiver = Receiver(conn, [direct_queue("q", max_length=3)])
        assert ids_of(receiver.receive(3)) == ["m2", "m3", "m4"]

    assert look.stats("q")["dropped"] == 2
    assert look.counts("q")["ready"] == 0


def test_a_queue_declared_with_expires_and_never_consumed_is_deleted_after_it(
    server: Server, prefix: str
):
    look = broker(server, prefix)
    with connect(server, prefix, binding_cache_ttl=0) as conn:
        _declare(conn, Queue("gone", Exchange("ex", type="direct"), "gone", expires=2))
        _declare(conn, Queue("kept", Exchange("ex", type="direct"), "kept"))
        publish(conn, ["m1"], routing_key="gone", exchange=Exchange("ex", type="direct"))
        declared = time.monotonic()
        assert look.exists("gone") and look.counts("gone")["ready"] == 1

        # Anyone publishing through an exchange reads its table, and with it sweeps.
        def gone() -> bool:
            publish(conn, ["k"], routing_key="kept", exchange=Exchange("ex", type="direct"))
            return not look.exists("gone")

        wait_until(gone, timeout=6, what="the unused queue to be deleted")
        assert time.monotonic() - declared >= 1.9

    assert scan_keys(look.client, f"{prefix}{{gone}}*") == set()
    assert look.client.zscore(expiring_key(prefix), "gone") is None
    assert [b.queue for b in look.table("ex").bindings] == ["kept"]
    assert look.exists("kept")


def test_a_queue_with_expires_is_swept_by_any_live_consumer_renewal(server: Server, prefix: str):
    look = broker(server, prefix)
    with connect(server, prefix) as declarer:
        _declare(declarer, direct_queue("gone", expires=1))
    with connect(server, prefix, lease_timeout=0.6) as conn:
        receiver = Receiver(conn, [direct_queue("other")])
        deadline = time.monotonic() + 5
        while look.exists("gone") and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.1)
        assert not look.exists("gone")
        assert receiver.messages == []


def test_a_queue_with_expires_is_never_deleted_while_a_consumer_lives(server: Server, prefix: str):
    look = broker(server, prefix)
    ex = Exchange("ex", type="direct")
    with (
        connect(server, prefix) as conn,
        connect(server, prefix, binding_cache_ttl=0) as publisher,
    ):
        _declare(publisher, Queue("idle", ex, "idle", expires=1))
        receiver = Receiver(conn, [Queue("live", ex, "live", expires=1)])
        stop = threading.Event()

        def sweep() -> None:
            while not stop.is_set():
                look.table("ex")
                look.expire_queues()
                time.sleep(0.05)

        sweeper = threading.Thread(target=sweep)
        sweeper.start()
        try:
            receiver.nothing_for(3.0)  # three times `expires`, sweeping all along
        finally:
            stop.set()
            sweeper.join()
        assert not look.exists("idle")  # the same expiry, but nobody used it
        assert look.exists("live")
        publish(publisher, ["m"], routing_key="live", exchange=ex)
        assert ids_of(receiver.receive(1)) == ["m"]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"x-message-ttl": "five"}, "x-message-ttl"),
        ({"x-message-ttl": -1}, "x-message-ttl"),
        ({"x-expires": 0}, "x-expires"),
        ({"x-max-length": 2.5}, "x-max-length"),
        ({"x-max-length": True}, "x-max-length"),
        ({"x-overflow": "reject-publish"}, "x-overflow"),
    ],
)
def test_an_invalid_queue_argument_fails_the_declaration_naming_it_and_stores_nothing(
    server: Server, prefix: str, arguments: dict[str, Any], named: str
):
    with (
        connect(server, prefix) as conn,
        pytest.raises(ConfigurationError, match=named),
    ):
        _declare(conn, direct_queue("bad", queue_arguments=arguments))

    look = broker(server, prefix)
    assert not look.exists("bad")
    assert scan_keys(look.client, f"{prefix}*") == set()


def test_a_redeclaration_replaces_the_arguments_and_a_passive_one_keeps_them(
    server: Server, prefix: str
):
    look = broker(server, prefix)
    with connect(server, prefix) as conn:
        _declare(conn, direct_queue("q", message_ttl=1, expires=30))
        direct_queue("q")(conn.default_channel).queue_declare(passive=True)
        assert look.queue_arguments("q") == QueueArguments(message_ttl_ms=1_000, expires_ms=30_000)

        _declare(conn, direct_queue("q", max_length=5))
    assert look.queue_arguments("q") == QueueArguments(max_length=5)
    assert look.client.zscore(expiring_key(prefix), "q") is None


def test_celery_event_queues_stay_bounded_by_rate_times_their_ttl_without_a_consumer(
    server: Server, prefix: str
):
    """An events consumer (Flower, ``celery events``) stops consuming while workers keep sending
    events: its queue keeps about rate x ``event_queue_ttl`` messages, not all of them."""
    app = Celery("events", broker=url(server), set_as_current=False)
    app.conf.broker_transport_options = {"key_prefix": prefix}
    look = broker(server, prefix)
    with app.connection_for_write() as conn:
        defaults = app.events.Receiver(conn, handlers={})
        assert defaults.queue.message_ttl == 5.0 and defaults.queue.expires == 60.0
        _declare(conn, defaults.queue)
        assert look.queue_arguments(defaults.queue.name) == QueueArguments(
            message_ttl_ms=5_000, expires_ms=60_000
        )

        app.conf.event_queue_ttl = 0.5  # the same path as the 5 s default, in less test time
        receiver = app.events.Receiver(conn, handlers={})
        name = receiver.queue.name
        with receiver.consumer_context(wakeup=False):
            pass  # it consumed once (declared and bound its queue), then stopped for good
        samples: list[tuple[float, int, int]] = []
        with app.events.Dispatcher(conn, enabled=True) as dispatcher:
            started = time.monotonic()
            sent = 0
            while time.monotonic() - started < 2.0:
                for _ in range(20):
                    dispatcher.send("worker-heartbeat", freq=2.0)
                sent += 20
                samples.append((time.monotonic(), sent, look.size(name)))

    assert _over_rate_times_ttl(samples, 0.5) == []
    assert look.size(name) < sent / 2
    assert look.stats(name)["expired"] + look.size(name) == sent
