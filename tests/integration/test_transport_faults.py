"""Faults through kombu: clients killed by the server, a server killed and restarted, a
connection lost mid-reply. Every fault is real: ``CLIENT KILL``, SIGKILL of the server process
(with an AOF written with ``appendfsync always``), or a proxy that drops a reply on the floor.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from kombu import Connection
from kombu_helpers import (
    FAST,
    ConsumerProcess,
    CuttingProxy,
    Receiver,
    ack_now,
    broker,
    connect,
    direct_queue,
    ids_of,
    publish,
    wait_until,
)

from celery_msg.core import State

if TYPE_CHECKING:
    from conftest import Server

LEASE = FAST["lease_timeout"]
SWEEP = FAST["sweep_interval"]


@pytest.fixture
def aof_server(server_factory: Callable[..., Server]) -> Server:
    """A server of its own that keeps every acknowledged write across a SIGKILL."""
    return server_factory(appendonly=True, appendfsync="always")


def _ids(count: int, start: int = 0) -> list[str]:
    return [f"m{i:03d}" for i in range(start, start + count)]


def _empty(server: Server, prefix: str, queue: str) -> bool:
    return broker(server, prefix).counts(queue) == {
        "ready": 0,
        "reserved": 0,
        "scheduled": 0,
        "dead": 0,
    }


def test_killing_every_client_while_a_consumer_waits_loses_nothing_and_it_keeps_receiving(
    fresh_server: Server, prefix: str
):
    with connect(fresh_server, prefix, sweep_interval=5.0) as conn:
        publish(conn, ["held"], routing_key="work")
        receiver = Receiver(conn, [direct_queue("work")], prefetch_count=10, ack=False)
        (held,) = receiver.receive(1)
        failures: list[BaseException] = []

        def wait() -> None:  # blocked in BLPOP for up to sweep_interval
            try:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=1)
            except BaseException as exc:
                failures.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        with fresh_server.process.client() as admin:
            wait_until(
                lambda: any(c["cmd"] == "blpop" for c in admin.client_list()),
                what="the consumer to block in BLPOP",
            )
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        waiter.join(10)

        # Either the wait surfaces the loss as an error kombu knows how to recover from, or the
        # client reconnects by itself; then the consumer carries on, on the same Connection.
        for exc in failures:
            assert isinstance(exc, conn.connection_errors), repr(exc)
        conn.ensure_connection(max_retries=3)
        with connect(fresh_server, prefix) as publisher:
            publish(publisher, _ids(3), routing_key="work")
        assert ids_of(receiver.receive(3)) == _ids(3)
        # The lease outlives the connection that took it: the held message is still ours.
        held.ack()
        for message in receiver.messages[1:]:
            message.ack()
    assert _empty(fresh_server, prefix, "work")
    assert broker(fresh_server, prefix).stats("work") == {
        "published": 4,
        "delivered": 4,
        "acked": 4,
    }


def test_every_publish_that_returned_survives_a_redis_crash_and_is_consumed_exactly_once(
    aof_server: Server, prefix: str
):
    ids = _ids(500)
    with connect(aof_server, prefix) as conn:
        publish(conn, ids, routing_key="work")
    aof_server.process.kill()
    aof_server.process.restart()

    with connect(aof_server, prefix) as conn:
        got = Receiver(conn, [direct_queue("work")], prefetch_count=100).receive(500, timeout=30)
    assert ids_of(got) == ids
    assert [m.delivery_info["delivery_count"] for m in got] == [1] * 500
    assert _empty(aof_server, prefix, "work")


def test_a_consumer_whose_redis_is_gone_gets_a_connection_error_and_resumes_after_restart(
    aof_server: Server, prefix: str
):
    look = broker(aof_server, prefix)
    with connect(aof_server, prefix) as conn:
        publish(conn, _ids(10), routing_key="work")
    # A 10 s lease: nothing in this test may come back through lease expiry.
    with connect(aof_server, prefix, sweep_interval=SWEEP) as conn:
        receiver = Receiver(conn, [direct_queue("work")], prefetch_count=5, ack=False)
        assert ids_of(receiver.receive(5)) == _ids(5)
        for message in receiver.messages[:2]:
            ack_now(message)
        assert look.counts("work") == {"ready": 5, "reserved": 3, "scheduled": 0, "dead": 0}

        aof_server.process.kill()
        down_at = time.monotonic()
        with pytest.raises(conn.connection_errors) as raised:
            conn.drain_events(timeout=30)
        assert "Redis unreachable" in str(raised.value)
        time.sleep(max(0.0, 2.0 - (time.monotonic() - down_at)))  # down for at least 2 s
        aof_server.process.restart()

        # Its three unacked messages are still leased to it; closing returns them, uncounted.
        assert look.counts("work") == {"ready": 5, "reserved": 3, "scheduled": 0, "dead": 0}
        conn.close()
        assert look.counts("work") == {"ready": 8, "reserved": 0, "scheduled": 0, "dead": 0}

    with connect(aof_server, prefix) as again:
        got = Receiver(again, [direct_queue("work")], prefetch_count=8).receive(8)
    assert sorted(ids_of(got[:3])) == _ids(3, start=2)
    assert ids_of(got[3:]) == _ids(5, start=5)
    assert [m.delivery_info["delivery_count"] for m in got] == [1] * 8
    assert _empty(aof_server, prefix, "work")


def test_the_unacked_messages_of_a_consumer_killed_during_a_redis_outage_come_back_after_it(
    aof_server: Server, prefix: str
):
    look = broker(aof_server, prefix)
    with connect(aof_server, prefix) as conn:
        publish(conn, _ids(10), routing_key="work")
    with ConsumerProcess(aof_server, prefix, "work", prefetch=5, **FAST) as dying:
        assert [e["got"] for e in dying.received(5)] == _ids(5)
        for message_id in _ids(2):
            dying.send(f"ack {message_id}")
            assert dying.event() == {"acked": message_id}
        wait_until(lambda: look.counts("work")["reserved"] == 3, what="two acks to be flushed")

        aof_server.process.kill()
        dying.kill()
        time.sleep(2.0)
        aof_server.process.restart()

    with connect(aof_server, prefix, **FAST) as conn:
        got = Receiver(conn, [direct_queue("work")], prefetch_count=8).receive(8, timeout=10)
    assert sorted(ids_of(got[:3])) == _ids(3, start=2)
    assert [m.delivery_info["delivery_count"] for m in got[:3]] == [2, 2, 2]
    assert ids_of(got[3:]) == _ids(5, start=5)
    assert [m.delivery_info["delivery_count"] for m in got[3:]] == [1] * 5
    assert _empty(aof_server, prefix, "work")
    assert look.stats("work")["reclaimed"] == 3


# -- a connection lost after the server did the work, before the client heard of it ----------


@pytest.fixture
def proxy(fresh_server: Server) -> Iterator[CuttingProxy]:
    cutter = CuttingProxy(fresh_server.process.port)
    yield cutter
    cutter.close()


def _through(proxy: CuttingProxy, prefix: str, **options: Any) -> Connection:
    return Connection(
        f"celery-msg://127.0.0.1:{proxy.port}/0",
        transport_options={"key_prefix": prefix, **options},
    )


def test_a_publish_whose_reply_is_lost_is_not_silently_stored_twice(
    fresh_server: Server, prefix: str, proxy: CuttingProxy
):
    look = broker(fresh_server, prefix)
    with _through(proxy, prefix) as conn:
        publish(conn, ["warm-up"], routing_key="work")  # scripts loaded, connection open
        proxy.cut_reply_to(b"EVALSHA")
        # If it raises, the caller is told the outcome is unknown and may publish again.
        with contextlib.suppress(*conn.connection_errors):
            publish(conn, ["job"], routing_key="work")
    assert proxy.cuts == 1
    # Either way there is one "job", not a second copy nobody asked for.
    assert [(i.key, i.state) for i in look.lookup("job", ["work"])] == [("job", State.READY)]
    assert look.stats("work")["published"] == 2


def test_a_fetch_whose_reply_is_lost_strands_nothing_beyond_one_lease(
    fresh_server: Server, prefix: str, proxy: CuttingProxy
):
    look = broker(fresh_server, prefix)
    with _through(proxy, prefix, **FAST) as conn:
        publish(conn, _ids(3), routing_key="work")
        receiver = Receiver(conn, [direct_queue("work")], prefetch_count=1)
        proxy.cut_reply_to(b"EVALSHA")
        got: list[Any] = []
        deadline = time.monotonic() + LEASE + SWEEP + 5
        while len(got) < 3 and time.monotonic() < deadline:
            with contextlib.suppress(*conn.connection_errors):
                got += receiver.receive(1, timeout=deadline - time.monotonic())
    assert proxy.cuts == 1
    assert sorted(ids_of(got)) == _ids(3)
    assert _empty(fresh_server, prefix, "work")
    assert look.stats("work")["acked"] == 3
