"""Priorities through kombu: 0..255 exactly, higher first (or lower first), FIFO within one."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from kombu_helpers import Receiver, broker, connect, direct_queue, ids_of, publish

if TYPE_CHECKING:
    from conftest import Server


def _publish_with_priorities(conn, queue: str, priorities: list[int]) -> list[str]:
    producer = conn.Producer()
    ids = []
    for i, priority in enumerate(priorities):
        message_id = f"m{i:03d}-p{priority}"
        producer.publish({"i": i}, routing_key=queue, headers={"id": message_id}, priority=priority)
        ids.append(message_id)
    return ids


def _random_priorities(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    # Few distinct values so that FIFO within a priority is exercised; 0 and 255 always there.
    values = [0, 1, 9, 10, 127, 128, 200, 254, 255]
    return [0, 255, *(rng.choice(values) for _ in range(count - 2))]


def test_higher_priority_is_delivered_first_and_equal_priorities_keep_publish_order(
    server: Server, prefix: str
):
    priorities = _random_priorities(seed=7, count=300)
    with connect(server, prefix) as conn:
        ids = _publish_with_priorities(conn, "prio", priorities)
        got = Receiver(conn, [direct_queue("prio")], prefetch_count=50).receive(300)

    expected = [ids[i] for i in sorted(range(300), key=lambda i: (-priorities[i], i))]
    assert ids_of(got) == expected
    assert [m.properties["priority"] for m in got] == sorted(priorities, reverse=True)


def test_every_priority_from_0_to_255_is_its_own_level(server: Server, prefix: str):
    priorities = list(range(256))
    random.Random(3).shuffle(priorities)
    with connect(server, prefix) as conn:
        ids = _publish_with_priorities(conn, "all", priorities)
        got = Receiver(conn, [direct_queue("all")], prefetch_count=100).receive(256)

    by_priority = {p: ids[i] for i, p in enumerate(priorities)}
    assert ids_of(got) == [by_priority[p] for p in range(255, -1, -1)]


def test_priorities_are_stored_as_bands_where_band_0_is_served_first(server: Server, prefix: str):
    with connect(server, prefix) as conn:
        publish(conn, ["top"], routing_key="bands", priority=255)
        publish(conn, ["low"], routing_key="bands", priority=0)
        publish(conn, ["mid"], routing_key="bands", priority=100)
    look = broker(server, prefix)
    assert [look.get(i, ["bands"]).priority_band for i in ("top", "low", "mid")] == [0, 255, 155]


def test_priorities_outside_0_to_255_are_clamped_to_the_nearest_end(server: Server, prefix: str):
    with connect(server, prefix) as conn:
        publish(conn, ["p255"], routing_key="clamp", priority=255)
        publish(conn, ["p1000"], routing_key="clamp", priority=1000)
        publish(conn, ["p0"], routing_key="clamp", priority=0)
        publish(conn, ["p-5"], routing_key="clamp", priority=-5)
        got = Receiver(conn, [direct_queue("clamp")]).receive(4)

    assert ids_of(got) == ["p255", "p1000", "p0", "p-5"]


def test_ascending_priority_order_delivers_lower_numbers_first_and_keeps_fifo(
    server: Server, prefix: str
):
    priorities = _random_priorities(seed=11, count=200)
    with connect(server, prefix, priority_order="asc") as conn:
        ids = _publish_with_priorities(conn, "asc", priorities)
        got = Receiver(conn, [direct_queue("asc")], prefetch_count=30).receive(200)

    expected = [ids[i] for i in sorted(range(200), key=lambda i: (priorities[i], i))]
    assert ids_of(got) == expected


def test_messages_published_without_a_priority_get_the_default_priority(
    server: Server, prefix: str
):
    with connect(server, prefix, default_priority=200) as conn:
        publish(conn, ["p100"], routing_key="dflt", priority=100)
        # kombu's Producer.publish has priority=0 as its default; Celery passes None when the
        # task has no priority. Both mean "none given".
        conn.Producer().publish({}, routing_key="dflt", headers={"id": "none-given"})
        publish(conn, ["none-explicit"], routing_key="dflt", priority=None)
        publish(conn, ["p250"], routing_key="dflt", priority=250)
        got = Receiver(conn, [direct_queue("dflt")]).receive(4)

    assert ids_of(got) == ["p250", "none-given", "none-explicit", "p100"]
    assert broker(server, prefix).stats("dflt")["published"] == 4
