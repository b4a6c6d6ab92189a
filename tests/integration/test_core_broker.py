"""Broker-level behaviour on a real server: look-ups, combined rounds, bindings, counts, errors.

The scripts themselves are tested key by key in tests/lua; here the subject is what
:class:`celery_msg.core.Broker` adds on top: grouping, pipelining, decoding and translation.
The broker's clock is pinned (``clock.t``, in seconds) so deadlines are exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import redis
from pinned import LEASE_MS, T0, Clock
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_msg.core import (
    Binding,
    Broker,
    Lease,
    MessageInfo,
    ReserveRequest,
    Round,
    State,
)
from celery_msg.errors import BrokerConnectionError, MessageNotFound, ScriptError
from celery_msg.keys import QueueKeys, bindings_key

if TYPE_CHECKING:
    from conftest import Server  # tests/conftest.py


def _lease(broker: Broker, queue: str, consumer: str = "c1", count: int = 1) -> list[Lease]:
    return [Lease(d.queue, d.key, d.token) for d in broker.reserve([queue], count, consumer)]


def _never_delivered(
    state: State, *, band: int, payload: bytes, due: float | None = None
) -> MessageInfo:
    """What a look-up of ``id1``, published to ``q`` and never delivered, finds."""
    return MessageInfo(
        id="id1",
        key="id1",
        queue="q",
        state=state,
        deliveries=0,
        priority_band=band,
        owner=None,
        lease_deadline=None,
        due=due,
        dead_reason=None,
        payload=payload,
    )


# -- look-up by id ----------------------------------------------------------------------------


def test_lookup_finds_a_ready_message_with_its_band_and_payload(broker: Broker):
    broker.declare("q")
    broker.publish("q", "id1", b"payload", 3)

    assert broker.lookup("id1") == [_never_delivered(State.READY, band=3, payload=b"payload")]


def test_lookup_reports_a_reserved_message_with_its_owner_and_lease_deadline(broker: Broker):
    broker.declare("q")
    broker.publish("q", "id1", b"p", 0)
    broker.reserve(["q"], 1, "worker-7")

    [info] = broker.lookup("id1")

    assert (info.state, info.deliveries, info.owner) == (State.RESERVED, 1, "worker-7")
    assert info.lease_deadline == T0 + LEASE_MS / 1000


def test_lookup_finds_every_stored_instance_of_a_duplicate_id(broker: Broker):
    broker.declare("q")
    assert broker.publish("q", "t", b"first", 0) == "t"
    broker.reserve(["q"], 1, "w1")
    assert broker.publish("q", "t", b"retry", 0) == "t/3"

    found = broker.lookup("t")

    assert sorted((i.key, i.id, i.state, i.payload) for i in found) == [
        ("t", "t", State.RESERVED, b"first"),
        ("t/3", "t", State.READY, b"retry"),
    ]


def test_get_returns_the_newest_instance_of_a_duplicate_id(broker: Broker):
    broker.declare("q")
    keys = [broker.publish("q", "t", f"v{i}".encode(), 0) for i in range(3)]

    assert keys == ["t", "t/2", "t/4"]
    assert [i.key for i in broker.lookup("t")] == keys
    assert broker.get("t").key == "t/4"
    assert broker.get("t").payload == b"v2"


def test_get_returns_the_newest_instance_after_the_plain_id_was_reused(broker: Broker):
    # A Celery retry: "t" is running and republishes itself (stored as t/3), "t" is acked, then
    # t/3 runs and retries again: the id "t" is free, so the newest instance is stored as "t".
    broker.declare("q")
    broker.publish("q", "t", b"v0", 0)
    [first] = _lease(broker, "q")
    assert broker.publish("q", "t", b"v1", 0) == "t/3"
    assert broker.ack([first]) == []
    _lease(broker, "q")  # t/3 runs
    assert broker.publish("q", "t", b"v2", 0) == "t"

    assert broker.get("t").payload == b"v2"
    assert broker.get("t").key == "t"
    # Oldest first by publish order, not by key: t/3 was published before the reused "t".
    assert [(i.key, i.id, i.state) for i in broker.lookup("t")] == [
        ("t/3", "t", State.RESERVED),
        ("t", "t", State.READY),
    ]


def test_lookup_orders_instances_by_publish_order_whatever_their_bands(broker: Broker):
    # Served band 0 first (t/2, t/4, t), but looked up in publish order, each with its band.
    broker.declare("q")
    assert [broker.publish("q", "t", f"v{band}".encode(), band) for band in (9, 0, 4)] == [
        "t",
        "t/2",
        "t/4",
    ]

    assert [(i.key, i.priority_band, i.payload) for i in broker.lookup("t")] == [
        ("t", 9, b"v9"),
        ("t/2", 0, b"v0"),
        ("t/4", 4, b"v4"),
    ]
    assert broker.get("t").key == "t/4"
    assert [d.key for d in broker.reserve(["q"], 3, "c1")] == ["t/2", "t/4", "t"]


def test_lookup_reports_the_published_band_after_a_requeue_and_a_reclaim(
    broker: Broker, clock: Clock
):
    broker.declare("q")
    broker.publish("q", "a", b"A", 200)
    broker.publish("q", "b", b"B", 200)
    [lease] = _lease(broker, "q")
    assert broker.requeue([lease]) == []

    info = broker.get("a")
    assert (info.state, info.priority_band, info.deliveries) == (State.READY, 200, 1)

    [lease] = _lease(broker, "q")
    assert lease.key == "a"
    clock.t = T0 + LEASE_MS / 1000
    assert broker.reclaim("q") == 1

    info = broker.get("a")
    assert (info.state, info.priority_band, info.deliveries) == (State.READY, 200, 2)
    assert [d.key for d in broker.reserve(["q"], 2, "c2")] == ["a", "b"]


def test_get_returns_the_newest_instance_of_a_duplicate_id_in_a_large_queue(broker: Broker):
    # Past hash-max-listpack-entries (512 by default) the body hash is a real hash table, and
    # HSCAN returns its fields in bucket order, not in insertion order.
    broker.declare("q")
    for i in range(600):
        broker.publish("q", f"filler-{i}", b"x", 0)
    keys = [broker.publish("q", "t", f"v{i}".encode(), 0) for i in range(40)]

    assert sorted(i.key for i in broker.lookup("t")) == sorted(keys)
    assert [i.key for i in broker.lookup("t")] == keys
    assert broker.get("t").key == keys[-1]


def test_lookup_treats_glob_characters_in_an_id_literally(broker: Broker):
    broker.declare("q")
    broker.publish("q", "t?", b"literal", 0)
    broker.publish("q", "tx", b"a", 0)
    broker.publish("q", "tx", b"b", 0)  # stored as tx/<n>, which "t?/*" would match

    assert [i.key for i in broker.lookup("t?")] == ["t?"]
    assert [i.key for i in broker.lookup("t*")] == []
    assert broker.lookup("t[x]") == []


def test_lookup_does_not_return_another_message_whose_id_contains_a_slash(broker: Broker):
    broker.declare("q")
    broker.publish("q", "parent", b"p", 0)
    broker.publish("q", "parent/child", b"c", 0)

    assert [i.key for i in broker.lookup("parent")] == ["parent"]
    assert [(i.key, i.id) for i in broker.lookup("parent/child")] == [
        ("parent/child", "parent/child")
    ]


def test_lookup_tells_a_duplicate_from_a_message_whose_id_looks_like_one(broker: Broker):
    # "a/3" is a task id of its own, and exactly the key the next duplicate of "a" would get.
    broker.declare("q")
    assert broker.publish("q", "a", b"a1", 0) == "a"
    assert broker.publish("q", "a/3", b"other", 0) == "a/3"
    assert broker.publish("q", "a", b"a2", 0) == "a/4"

    assert [(i.key, i.id, i.payload) for i in broker.lookup("a")] == [
        ("a", "a", b"a1"),
        ("a/4", "a", b"a2"),
    ]
    assert [(i.key, i.id, i.payload) for i in broker.lookup("a/3")] == [("a/3", "a/3", b"other")]
    assert broker.get("a").payload == b"a2"


def test_looking_up_an_id_equal_to_another_ids_duplicate_key_finds_only_its_own(broker: Broker):
    broker.declare("q")
    broker.publish("q", "t", b"t1", 0)
    assert broker.publish("q", "t", b"t2", 0) == "t/2"

    assert broker.lookup("t/2") == []

    own = broker.publish("q", "t/2", b"mine", 0)
    assert own == "t/2/4"  # t/2 is taken (n = 4, the sequence number taken first)
    assert [(i.key, i.id, i.payload) for i in broker.lookup("t/2")] == [(own, "t/2", b"mine")]
    assert [i.payload for i in broker.lookup("t")] == [b"t1", b"t2"]


def test_get_raises_message_not_found_once_the_message_is_acked(broker: Broker):
    broker.declare("q")
    broker.publish("q", "id1", b"p", 0)
    assert broker.ack(_lease(broker, "q")) == []

    assert broker.lookup("id1") == []
    with pytest.raises(MessageNotFound, match="id1"):
        broker.get("id1")


def test_lookup_searches_every_declared_queue_unless_told_which(broker: Broker):
    broker.declare("q1")
    broker.declare("q2")
    assert broker.publish_many(["q1", "q2", "undeclared"], "b1", b"bcast", 1) == ["b1"] * 3

    assert [i.queue for i in broker.lookup("b1")] == ["q1", "q2"]
    assert [i.queue for i in broker.lookup("b1", queues=["undeclared"])] == ["undeclared"]


# -- settle_and_reserve -------------------------------------------------------------------------


def test_settle_and_reserve_acks_and_serves_every_request_in_order(broker: Broker):
    for message_id in ("a", "b", "c", "d"):
        broker.publish("q", message_id, message_id.encode(), 0)
    broker.publish("q2", "x", b"x", 0)
    la, lb = _lease(broker, "q", count=2)
    stale = Lease("q", lb.key, lb.token + 1000)

    served, lost, next_due = broker.settle_and_reserve(
        [la, stale],
        [
            ReserveRequest(["q"], 0, "c1"),
            ReserveRequest(["q2", "q"], 5, "c2", order="strict"),
            ReserveRequest([], 3, "c3"),
        ],
    )

    assert lost == [stale]
    assert next_due is None  # nothing is scheduled
    assert served[0] == [] and served[2] == []
    assert [(d.queue, d.key, d.deliveries, d.payload) for d in served[1]] == [
        ("q2", "x", 1, b"x"),
        ("q", "c", 1, b"c"),
        ("q", "d", 1, b"d"),
    ]
    assert broker.lookup("a", ["q"]) == []
    assert broker.get("b", ["q"]).state == State.RESERVED
    assert broker.counts("q") == {"ready": 0, "reserved": 3, "scheduled": 0, "dead": 0}


def test_settle_and_reserve_reports_lost_acks_of_several_queues(broker: Broker):
    broker.publish("q1", "a", b"a", 0)
    broker.publish("q2", "b", b"b", 0)
    [l1] = _lease(broker, "q1")
    [l2] = _lease(broker, "q2")
    lost2 = Lease("q2", l2.key, l2.token - 1)

    served, lost, _ = broker.settle_and_reserve([l1, lost2], [])

    assert (served, lost) == ([], [lost2])
    assert broker.counts("q1")["reserved"] == 0
    assert broker.counts("q2")["reserved"] == 1


def test_settle_and_reserve_with_nothing_to_do_sends_no_command():
    unreachable = Broker(redis.Redis(host="127.0.0.1", port=1))

    assert unreachable.settle_and_reserve([], [ReserveRequest(["q"], 0, "c")]) == Round(
        [[]], [], None
    )


# -- bindings -------------------------------------------------------------------------------


def test_an_expired_binding_is_dropped_and_its_ephemeral_queue_deleted(
    broker: Broker, clock: Clock, redis_client: redis.Redis, prefix: str
):
    permanent = Binding("", "", "workers")
    ephemeral = Binding("", "", "w1.pidbox")
    for queue in ("workers", "w1.pidbox"):
        broker.declare(queue)
        broker.publish(queue, "m1", b"x", 0)
        broker.publish(queue, "m2", b"y", 0)
    _lease(broker, "w1.pidbox")
    broker.bind("ex", permanent)
    broker.bind("ex", ephemeral, ttl_ms=5_000)

    clock.t = T0 + 5.0  # expires at exactly now: still live
    assert sorted(broker.table("ex").bindings, key=str) == sorted([permanent, ephemeral], key=str)

    clock.t = T0 + 5.001
    assert broker.table("ex").bindings == [permanent]

    assert redis_client.hkeys(bindings_key(prefix, "ex")) == [permanent.encode().encode()]
    assert broker.queues() == ["workers"]
    assert redis_client.exists(*QueueKeys("w1.pidbox", prefix).all) == 0
    assert broker.counts("workers") == {"ready": 2, "reserved": 0, "scheduled": 0, "dead": 0}


def test_refreshed_bindings_outlive_their_first_deadline(broker: Broker, clock: Clock):
    binding = Binding("rk", "", "w1.pidbox")
    broker.bind("ex", binding, ttl_ms=5_000)

    clock.t = T0 + 4
    broker.refresh_bindings({"ex": {binding: 5_000}})
    clock.t = T0 + 8

    assert broker.table("ex").bindings == [binding]


def test_a_permanent_binding_never_expires_and_unbind_removes_it(broker: Broker, clock: Clock):
    binding = Binding("rk", "*.x", "q")
    broker.bind("ex", binding)

    clock.t = T0 + 10**9
    assert broker.table("ex").bindings == [binding]
    broker.unbind("ex", binding)
    assert broker.table("ex").bindings == []


# -- counts, stats, purge, dead letters ------------------------------------------------------


def test_counts_and_stats_follow_every_transition(broker: Broker):
    for message_id in ("a", "b", "c", "d"):
        broker.publish("q", message_id, b"x", 0)
    la, lb, lc = _lease(broker, "q", count=3)

    assert broker.ack([la]) == []
    assert broker.dead_letter(lb, "rejected", "no") is True
    assert broker.counts("q") == {"ready": 1, "reserved": 1, "scheduled": 0, "dead": 1}
    assert broker.requeue([lc]) == []
    assert broker.ack([lc]) == [lc]

    assert broker.counts("q") == {"ready": 2, "reserved": 0, "scheduled": 0, "dead": 1}
    assert broker.size("q") == 2
    assert broker.stats("q") == {
        "published": 4,
        "delivered": 3,
        "acked": 1,
        "dead": 1,
        "dead:rejected": 1,
        "requeued": 1,
        "lease_lost": 1,
    }


def test_lost_extends_and_requeues_are_counted_as_lease_lost(broker: Broker):
    broker.publish("q", "a", b"A", 0)
    broker.publish("q", "b", b"B", 0)
    la, lb = _lease(broker, "q", count=2)
    stale_a, stale_b = Lease("q", "a", la.token + 100), Lease("q", "b", lb.token + 100)

    assert broker.extend([la, stale_b]) == [stale_b]
    assert broker.requeue([stale_a, lb]) == [stale_a]

    assert broker.stats("q") == {
        "published": 2,
        "delivered": 2,
        "requeued": 1,
        "lease_lost": 2,
    }


def test_acking_and_purging_leave_no_order_or_dups_entries(
    broker: Broker, redis_client: redis.Redis, prefix: str
):
    keys = QueueKeys("q", prefix)
    broker.publish("q", "t", b"v0", 0)
    [first] = _lease(broker, "q")
    assert broker.publish("q", "t", b"v1", 0) == "t/3"
    [retry] = _lease(broker, "q")
    assert broker.publish("q", "t", b"v2", 0) == "t/6"  # a duplicate again, ready
    assert redis_client.hlen(keys.order) == 2  # the two leased: t/6 is READY, its score holds it
    assert redis_client.hlen(keys.dups) == 2

    assert broker.ack([first, retry]) == []
    assert broker.purge("q") == 1

    assert redis_client.exists(keys.body, keys.order, keys.dups, keys.born) == 0
    assert broker.lookup("t", ["q"]) == []


def test_an_unknown_queue_has_zero_counts_and_no_stats(broker: Broker):
    assert broker.counts("nothing") == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 0}
    assert broker.stats("nothing") == {}
    assert broker.exists("nothing") is False


def test_purge_removes_every_ready_message_in_bounded_steps(broker: Broker):
    for i in range(7):
        broker.publish("q", f"m{i}", b"x", 0)
    _lease(broker, "q")

    assert broker.purge("q", batch=2) == 6
    assert broker.counts("q") == {"ready": 0, "reserved": 1, "scheduled": 0, "dead": 0}
    assert broker.purge("q", batch=2) == 0


def test_delete_removes_the_queue_with_its_leased_and_dead_messages(
    broker: Broker, redis_client: redis.Redis, prefix: str
):
    broker.declare("q")
    for i in range(3):
        broker.publish("q", f"m{i}", b"x", 0)
    _, second = _lease(broker, "q", count=2)
    broker.dead_letter(second, "rejected")

    broker.delete("q")

    assert redis_client.exists(*QueueKeys("q", prefix).all) == 0
    assert broker.queues() == []


def test_dead_letters_lists_the_oldest_first_with_ids_and_reasons(broker: Broker, clock: Clock):
    broker.publish("q", "a", b"A", 0)
    broker.publish("q", "t", b"T1", 0)
    broker.publish("q", "t", b"T2", 0)
    leases = {lease.key: lease for lease in _lease(broker, "q", count=3)}
    assert sorted(leases) == ["a", "t", "t/3"]

    for when, key in [(T0 + 3, "a"), (T0 + 1, "t/3"), (T0 + 2, "t")]:
        clock.t = when
        assert broker.dead_letter(leases[key], "rejected", f"{key} failed", attempt=2) is True

    dead = broker.dead_letters("q")

    assert [(i.key, i.id, i.state, i.payload) for i in dead] == [
        ("t/3", "t", State.DEAD, b"T2"),
        ("t", "t", State.DEAD, b"T1"),
        ("a", "a", State.DEAD, b"A"),
    ]
    assert dead[0].dead_reason == {
        "reason": "rejected",
        "detail": "t/3 failed",
        # Public times are seconds since the epoch (stored as ms).
        "time": pytest.approx(T0 + 1),
        "attempt": 2,
        # Its first failure: nothing earlier was recorded, so this one.
        "first_failure": pytest.approx(T0 + 1),
        "last_failure": pytest.approx(T0 + 1),
    }
    assert [i.key for i in broker.dead_letters("q", limit=2)] == ["t/3", "t"]
    assert [i.key for i in broker.lookup("t", ["q"])] == ["t", "t/3"]


def test_dead_letters_give_the_own_id_of_a_message_whose_id_contains_a_slash(broker: Broker):
    broker.publish("q", "parent/child", b"c", 0)
    [lease] = _lease(broker, "q")
    assert broker.dead_letter(lease, "rejected") is True

    assert [(i.key, i.id) for i in broker.dead_letters("q")] == [("parent/child", "parent/child")]


def test_dead_letter_returns_false_when_the_lease_was_lost(broker: Broker):
    broker.publish("q", "a", b"A", 0)
    [lease] = _lease(broker, "q")

    assert broker.dead_letter(Lease("q", "a", lease.token + 1), "rejected") is False
    assert broker.counts("q") == {"ready": 0, "reserved": 1, "scheduled": 0, "dead": 0}


def test_extend_and_reclaim_use_the_broker_clock(broker: Broker, clock: Clock):
    broker.publish("q", "a", b"A", 0)
    [lease] = _lease(broker, "q")

    clock.t = T0 + 20
    assert broker.extend([lease]) == []
    assert broker.get("a", ["q"]).lease_deadline == T0 + 20 + LEASE_MS / 1000

    clock.t = T0 + 20 + LEASE_MS / 1000 - 0.001
    assert broker.reclaim("q") == 0
    clock.t = T0 + 20 + LEASE_MS / 1000
    assert broker.reclaim("q") == 1
    assert broker.extend([lease]) == [lease]


def test_wait_returns_at_once_after_a_publish_and_times_out_on_an_idle_queue(broker: Broker):
    broker.publish("busy", "a", b"A", 0)

    assert broker.wait(["idle", "busy"], timeout=5) is True
    assert broker.wait(["idle", "busy"], timeout=0.05) is False


# -- translated errors --------------------------------------------------------------------------


def test_a_stopped_server_gives_broker_connection_error_with_the_redis_error_as_cause(
    fresh_server: Server,
):
    client = fresh_server.process.client(
        socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    broker = Broker(client, prefix="t:")
    broker.publish("q", "a", b"A", 0)
    lease = Lease("q", "a", 2)
    fresh_server.process.stop()

    calls: list[Callable[[], object]] = [
        lambda: broker.publish("q", "b", b"B", 0),
        lambda: broker.reserve(["q"], 1, "c1"),
        lambda: broker.ack([lease]),
        lambda: broker.settle_and_reserve([lease], [ReserveRequest(["q"], 1, "c1")]),
        lambda: broker.counts("q"),
        lambda: broker.lookup("a"),
        lambda: broker.table("ex").bindings,
    ]
    try:
        for call in calls:
            with pytest.raises(BrokerConnectionError) as excinfo:
                call()
            assert isinstance(excinfo.value.__cause__, redis.ConnectionError)
            assert isinstance(excinfo.value, ConnectionError)
            assert "Redis unreachable" in str(excinfo.value)
    finally:
        client.close()


def test_a_failing_script_gives_script_error_with_the_redis_error_as_cause(
    broker: Broker, redis_client: redis.Redis, prefix: str
):
    redis_client.set(QueueKeys("q", prefix).ready, "not a zset")

    with pytest.raises(ScriptError, match="publish to 'q'") as excinfo:
        broker.publish("q", "a", b"A", 0)

    assert isinstance(excinfo.value.__cause__, redis.ResponseError)
    assert "WRONGTYPE" in str(excinfo.value)


# -- scheduling ---------------------------------------------------------------------------------

DUE = T0 + 5.0  # seconds; a due time five seconds after the broker's clock starts
DUE_MS = int(DUE * 1000)


def test_a_message_published_with_a_future_due_time_is_scheduled_with_its_due_time(
    broker: Broker,
):
    broker.declare("q")
    assert broker.publish("q", "id1", b"later", 4, due_ms=DUE_MS) == "id1"

    assert broker.lookup("id1") == [
        _never_delivered(State.SCHEDULED, band=4, payload=b"later", due=DUE)
    ]
    assert broker.counts("q") == {"ready": 0, "reserved": 0, "scheduled": 1, "dead": 0}
    assert broker.size("q") == 0
    assert broker.stats("q") == {"published": 1}


def test_a_due_time_now_or_in_the_past_is_stored_as_ready(broker: Broker, clock: Clock):
    broker.publish("q", "now", b"x", 0, due_ms=int(T0 * 1000))
    broker.publish("q", "past", b"x", 0, due_ms=int(T0 * 1000) - 60_000)
    broker.publish("q", "soon", b"x", 0, due_ms=int(T0 * 1000) + 1)

    assert [(i.state, i.due) for i in broker.lookup("now", ["q"])] == [(State.READY, None)]
    assert [(i.state, i.due) for i in broker.lookup("past", ["q"])] == [(State.READY, None)]
    assert [(i.state, i.due) for i in broker.lookup("soon", ["q"])] == [
        (State.SCHEDULED, T0 + 0.001)
    ]


def test_a_scheduled_message_is_not_reserved_before_its_due_time(broker: Broker, clock: Clock):
    broker.publish("q", "a", b"A", 0, due_ms=DUE_MS)

    clock.t = DUE - 0.001
    assert broker.reserve(["q"], 10, "c1") == []
    assert broker.get("a", ["q"]).state == State.SCHEDULED

    clock.t = DUE
    [delivery] = broker.reserve(["q"], 10, "c1")
    assert (delivery.key, delivery.deliveries, delivery.payload) == ("a", 1, b"A")
    info = broker.get("a", ["q"])
    assert (info.state, info.due, info.lease_deadline) == (
        State.RESERVED,
        None,
        DUE + LEASE_MS / 1000,
    )
    assert broker.stats("q") == {"published": 1, "promoted": 1, "delivered": 1}


def test_promote_moves_due_messages_to_ready_once_and_respects_its_limit(
    broker: Broker, clock: Clock
):
    for i in range(4):
        broker.publish("q", f"m{i}", b"x", 0, due_ms=DUE_MS + i * 1000)

    assert broker.promote("q") == 0
    clock.t = DUE + 2
    assert broker.promote("q", limit=2) == 2
    assert broker.promote("q") == 1
    assert broker.promote("q") == 0
    assert broker.counts("q") == {"ready": 3, "reserved": 0, "scheduled": 1, "dead": 0}
    assert [d.key for d in broker.reserve(["q"], 10, "c1")] == ["m0", "m1", "m2"]
    assert broker.get("m3", ["q"]).due == DUE + 3
    assert broker.stats("q")["promoted"] == 3


def test_settle_and_reserve_reports_the_earliest_due_time_of_the_requested_queues(
    broker: Broker, clock: Clock
):
    broker.publish("q1", "a", b"A", 0, due_ms=DUE_MS + 3000)
    broker.publish("q2", "b", b"B", 0, due_ms=DUE_MS)
    broker.publish("q3", "c", b"C", 0, due_ms=DUE_MS - 2000)  # not requested below
    broker.publish("q1", "r", b"R", 0)

    served, lost, next_due = broker.settle_and_reserve(
        [], [ReserveRequest(["q1"], 5, "c1"), ReserveRequest(["q2"], 5, "c2")]
    )
    assert [[d.key for d in ds] for ds in served] == [["r"], []]
    assert (lost, next_due) == ([], DUE_MS)

    clock.t = DUE
    served, _, next_due = broker.settle_and_reserve(
        [], [ReserveRequest(["q1"], 5, "c1"), ReserveRequest(["q2"], 5, "c2")]
    )
    assert [[d.key for d in ds] for ds in served] == [[], ["b"]]
    assert next_due == DUE_MS + 3000

    clock.t = DUE + 3
    round_ = broker.settle_and_reserve([], [ReserveRequest(["q1", "q2"], 5, "c1")])
    assert [d.key for d in round_.deliveries[0]] == ["a"]
    assert (round_.lost, round_.next_due_ms) == ([], None)  # q3 was not asked about
    assert broker.counts("q3")["scheduled"] == 1


def test_a_unique_publish_of_a_pending_id_stores_nothing(broker: Broker, clock: Clock):
    assert broker.publish("q", "u", b"first", 0, unique=True) == "u"
    assert broker.publish("q", "u", b"second", 0, unique=True) == "u"
    [lease] = _lease(broker, "q")
    assert broker.publish("q", "u", b"third", 0, unique=True) == "u"
    broker.publish("q", "s", b"S", 0, due_ms=DUE_MS)
    assert broker.publish("q", "s", b"S2", 0, due_ms=DUE_MS + 1, unique=True) == "s"

    assert [(i.key, i.state, i.payload) for i in broker.lookup("u", ["q"])] == [
        ("u", State.RESERVED, b"first")
    ]
    assert [(i.state, i.due, i.payload) for i in broker.lookup("s", ["q"])] == [
        (State.SCHEDULED, DUE, b"S")
    ]
    assert broker.counts("q") == {"ready": 0, "reserved": 1, "scheduled": 1, "dead": 0}
    assert broker.stats("q") == {"published": 2, "duplicates": 3, "delivered": 1}

    # Once acked, the id is free: a unique publish stores it again.
    assert broker.ack([lease]) == []
    assert broker.publish("q", "u", b"fourth", 0, unique=True) == "u"
    assert broker.get("u", ["q"]).payload == b"fourth"


def test_a_plain_publish_of_a_pending_id_still_stores_a_duplicate(broker: Broker):
    broker.publish("q", "u", b"first", 0, due_ms=DUE_MS)

    assert broker.publish("q", "u", b"second", 0) == "u/2"
    assert [(i.key, i.state) for i in broker.lookup("u", ["q"])] == [
        ("u", State.SCHEDULED),
        ("u/2", State.READY),
    ]


def test_a_unique_publish_of_a_dead_id_stores_a_new_message(broker: Broker):
    broker.publish("q", "u", b"first", 0)
    [lease] = _lease(broker, "q")
    assert broker.dead_letter(lease, "rejected", "no") is True

    key = broker.publish("q", "u", b"again", 0, unique=True)

    assert key != "u"
    assert sorted((i.key, i.state) for i in broker.lookup("u", ["q"])) == [
        ("u", State.DEAD),
        (key, State.READY),
    ]


def test_publish_many_schedules_the_message_in_every_queue(broker: Broker, clock: Clock):
    assert broker.publish_many(["a", "b"], "m", b"M", 0, due_ms=DUE_MS) == ["m", "m"]

    assert [(i.queue, i.state, i.due) for i in broker.lookup("m", ["a", "b"])] == [
        ("a", State.SCHEDULED, DUE),
        ("b", State.SCHEDULED, DUE),
    ]
    clock.t = DUE
    assert [d.queue for d in broker.reserve(["a", "b"], 5, "c1")] == ["a", "b"]


def test_purge_removes_scheduled_messages_too(broker: Broker):
    broker.publish("q", "r", b"R", 0)
    for i in range(3):
        broker.publish("q", f"s{i}", b"S", 0, due_ms=DUE_MS + i)
    broker.publish("q", "held", b"H", 0)
    # "r" is served first; "held" stays ready until purged.
    _lease(broker, "q")

    assert broker.purge("q", batch=2) == 4
    assert broker.counts("q") == {"ready": 0, "reserved": 1, "scheduled": 0, "dead": 0}
    assert broker.lookup("s0", ["q"]) == []


def test_counts_follow_a_scheduled_message_through_its_life(broker: Broker, clock: Clock):
    broker.publish("q", "a", b"A", 0, due_ms=DUE_MS)
    assert broker.counts("q") == {"ready": 0, "reserved": 0, "scheduled": 1, "dead": 0}

    clock.t = DUE
    assert broker.promote("q") == 1
    assert broker.counts("q") == {"ready": 1, "reserved": 0, "scheduled": 0, "dead": 0}
    [lease] = _lease(broker, "q")
    assert broker.counts("q") == {"ready": 0, "reserved": 1, "scheduled": 0, "dead": 0}
    assert broker.ack([lease]) == []
    assert broker.counts("q") == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 0}
    assert broker.stats("q") == {"published": 1, "promoted": 1, "delivered": 1, "acked": 1}


# -- pipelined script calls ------------------------------------------------------------------


def test_a_pipelined_round_sends_no_script_exists_and_survives_a_script_flush(
    broker: Broker, redis_client: redis.Redis
):
    for message_id in ("a", "b"):
        broker.publish("q", message_id, message_id.encode(), 0)
    [lease] = broker.reserve(["q"], 1, "c1")
    redis_client.config_resetstat()
    redis_client.script_flush()  # as after a restart: every script must be loaded again

    served, lost, _ = broker.settle_and_reserve(
        [Lease("q", lease.key, lease.token)], [ReserveRequest(["q"], 5, "c1")]
    )

    assert lost == [] and [d.key for d in served[0]] == ["b"]
    assert broker.lookup("a", ["q"]) == []  # the ack ran once the script was back
    stats = redis_client.info("commandstats")
    assert "cmdstat_script|exists" not in stats  # redis-py's pipelines would ask first
    assert stats["cmdstat_script|load"]["calls"] == 2  # ack and reserve, loaded again once
    # With every script loaded, a round is its EVALSHA calls and nothing else from the client
    # (commands run inside scripts are counted too, so only SCRIPT is checked).
    redis_client.config_resetstat()
    broker.settle_and_reserve([], [ReserveRequest(["q"], 5, "c1")])
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert not [name for name in stats if name.startswith("cmdstat_script")]


def test_a_queue_with_a_corrupt_key_does_not_starve_the_other_queues_of_a_round(
    broker: Broker, caplog: pytest.LogCaptureFixture
):
    broker.publish("sound", "s1", "S1", 0)
    broker.publish("broken", "b1", "B1", 0)
    held = broker.reserve(["broken"], 1, "c0")
    broker.client.delete(broker.keys("broken").leased)
    broker.client.set(broker.keys("broken").leased, "garbage")  # a hand edit gone wrong
    leases = [Lease(d.queue, d.key, d.token) for d in held]

    with caplog.at_level(logging.ERROR, logger="celery_msg.consuming"):
        served = []
        for _ in range(2):
            round_ = broker.settle_and_reserve(
                leases, [ReserveRequest(["broken", "sound"], 10, "c1")]
            )
            served.append([[d.key for d in group] for group in round_.deliveries])
            leases = []
    assert served == [[["s1"]], [[]]]
    assert broker.lookup("s1", ["sound"])[0].state == State.RESERVED
    # The broken queue's ack is refused (its message comes back by itself once repaired), and
    # it is reported once, naming the key, however many rounds meet it.
    reports = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(reports) == 1
    assert broker.keys("broken").leased in reports[0]


# -- scheduled messages (inspect scheduled) -----------------------------------------------------


def test_scheduled_lists_the_soonest_scheduled_messages_first_up_to_the_limit(broker: Broker):
    now_ms = int(T0 * 1000)
    for i, delay in enumerate((30_000, 10_000, 20_000)):
        broker.publish("q", f"m{i}", f"body{i}", 0, due_ms=now_ms + delay)
    broker.publish("q", "ready", "now", 0)

    listed = broker.scheduled("q", limit=2)

    assert [(m.queue, m.key, m.due_ms, m.payload) for m in listed] == [
        ("q", "m1", now_ms + 10_000, b"body1"),
        ("q", "m2", now_ms + 20_000, b"body2"),
    ]
    assert [m.key for m in broker.scheduled("q")] == ["m1", "m2", "m0"]
    assert broker.scheduled("q", limit=0) == []
    assert broker.scheduled("unknown") == []
