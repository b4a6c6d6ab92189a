"""publish.lua: store a message and append it to the back of its priority band."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import redis

from celery_msg.scripts import Code
from celery_msg.transitions import Publish

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py

OK = Code.OK


def test_publish_stores_the_message_at_the_back_of_its_band_and_signals(lab: Lab):
    key = lab.publish("m1", "body-1", 0)

    assert key == "m1"
    # One sequence number (1): its place in the band; no `order` entry (the score holds both),
    # no `born` entry: the queue's first clock tick (1 -> now) gives its enqueue time.
    expected = lab.expect().ready("m1", "body-1", seq=1).plus(clock=lab.ticks((1, lab.now)))
    assert lab.state() == expected.plus(seq="1", signal=["1"], stats={"published": "1"}).state


def test_the_ready_score_is_band_times_2_pow_44_plus_2_pow_43_plus_the_sequence(lab: Lab):
    lab.publish("a", "A", 0)
    lab.publish("b", "B", 7)
    lab.publish("c", "C", 255)

    state = lab.state()
    scores = dict(state["ready"])
    # Each publish takes one sequence number (1, 2, 3), used in its score.
    assert scores == {
        "a": 2**43 + 1,
        "b": 7 * 2**44 + 2**43 + 2,
        "c": 255 * 2**44 + 2**43 + 3,
    }
    assert "order" not in state
    # The highest score is still an exact double: no two sequence numbers may collide.
    assert float(scores["c"]) == scores["c"] < 2**53
    assert lab.client.zscore(lab.keys.ready, "c") == float(255 * 2**44 + 2**43 + 3)
    # Taken out of `ready`, each keeps exactly that score in `order`, written out as an
    # integer (no exponent, no rounding).
    assert len(lab.reserve(count=3)) == 3
    assert lab.state()["order"] == {
        "a": str(2**43 + 1),
        "b": str(7 * 2**44 + 2**43 + 2),
        "c": str(255 * 2**44 + 2**43 + 3),
    }


def test_messages_of_one_band_are_served_in_publish_order(lab: Lab):
    ids = [f"m{i}" for i in range(6)]
    for message_id in ids:
        lab.publish(message_id, message_id.upper(), 3)

    assert lab.ready_order() == ids
    served = lab.reserve(count=10)
    assert [key for _, key, _, _, _ in served] == ids


def test_a_higher_band_is_served_after_every_lower_band(lab: Lab):
    for message_id, band in [("a", 2), ("b", 0), ("c", 1), ("d", 0), ("e", 2), ("f", 1)]:
        lab.publish(message_id, message_id, band)

    assert lab.ready_order() == ["b", "d", "c", "f", "a", "e"]


def test_a_duplicate_id_is_stored_under_id_slash_n(lab: Lab):
    # t: seq 1. t again: n = 2 (the sequence number taken first, t was taken), score 3.
    # t a third time: n = 4, score 5.
    assert lab.publish("t", "first", 0) == "t"
    assert lab.publish("t", "second", 0) == "t/2"
    assert lab.publish("t", "third", 1) == "t/4"

    expected = (
        lab.expect()
        .ready("t", "first", seq=1)
        .ready("t/2", "second", seq=3)
        .ready("t/4", "third", band=1, seq=5)
        .plus(seq="5", signal=["1"], stats={"published": "3"}, clock=lab.ticks((1, lab.now)))
        .duplicates("t", "t/2", "t/4")
    )
    assert lab.state() == expected.state


def test_a_duplicate_of_a_leased_message_is_stored_beside_it_and_leaves_the_lease_alone(lab: Lab):
    lab.add_leased("t", "old", token=4, deadline=lab.now + 500, owner="w1", seq=3, deliv=1)
    lab.set_counter("seq", 4)

    assert lab.publish("t", "retry", 0) == "t/5"

    expected = (
        lab.expect()
        .leased("t", "old", until=lab.now + 500, token=4, owner="w1", seq=3)
        .ready("t/5", "retry", seq=6)
        .plus(seq="6", signal=["1"], stats={"published": "1"}, clock=lab.ticks((6, lab.now)))
        .duplicates("t", "t/5")
    )
    assert lab.state() == expected.state


def test_a_duplicate_id_never_overwrites_another_stored_message(lab: Lab):
    # Task ids are free-form strings, so a stored id may already look like "<id>/<n>": here
    # exactly the key the next duplicate of "a" would get (n = 3, the next sequence number).
    assert lab.publish("a", "first a", 0) == "a"
    assert lab.publish("a/3", "someone else's message", 0) == "a/3"

    key = lab.publish("a", "second a", 0)

    # a is taken (n = 3), a/3 too, so the loop takes the next sequence number (4) and tries
    # a/4, which is free; the one after (5) is its score.
    assert key == "a/4"
    expected = (
        lab.expect()
        .ready("a", "first a", seq=1)
        .ready("a/3", "someone else's message", seq=2)  # no dups entry: its own id
        .ready("a/4", "second a", seq=5)
        .plus(seq="5", signal=["1"], stats={"published": "3"}, clock=lab.ticks((1, lab.now)))
        .duplicates("a", "a/4")
    )
    assert lab.state() == expected.state


def test_the_duplicate_key_loop_skips_every_taken_id_slash_n(lab: Lab):
    assert lab.publish("a", "first a", 0) == "a"
    # Stored by hand, without the scripts: the next three keys a duplicate would try (the loop
    # takes a new sequence number for each: a/2, a/3, a/4, then a/5 is free; 6 is its score).
    for n in (2, 3, 4):
        lab.add_ready(f"a/{n}", f"other {n}", score=lab.back(0, 100 + n))

    assert lab.publish("a", "second a", 0) == "a/5"

    expected = lab.expect().ready("a", "first a", seq=1)
    for n in (2, 3, 4):
        expected.ready(f"a/{n}", f"other {n}", seq=100 + n)  # untouched, never published
    expected.ready("a/5", "second a", seq=6)
    expected.plus(seq="6", signal=["1"], stats={"published": "2"}, clock=lab.ticks((1, lab.now)))
    expected.duplicates("a", "a/5")
    assert lab.state() == expected.state


def test_an_id_that_is_free_again_is_stored_under_itself_without_a_dups_entry(lab: Lab):
    lab.publish("t", "first", 0)
    [(_, key, token, _, _)] = lab.reserve(count=1)
    assert lab.publish("t", "retry", 0) == "t/3"
    assert lab.ack((key, token)) == [OK]

    assert lab.publish("t", "again", 0) == "t"

    state = lab.state()
    # t: seq 1; token 2; t/3: n 3, score 4; t again: seq 5 (both READY: no `order` entry).
    assert "order" not in state
    assert state["dups"] == {"t/3": "t"}
    assert state["ready"] == [("t/3", lab.back(0, 4)), ("t", lab.back(0, 5))]


def test_the_wake_up_signal_holds_exactly_one_element_after_many_publishes(lab: Lab):
    for i in range(50):
        lab.publish(f"m{i}", "x", i % 3)

    assert lab.client.lrange(lab.keys.signal, 0, -1) == [b"1"]


def test_a_retry_is_counted_as_published_and_retried(lab: Lab):
    lab.publish("t", "first", 0)
    lab.publish_reply("t", "retry 1", 0, retry=True)
    lab.publish_reply("t", "retry 2", 0, due=lab.now + 1_000, retry=True)

    assert lab.state()["stats"] == {"published": "3", "retried": "2"}


def test_every_publish_is_counted_in_stats_published(lab: Lab):
    for i in range(7):
        lab.publish(f"m{i}", "x", 0)
    lab.publish("m0", "duplicate", 0)

    assert lab.client.hgetall(lab.keys.stats) == {b"published": b"8"}
    assert lab.client.zcard(lab.keys.ready) == 8
    # m0..m6 took 1..7; the duplicate of m0 takes 8 (its key) and 9 (its score).
    assert lab.client.hgetall(lab.keys.dups) == {b"m0/8": b"m0"}
    assert lab.client.zscore(lab.keys.ready, "m0/8") == lab.back(0, 9)


def test_the_payload_is_stored_byte_for_byte(lab: Lab):
    payload = bytes(range(256)) + "é✓".encode()

    lab.publish("bin", payload, 0)

    assert lab.client.hget(lab.keys.body, "bin") == payload


def _routed(lab: Lab, message_id: str, version_key: str, version: int) -> tuple[str, int]:
    """publish.lua called as a publisher routing through an exchange: the bindings version key
    after the publish keys, the version its table was read at as ARGV[6]."""
    keys = [*lab.keys.publish, version_key]
    args = Publish.args(
        message_id=message_id,
        payload="B",
        band=0,
        due_ms=0,
        unique=False,
        route_version=version,
        now_ms=lab.now,
        lock_until_ms=0,
    )
    reply = lab.scripts.publish.run(keys, args)
    return reply.key, reply.code


def test_a_publish_routed_with_the_current_bindings_version_is_stored(lab: Lab):
    version_key = f"{lab.keys.base}test-bindings-version"
    lab.client.set(version_key, 7)

    assert _routed(lab, "m1", version_key, 7) == ("m1", 1)
    assert lab.state()["ready"] == [("m1", lab.back(0, 1))]


def test_a_publish_routed_with_a_stale_bindings_version_writes_nothing(lab: Lab):
    version_key = f"{lab.keys.base}test-bindings-version"
    lab.client.set(version_key, 8)

    assert _routed(lab, "m1", version_key, 7) == ("", Code.STALE_ROUTE)
    assert lab.state() == {}
    # No version stored yet reads as 0.
    lab.client.delete(version_key)
    assert _routed(lab, "m2", version_key, 0) == ("m2", 1)


# -- queue arguments: message TTL and max length (the `args` hash) ---------------------------


def test_a_publish_to_a_queue_with_a_message_ttl_records_the_message_deadline(lab: Lab):
    lab.set_args(message_ttl=5_000)

    lab.publish("m1", "B1", 0)
    lab.publish("m2", "B2", 0, due=lab.now + 60_000, now=lab.now + 1)

    # A scheduled message's TTL counts from its due time: it waits in the queue only from then.
    expected = (
        lab.expect()
        .ready("m1", "B1", seq=1)
        .scheduled("m2", "B2", due=lab.now + 60_000, seq=2)  # born once it is promoted
        .plus(clock=lab.ticks((1, lab.now)))
        .plus(ttl=[("m1", lab.now + 5_000), ("m2", lab.now + 65_000)])
        .plus(args={"message_ttl": "5000"}, seq="2", signal=["1"], stats={"published": "2"})
    )
    assert lab.state() == expected.state


def test_a_publish_removes_messages_older_than_the_ttl_and_counts_them_expired(lab: Lab):
    lab.set_args(message_ttl=5_000)
    lab.publish("old", "B1", 0)
    lab.publish("due-then", "B2", 0, due=lab.now + 1_000)
    lab.publish("edge", "B3", 0, now=lab.now + 1_001)

    # At now + 6,000 only `old` (deadline now + 5,000) is older than the TTL; at now + 6,001 the
    # scheduled one too (due at now + 1,000, never promoted: deadline now + 6,000), not `edge`,
    # exactly 5,000 ms old (deadline now + 6,001).
    lab.publish("new", "B4", 0, now=lab.now + 6_000)
    assert lab.state()["stats"] == {"published": "4", "expired": "1"}
    lab.publish("newer", "B5", 0, now=lab.now + 6_001)

    assert lab.state() == {
        "args": {"message_ttl": "5000"},
        "ttl": [
            ("edge", lab.now + 6_001),
            ("new", lab.now + 11_000),
            ("newer", lab.now + 11_001),
        ],
        "ready": [
            ("edge", lab.back(0, 3)),
            ("new", lab.back(0, 4)),
            ("newer", lab.back(0, 5)),
        ],
        "body": {"edge": "B3", "new": "B4", "newer": "B5"},
        "seq": "5",
        "signal": ["1"],
        "stats": {"published": "5", "expired": "2"},
        # A tick when `edge` came 1,001 ms after the first (then removed: no message maps to
        # it any more) and when `new` came; `newer`, 1 ms later, maps to new's.
        "clock": lab.ticks((3, lab.now + 1_001), (4, lab.now + 6_000)),
    }


def test_one_publish_removes_at_most_ten_expired_messages_the_oldest_first(lab: Lab):
    lab.set_args(message_ttl=1_000)
    for i in range(12):
        lab.publish(f"m{i:02}", "x", 0, now=lab.now + i)

    lab.publish("late", "x", 0, now=lab.now + 60_000)
    assert lab.ready_order() == ["m10", "m11", "late"]
    assert lab.state()["stats"] == {"published": "13", "expired": "10"}

    lab.publish("later", "x", 0, now=lab.now + 60_001)
    assert lab.ready_order() == ["late", "later"]
    assert lab.state()["stats"] == {"published": "14", "expired": "12"}


def test_a_publish_beyond_max_length_drops_the_head_and_counts_it_dropped(lab: Lab):
    lab.set_args(max_length=2)
    # The head is what would be served next: a requeued message (front of band 0, delivered
    # once already), then the band-0 message; the band-3 one is served last.
    lab.add_ready("requeued", "R", band=0, score=lab.front(0, 1), deliv=1)
    lab.client.hset(lab.keys.order, "requeued", lab.order(0, 1))  # as an older version did
    lab.set_counter("seq", 1)
    lab.publish("low", "L", 3)

    lab.publish("next", "N", 0)

    assert lab.state() == {
        "args": {"max_length": "2"},
        "ready": [("next", lab.back(0, 3)), ("low", lab.back(3, 2))],
        "body": {"low": "L", "next": "N"},
        "seq": "3",
        "signal": ["1"],
        "stats": {"published": "2", "dropped": "1"},
        "clock": lab.ticks((2, lab.now)),
    }


def test_a_message_at_the_head_of_a_full_queue_is_itself_dropped_at_once(lab: Lab):
    lab.set_args(max_length=1)
    lab.publish("first", "F", 5)

    assert lab.publish_reply("urgent", "U", 0) == ("urgent", 1)

    # RabbitMQ's drop-head: the head gives way, whatever just arrived.
    assert lab.ready_order() == ["first"]
    assert lab.state()["stats"] == {"published": "2", "dropped": "1"}
    assert lab.state()["body"] == {"first": "F"}


def test_max_length_counts_only_ready_messages_not_scheduled_or_leased_ones(lab: Lab):
    lab.set_args(max_length=1)
    lab.add_leased("held", "H", token=1, deadline=lab.now + 1_000)
    lab.publish("later", "L", 0, due=lab.now + 5_000)
    lab.publish("r1", "R1", 0)

    lab.publish("r2", "R2", 0)

    state = lab.state()
    assert lab.ready_order() == ["r2"]
    assert state["sched"] == [("later", lab.now + 5_000)]
    assert state["leased"] == [("held", lab.now + 1_000)]
    assert state["body"] == {"held": "H", "later": "L", "r2": "R2"}
    assert state["stats"] == {"published": "3", "dropped": "1"}


def test_a_dropped_duplicate_key_leaves_no_dups_or_alias_entry(lab: Lab):
    lab.set_args(max_length=1)
    lab.add_leased("t", "T", token=1, deadline=lab.now + 1_000)
    assert lab.publish("t", "retry", 0) == "t/1"

    lab.publish("u", "U", 0)

    state = lab.state()
    assert lab.ready_order() == ["u"]
    assert "dups" not in state and "alias" not in state
    assert state["body"] == {"t": "T", "u": "U"}


def test_a_garbage_queue_argument_is_ignored_and_the_valid_ones_still_apply(lab: Lab):
    lab.set_args(message_ttl="five seconds", max_length=2)
    for i in range(3):
        lab.publish(f"m{i}", "x", 0, now=lab.now + i * 60_000)

    state = lab.state()
    assert lab.ready_order() == ["m1", "m2"]
    assert "ttl" not in state
    assert state["stats"] == {"published": "3", "dropped": "1"}

    lab.set_args(message_ttl=1_000, max_length="-1")
    lab.publish("m3", "x", 0, now=lab.now + 180_000)
    assert lab.ready_order() == ["m1", "m2", "m3"]
    assert lab.state()["ttl"] == [("m3", lab.now + 181_000)]


def test_a_publish_to_a_ttl_queue_without_a_clock_fails_before_writing_anything(lab: Lab):
    lab.set_args(message_ttl=1_000)
    args = ["m", "B", 0, 0, 0, "", "not a number"]

    with pytest.raises(redis.ResponseError, match="now"):
        lab.scripts.publish.script(keys=lab.keys.publish, args=args)

    assert lab.state() == {"args": {"message_ttl": "1000"}}
