"""reclaim.lua: expired leases go back to the front of their band, each exactly once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery_msg.scripts import Code

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py


def test_reclaim_moves_an_expired_lease_to_the_front_of_its_band(lab: Lab):
    lab.add_ready("r", "R", band=5, score=lab.back(5, 1))
    lab.add_leased("m", "M", token=3, deadline=lab.now - 1, owner="gone", band=5, deliv=2)

    assert lab.reclaim() == 1

    assert lab.state() == {
        "ready": [("m", lab.front(5, 1)), ("r", lab.back(5, 1))],
        "body": {"r": "R", "m": "M"},
        "order": {"r": lab.order(5, 1), "m": lab.order(5, 0)},
        "deliv": {"m": "2"},
        "front": "1",
        "signal": ["1"],
        "stats": {"reclaimed": "1"},
    }


def test_reclaiming_twice_at_the_same_now_moves_each_expired_lease_once(lab: Lab):
    for i, deadline in enumerate([lab.now - 300, lab.now - 200, lab.now]):
        lab.add_leased(f"e{i}", "x", token=i + 1, deadline=deadline)
    lab.add_leased("live", "x", token=9, deadline=lab.now + 1)

    assert lab.reclaim() == 3
    after_first = lab.state()
    assert lab.reclaim() == 0

    assert lab.state() == after_first
    assert after_first["stats"] == {"reclaimed": "3"}
    assert after_first["front"] == "3"
    # Walked backwards (latest deadline first to the front), so the earliest expired is first.
    assert after_first["ready"] == [
        ("e0", lab.front(0, 3)),
        ("e1", lab.front(0, 2)),
        ("e2", lab.front(0, 1)),
    ]
    assert after_first["leased"] == [("live", lab.now + 1)]
    assert after_first["token"] == {"live": "9"}


def test_reclaim_honours_its_limit_and_takes_the_earliest_deadlines_first(lab: Lab):
    for i in range(5):
        lab.add_leased(f"e{i}", "x", token=i + 1, deadline=lab.now - 100 + i)

    assert lab.reclaim(limit=2) == 2
    assert [key for key, _ in lab.state()["leased"]] == ["e2", "e3", "e4"]
    assert lab.reclaim(limit=2) == 2
    assert lab.reclaim(limit=2) == 1
    assert lab.reclaim(limit=2) == 0

    state = lab.state()
    assert "leased" not in state
    assert state["stats"] == {"reclaimed": "5"}
    # Each call keeps its own batch in deadline order, but goes in front of the earlier calls'.
    assert state["ready"] == [
        ("e4", lab.front(0, 5)),
        ("e2", lab.front(0, 4)),
        ("e3", lab.front(0, 3)),
        ("e0", lab.front(0, 2)),
        ("e1", lab.front(0, 1)),
    ]


def test_reclaim_puts_the_earliest_expired_lease_first_in_line(lab: Lab):
    lab.add_ready("r", "R", score=lab.back(0, 1))
    for key, deadline in [("late", lab.now - 10), ("early", lab.now - 30), ("mid", lab.now - 20)]:
        lab.add_leased(key, key.upper(), token=len(key), deadline=deadline)

    assert lab.reclaim() == 3

    assert lab.state() == {
        "ready": [
            ("early", lab.front(0, 3)),
            ("mid", lab.front(0, 2)),
            ("late", lab.front(0, 1)),
            ("r", lab.back(0, 1)),
        ],
        "body": {"r": "R", "late": "LATE", "early": "EARLY", "mid": "MID"},
        "order": {
            "r": lab.order(0, 1),
            "late": lab.order(0, 0),
            "early": lab.order(0, 0),
            "mid": lab.order(0, 0),
        },
        "deliv": {"late": "1", "early": "1", "mid": "1"},
        "front": "3",
        "signal": ["1"],
        "stats": {"reclaimed": "3"},
    }
    assert [key for _, key, _, _, _ in lab.reserve(count=4)] == ["early", "mid", "late", "r"]


def test_reclaim_keeps_the_lexical_order_of_leases_with_equal_deadlines(lab: Lab):
    # ZRANGEBYSCORE orders equal scores by member: a before b, whatever the insertion order.
    for n, key in enumerate(["c", "b", "a"], start=1):
        lab.add_leased(key, key.upper(), token=n, deadline=lab.now - 5)

    assert lab.reclaim() == 3

    assert lab.state()["ready"] == [
        ("a", lab.front(0, 3)),
        ("b", lab.front(0, 2)),
        ("c", lab.front(0, 1)),
    ]


def test_reclaim_with_nothing_expired_writes_nothing(lab: Lab):
    lab.add_leased("live", "x", token=1, deadline=lab.now + 1)
    before = lab.state()

    assert lab.reclaim() == 0

    assert lab.state() == before


def test_a_reclaimed_lease_cannot_be_settled_with_its_old_token(lab: Lab):
    lab.add_leased("m", "M", token=3, deadline=lab.now - 1)
    assert lab.reclaim() == 1
    before = lab.state()

    assert lab.extend(("m", 3)) == [Code.LEASE_LOST]
    assert lab.requeue(("m", 3)) == [Code.LEASE_LOST]
    assert lab.state() == {**before, "stats": {"reclaimed": "1", "lease_lost": "2"}}
    assert lab.ack(("m", 3)) == [Code.LEASE_LOST]
    assert lab.dead_letter("m", 3, "{}") == Code.LEASE_LOST
    assert lab.state() == {**before, "stats": {"reclaimed": "1", "lease_lost": "4"}}


def test_a_reclaim_takes_the_band_from_order_once_the_ready_entry_is_gone(lab: Lab):
    assert lab.publish("a", "A", 3) == "a"
    assert lab.publish("m", "M", 2) == "m"
    assert lab.publish("b", "B", 2) == "b"
    assert lab.reserve(count=1, lease=100, consumer="gone") == [(0, "m", 4, 1, "M")]
    # Reserved: its ready entry (the score) is gone; only `order` still knows its band.
    assert lab.state()["ready"] == [("b", lab.back(2, 3)), ("a", lab.back(3, 1))]

    assert lab.reclaim(now=lab.now + 100) == 1

    assert lab.state() == {
        "ready": [("m", lab.front(2, 1)), ("b", lab.back(2, 3)), ("a", lab.back(3, 1))],
        "body": {"a": "A", "m": "M", "b": "B"},
        "order": {"a": lab.order(3, 1), "m": lab.order(2, 2), "b": lab.order(2, 3)},
        "deliv": {"m": "1"},
        "seq": "4",
        "front": "1",
        "signal": ["1"],
        "stats": {"published": "3", "reclaimed": "1"},
    }
    assert [key for _, key, _, _, _ in lab.reserve(count=3)] == ["m", "b", "a"]
