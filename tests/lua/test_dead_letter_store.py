"""The dead-letter store's scripts: bury.lua (a copy straight to DEAD), replay.lua (DEAD ->
READY, at most once), discard.lua (DEAD -> gone) and trim_dead.lua (retention by length and
age, bounded per call). Whole-state asserts, fixed clock."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from celery_msg.scripts import Code
from celery_msg.transitions import Discard, Replay

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py

OK, NOT_FOUND = Code.OK, Code.NOT_FOUND
REASON = json.dumps({"reason": "failed", "detail": "ValueError: boom", "time": 1_000_000})


def bury(
    lab: Lab,
    message_id: str,
    payload: str = "P",
    *,
    band: int = 0,
    deliveries: int = 1,
    reason: str = REASON,
    now: int | None = None,
) -> str:
    at = lab.now if now is None else now
    return lab.bury(message_id, payload, band=band, deliveries=deliveries, reason=reason, now=at)


def replay(lab: Lab, *keys: str) -> list[int]:
    return list(lab.scripts.replay.run(lab.keys.all, Replay.args(keys)))


def discard(lab: Lab, *keys: str) -> list[int]:
    return list(lab.scripts.discard.run(lab.keys.all, Discard.args(keys)))


def trim(lab: Lab, *, max_len: int = 0, max_age: int = 0, limit: int = 100, now: Any = None) -> int:
    # ``now`` may be garbage on purpose (a test of the script's own checks): raw ARGV then.
    args = [lab.now if now is None else now, max_len, max_age, limit]
    return lab.scripts.trim_dead.reply(lab.scripts.trim_dead.script(keys=lab.keys.all, args=args))


def dead_keys(lab: Lab) -> list[str]:
    return [key for key, _ in lab.state().get("dead", [])]


# -- bury ----------------------------------------------------------------------------------


def test_bury_stores_a_copy_as_dead_under_its_id(lab: Lab):
    assert bury(lab, "m", "M", band=1, deliveries=2) == "m"

    expected = lab.expect().dead(
        "m", "M", at=lab.now, reason=REASON, deliv=2, band=1, seq=1, born=lab.now
    )
    assert lab.state() == expected.plus(seq="1", stats={"dead": "1", "dead:failed": "1"}).state


def test_bury_allocates_id_slash_n_when_the_id_is_stored(lab: Lab):
    # The original is still READY (a retry republished the same task id, say).
    assert lab.publish("t", "first", 0) == "t"

    assert bury(lab, "t", "copy", band=2, deliveries=3) == "t/2"

    expected = (
        lab.expect()
        .ready("t", "first", seq=1)
        .dead("t/2", "copy", at=lab.now, reason=REASON, deliv=3, band=2, seq=3, born=lab.now)
        .plus(seq="3", signal=["1"], clock=lab.ticks((1, lab.now)))
        .plus(stats={"published": "1", "dead": "1", "dead:failed": "1"})
        .duplicates("t", "t/2")
    )
    assert lab.state() == expected.state


def test_burying_the_same_id_twice_keeps_both_copies(lab: Lab):
    assert bury(lab, "t", "one", now=lab.now) == "t"
    assert bury(lab, "t", "two", now=lab.now + 5) == "t/2"
    assert bury(lab, "t", "three", now=lab.now + 9) == "t/4"

    state = lab.state()
    assert state["dead"] == [("t", lab.now), ("t/2", lab.now + 5), ("t/4", lab.now + 9)]
    assert state["body"] == {"t": "one", "t/2": "two", "t/4": "three"}
    assert state["dups"] == {"t/2": "t", "t/4": "t"}
    assert state["alias"] == {"t": "t/4"}
    assert state["stats"] == {"dead": "3", "dead:failed": "3"}


def test_a_buried_copy_is_never_served(lab: Lab):
    bury(lab, "m")
    before = lab.state()

    assert lab.reserve(now=lab.now + 10 * lab.lease, count=5) == []

    assert lab.state() == before


# -- replay --------------------------------------------------------------------------------


def test_replay_moves_a_dead_message_to_the_back_of_its_band_with_a_fresh_sequence(lab: Lab):
    lab.add_ready("a", "A", band=2, score=lab.back(2, 3))
    lab.add_ready("z", "Z", band=5, score=lab.back(5, 4))
    lab.add_dead("m", "M", at=lab.now - 50, reason=REASON, band=2, seq=1, deliv=4)
    lab.set_counter("seq", 4)

    assert replay(lab, "m") == [OK]

    assert lab.state() == {
        "ready": [("a", lab.back(2, 3)), ("m", lab.back(2, 5)), ("z", lab.back(5, 4))],
        "body": {"a": "A", "z": "Z", "m": "M"},
        # READY again: no `order` entry (its ready score holds band 2 and sequence 5).
        # Why it died stays until the ack: look-ups show the replay in its history.
        "reason": {"m": REASON},
        "seq": "5",
        "signal": ["1"],
        "stats": {"replayed": "1"},
    }
    assert lab.ready_order() == ["a", "m", "z"]


def test_a_replayed_message_is_delivered_as_a_first_delivery(lab: Lab):
    lab.add_dead("m", "M", at=lab.now, reason=REASON, deliv=5)
    assert replay(lab, "m") == [OK]

    [(_, key, _, deliveries, payload)] = lab.reserve(count=1)

    assert (key, deliveries, payload) == ("m", 1, "M")


def test_replay_puts_a_message_behind_messages_published_after_it_died(lab: Lab):
    lab.add_dead("m", "M", at=lab.now, reason=REASON, seq=1)
    lab.set_counter("seq", 1)
    lab.publish("later", "L", 0)

    assert replay(lab, "m") == [OK]

    assert lab.ready_order() == ["later", "m"]


def test_replaying_the_same_key_twice_enqueues_it_once(lab: Lab):
    lab.add_dead("m", "M", at=lab.now, reason=REASON, deliv=2)
    assert replay(lab, "m") == [OK]
    after_first = lab.state()

    assert replay(lab, "m") == [NOT_FOUND]

    assert lab.state() == after_first
    assert after_first["ready"] == [("m", lab.back(0, 1))]


def test_the_same_key_twice_in_one_call_is_replayed_once(lab: Lab):
    lab.add_dead("m", "M", at=lab.now, reason=REASON)

    assert replay(lab, "m", "m") == [OK, NOT_FOUND]

    state = lab.state()
    assert state["ready"] == [("m", lab.back(0, 1))]
    assert state["stats"] == {"replayed": "1"}


def test_replay_of_a_key_that_is_not_dead_changes_nothing(lab: Lab):
    lab.add_ready("r", "R", score=lab.back(0, 1))
    lab.add_leased("l", "L", token=7, deadline=lab.now + 100)
    lab.add_scheduled("s", "S", due=lab.now + 5_000)
    before = lab.state()

    assert replay(lab, "r", "l", "s", "nothing") == [NOT_FOUND] * 4

    assert lab.state() == before  # no signal, no counter


def test_replay_of_several_keys_reports_each_and_counts_those_replayed(lab: Lab):
    lab.add_dead("d1", "D1", at=lab.now - 2, reason=REASON, band=1)
    lab.add_dead("d2", "D2", at=lab.now - 1, reason=REASON, band=0)
    lab.add_ready("r", "R", score=lab.back(0, 1))
    lab.set_counter("seq", 1)

    assert replay(lab, "d1", "gone", "d2", "r") == [OK, NOT_FOUND, OK, NOT_FOUND]

    state = lab.state()
    assert state["ready"] == [("r", lab.back(0, 1)), ("d2", lab.back(0, 3)), ("d1", lab.back(1, 2))]
    assert "dead" not in state
    assert state["reason"] == {"d1": REASON, "d2": REASON}  # kept until the ack
    assert state["stats"] == {"replayed": "2"}
    assert state["seq"] == "3"


def test_a_replayed_duplicate_key_keeps_its_dups_entry(lab: Lab):
    lab.publish("t", "first", 0)
    assert bury(lab, "t", "copy") == "t/2"

    assert replay(lab, "t/2") == [OK]

    state = lab.state()
    assert state["dups"] == {"t/2": "t"}
    assert state["alias"] == {"t": "t/2"}
    assert state["ready"] == [("t", lab.back(0, 1)), ("t/2", lab.back(0, 4))]
    assert "order" not in state  # both READY: their scores hold band and sequence


def test_replay_then_bury_again_then_replay_again(lab: Lab):
    # A replayed task that fails again is dead again; it may be replayed again.
    lab.add_dead("m", "M", at=lab.now, reason=REASON)
    assert replay(lab, "m") == [OK]
    [(_, key, token, _, _)] = lab.reserve(count=1)
    assert lab.dead_letter(key, token, REASON, now=lab.now + 10) == OK

    assert replay(lab, "m") == [OK]

    state = lab.state()
    assert state["ready"] == [("m", lab.back(0, 3))]
    assert state["stats"]["replayed"] == "2"


# -- discard -------------------------------------------------------------------------------


def test_discard_removes_every_trace_of_a_dead_message(lab: Lab):
    lab.add_ready("r", "R", score=lab.back(0, 2))
    lab.add_dead("m", "M", at=lab.now, reason=REASON, deliv=3)
    lab.set_counter("seq", 2)

    assert discard(lab, "m") == [OK]

    # Only r is left: m has no dead, body, order, deliv or reason entry.
    assert lab.state() == lab.expect().ready("r", "R", seq=2).plus(seq="2").state


def test_discard_of_a_dead_duplicate_removes_its_dups_and_alias_entries(lab: Lab):
    lab.publish("t", "first", 0)
    assert bury(lab, "t", "copy") == "t/2"

    assert discard(lab, "t/2") == [OK]

    # Only t is left: t/2 has no dead, body, order or reason entry, and no dups or alias one.
    expected = lab.expect().ready("t", "first", seq=1).plus(seq="3", signal=["1"])
    expected.plus(clock=lab.ticks((1, lab.now)))
    expected.plus(stats={"published": "1", "dead": "1", "dead:failed": "1"})
    assert lab.state() == expected.state


def test_discard_of_a_key_that_is_not_dead_changes_nothing(lab: Lab):
    lab.add_ready("r", "R", score=lab.back(0, 1))
    lab.add_leased("l", "L", token=3, deadline=lab.now + 100)
    lab.add_dead("d", "D", at=lab.now, reason=REASON)
    before = lab.state()

    assert discard(lab, "r", "l", "x") == [NOT_FOUND] * 3

    assert lab.state() == before


def test_a_discarded_message_cannot_be_replayed_nor_discarded_again(lab: Lab):
    lab.add_dead("m", "M", at=lab.now, reason=REASON)
    assert discard(lab, "m", "m") == [OK, NOT_FOUND]

    assert replay(lab, "m") == [NOT_FOUND]
    assert lab.state() == {}


def test_a_replayed_message_cannot_be_discarded(lab: Lab):
    lab.add_dead("m", "M", at=lab.now, reason=REASON)
    assert replay(lab, "m") == [OK]
    before = lab.state()

    assert discard(lab, "m") == [NOT_FOUND]

    assert lab.state() == before


# -- trim_dead -----------------------------------------------------------------------------


def five_dead(lab: Lab) -> None:
    """d1..d5 dead 5, 4, 3, 2 and 1 seconds ago; one READY message that trims never touch."""
    for i in range(1, 6):
        lab.add_dead(f"d{i}", f"D{i}", at=lab.now - (6 - i) * 1000, reason=REASON, seq=i)
    lab.add_ready("r", "R", score=lab.back(0, 6))
    lab.set_counter("seq", 6)


def only(lab: Lab, *kept: str) -> dict[str, Any]:
    """The state of five_dead after trimming all dead messages but ``kept``."""
    ages = {f"d{i}": lab.now - (6 - i) * 1000 for i in range(1, 6)}
    seqs = {f"d{i}": i for i in range(1, 6)}
    return {
        "ready": [("r", lab.back(0, 6))],
        "dead": [(k, ages[k]) for k in kept],
        "reason": dict.fromkeys(kept, REASON),
        "body": {"r": "R", **{k: "D" + k[1:] for k in kept}},
        "order": {k: lab.order(0, seqs[k]) for k in kept},
        "deliv": dict.fromkeys(kept, "1"),
        "seq": "6",
    }


def test_trim_by_length_drops_the_oldest_beyond_the_bound(lab: Lab):
    five_dead(lab)

    assert trim(lab, max_len=2) == 3

    assert lab.state() == {**only(lab, "d4", "d5"), "stats": {"dead_trimmed": "3"}}


def test_trim_by_length_with_a_limit_drops_at_most_the_limit_per_call(lab: Lab):
    five_dead(lab)

    assert trim(lab, max_len=1, limit=2) == 2
    assert dead_keys(lab) == ["d3", "d4", "d5"]
    assert trim(lab, max_len=1, limit=2) == 2

    assert lab.state() == {**only(lab, "d5"), "stats": {"dead_trimmed": "4"}}
    assert trim(lab, max_len=1, limit=2) == 0


def test_trim_by_age_drops_those_dead_longer_than_the_bound(lab: Lab):
    five_dead(lab)

    # d3 died exactly 3000 ms ago: not older than the bound, so kept.
    assert trim(lab, max_age=3000) == 2

    assert lab.state() == {**only(lab, "d3", "d4", "d5"), "stats": {"dead_trimmed": "2"}}


def test_trim_by_age_with_a_limit_drops_the_oldest_first(lab: Lab):
    five_dead(lab)

    assert trim(lab, max_age=1500, limit=3) == 3
    assert dead_keys(lab) == ["d4", "d5"]
    assert trim(lab, max_age=1500, limit=3) == 1

    assert lab.state() == {**only(lab, "d5"), "stats": {"dead_trimmed": "4"}}


def test_trim_by_age_and_length_together_stays_within_the_limit(lab: Lab):
    five_dead(lab)

    # Age alone drops d1, d2; length 1 wants 2 more (d3, d4); the limit allows one of them.
    assert trim(lab, max_len=1, max_age=3500, limit=3) == 3
    assert dead_keys(lab) == ["d4", "d5"]

    assert trim(lab, max_len=1, max_age=3500, limit=3) == 1
    assert lab.state() == {**only(lab, "d5"), "stats": {"dead_trimmed": "4"}}


def test_trim_by_age_and_length_when_age_alone_fills_the_limit(lab: Lab):
    five_dead(lab)

    assert trim(lab, max_len=1, max_age=500, limit=2) == 2

    assert dead_keys(lab) == ["d3", "d4", "d5"]


def test_trim_without_bounds_or_within_them_changes_nothing(lab: Lab):
    five_dead(lab)
    before = lab.state()

    assert trim(lab) == 0
    assert trim(lab, max_len=5, max_age=10_000) == 0

    assert lab.state() == before  # no counter either


def test_trim_of_an_empty_store_is_a_no_op(lab: Lab):
    assert trim(lab, max_len=1, max_age=1) == 0
    assert lab.state() == {}


def test_trim_removes_the_dups_and_alias_entries_of_a_trimmed_duplicate(lab: Lab):
    lab.publish("t", "first", 0)
    assert bury(lab, "t", "copy", now=lab.now - 10_000) == "t/2"

    assert trim(lab, max_age=1000) == 1

    assert lab.state() == {
        "ready": [("t", lab.back(0, 1))],
        "body": {"t": "first"},
        "seq": "3",
        "signal": ["1"],
        "clock": lab.ticks((1, lab.now)),
        "stats": {"published": "1", "dead": "1", "dead:failed": "1", "dead_trimmed": "1"},
    }


def test_the_ack_of_a_replayed_message_removes_the_record_of_its_earlier_death(lab: Lab):
    lab.add_dead("m", "M", at=lab.now - 50, reason=REASON, band=0, seq=1)
    lab.set_counter("seq", 1)
    assert replay(lab, "m") == [OK]
    [(_, key, token, _, _)] = lab.reserve()
    assert lab.state()["reason"] == {"m": REASON}  # leased: still there

    assert lab.ack((key, token)) == [OK]

    state = lab.state()
    assert "reason" not in state and "body" not in state
