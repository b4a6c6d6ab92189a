"""ack.lua: RESERVED -> ACKED (every trace removed), fenced by the lease's token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery_msg.scripts import Code

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py

OK, LOST, GONE = Code.OK, Code.LEASE_LOST, Code.GONE


def test_an_ack_with_the_current_token_removes_every_trace_of_the_message(lab: Lab):
    lab.add_leased("m", "M", token=7, deadline=lab.now + 100, owner="w1", band=3, deliv=2)
    lab.add_ready("other", "O", score=lab.back(0, 1))

    assert lab.ack(("m", 7)) == [OK]

    assert lab.state() == {
        "ready": [("other", lab.back(0, 1))],
        "body": {"other": "O"},
        "stats": {"acked": "1"},
    }


def test_an_ack_with_a_wrong_token_changes_nothing_but_the_lease_lost_count(lab: Lab):
    lab.add_leased("m", "M", token=7, deadline=lab.now + 100, owner="w1", deliv=1)
    before = lab.state()

    assert lab.ack(("m", 6)) == [LOST]

    assert lab.state() == {**before, "stats": {"lease_lost": "1"}}


def test_a_batch_ack_returns_one_code_per_pair_in_order(lab: Lab):
    for n, key in enumerate(["a", "b", "c"], start=1):
        lab.add_leased(key, key.upper(), token=n, deadline=lab.now + 100)

    codes = lab.ack(("a", 1), ("b", 99), ("c", 3), ("missing", 4))

    assert codes == [OK, LOST, OK, GONE]
    expected = lab.expect().leased("b", "B", until=lab.now + 100, token=2)
    assert lab.state() == expected.plus(stats={"acked": "2", "lease_lost": "1"}).state


def test_a_zombie_consumer_cannot_ack_a_redelivered_message(lab: Lab):
    key, zombie_token, new_token = lab.redelivered()
    before = lab.state()
    assert before["owner"] == {key: "c2"}

    assert lab.ack((key, zombie_token)) == [LOST]

    assert lab.state() == {**before, "stats": {**before["stats"], "lease_lost": "1"}}
    assert lab.ack((key, new_token)) == [OK]
    assert "body" not in lab.state()


def test_a_second_ack_of_a_message_finds_it_gone_and_changes_nothing_not_even_a_count(lab: Lab):
    # A prefork pool child acks its task's success; the worker's own ack follows.
    lab.add_leased("m", "M", token=1, deadline=lab.now + 100)

    assert lab.ack(("m", 1), ("m", 1)) == [OK, GONE]
    assert lab.ack(("m", 1)) == [GONE]
    assert lab.state() == {"stats": {"acked": "1"}}


def test_an_ack_of_a_message_acked_and_published_again_is_a_lost_lease_not_gone(lab: Lab):
    # The key is stored again (a new message with the same id): the old token holds nothing.
    lab.add_leased("m", "M", token=1, deadline=lab.now + 100)
    assert lab.ack(("m", 1)) == [OK]
    lab.add_ready("m", "M2", score=lab.back(0, 1))
    before = lab.state()

    assert lab.ack(("m", 1)) == [LOST]

    assert lab.state() == {**before, "stats": {"acked": "1", "lease_lost": "1"}}


def test_an_ack_of_a_requeued_message_is_refused_and_leaves_it_ready(lab: Lab):
    lab.add_leased("m", "M", token=4, deadline=lab.now + 100)
    assert lab.requeue(("m", 4)) == [OK]
    before = lab.state()

    assert lab.ack(("m", 4)) == [LOST]

    assert lab.state() == {**before, "stats": {**before["stats"], "lease_lost": "1"}}


def test_an_ack_of_a_dead_lettered_message_is_refused_and_keeps_it_dead(lab: Lab):
    lab.add_dead("d", "D", at=lab.now - 5, reason='{"reason": "rejected"}')
    before = lab.state()

    assert lab.ack(("d", 1)) == [LOST]

    assert lab.state() == {**before, "stats": {"lease_lost": "1"}}


def test_an_empty_ack_batch_writes_nothing(lab: Lab):
    lab.add_leased("m", "M", token=1, deadline=lab.now + 100)
    before = lab.state()

    assert lab.ack() == []
    assert lab.state() == before


def test_an_ack_removes_the_order_dups_and_alias_entries_of_the_message(lab: Lab):
    assert lab.publish("t", "first", 0) == "t"
    [(_, _, first, _, _)] = lab.reserve(count=1)
    assert lab.publish("t", "retry", 0) == "t/3"
    [(_, _, retry, _, _)] = lab.reserve(count=1)
    before = lab.state()
    # t: seq 1, token 2; t/3: n 3, score 4, token 5.
    assert (first, retry) == (2, 5)
    assert before["order"] == {"t": lab.order(0, 1), "t/3": lab.order(0, 4)}
    assert before["dups"] == {"t/3": "t"}
    assert before["alias"] == {"t": "t/3"}

    assert lab.ack(("t/3", retry)) == [OK]

    # t/3 is gone with its dups and alias entries; t keeps its lease.
    expected = lab.expect().leased("t", "first", until=lab.now + lab.lease, token=first, seq=1)
    expected.plus(born={"t": str(lab.now)}, clock=lab.ticks((1, lab.now)), seq="5", signal=["1"])
    expected.plus(stats={"published": "2", "delivered": "2", "acked": "1"})
    assert lab.state() == expected.state
    assert lab.ack(("t", first)) == [OK]
    assert lab.state() == {
        "seq": "5",
        "signal": ["1"],
        "clock": lab.ticks((1, lab.now)),
        "stats": {"published": "2", "delivered": "2", "acked": "2"},
    }


def test_acking_an_older_duplicate_keeps_the_alias_of_the_newest(lab: Lab):
    lab.publish("t", "first", 0)
    [(_, _, first, _, _)] = lab.reserve(count=1)
    older = lab.publish("t", "retry-1", 0)
    [(_, _, older_token, _, _)] = lab.reserve(count=1)
    newer = lab.publish("t", "retry-2", 0)
    assert lab.state()["alias"] == {"t": newer} and older != newer

    assert lab.ack((older, older_token), ("t", first)) == [OK, OK]

    state = lab.state()
    assert state["alias"] == {"t": newer}
    assert state["dups"] == {newer: "t"}
