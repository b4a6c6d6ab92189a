"""extend.lua: renew the leases a live consumer still holds, fenced by token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery_msg.scripts import Code

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py

OK, LOST, GONE = Code.OK, Code.LEASE_LOST, Code.GONE


def test_extend_moves_the_deadline_to_now_plus_lease_and_nothing_else(lab: Lab):
    lab.add_leased("m", "M", token=5, deadline=lab.now + 100, owner="w1", band=2, deliv=3)
    before = lab.state()

    assert lab.extend(("m", 5), now=lab.now + 50, lease=20_000) == [OK]

    assert lab.state() == {**before, "leased": [("m", lab.now + 50 + 20_000)]}


def test_an_extend_with_a_wrong_token_changes_nothing_but_the_lease_lost_count(lab: Lab):
    lab.add_leased("m", "M", token=5, deadline=lab.now + 100)
    before = lab.state()

    assert lab.extend(("m", 4)) == [LOST]

    assert lab.state() == {**before, "stats": {"lease_lost": "1"}}


def test_a_batch_extend_returns_one_code_per_pair_and_renews_only_held_leases(lab: Lab):
    lab.add_leased("a", "A", token=1, deadline=lab.now + 10)
    lab.add_leased("b", "B", token=2, deadline=lab.now + 20)
    lab.add_leased("c", "C", token=3, deadline=lab.now + 30)

    codes = lab.extend(("a", 1), ("b", 1), ("c", 3), ("gone", 9), lease=5_000)

    assert codes == [OK, LOST, OK, GONE]
    state = lab.state()
    assert state["leased"] == [
        ("b", lab.now + 20),
        ("a", lab.now + 5_000),
        ("c", lab.now + 5_000),
    ]
    assert state["stats"] == {"lease_lost": "1"}


def test_a_zombie_consumer_cannot_renew_a_redelivered_message(lab: Lab):
    key, zombie_token, new_token = lab.redelivered()
    before = lab.state()
    assert before["leased"] == [(key, lab.now + 2 * lab.lease)]

    assert lab.extend((key, zombie_token), now=lab.now + 2 * lab.lease - 1) == [LOST]

    assert lab.state() == {**before, "stats": {**before["stats"], "lease_lost": "1"}}
    assert lab.extend((key, new_token), now=lab.now + lab.lease + 10) == [OK]
    assert lab.state()["leased"] == [(key, lab.now + 2 * lab.lease + 10)]


def test_extend_never_puts_an_acked_message_back_into_the_leased_set(lab: Lab):
    # Acked by a prefork pool child before its worker's renewal round: gone, not a lost lease.
    lab.add_leased("m", "M", token=1, deadline=lab.now + 100)
    assert lab.ack(("m", 1)) == [OK]

    assert lab.extend(("m", 1)) == [GONE]

    assert lab.state() == {"stats": {"acked": "1"}}


def test_the_holder_of_an_expired_but_unreclaimed_lease_may_still_renew_it(lab: Lab):
    # Nobody else can hold the message until a reclaim hands it out with a new token.
    lab.add_leased("m", "M", token=1, deadline=lab.now - 10)

    assert lab.extend(("m", 1)) == [OK]

    assert lab.state()["leased"] == [("m", lab.now + lab.lease)]
    assert lab.reclaim() == 0


def test_an_empty_extend_batch_writes_nothing(lab: Lab):
    lab.add_leased("m", "M", token=1, deadline=lab.now + 100)
    before = lab.state()

    assert lab.extend() == []
    assert lab.state() == before
