"""requeue.lua: RESERVED -> READY at the front of the message's band, in publish order, fenced by
token."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from celery_msg.scripts import Code

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py

OK, LOST, GONE = Code.OK, Code.LEASE_LOST, Code.GONE


def test_requeue_puts_the_message_at_the_front_of_its_band(lab: Lab):
    lab.add_ready("x2", "X", band=2, score=lab.back(2, 1))
    lab.add_ready("y0", "Y", band=0, score=lab.back(0, 2))
    lab.add_leased("m", "M", token=5, deadline=lab.now + 100, owner="w1", band=2, seq=3, deliv=1)

    assert lab.requeue(("m", 5)) == [OK]

    assert lab.state() == {
        "ready": [("y0", lab.back(0, 2)), ("m", lab.front(2, 3)), ("x2", lab.back(2, 1))],
        "body": {"x2": "X", "y0": "Y", "m": "M"},
        "deliv": {"m": "1"},
        "signal": ["1"],
        "stats": {"requeued": "1"},
    }


def test_a_requeued_message_is_the_next_one_served_in_its_band(lab: Lab):
    for i in range(3):
        lab.publish(f"m{i}", "x", 1)
    [(_, key, token, _, _)] = lab.reserve(count=1)
    assert key == "m0"

    assert lab.requeue((key, token)) == [OK]

    assert [k for _, k, _, _, _ in lab.reserve(count=3)] == ["m0", "m1", "m2"]


def test_requeue_with_uncount_takes_back_the_delivery_count(lab: Lab):
    lab.add_leased("m", "M", token=5, deadline=lab.now + 100, deliv=3)

    assert lab.requeue(("m", 5), uncount=True) == [OK]

    assert lab.state()["deliv"] == {"m": "2"}


def test_requeue_without_uncount_keeps_the_delivery_count(lab: Lab):
    lab.add_leased("m", "M", token=5, deadline=lab.now + 100, deliv=3)

    assert lab.requeue(("m", 5), uncount=False) == [OK]

    assert lab.state()["deliv"] == {"m": "3"}


def test_a_requeue_with_a_wrong_token_changes_nothing_but_the_lease_lost_count(lab: Lab):
    lab.add_leased("m", "M", token=5, deadline=lab.now + 100, deliv=2)
    before = lab.state()

    assert lab.requeue(("m", 6), uncount=True) == [LOST]

    assert lab.state() == {**before, "stats": {"lease_lost": "1"}}


def test_a_requeue_of_a_message_acked_already_finds_it_gone_and_counts_nothing(lab: Lab):
    # A prefork pool child acked its success; the worker, stopped before it read the result,
    # restores the delivery.
    lab.add_leased("m", "M", token=5, deadline=lab.now + 100, deliv=1)
    lab.add_leased("n", "N", token=6, deadline=lab.now + 100, deliv=1)
    assert lab.ack(("m", 5)) == [OK]
    before = lab.state()

    assert lab.requeue(("m", 5), ("n", 9), uncount=True) == [GONE, LOST]

    assert lab.state() == {**before, "stats": {**before["stats"], "lease_lost": "1"}}


def test_a_batch_requeue_returns_one_code_per_pair_and_puts_them_in_publish_order(lab: Lab):
    lab.add_ready("r", "R", score=lab.back(0, 4))
    lab.add_leased("a", "A", token=1, deadline=lab.now + 100, deliv=1, seq=1)
    lab.add_leased("b", "B", token=2, deadline=lab.now + 100, deliv=1, seq=2)
    lab.add_leased("c", "C", token=3, deadline=lab.now + 100, deliv=1, seq=3)

    codes = lab.requeue(("a", 1), ("b", 7), ("c", 3), uncount=True)

    assert codes == [OK, LOST, OK]
    state = lab.state()
    assert state["ready"] == [("a", lab.front(0, 1)), ("c", lab.front(0, 3)), ("r", lab.back(0, 4))]
    assert state["leased"] == [("b", lab.now + 100)]
    assert state["token"] == {"b": "2"}
    assert state["deliv"] == {"a": "0", "b": "1", "c": "0"}
    assert state["stats"] == {"requeued": "2", "lease_lost": "1"}


def test_a_batch_requeue_is_served_again_in_the_order_of_the_batch(lab: Lab):
    for message_id in ("a", "b", "c", "d"):
        lab.publish(message_id, message_id.upper(), 0)
    served = lab.reserve(count=3)
    assert [key for _, key, _, _, _ in served] == ["a", "b", "c"]

    assert lab.requeue(*[(key, token) for _, key, token, _, _ in served]) == [OK, OK, OK]

    # The requeued messages go to the front of their band in publish order (the sequence
    # numbers of their `order` entries), with the enqueue time reserve gave them from the
    # clock; d, never taken, is still timed by the clock.
    expected = lab.expect()
    for seq, key in enumerate(["a", "b", "c"], start=1):
        expected.ready(key, key.upper(), seq=seq, at=lab.front(0, seq), deliv=1, born=lab.now)
    expected.ready("d", "D", seq=4)
    expected.plus(seq="7", signal=["1"], clock=lab.ticks((1, lab.now)))
    expected.plus(stats={"published": "4", "delivered": "3", "requeued": "3"})
    assert lab.state() == expected.state
    assert [key for _, key, _, _, _ in lab.reserve(count=4)] == ["a", "b", "c", "d"]


def test_a_batch_requeue_in_any_order_is_served_in_publish_order(lab: Lab):
    for n, key in enumerate(["a", "b", "c"], start=1):
        lab.add_leased(key, key.upper(), token=n, deadline=lab.now + 100, seq=n)

    assert lab.requeue(("c", 3), ("a", 1), ("b", 2)) == [OK, OK, OK]

    assert lab.ready_order() == ["a", "b", "c"]


@pytest.mark.parametrize("turn", ["in order", "in reverse"])
def test_requeues_one_at_a_time_are_served_in_publish_order(lab: Lab, turn: str):
    # A consumer rejecting A, B, C one by one (or C, B, A): A, B, C either way, as on kombu.
    for message_id in ("a", "b", "c", "d"):
        lab.publish(message_id, message_id.upper(), 0)
    served = lab.reserve(count=3)

    for _, key, token, _, _ in served if turn == "in order" else reversed(served):
        assert lab.requeue((key, token)) == [OK]

    assert [key for _, key, _, _, _ in lab.reserve(count=4)] == ["a", "b", "c", "d"]


def test_a_batch_requeue_keeps_publish_order_within_each_band(lab: Lab):
    lab.add_ready("r1", "R", band=1, score=lab.back(1, 5))
    for n, (key, band) in enumerate([("a", 1), ("b", 0), ("c", 1), ("d", 0)], start=1):
        lab.add_leased(key, key.upper(), token=n, band=band, seq=n, deadline=lab.now + 100)

    assert lab.requeue(("c", 3), ("d", 4), ("a", 1), ("b", 2)) == [OK] * 4

    assert lab.state()["ready"] == [
        ("b", lab.front(0, 2)),
        ("d", lab.front(0, 4)),
        ("a", lab.front(1, 1)),
        ("c", lab.front(1, 3)),
        ("r1", lab.back(1, 5)),
    ]


def test_a_zombie_consumer_cannot_requeue_a_redelivered_message(lab: Lab):
    key, zombie_token, new_token = lab.redelivered()
    before = lab.state()

    assert lab.requeue((key, zombie_token), uncount=True) == [LOST]

    assert lab.state() == {**before, "stats": {**before["stats"], "lease_lost": "1"}}
    assert lab.requeue((key, new_token)) == [OK]
    assert lab.ready_order() == [key]


def test_a_message_without_an_order_entry_is_requeued_to_band_0(lab: Lab):
    lab.add_leased("m", "M", token=1, deadline=lab.now + 100, band=9)
    lab.client.hdel(lab.keys.order, "m")

    assert lab.requeue(("m", 1)) == [OK]

    assert lab.state()["ready"] == [("m", lab.front(0, 0))]


@pytest.mark.parametrize("put_back", ["requeue", "reclaim"])
def test_a_lease_put_back_takes_the_band_from_order_once_the_ready_entry_is_gone(
    lab: Lab, put_back: str
):
    # The same for requeue.lua (the holder gives it back) and reclaim.lua (its lease expired).
    assert lab.publish("m", "M", 5) == "m"
    assert lab.publish("n", "N", 5) == "n"
    assert lab.publish("z", "Z", 6) == "z"
    assert lab.reserve(count=1, lease=100, consumer="gone") == [(0, "m", 4, 1, "M")]
    # Reserved: its ready entry (the score) is gone; only `order` still knows its band.
    assert lab.state()["ready"] == [("n", lab.back(5, 2)), ("z", lab.back(6, 3))]

    if put_back == "requeue":
        assert lab.requeue(("m", 4)) == [OK]
    else:
        assert lab.reclaim(now=lab.now + 100) == 1

    # m back at the front of band 5 (band 5, seq 1 in its score): no order entry while READY.
    expected = (
        lab.expect()
        .ready("m", "M", band=5, seq=1, at=lab.front(5, 1), deliv=1, born=lab.now)
        .ready("n", "N", band=5, seq=2)
        .ready("z", "Z", band=6, seq=3)
        .plus(seq="4", signal=["1"], clock=lab.ticks((1, lab.now)))
        .plus(
            stats={
                "published": "3",
                "delivered": "1",
                {"requeue": "requeued", "reclaim": "reclaimed"}[put_back]: "1",
            }
        )
    )
    assert lab.state() == expected.state
    assert [key for _, key, _, _, _ in lab.reserve(count=3)] == ["m", "n", "z"]


@pytest.mark.parametrize(
    ("band", "seq"),
    [(0, 1), (1, 1), (7, 12_345), (254, 2**43 - 1), (255, 2**43 - 1)],
    ids=["band0", "band1", "band7", "band254-last-seq", "band255-last-seq"],
)
def test_requeue_and_reclaim_read_the_published_band_from_order_over_the_whole_range(
    lab: Lab, band: int, seq: int
):
    # The band is order // 2^44: exact even for the last sequence number of a band, whose
    # score is one below the next band's first (255 and 2^43 - 1: 2^52 - 1).
    lab.set_counter("seq", seq - 1)
    assert lab.publish("m", "M", band) == "m"
    assert "order" not in lab.state()  # READY: its score holds band and seq
    [(_, _, token, _, _)] = lab.reserve(count=1)
    assert lab.state()["order"] == {"m": lab.order(band, seq)}  # written when it left `ready`

    assert lab.requeue(("m", token)) == [OK]
    state = lab.state()
    assert state["ready"] == [("m", lab.front(band, seq))]
    assert "order" not in state

    # Taken from the front this time: reserve writes the same entry from the front score.
    assert [key for _, key, _, _, _ in lab.reserve(count=1)] == ["m"]
    assert lab.state()["order"] == {"m": lab.order(band, seq)}
    assert lab.reclaim(now=lab.now + lab.lease) == 1
    state = lab.state()
    assert state["ready"] == [("m", lab.front(band, seq))]
    assert "order" not in state


@pytest.mark.parametrize("put_back", ["requeue", "reclaim"])
def test_a_ready_message_stored_by_an_older_version_keeps_its_band_when_it_comes_back(
    lab: Lab, put_back: str
):
    # A rolling upgrade: an older version wrote `order` for READY messages too. Nothing reads
    # it while the message is ready; reserve overwrites it with the same number.
    lab.add_ready("old", "O", band=3, score=lab.back(3, 1), legacy=True)
    lab.add_ready("new", "N", band=3, score=lab.back(3, 2))
    lab.set_counter("seq", 2)
    [(_, key, token, _, _)] = lab.reserve(count=1)
    assert key == "old"
    assert lab.state()["order"] == {"old": lab.order(3, 1)}

    if put_back == "requeue":
        assert lab.requeue(("old", token)) == [OK]
    else:
        assert lab.reclaim(now=lab.now + lab.lease) == 1

    state = lab.state()
    assert state["ready"] == [("old", lab.front(3, 1)), ("new", lab.back(3, 2))]
    assert "order" not in state
    assert [key for _, key, _, _, _ in lab.reserve(count=2)] == ["old", "new"]


@pytest.mark.parametrize(
    "score", [-5, 256 * 2**44, float("inf")], ids=["negative", "band256", "infinite"]
)
def test_a_ready_score_in_no_band_is_served_and_comes_back_as_the_first_of_band_0(
    lab: Lab, score: float
):
    # Written by hand: reserve still leases it, and a requeue puts it where a message without
    # an `order` entry goes (the first of band 0) instead of failing half-way.
    lab.client.zadd(lab.keys.ready, {"odd": score})
    lab.client.hset(lab.keys.body, "odd", "X")
    lab.add_ready("b1", "B", band=1, score=lab.back(1, 1))
    lab.set_counter("seq", 1)
    served = lab.reserve(count=1) if score < 0 else lab.reserve(count=2)[1:]
    [(_, key, token, _, _)] = served
    assert key == "odd"
    assert lab.state()["order"]["odd"] == lab.order(0, 0)

    assert lab.requeue(("odd", token)) == [OK]

    assert ("odd", lab.front(0, 0)) in lab.state()["ready"]
