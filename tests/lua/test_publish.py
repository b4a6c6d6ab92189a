"""publish.lua: store a message and append it to the back of its priority band."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery_msg.scripts import Code

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py

OK = Code.OK


def test_publish_stores_the_message_at_the_back_of_its_band_and_signals(lab: Lab):
    key = lab.publish("m1", "body-1", 0)

    assert key == "m1"
    # One sequence number for its birth (1), the next one for its place in the band (2).
    assert lab.state() == {
        "ready": [("m1", lab.back(0, 2))],
        "body": {"m1": "body-1"},
        "prio": {"m1": "0"},
        "seq": "2",
        "signal": ["1"],
        "stats": {"published": "1"},
        "born": {"m1": "1"},
    }


def test_the_ready_score_is_band_times_2_pow_44_plus_2_pow_43_plus_the_sequence(lab: Lab):
    lab.publish("a", "A", 0)
    lab.publish("b", "B", 7)
    lab.publish("c", "C", 255)

    scores = dict(lab.state()["ready"])
    # Each publish takes two sequence numbers: its birth (1, 3, 5), then its score (2, 4, 6).
    assert scores == {
        "a": 2**43 + 2,
        "b": 7 * 2**44 + 2**43 + 4,
        "c": 255 * 2**44 + 2**43 + 6,
    }
    # The highest score is still an exact double: no two sequence numbers may collide.
    assert float(scores["c"]) == scores["c"] < 2**53
    assert lab.client.zscore(lab.keys.ready, "c") == float(255 * 2**44 + 2**43 + 6)


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
    # t: born 1, score 2. t again: n = 3 (the sequence number taken first), born 4, score 5.
    assert lab.publish("t", "first", 0) == "t"
    assert lab.publish("t", "second", 0) == "t/3"
    assert lab.publish("t", "third", 1) == "t/6"

    assert lab.state() == {
        "ready": [("t", lab.back(0, 2)), ("t/3", lab.back(0, 5)), ("t/6", lab.back(1, 8))],
        "body": {"t": "first", "t/3": "second", "t/6": "third"},
        "prio": {"t": "0", "t/3": "0", "t/6": "1"},
        "seq": "8",
        "signal": ["1"],
        "stats": {"published": "3"},
        "born": {"t": "1", "t/3": "4", "t/6": "7"},
        "dups": {"t/3": "t", "t/6": "t"},
    }


def test_a_duplicate_of_a_leased_message_is_stored_beside_it_and_leaves_the_lease_alone(lab: Lab):
    lab.add_leased("t", "old", token=4, deadline=lab.now + 500, owner="w1", deliv=1)
    lab.set_counter("seq", 4)

    assert lab.publish("t", "retry", 0) == "t/5"

    assert lab.state() == {
        "ready": [("t/5", lab.back(0, 7))],
        "leased": [("t", lab.now + 500)],
        "body": {"t": "old", "t/5": "retry"},
        "prio": {"t": "0", "t/5": "0"},
        "deliv": {"t": "1"},
        "token": {"t": "4"},
        "owner": {"t": "w1"},
        "seq": "7",
        "signal": ["1"],
        "stats": {"published": "1"},
        "born": {"t/5": "6"},
        "dups": {"t/5": "t"},
    }


def test_a_duplicate_id_never_overwrites_another_stored_message(lab: Lab):
    # Task ids are free-form strings, so a stored id may already look like "<id>/<n>": here
    # exactly the key the next duplicate of "a" would get (n = 5, the next sequence number).
    assert lab.publish("a", "first a", 0) == "a"
    assert lab.publish("a/5", "someone else's message", 0) == "a/5"

    key = lab.publish("a", "second a", 0)

    # a/5 is taken, so the loop takes the next sequence number (6) and tries a/6, which is free.
    assert key == "a/6"
    assert lab.state() == {
        "ready": [("a", lab.back(0, 2)), ("a/5", lab.back(0, 4)), ("a/6", lab.back(0, 8))],
        "body": {"a": "first a", "a/5": "someone else's message", "a/6": "second a"},
        "prio": {"a": "0", "a/5": "0", "a/6": "0"},
        "seq": "8",
        "signal": ["1"],
        "stats": {"published": "3"},
        "born": {"a": "1", "a/5": "3", "a/6": "7"},
        "dups": {"a/6": "a"},
    }


def test_the_duplicate_key_loop_skips_every_taken_id_slash_n(lab: Lab):
    assert lab.publish("a", "first a", 0) == "a"
    # Stored by hand, without the scripts: the next three keys a duplicate would try (the loop
    # takes a new sequence number for each: a/3, a/4, a/5, then a/6 is free).
    for n in (3, 4, 5):
        lab.add_ready(f"a/{n}", f"other {n}", score=lab.back(0, 100 + n))

    assert lab.publish("a", "second a", 0) == "a/6"

    assert lab.state() == {
        "ready": [
            ("a", lab.back(0, 2)),
            ("a/6", lab.back(0, 8)),
            ("a/3", lab.back(0, 103)),
            ("a/4", lab.back(0, 104)),
            ("a/5", lab.back(0, 105)),
        ],
        "body": {
            "a": "first a",
            "a/3": "other 3",
            "a/4": "other 4",
            "a/5": "other 5",
            "a/6": "second a",
        },
        "prio": {"a": "0", "a/3": "0", "a/4": "0", "a/5": "0", "a/6": "0"},
        "seq": "8",
        "signal": ["1"],
        "stats": {"published": "2"},
        "born": {"a": "1", "a/6": "7"},
        "dups": {"a/6": "a"},
    }


def test_an_id_that_is_free_again_is_stored_under_itself_without_a_dups_entry(lab: Lab):
    lab.publish("t", "first", 0)
    [(_, key, token, _, _)] = lab.reserve(count=1)
    assert lab.publish("t", "retry", 0) == "t/4"
    assert lab.ack((key, token)) == [OK]

    assert lab.publish("t", "again", 0) == "t"

    state = lab.state()
    # t: born 1, score 2; token 3; t/4: born 5, score 6; t again: born 7, score 8.
    assert state["born"] == {"t/4": "5", "t": "7"}
    assert state["dups"] == {"t/4": "t"}
    assert state["ready"] == [("t/4", lab.back(0, 6)), ("t", lab.back(0, 8))]


def test_the_wake_up_signal_holds_exactly_one_element_after_many_publishes(lab: Lab):
    for i in range(50):
        lab.publish(f"m{i}", "x", i % 3)

    assert lab.client.lrange(lab.keys.signal, 0, -1) == [b"1"]


def test_every_publish_is_counted_in_stats_published(lab: Lab):
    for i in range(7):
        lab.publish(f"m{i}", "x", 0)
    lab.publish("m0", "duplicate", 0)

    assert lab.client.hgetall(lab.keys.stats) == {b"published": b"8"}
    assert lab.client.zcard(lab.keys.ready) == 8
    assert lab.client.hlen(lab.keys.born) == 8
    assert lab.client.hgetall(lab.keys.dups) == {b"m0/15": b"m0"}


def test_the_payload_is_stored_byte_for_byte(lab: Lab):
    payload = bytes(range(256)) + "é✓".encode()

    lab.publish("bin", payload, 0)

    assert lab.client.hget(lab.keys.body, "bin") == payload
