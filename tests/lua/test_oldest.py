"""oldest.lua: when the oldest ready message was enqueued, read without a write, whatever the
priority bands and however messages came back."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_msg.scripts import CLOCK_MS

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


# -- the clock: no `born` entry for a message waiting at the back of its band ----------------


def test_a_waiting_message_is_timed_by_the_last_tick_at_or_before_it(lab: Lab):
    # A tick when the last is CLOCK_MS old or more: m0 writes one, m1 and m2 (400 and 999 ms
    # later) map to it, m3 (1,000 ms later) writes the next.
    for i, after in enumerate([0, 400, 999, 1_000]):
        lab.publish(f"m{i}", "x", now=lab.now + after)
    state = lab.state()
    assert "born" not in state
    assert state["clock"] == lab.ticks((1, lab.now), (4, lab.now + 1_000))

    lab.reserve(count=1)  # m0 leaves: m1 is the oldest, 400 ms over-reported at most
    assert lab.oldest(now=lab.now + 2_000) == lab.now
    lab.reserve(count=2)
    assert lab.oldest(now=lab.now + 2_000) == lab.now + 1_000


def test_reserve_gives_a_taken_message_its_enqueue_time_from_the_clock(lab: Lab):
    lab.publish("a", "A", now=lab.now)
    lab.publish("b", "B", now=lab.now + 1_500)
    lab.add_ready("old", "O", score=lab.back(0, 3))  # an older version's: its own entry
    lab.client.hset(lab.keys.born, "old", lab.now - 7)
    lab.set_counter("seq", 3)

    assert [key for _, key, _, _, _ in lab.reserve(count=3)] == ["a", "b", "old"]

    assert lab.state()["born"] == {
        "a": str(lab.now),
        "b": str(lab.now + 1_500),
        "old": str(lab.now - 7),  # kept, not overwritten
    }


def test_a_requeued_message_keeps_its_enqueue_time_after_its_tick_is_gone(lab: Lab):
    lab.publish("long", "L", now=lab.now)
    [(_, key, token, _, _)] = lab.reserve(count=1)
    # The queue moves on while `long` runs: ticks at +1 s and +2 s, the first one trimmed.
    lab.publish("b", "B", now=lab.now + 1_000)
    lab.reserve(count=1)
    lab.publish("c", "C", now=lab.now + 2_000)
    assert lab.state()["clock"] == lab.ticks((5, lab.now + 2_000))

    assert lab.requeue((key, token)) == [1]

    assert lab.ready_order() == ["long", "c"]
    assert lab.oldest(now=lab.now + 3_000) == lab.now


def test_a_tick_is_removed_once_no_waiting_message_maps_to_it(lab: Lab):
    for i in range(5):  # one tick each
        lab.publish(f"m{i}", "x", i % 2, now=lab.now + i * 1_000)
    assert len(lab.state()["clock"]) == 5
    for _, key, token, _, _ in lab.reserve(count=4):  # m0, m2, m4 (band 0), then m1
        lab.ack((key, token))

    lab.publish("late", "x", now=lab.now + 9_000)

    # m3 (band 1, tick 4) still waits: the ticks before its own go (those after stay until
    # the waiting messages pass them), and late's (sequence 10: after four tokens) comes.
    assert lab.state()["clock"] == lab.ticks(
        (4, lab.now + 3_000), (5, lab.now + 4_000), (10, lab.now + 9_000)
    )
    assert lab.oldest(now=lab.now + 9_000) == lab.now + 3_000


def test_a_caller_whose_clock_is_behind_writes_no_tick(lab: Lab):
    lab.publish("a", "A", now=lab.now)
    lab.publish("b", "B", now=lab.now - 5_000)

    assert lab.state()["clock"] == lab.ticks((1, lab.now))


def test_a_tick_that_is_not_a_time_is_passed_over_and_replaced(lab: Lab):
    lab.client.zadd(lab.keys.clock, {"garbage": 0})
    lab.add_ready("handmade", "H", score=lab.back(0, 1))
    assert lab.oldest() == 0

    lab.publish("m", "M", 2, now=lab.now + 7)

    assert lab.state()["clock"] == lab.ticks((1, lab.now + 7))  # garbage trimmed: before it
    assert lab.oldest() == lab.now + 7


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 2_500), st.integers(0, 2), st.integers(0, 2)),
        min_size=1,
        max_size=30,
    )
)
def test_the_oldest_age_is_over_reported_by_less_than_the_clock_resolution(
    make_lab: Callable[[str], Lab], steps: list[tuple[int, int, int]]
):
    # Each step: time passes, a message is published into a band, some are taken (and
    # requeued, one in two). The true enqueue time of a waiting message is its publish time;
    # the script's answer lies in (true - CLOCK_MS, true].
    lab = make_lab(f"clock-{uuid.uuid4().hex[:8]}")
    now = lab.now
    published: dict[str, int] = {}
    for i, (gap, band, take) in enumerate(steps):
        now += gap
        published[lab.publish(f"m{i}", "x", band, now=now)] = now
        for _, key, token, _, _ in lab.reserve(now=now, count=take):
            if i % 2:
                lab.requeue((key, token))
            else:
                lab.ack((key, token))
                del published[key]
        waiting = [key for key in lab.ready_order()]
        answer = lab.oldest(now=now)
        if not waiting:
            assert answer == 0
            continue
        truth = min(published[key] for key in waiting)
        assert truth - CLOCK_MS < answer <= truth


@pytest.mark.parametrize("part", ["ready", "born", "sched", "clock"])
def test_a_key_of_the_wrong_type_is_an_error_naming_it(lab: Lab, part: str):
    lab.client.set(getattr(lab.keys, part), "x")
    with pytest.raises(redis.ResponseError, match=part):
        lab.oldest()
