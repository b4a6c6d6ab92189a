"""Routing through kombu exchanges, and the order one consumer takes messages from many queues."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kombu import Connection, Exchange, Queue
from kombu_helpers import Receiver, broker, connect, direct_queue, ids_of, publish, scan_keys

if TYPE_CHECKING:
    from conftest import Server


def _ids(queue: str, count: int) -> list[str]:
    return [f"{queue}{i:04d}" for i in range(count)]


def _fill(conn: Connection, counts: dict[str, int]) -> None:
    """Publish ``_ids(queue, count)`` to each queue of ``counts``, one queue after the other."""
    for queue, count in counts.items():
        publish(conn, _ids(queue, count), routing_key=queue)


# -- several queues, one consumer ------------------------------------------------------------


def test_fair_order_interleaves_queues_so_a_long_queue_does_not_starve_the_others(
    server: Server, prefix: str
):
    with connect(server, prefix, queue_order="fair") as conn:
        _fill(conn, {"a": 1000, "b": 5, "c": 5})
        queues = [direct_queue(q) for q in ("a", "b", "c")]
        got = ids_of(Receiver(conn, queues, prefetch_count=3).receive(18))

    # Every batch of 3 holds one message of each queue while all three have some.
    for batch in range(5):
        assert sorted(m[0] for m in got[batch * 3 : batch * 3 + 3]) == ["a", "b", "c"], got
    # FIFO within each queue; then only "a" is left.
    assert [m for m in got if m[0] == "b"] == _ids("b", 5)
    assert [m for m in got if m[0] == "c"] == _ids("c", 5)
    assert [m for m in got if m[0] == "a"] == _ids("a", 8)
    assert broker(server, prefix).counts("a") == {
        "ready": 992,
        "reserved": 0,
        "scheduled": 0,
        "dead": 0,
    }


def test_strict_order_drains_the_first_queue_before_the_second_before_the_third(
    server: Server, prefix: str
):
    with connect(server, prefix, queue_order="strict") as conn:
        _fill(conn, {"c": 5, "b": 5, "a": 20})
        receiver = Receiver(conn, [direct_queue(q) for q in ("a", "b", "c")], prefetch_count=5)
        first = ids_of(receiver.receive(25))
        # A message arriving in an earlier queue goes before what is left of later ones.
        publish(conn, ["a-late"], routing_key="a")
        rest = ids_of(receiver.receive(5))
        last = ids_of(receiver.receive(1))

    assert first == _ids("a", 20) + _ids("b", 5)
    assert rest == ["a-late", *_ids("c", 4)]
    assert last == ["c0004"]


def test_a_consumer_never_holds_more_unacked_messages_than_its_prefetch_count(
    server: Server, prefix: str
):
    look = broker(server, prefix)
    with connect(server, prefix) as conn:
        publish(conn, _ids("q", 10), routing_key="q")
        receiver = Receiver(conn, [direct_queue("q")], prefetch_count=3, ack=False)
        assert ids_of(receiver.receive(3)) == _ids("q", 3)
        assert look.counts("q") == {"ready": 7, "reserved": 3, "scheduled": 0, "dead": 0}
        receiver.nothing_for(0.5)

        receiver.messages[0].ack()
        assert ids_of(receiver.receive(1)) == ["q0003"]
        assert look.counts("q") == {"ready": 6, "reserved": 3, "scheduled": 0, "dead": 0}


# -- exchanges ------------------------------------------------------------------------------


def _routed(
    server: Server,
    prefix: str,
    exchange: Exchange,
    bindings: dict[str, str],
    sent: list[tuple[str, str]],
) -> dict[str, list[str]]:
    """Declare a queue per ``bindings`` entry (queue name: its binding key on ``exchange``),
    publish one message per ``(id, routing key)`` of ``sent`` to the exchange, then read each
    queue with basic_get (no consumer): the ids each holds, in order, by queue name."""
    queues = [Queue(name, exchange, routing_key=key) for name, key in bindings.items()]
    got: dict[str, list[str]] = {}
    with connect(server, prefix) as conn:
        for queue in queues:
            queue(conn.default_channel).declare()
        for message_id, routing_key in sent:
            publish(conn, [message_id], exchange=exchange, routing_key=routing_key)
        for queue in queues:
            bound = queue(conn.default_channel)
            messages = []
            while (message := bound.get(no_ack=True)) is not None:
                messages.append(message.headers["id"])
            got[queue.name] = messages
    return got


def test_a_direct_exchange_delivers_to_every_queue_bound_with_the_routing_key(
    server: Server, prefix: str
):
    bindings = {"images": "image", "videos": "video", "audit": "image"}
    sent = [("i1", "image"), ("v1", "video"), ("i2", "image")]

    got = _routed(server, prefix, Exchange("jobs", type="direct"), bindings, sent)

    assert got == {"images": ["i1", "i2"], "videos": ["v1"], "audit": ["i1", "i2"]}


def test_a_topic_exchange_matches_star_as_one_word_and_hash_as_one_or_more_words(
    server: Server, prefix: str
):
    bindings = {"errors": "logs.*.error", "everything": "logs.#", "db": "*.db.*"}
    keys = ["logs.app.error", "logs.db.info", "logs.a.b.error", "other.db.x", "logs"]
    sent = [(key, key) for key in keys]  # each message's id is its routing key

    got = _routed(server, prefix, Exchange("logs", type="topic"), bindings, sent)

    assert got == {
        "errors": ["logs.app.error"],
        "everything": ["logs.app.error", "logs.db.info", "logs.a.b.error"],
        "db": ["logs.db.info", "other.db.x"],
    }


def test_the_anonymous_exchange_routes_by_queue_name(server: Server, prefix: str):
    with connect(server, prefix) as conn:
        queue = direct_queue("named")
        queue(conn.default_channel).declare()
        conn.Producer().publish({"x": 1}, routing_key="named", headers={"id": "n1"})
        got = Receiver(conn, [queue]).receive(1)
    assert ids_of(got) == ["n1"]
    assert got[0].payload == {"x": 1}
    assert got[0].delivery_info["routing_key"] == "named"


def test_a_routing_key_nothing_is_bound_to_delivers_nowhere_and_creates_no_queue(
    server: Server, prefix: str, redis_client
):
    exchange = Exchange("jobs", type="direct")
    queue = Queue("images", exchange, routing_key="image")
    with connect(server, prefix) as conn:
        queue(conn.default_channel).declare()
        keys_before = scan_keys(redis_client, f"*{prefix}*")
        publish(conn, ["lost"], exchange=exchange, routing_key="nobody")
        keys_after = scan_keys(redis_client, f"*{prefix}*")

    look = broker(server, prefix)
    assert look.queues() == ["images"]
    assert look.counts("images") == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 0}
    assert look.lookup("lost") == []
    assert keys_after == keys_before


def test_deleting_a_queue_removes_it_and_its_messages_whichever_connection_declared_it(
    server: Server, prefix: str, redis_client
):
    with connect(server, prefix) as conn:
        direct_queue("old")(conn.default_channel).declare()
        publish(conn, ["o1", "o2"], routing_key="old")
    with connect(server, prefix) as other:
        direct_queue("old")(other.default_channel).delete()

    assert broker(server, prefix).queues() == []
    assert scan_keys(redis_client, f"{prefix}{{old}}:*") == set()
