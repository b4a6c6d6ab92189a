"""oldest.lua: when the oldest ready message was enqueued, read without a write, whatever the
priority bands and however messages came back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import redis

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py


def test_an_empty_queue_has_no_oldest_message(lab: Lab):
    assert lab.oldest() == 0
    assert lab.state() == {}


def test_the_oldest_is_the_first_published_of_a_single_band(lab: Lab):
    lab.publish("a", "A", now=lab.now)
    lab.publish("b", "B", now=lab.now + 5)
    before = lab.state()

    assert lab.oldest() == lab.now
    assert lab.state() == before  # read only


def test_the_oldest_is_found_in_a_later_band_than_the_head(lab: Lab):
    lab.publish("low", "L", 7, now=lab.now)  # served last, waiting longest
    lab.publish("high", "H", 0, now=lab.now + 100)
    lab.publish("mid", "M", 3, now=lab.now + 200)

    assert lab.ready_order() == ["high", "mid", "low"]
    assert lab.oldest() == lab.now


def test_a_message_at_the_front_does_not_hide_an_older_one_at_the_back(lab: Lab):
    # A replayed message goes to the back with a fresh sequence number but keeps its enqueue
    # time; a requeued younger one sits at the front of the same band.
    lab.add_ready("young", "Y", score=lab.front(0, 5))
    lab.add_ready("old", "O", score=lab.back(0, 9))
    lab.client.hset(lab.keys.born, mapping={"young": lab.now + 50, "old": lab.now})

    assert lab.ready_order() == ["young", "old"]
    assert lab.oldest() == lab.now


def test_a_promoted_message_counts_from_when_it_fell_due_not_from_its_promotion(lab: Lab):
    lab.publish("later", "L", due=lab.now + 1_000, now=lab.now)
    assert lab.oldest() == 0  # scheduled, not due yet: not ready

    lab.promote(now=lab.now + 4_000)

    assert lab.oldest(now=lab.now + 4_000) == lab.now + 1_000
    assert lab.state()["born"] == {"later": str(lab.now + 1_000)}


def test_a_due_message_nobody_promoted_counts_as_ready_since_its_due_time(lab: Lab):
    lab.publish("ready", "R", now=lab.now)
    lab.publish("overdue", "O", due=lab.now - 500, now=lab.now - 900)
    lab.publish("future", "F", due=lab.now + 500, now=lab.now - 900)

    assert lab.oldest(now=lab.now) == lab.now - 500
    assert lab.oldest(now=lab.now - 600) == lab.now  # not due yet at that time


def test_the_enqueue_time_goes_with_the_message(lab: Lab):
    lab.publish("m", "M", now=lab.now)
    [(_, key, token, _, _)] = lab.reserve(count=1)
    lab.ack((key, token))

    assert "born" not in lab.state()


def test_messages_without_an_enqueue_time_are_passed_over(lab: Lab):
    lab.add_ready("handmade", "H", score=lab.back(0, 1))
    assert lab.oldest() == 0

    lab.publish("m", "M", 2, now=lab.now + 7)
    assert lab.oldest() == lab.now + 7


@pytest.mark.parametrize("score", ["inf", "-inf", str(-(2**50)), str(300 * 2**44)])
def test_scores_outside_every_band_end_the_walk_instead_of_looping(lab: Lab, score: str):
    lab.publish("m", "M", 4, now=lab.now)
    lab.client.zadd(lab.keys.ready, {"odd": float(score)})
    lab.client.hset(lab.keys.born, "odd", lab.now - 5)

    assert lab.oldest() in (lab.now, lab.now - 5)


@pytest.mark.parametrize("part", ["ready", "born", "sched"])
def test_a_key_of_the_wrong_type_is_an_error_naming_it(lab: Lab, part: str):
    lab.client.set(getattr(lab.keys, part), "x")
    with pytest.raises(redis.ResponseError, match=part):
        lab.oldest()
