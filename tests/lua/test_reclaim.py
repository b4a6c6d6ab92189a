"""reclaim.lua: expired leases go back to the front of their band, each exactly once, in the order
they were published."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery_msg.scripts import Code

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py


def test_reclaim_moves_an_expired_lease_to_the_front_of_its_band(lab: Lab):
    lab.add_ready("r", "R", band=5, score=lab.back(5, 1))
    lab.add_leased("m", "M", token=3, deadline=lab.now - 1, owner="gone", band=5, seq=2, deliv=2)

    assert lab.reclaim() == 1

    assert lab.state() == {
        "ready": [("m", lab.front(5, 2)), ("r", lab.back(5, 1))],
        "body": {"r": "R", "m": "M"},
        "deliv": {"m": "2"},
        "signal": ["1"],
        "stats": {"reclaimed": "1"},
    }


def test_reclaiming_twice_at_the_same_now_moves_each_expired_lease_once(lab: Lab):
    for i, deadline in enumerate([lab.now - 300, lab.now - 200, lab.now]):
        lab.add_leased(f"e{i}", "x", token=i + 1, deadline=deadline, seq=3 - i)
    lab.add_leased("live", "x", token=9, deadline=lab.now + 1)

    assert lab.reclaim() == 3
    after_first = lab.state()
    assert lab.reclaim() == 0

    assert lab.state() == after_first
    assert after_first["stats"] == {"reclaimed": "3"}
    # Back in the order they were published (e2 first), whatever their deadlines.
    assert after_first["ready"] == [
        ("e2", lab.front(0, 1)),
        ("e1", lab.front(0, 2)),
        ("e0", lab.front(0, 3)),
    ]
    assert after_first["leased"] == [("live", lab.now + 1)]
    assert after_first["token"] == {"live": "9"}


def test_reclaim_honours_its_limit_and_takes_the_earliest_deadlines_first(lab: Lab):
    for i in range(5):
        lab.add_leased(f"e{i}", "x", token=i + 1, deadline=lab.now - 100 + i, seq=i + 1)

    assert lab.reclaim(limit=2) == 2
    assert [key for key, _ in lab.state()["leased"]] == ["e2", "e3", "e4"]
    assert lab.reclaim(limit=2) == 2
    assert lab.reclaim(limit=2) == 1
    assert lab.reclaim(limit=2) == 0

    state = lab.state()
    assert "leased" not in state
    assert state["stats"] == {"reclaimed": "5"}
    # Three calls, one order: the order they were published in.
    assert state["ready"] == [(f"e{i}", lab.front(0, i + 1)) for i in range(5)]


def test_reclaimed_messages_go_before_the_rest_of_their_band_in_publish_order(lab: Lab):
    lab.add_ready("r", "R", score=lab.back(0, 4))
    leases = [("late", lab.now - 10, 3), ("early", lab.now - 30, 2), ("mid", lab.now - 20, 1)]
    for key, deadline, seq in leases:
        lab.add_leased(key, key.upper(), token=len(key), deadline=deadline, seq=seq)

    assert lab.reclaim() == 3

    expected = (
        lab.expect()
        .ready("mid", "MID", seq=1, at=lab.front(0, 1), deliv=1)
        .ready("early", "EARLY", seq=2, at=lab.front(0, 2), deliv=1)
        .ready("late", "LATE", seq=3, at=lab.front(0, 3), deliv=1)
        .ready("r", "R", seq=4)
        .plus(signal=["1"], stats={"reclaimed": "3"})
    )
    assert lab.state() == expected.state
    assert [key for _, key, _, _, _ in lab.reserve(count=4)] == ["mid", "early", "late", "r"]


def test_reclaim_keeps_the_lexical_order_of_leases_without_an_order_entry(lab: Lab):
    # No publish position (written by hand): all first in band 0, equal scores by member.
    for n, key in enumerate(["c", "b", "a"], start=1):
        lab.add_leased(key, key.upper(), token=n, deadline=lab.now - 5)
        lab.client.hdel(lab.keys.order, key)

    assert lab.reclaim() == 3

    assert lab.state()["ready"] == [("a", 0), ("b", 0), ("c", 0)]


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


# A reclaimed lease takes its band from `order` once its ready entry is gone: see
# test_requeue.py::test_a_lease_put_back_takes_the_band_from_order_once_the_ready_entry_is_gone,
# run for both requeue.lua and reclaim.lua.
