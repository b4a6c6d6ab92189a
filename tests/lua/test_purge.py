"""purge.lua: READY and SCHEDULED -> gone, bounded per call; leased and dead messages are left
alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py


def test_purge_removes_ready_and_scheduled_messages_but_not_leased_or_dead(lab: Lab):
    lab.add_ready("a", "A", band=0, score=lab.back(0, 1), deliv=1)
    lab.add_ready("b", "B", band=1, score=lab.back(1, 2))
    lab.add_scheduled("s1", "S1", due=lab.now + 100, band=1, seq=3)
    lab.add_scheduled("s2", "S2", due=lab.now + 50, seq=4)
    lab.add_leased("l", "L", token=5, deadline=lab.now + 100, owner="w1", deliv=1)
    lab.add_dead("d", "D", at=lab.now - 1, reason='{"reason": "rejected"}', deliv=4)
    lab.set_counter("seq", 5)

    assert lab.purge(100) == 4

    expected = (
        lab.expect()
        .leased("l", "L", until=lab.now + 100, token=5, owner="w1")
        .dead("d", "D", at=lab.now - 1, reason='{"reason": "rejected"}', deliv=4)
        .plus(seq="5")
    )
    assert lab.state() == expected.state


def test_purge_removes_at_most_its_limit_in_serve_order(lab: Lab):
    for i in range(5):
        lab.add_ready(f"m{i}", "x", band=i % 2, score=lab.back(i % 2, i + 1))

    assert lab.purge(2) == 2
    assert lab.ready_order() == ["m4", "m1", "m3"]
    assert set(lab.state()["body"]) == {"m1", "m3", "m4"}
    assert lab.purge(2) == 2
    assert lab.purge(2) == 1
    assert lab.purge(2) == 0
    assert lab.state() == {}


def test_a_purge_of_an_empty_queue_returns_0_and_writes_nothing(lab: Lab):
    assert lab.purge(10) == 0
    assert lab.state() == {}


def test_purge_removes_the_order_and_dups_entries_of_the_ready_messages_only(lab: Lab):
    assert lab.publish("t", "first", 0) == "t"
    [(_, _, token, _, _)] = lab.reserve(count=1)
    assert lab.publish("t", "retry", 0) == "t/3"
    assert lab.publish("u", "other", 0) == "u"
    lab.add_ready("old", "O", score=lab.back(0, 6), legacy=True)  # as an older version left it
    lab.set_counter("seq", 6)
    assert lab.state()["dups"] == {"t/3": "t"}
    assert lab.state()["order"] == {"t": lab.order(0, 1), "old": lab.order(0, 6)}

    assert lab.purge(100) == 3

    # t/3, u and old are gone, with t/3's dups and alias entries and old's order entry; t
    # keeps its lease.
    expected = lab.expect().leased("t", "first", until=lab.now + lab.lease, token=token, seq=1)
    expected.plus(born={"t": str(lab.now)}, clock=lab.ticks((1, lab.now)), seq="6", signal=["1"])
    assert lab.state() == expected.plus(stats={"published": "3", "delivered": "1"}).state
