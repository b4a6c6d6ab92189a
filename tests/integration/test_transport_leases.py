"""Leases through kombu: a dead consumer's messages come back, a live one's never do, a zombie's
late ack is refused, and a warm close returns prefetched messages at once.

Consumers that must really die or freeze run in a child process (SIGKILL, SIGSTOP); the
broker's own view (:meth:`Broker.lookup`) is checked along the way.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from kombu_helpers import (
    FAST,
    ConsumerProcess,
    Receiver,
    broker,
    connect,
    direct_queue,
    ids_of,
    publish,
    wait_until,
)

from celery_msg.core import Broker, MessageInfo, State

if TYPE_CHECKING:
    from conftest import Server

LEASE = FAST["lease_timeout"]
SWEEP = FAST["sweep_interval"]
#: Scheduling slack on a loaded 2-core machine.
SLACK = 0.8


def _only(look: Broker, message_id: str, queue: str) -> MessageInfo:
    found = look.lookup(message_id, [queue])
    assert len(found) == 1, found
    return found[0]


def test_a_killed_consumers_message_is_redelivered_to_another_within_lease_timeout_and_sweep(
    server: Server, prefix: str, consumer_process: Callable[..., ConsumerProcess]
):
    look = broker(server, prefix)
    with connect(server, prefix) as conn:
        publish(conn, ["job"], routing_key="work")
    dying = consumer_process("work")
    (event,) = dying.received(1)
    assert event["got"] == "job" and event["deliveries"] == 1

    held = _only(look, "job", "work")
    assert (held.state, held.queue, held.deliveries) == (State.RESERVED, "work", 1)
    assert held.owner is not None and held.owner.startswith(event["consumer"] + "/")
    assert held.lease_deadline is not None
    assert time.time() < held.lease_deadline <= time.time() + LEASE

    dying.kill()
    killed_at = time.monotonic()
    with connect(server, prefix, **FAST) as conn:
        receiver = Receiver(conn, [direct_queue("work")], ack=False)
        (message,) = receiver.receive(1, timeout=LEASE + SWEEP + 5)
        waited = time.monotonic() - killed_at
        assert message.headers["id"] == "job"
        assert message.delivery_info["delivery_count"] == 2
        assert message.delivery_info["redelivered"] is True
        assert waited <= LEASE + SWEEP + SLACK

        again = _only(look, "job", "work")
        assert again.state is State.RESERVED
        assert again.deliveries == 2
        assert again.owner is not None and again.owner.startswith(conn.transport.consumer_id)
        message.ack()
        wait_until(lambda: look.lookup("job", ["work"]) == [], what="the ack to be flushed")
    assert look.stats("work") == {
        "published": 1,
        "reclaimed": 1,
        "delivered": 2,
        "redelivered": 1,
        "acked": 1,
    }


def test_a_live_consumer_keeps_a_message_for_three_lease_timeouts_and_nobody_else_gets_it(
    server: Server, prefix: str
):
    look = broker(server, prefix)
    with (
        connect(server, prefix, **FAST) as holder_conn,
        connect(server, prefix, **FAST) as other_conn,
    ):
        publish(holder_conn, ["long"], routing_key="work")
        holder = Receiver(holder_conn, [direct_queue("work")], ack=False)
        (message,) = holder.receive(1)
        first = _only(look, "long", "work")

        other = Receiver(other_conn, [direct_queue("work")])
        other.nothing_for(3 * LEASE)

        still = _only(look, "long", "work")
        assert still.state is State.RESERVED
        assert still.owner == first.owner
        assert still.deliveries == 1
        assert still.lease_deadline is not None and first.lease_deadline is not None
        assert still.lease_deadline > first.lease_deadline + 2 * LEASE - SLACK
        assert still.lease_deadline > time.time()

        message.ack()
        wait_until(lambda: look.lookup("long", ["work"]) == [], what="the ack to be flushed")
    assert look.stats("work") == {"published": 1, "delivered": 1, "acked": 1}


def test_a_zombies_late_ack_is_refused_and_the_new_holders_ack_succeeds(
    server: Server, prefix: str, caplog: pytest.LogCaptureFixture
):
    look = broker(server, prefix)
    with (
        connect(server, prefix, **FAST) as zombie_conn,
        connect(server, prefix, **FAST) as heir_conn,
    ):
        publish(zombie_conn, ["job"], routing_key="work")
        # basic_get leases without starting the renewer: the lease lapses as if the zombie froze.
        stale = direct_queue("work")(zombie_conn.default_channel).get()
        assert stale is not None and stale.delivery_info["delivery_count"] == 1
        zombie = _only(look, "job", "work")

        heir = Receiver(heir_conn, [direct_queue("work")], ack=False)
        (fresh,) = heir.receive(1, timeout=LEASE + SWEEP + 5)
        assert fresh.delivery_info["delivery_count"] == 2
        assert fresh.delivery_info["redelivered"] is True
        held = _only(look, "job", "work")
        assert held.owner != zombie.owner
        assert held.owner is not None and held.owner.startswith(heir_conn.transport.consumer_id)

        with caplog.at_level(logging.WARNING, logger="celery_msg"):
            stale.ack()
        refused = [r for r in caplog.records if "lease lost" in r.getMessage()]
        assert len(refused) == 1, caplog.text
        assert "work" in refused[0].getMessage() and "ack" in refused[0].getMessage()
        after = _only(look, "job", "work")
        assert (after.state, after.owner, after.deliveries) == (State.RESERVED, held.owner, 2)
        assert look.stats("work")["lease_lost"] == 1

        fresh.ack()
        wait_until(lambda: look.lookup("job", ["work"]) == [], what="the heir's ack")
    assert look.stats("work") == {
        "published": 1,
        "reclaimed": 1,
        "delivered": 2,
        "redelivered": 1,
        "acked": 1,
        "lease_lost": 1,
    }


def test_a_frozen_consumer_loses_its_lease_and_its_ack_after_thawing_changes_nothing(
    server: Server, prefix: str, consumer_process: Callable[..., ConsumerProcess]
):
    look = broker(server, prefix)
    with connect(server, prefix) as conn:
        publish(conn, ["job"], routing_key="work")
    frozen = consumer_process("work")
    assert [e["got"] for e in frozen.received(1)] == ["job"]
    frozen.signal(signal.SIGSTOP)  # its renewer stops with it

    with connect(server, prefix, **FAST) as heir_conn:
        heir = Receiver(heir_conn, [direct_queue("work")], ack=False)
        (fresh,) = heir.receive(1, timeout=LEASE + SWEEP + 5)
        assert fresh.delivery_info["delivery_count"] == 2
        held = _only(look, "job", "work")
        assert held.owner is not None and held.owner.startswith(heir_conn.transport.consumer_id)

        frozen.signal(signal.SIGCONT)
        frozen.send("ack job")
        assert frozen.event() == {"acked": "job"}
        # Its renewer finds the lease lost, or flushes the ack and has it refused: either way
        # it says so, within one renewal round.
        wait_until(
            lambda: "lease lost" in frozen.log or "its lease was lost" in frozen.log,
            timeout=3 * LEASE,
            what="the thawed consumer to log that its lease was lost",
        )
        frozen.finish()

        after = _only(look, "job", "work")
        assert (after.state, after.owner, after.deliveries) == (State.RESERVED, held.owner, 2)

        fresh.ack()
        wait_until(lambda: look.lookup("job", ["work"]) == [], what="the heir's ack")
    assert look.stats("work")["acked"] == 1
    assert look.counts("work") == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 0}


def test_closing_a_connection_waits_for_the_acks_its_renewer_is_flushing(
    fresh_server: Server, prefix: str
):
    look = broker(fresh_server, prefix)
    with connect(fresh_server, prefix, **FAST) as conn:
        publish(conn, ["job"], routing_key="work")
        (message,) = Receiver(conn, [direct_queue("work")], ack=False).receive(1)
        renewer = f"celery-msg-renewer-{conn.transport.consumer_id}"
        message.ack()  # buffered (this thread drains): the renewer flushes it within lease / 3
        with fresh_server.process.client() as admin:
            admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        # The renewer takes the buffered ack (within lease / 3) and Redis holds its write back.
        wait_until(
            lambda: not any(ch.holdings.has_acks() for ch in conn.transport.channels),
            timeout=LEASE,
            what="the renewer to take the buffered ack",
            interval=0.01,
        )
        conn.close()

    # A process that exits right after close() would drop an ack still in flight, and the
    # message would come back as a duplicate: close() must finish the renewer's work first.
    assert renewer not in [t.name for t in threading.enumerate()]
    assert look.lookup("job", ["work"]) == []
    assert look.stats("work") == {"published": 1, "delivered": 1, "acked": 1}


def test_closing_a_connection_returns_its_unacked_messages_to_the_front_at_once_uncounted(
    server: Server, prefix: str
):
    ids = [f"m{i:02d}" for i in range(20)]
    look = broker(server, prefix)
    with connect(server, prefix) as conn:  # default 10 s lease: nothing may wait for expiry
        publish(conn, ids, routing_key="work")
        receiver = Receiver(conn, [direct_queue("work")], prefetch_count=10, ack=False)
        assert ids_of(receiver.receive(10)) == ids[:10]
        for message in receiver.messages[:3]:
            message.ack()

    # At once: with a 10 s lease, waiting for expiry would leave 7 RESERVED here.
    assert look.counts("work") == {"ready": 17, "reserved": 0, "scheduled": 0, "dead": 0}
    for message_id in ids[3:10]:
        info = _only(look, message_id, "work")
        assert (info.state, info.deliveries, info.owner) == (State.READY, 0, None)
    for message_id in ids[:3]:
        assert look.lookup(message_id, ["work"]) == []

    with connect(server, prefix) as conn:
        again = Receiver(conn, [direct_queue("work")], prefetch_count=17).receive(17)
    assert ids_of(again) == ids[3:]
    assert [m.delivery_info["delivery_count"] for m in again] == [1] * 17
    assert not any(m.delivery_info["redelivered"] for m in again)


def test_a_consumer_rejecting_with_requeue_puts_the_message_back_first_and_counts_it(
    server: Server, prefix: str
):
    look = broker(server, prefix)
    with connect(server, prefix) as conn:
        publish(conn, ["a", "b", "c"], routing_key="work")
        receiver = Receiver(conn, [direct_queue("work")], prefetch_count=1, ack=False)
        (first,) = receiver.receive(1)
        first.reject(requeue=True)
        info = _only(look, "a", "work")
        assert (info.state, info.deliveries) == (State.READY, 1)
        (again,) = receiver.receive(1)
        assert again.headers["id"] == "a"
        assert again.delivery_info["delivery_count"] == 2
        again.ack()
        assert ids_of(receiver.receive(1)) == ["b"]


def test_messages_rejected_with_requeue_one_by_one_come_back_in_the_order_they_were_sent(
    server: Server, prefix: str
):
    # As on kombu's redis transport: reject A, B, C (in that order) -> A, B, C again, then D.
    with connect(server, prefix) as conn:
        publish(conn, ["a", "b", "c", "d"], routing_key="work")
        receiver = Receiver(conn, [direct_queue("work")], prefetch_count=3, ack=False)
        taken = receiver.receive(3)
        assert ids_of(taken) == ["a", "b", "c"]
        for message in taken:
            message.reject(requeue=True)
        again = receiver.receive(3)
        assert ids_of(again) == ["a", "b", "c"]
        assert [m.delivery_info["delivery_count"] for m in again] == [2, 2, 2]
        for message in again:
            message.ack()
        assert ids_of(receiver.receive(1)) == ["d"]


def test_a_message_whose_handling_raised_comes_back_counted_so_max_deliveries_ends_the_loop(
    server: Server, prefix: str
):
    # A consumer that dies of a message (the exception ends its process, the connection is
    # closed and its unacked messages restored) must not get it back as if never delivered.
    def crash(body: Any, message: Any) -> None:
        raise RuntimeError("this message kills its consumer")

    look = broker(server, prefix)
    with connect(server, prefix, max_deliveries=2) as conn:
        publish(conn, ["bad"], routing_key="work")
    for attempt in (1, 2):
        with connect(server, prefix, max_deliveries=2) as conn:
            consumer = conn.Consumer([direct_queue("work")], callbacks=[crash], accept=["json"])
            consumer.consume()
            with pytest.raises(RuntimeError, match="kills its consumer"):
                conn.drain_events(timeout=5)
        info = _only(look, "bad", "work")
        assert (info.state, info.deliveries) == (State.READY, attempt)
    with connect(server, prefix, max_deliveries=2) as conn:
        Receiver(conn, [direct_queue("work")]).nothing_for(0.5)
    info = _only(look, "bad", "work")
    assert info.state == State.DEAD
    assert info.dead_reason is not None and info.dead_reason["reason"] == "poison"
