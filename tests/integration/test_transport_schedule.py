"""Scheduling through kombu: a message with a Celery ``eta`` header waits in Redis (SCHEDULED)
until it is due, then reaches a consumer within milliseconds, and a consumer killed around its
due time loses none of it.

Consumers use a long ``sweep_interval`` where the point is that they wake for the due time
itself (the earliest due time reported by their last round), not for a periodic sweep.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from kombu import Connection, Exchange
from kombu.message import Message
from kombu_helpers import (
    FAST,
    ConsumerProcess,
    Receiver,
    broker,
    connect,
    direct_queue,
    ids_of,
    wait_until,
)

from celery_msg.core import Broker, State

if TYPE_CHECKING:
    from conftest import Server

LEASE = FAST["lease_timeout"]
SWEEP = FAST["sweep_interval"]
#: Sweeps so rare that only the due-time wake-up can deliver within a test's waits.
NO_SWEEP = {"sweep_interval": 30.0}
#: How late (seconds) a due message may reach a waiting consumer on a loaded 2-core machine.
LATE = 1.0


def _eta(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def _ms(when: datetime) -> int:
    """Epoch ms as the transport stores a due time (truncated)."""
    return int(when.timestamp() * 1000)


def publish_at(conn: Connection, ids: Iterable[str], eta: datetime | None, queue: str) -> None:
    """Publish one message per ID with Celery's ``eta`` header (ISO 8601), as ``apply_async``
    with ``countdown``/``eta`` does; ``None`` publishes without one."""
    producer = conn.Producer(exchange=Exchange(""))
    for message_id in ids:
        headers: dict[str, Any] = {"id": message_id}
        if eta is not None:
            headers["eta"] = eta.isoformat()
        producer.publish({"id": message_id}, routing_key=queue, headers=headers)


def _scheduled_in_work(
    server: Server, prefix: str, count: int, *, due_in: float
) -> tuple[list[str], datetime]:
    """``count`` messages (s0, s1, ...) published to ``work`` due ``due_in`` seconds from now:
    their ids and their ``eta``."""
    ids = [f"s{i}" for i in range(count)]
    eta = _eta(due_in)
    with connect(server, prefix) as conn:
        publish_at(conn, ids, eta, "work")
    return ids, eta


def _wait_until_all_acked(look: Broker) -> None:
    """Wait for the consumers' acks to reach Redis, then check ``work`` is empty."""
    wait_until(lambda: look.counts("work")["reserved"] == 0, what="the acks to be flushed")
    assert look.counts("work") == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 0}


class TimedReceiver(Receiver):
    """A :class:`Receiver` that also notes when (epoch seconds) each message arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.arrived: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    def _on_message(self, body: Any, message: Message) -> None:
        self.arrived.setdefault(message.headers["id"], time.time())
        super()._on_message(body, message)


# -- due times -------------------------------------------------------------------------------


def test_a_message_with_an_eta_waits_in_redis_and_reaches_a_waiting_consumer_on_time(
    server: Server, prefix: str
):
    look = broker(server, prefix)
    with (
        connect(server, prefix, **NO_SWEEP) as conn,
        connect(server, prefix) as producer_conn,
    ):
        receiver = TimedReceiver(conn, [direct_queue("work")])
        receiver.nothing_for(0.2)  # the consumer is blocked, waiting, before the publish
        eta = _eta(1.5)
        publish_at(producer_conn, ["later"], eta, "work")

        [info] = look.lookup("later", ["work"])
        assert info.state is State.SCHEDULED
        assert info.due == _ms(eta) / 1000
        assert look.counts("work") == {"ready": 0, "reserved": 0, "scheduled": 1, "dead": 0}

        # Not before its eta ...
        receiver.nothing_for(max(0.0, eta.timestamp() - time.time() - 0.1))
        # ... and shortly after it, although the consumer sweeps only every 30 s.
        (message,) = receiver.receive(1, timeout=LATE + 0.5)
        arrived = receiver.arrived["later"]
        assert arrived * 1000 >= _ms(eta), f"delivered {_ms(eta) - arrived * 1000:.0f} ms early"
        assert arrived - eta.timestamp() < LATE
        assert message.delivery_info["delivery_count"] == 1
        wait_until(lambda: look.lookup("later", ["work"]) == [], what="the ack to be flushed")
    assert look.stats("work") == {"published": 1, "promoted": 1, "delivered": 1, "acked": 1}


def test_a_consumer_that_starts_after_the_publish_learns_the_due_time_from_its_first_fetch(
    server: Server, prefix: str
):
    with (
        connect(server, prefix) as producer_conn,
        connect(server, prefix, **NO_SWEEP) as conn,
    ):
        eta = _eta(1.5)
        publish_at(producer_conn, ["later"], eta, "work")
        receiver = TimedReceiver(conn, [direct_queue("work")])

        assert ids_of(receiver.receive(1, timeout=1.5 + LATE + 1)) == ["later"]
        arrived = receiver.arrived["later"]
        assert _ms(eta) <= arrived * 1000
        assert arrived - eta.timestamp() < LATE


def test_a_sooner_eta_published_while_a_consumer_sleeps_towards_a_later_one_wakes_it(
    server: Server, prefix: str
):
    with (
        connect(server, prefix, **NO_SWEEP) as conn,
        connect(server, prefix) as producer_conn,
    ):
        publish_at(producer_conn, ["late"], _eta(20), "work")
        receiver = TimedReceiver(conn, [direct_queue("work")])
        receiver.nothing_for(0.3)  # it now sleeps towards "late" (capped by the 30 s sweep)

        eta = _eta(1.0)
        publish_at(producer_conn, ["soon"], eta, "work")
        (message,) = receiver.receive(1, timeout=1.0 + LATE + 1)
        assert ids_of([message]) == ["soon"]
        assert _ms(eta) <= receiver.arrived["soon"] * 1000
        assert receiver.arrived["soon"] - eta.timestamp() < LATE


def test_due_messages_arrive_in_eta_order_after_messages_without_one(server: Server, prefix: str):
    look = broker(server, prefix)
    with connect(server, prefix) as producer_conn:
        now = datetime.now(UTC)
        publish_at(producer_conn, ["c"], now + timedelta(seconds=1.2), "work")
        publish_at(producer_conn, ["a"], now + timedelta(seconds=0.8), "work")
        publish_at(producer_conn, ["b"], now + timedelta(seconds=1.0), "work")
        publish_at(producer_conn, ["past"], now - timedelta(seconds=60), "work")
        publish_at(producer_conn, ["plain"], None, "work")
    assert look.counts("work") == {"ready": 2, "reserved": 0, "scheduled": 3, "dead": 0}

    time.sleep(max(0.0, (now + timedelta(seconds=1.3)).timestamp() - time.time()))
    with connect(server, prefix) as conn:
        receiver = Receiver(conn, [direct_queue("work")])
        assert ids_of(receiver.receive(5)) == ["past", "plain", "a", "b", "c"]


def test_an_unreadable_eta_is_delivered_at_once(server: Server, prefix: str):
    with connect(server, prefix) as conn:
        conn.Producer(exchange=Exchange("")).publish(
            {"id": "odd"}, routing_key="work", headers={"id": "odd", "eta": "next tuesday"}
        )
        receiver = Receiver(conn, [direct_queue("work")])
        assert ids_of(receiver.receive(1, timeout=2)) == ["odd"]


def test_purging_a_queue_removes_its_scheduled_messages(server: Server, prefix: str):
    look = broker(server, prefix)
    with connect(server, prefix) as conn:
        publish_at(conn, ["s1", "s2"], _eta(60), "work")
        publish_at(conn, ["r"], None, "work")
        assert direct_queue("work")(conn.default_channel).purge() == 3
    assert look.counts("work") == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 0}


# -- a consumer killed around the due time --------------------------------------------------


def test_a_consumer_killed_while_it_waits_for_a_due_time_loses_nothing(
    server: Server, prefix: str, consumer_process: Callable[..., ConsumerProcess]
):
    look = broker(server, prefix)
    ids, eta = _scheduled_in_work(server, prefix, 5, due_in=1.5)
    dying = consumer_process("work", prefetch=1)
    time.sleep(0.5)  # it has fetched (nothing), learnt the due time and sleeps towards it
    dying.kill()
    assert look.counts("work") == {"ready": 0, "reserved": 0, "scheduled": 5, "dead": 0}

    time.sleep(max(0.0, eta.timestamp() - time.time()) + 0.3)  # due now, with nobody there
    with connect(server, prefix, **FAST) as conn:
        receiver = Receiver(conn, [direct_queue("work")])
        got = receiver.receive(5, timeout=5)
        receiver.nothing_for(LEASE + 2 * SWEEP)
    assert sorted(ids_of(got)) == ids
    assert [m.delivery_info["delivery_count"] for m in got] == [1] * 5
    _wait_until_all_acked(look)
    assert look.stats("work") == {"published": 5, "promoted": 5, "delivered": 5, "acked": 5}


def test_a_consumer_killed_holding_due_messages_loses_none_and_each_is_settled_once(
    server: Server, prefix: str, consumer_process: Callable[..., ConsumerProcess]
):
    ids, eta = _scheduled_in_work(server, prefix, 6, due_in=1.0)
    dying = consumer_process("work", prefetch=2)
    with connect(server, prefix, **FAST) as conn:
        receiver = TimedReceiver(conn, [direct_queue("work")], prefetch_count=1)
        held = dying.received(2, timeout=1.0 + LATE + 5)
        assert time.time() * 1000 >= _ms(eta)
        assert [e["deliveries"] for e in held] == [1, 1]
        dying.kill()

        # The four the dead consumer never took, then its two after their leases expire.
        got = receiver.receive(6, timeout=LEASE + SWEEP + 10)
        receiver.nothing_for(LEASE + 2 * SWEEP)
    assert sorted(ids_of(got)) == ids, "each due message exactly once on the survivor"
    assert all(receiver.arrived[i] * 1000 >= _ms(eta) for i in ids)
    taken = {e["got"] for e in held}
    assert {m.headers["id"]: m.delivery_info["delivery_count"] for m in got} == {
        i: 2 if i in taken else 1 for i in ids
    }
    look = broker(server, prefix)
    _wait_until_all_acked(look)
    stats = look.stats("work")
    assert (stats["published"], stats["promoted"], stats["acked"]) == (6, 6, 6)
    assert stats["reclaimed"] == 2


def test_two_consumers_racing_for_due_messages_get_each_exactly_once(server: Server, prefix: str):
    ids = [f"s{i:02d}" for i in range(20)]
    eta = _eta(1.0)
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(connect(server, prefix, **NO_SWEEP)) for _ in range(2)]
        receivers = [TimedReceiver(c, [direct_queue("work")], prefetch_count=3) for c in conns]
        publish_at(conns[0], ids, eta, "work")
        deadline = time.monotonic() + 1.0 + LATE + 5
        while sum(len(r.messages) for r in receivers) < len(ids):
            assert time.monotonic() < deadline, [ids_of(r.messages) for r in receivers]
            for receiver in receivers:
                with contextlib.suppress(TimeoutError):
                    receiver.conn.drain_events(timeout=0.05)
        got = [m for r in receivers for m in r.messages]
        assert sorted(ids_of(got)) == ids
        assert all(m.delivery_info["delivery_count"] == 1 for m in got)
        assert min(a for r in receivers for a in r.arrived.values()) * 1000 >= _ms(eta)
