"""dead_letter.lua: RESERVED -> DEAD with a reason; the body stays, fenced by token."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import redis

from celery_msg.scripts import Code

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py

OK, LOST = Code.OK, Code.LEASE_LOST
REASON = json.dumps({"reason": "rejected", "detail": "task said no", "time": 1_000_000})


def test_dead_letter_moves_the_message_to_the_dead_store_with_its_reason(lab: Lab):
    lab.add_leased("m", "M", token=4, deadline=lab.now + 100, owner="w1", band=1, deliv=2)

    assert lab.dead_letter("m", 4, REASON) == OK

    expected = lab.expect().dead("m", "M", at=lab.now, reason=REASON, deliv=2, band=1)
    assert lab.state() == expected.plus(stats={"dead": "1", "dead:failed": "1"}).state


def test_a_dead_letter_with_a_wrong_token_changes_nothing_but_the_lease_lost_count(lab: Lab):
    lab.add_leased("m", "M", token=4, deadline=lab.now + 100, deliv=2)
    before = lab.state()

    assert lab.dead_letter("m", 3, REASON) == LOST

    assert lab.state() == {**before, "stats": {"lease_lost": "1"}}


def test_a_zombie_consumer_cannot_dead_letter_a_redelivered_message(lab: Lab):
    key, zombie_token, new_token = lab.redelivered()
    before = lab.state()

    assert lab.dead_letter(key, zombie_token, REASON) == LOST

    assert lab.state() == {**before, "stats": {**before["stats"], "lease_lost": "1"}}
    assert lab.dead_letter(key, new_token, REASON) == OK
    assert lab.state()["dead"] == [(key, lab.now)]


def test_a_message_cannot_be_dead_lettered_twice(lab: Lab):
    lab.add_leased("m", "M", token=4, deadline=lab.now + 100)
    assert lab.dead_letter("m", 4, REASON, now=lab.now) == OK

    assert lab.dead_letter("m", 4, '{"reason": "again"}', now=lab.now + 500, word="again") == LOST

    state = lab.state()
    assert state["dead"] == [("m", lab.now)]
    assert state["reason"] == {"m": REASON}
    assert state["stats"] == {"dead": "1", "dead:failed": "1", "lease_lost": "1"}


def test_the_reason_is_stored_byte_for_byte(lab: Lab):
    lab.add_leased("m", "M", token=1, deadline=lab.now + 100)
    reason = json.dumps({"reason": "undecodable", "detail": 'bad \u00e9 \\ "quote"', "n": 1.5})

    assert lab.dead_letter("m", 1, reason) == OK

    assert json.loads(lab.client.hget(lab.keys.reason, "m")) == json.loads(reason)
    assert lab.client.hget(lab.keys.reason, "m") == reason.encode()


def test_a_dead_lettered_message_is_never_served_or_reclaimed_again(lab: Lab):
    lab.add_leased("m", "M", token=1, deadline=lab.now + 100)
    assert lab.dead_letter("m", 1, REASON) == OK
    before = lab.state()

    assert lab.reserve(now=lab.now + 10 * lab.lease, count=5) == []
    assert lab.reclaim(now=lab.now + 10 * lab.lease) == 0

    assert lab.state() == before


def test_a_dead_lettered_duplicate_keeps_its_order_and_dups_entries(lab: Lab):
    # Its body stays, so a look-up by id must still find it, tell which id it belongs to, and
    # place it among the other instances (by the sequence number in `order`).
    assert lab.publish("t", "first", 0) == "t"
    assert lab.publish("t", "retry", 2) == "t/2"
    served = lab.reserve(count=2)
    tokens = {key: token for _, key, token, _, _ in served}

    assert lab.dead_letter("t/2", tokens["t/2"], REASON) == OK

    state = lab.state()
    assert state["dead"] == [("t/2", lab.now)]
    assert state["order"] == {"t": lab.order(0, 1), "t/2": lab.order(2, 3)}
    assert state["dups"] == {"t/2": "t"}


@pytest.mark.parametrize("word", ["", "Failed", "a b", "x" * 41, "dead:x"])
def test_a_reason_that_is_no_word_is_refused_before_any_write(lab: Lab, word: str):
    lab.add_leased("m", "M", token=4, deadline=lab.now + 100)
    before = lab.state()

    with pytest.raises(redis.ResponseError, match="reason word"):
        lab.dead_letter("m", 4, REASON, word=word)
    with pytest.raises(redis.ResponseError, match="reason word"):
        lab.bury("m", word=word)

    assert lab.state() == before


def test_each_reason_is_counted_apart_and_in_the_total(lab: Lab):
    for key, word in (("a", "failed"), ("b", "rejected"), ("c", "failed")):
        lab.add_leased(key, key.upper(), token=1, deadline=lab.now + 100)
        assert lab.dead_letter(key, 1, REASON, word=word) == OK

    assert lab.state()["stats"] == {"dead": "3", "dead:failed": "2", "dead:rejected": "1"}
