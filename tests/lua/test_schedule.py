"""Broker-side scheduling: publish.lua with a due time (SCHEDULED), promotion of due messages
(promote.lua, and reserve.lua before it reserves), reserve's next-due report, purge of
scheduled messages, and unique publishes."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_msg.scripts import Code

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py

OK = Code.OK


def _reserve_flat(lab: Lab, *, now: int, count: int, others: tuple[Lab, ...] = ()) -> list[Any]:
    """reserve.lua's raw flat reply (five entries per delivery, then the next due time)."""
    keys = list(lab.keys.all)
    for other in others:
        keys.extend(other.keys.all)
    args = [now, lab.lease, count, "c1", "fair", 0, 100, 0]
    return list(lab.scripts.reserve.script(keys=keys, args=args))


def _clear_signal(lab: Lab) -> None:
    """What a woken consumer's BLPOP does."""
    lab.client.delete(lab.keys.signal)


# -- publish with a due time ---------------------------------------------------------------


def test_a_publish_with_a_future_due_time_is_scheduled_not_ready_and_signals(lab: Lab):
    reply = lab.publish_reply("m1", "B1", 2, due=lab.now + 5_000)

    assert reply == ("m1", 1)
    # The band and the publish order are kept in `order`: its score is its due time.
    expected = lab.expect().scheduled("m1", "B1", due=lab.now + 5_000, band=2, seq=1)
    assert lab.state() == expected.plus(seq="1", signal=["1"], stats={"published": "1"}).state


def test_a_due_time_of_zero_means_now_as_before(lab: Lab):
    assert lab.publish_reply("m1", "B1", 0, due=0) == ("m1", 1)

    expected = lab.expect().ready("m1", "B1", seq=1).plus(clock=lab.ticks((1, lab.now)))
    assert lab.state() == expected.plus(seq="1", signal=["1"], stats={"published": "1"}).state


def test_a_scheduled_publish_signals_only_when_it_becomes_the_earliest_due(lab: Lab):
    lab.publish("a", "A", 0, due=lab.now + 5_000)
    _clear_signal(lab)

    lab.publish("later", "L", 0, due=lab.now + 9_000)
    assert "signal" not in lab.state(), "a later due time must not wake anyone"

    lab.publish("sooner", "S", 0, due=lab.now + 1_000)
    assert lab.state()["signal"] == ["1"], "a sooner due time must shorten the sleepers' wait"
    _clear_signal(lab)

    lab.publish("between", "X", 0, due=lab.now + 3_000)
    assert "signal" not in lab.state()
    assert lab.state()["sched"] == [
        ("sooner", lab.now + 1_000),
        ("between", lab.now + 3_000),
        ("a", lab.now + 5_000),
        ("later", lab.now + 9_000),
    ]


def test_a_scheduled_duplicate_id_is_stored_under_id_slash_n(lab: Lab):
    assert lab.publish("t", "first", 0, due=lab.now + 100) == "t"
    assert lab.publish("t", "second", 0, due=lab.now + 50) == "t/2"

    state = lab.state()
    assert state["sched"] == [("t/2", lab.now + 50), ("t", lab.now + 100)]
    assert state["dups"] == {"t/2": "t"}
    assert state["order"] == {"t": lab.order(0, 1), "t/2": lab.order(0, 3)}


# -- reserve before and after the due time -------------------------------------------------


def test_a_reserve_before_the_due_time_serves_nothing_and_reports_the_next_due(lab: Lab):
    lab.publish("a", "A", 0, due=lab.now + 5_000)
    lab.publish("b", "B", 0, due=lab.now + 2_000)
    _clear_signal(lab)
    before = lab.state()

    # One millisecond early: still scheduled.
    assert _reserve_flat(lab, now=lab.now + 1_999, count=10) == [lab.now + 2_000]
    assert lab.state() == before
    assert lab.reserve(now=lab.now + 1_999, count=10) == []
    assert lab.next_due(now=lab.now) == lab.now + 2_000
    assert lab.state() == before


def test_the_next_due_is_0_when_nothing_is_scheduled(lab: Lab):
    assert _reserve_flat(lab, now=lab.now, count=5) == [0]
    lab.publish("r", "R", 0)
    flat = _reserve_flat(lab, now=lab.now, count=5)
    assert len(flat) == 6 and flat[-1] == 0


def test_the_next_due_is_the_earliest_over_every_queue_of_the_reserve(
    make_lab: Callable[[str], Lab],
):
    q1, q2, q3 = make_lab("q1"), make_lab("q2"), make_lab("q3")
    q1.publish("a", "A", 0, due=q1.now + 7_000)
    q2.publish("b", "B", 0, due=q1.now + 3_000)
    q2.publish("c", "C", 0, due=q1.now + 9_000)
    q3.publish("r", "R", 0)

    flat = _reserve_flat(q1, now=q1.now, count=5, others=(q2, q3))

    # r is served (group 2), and b is the earliest still scheduled.
    assert [int(flat[0]), flat[1]] == [2, b"r"]
    assert flat[-1] == q1.now + 3_000
    assert len(flat) == 6


def test_the_next_due_reported_is_after_this_reserves_promotions(lab: Lab):
    lab.publish("a", "A", 0, due=lab.now + 1_000)
    lab.publish("b", "B", 0, due=lab.now + 4_000)

    flat = _reserve_flat(lab, now=lab.now + 1_000, count=0)

    # a was promoted (not served: count 0); b is the next due.
    assert flat == [lab.now + 4_000]
    assert lab.ready_order() == ["a"]


def test_a_message_is_promoted_and_served_at_exactly_its_due_time(lab: Lab):
    lab.publish("m", "M", 0, due=lab.now + 1_000)
    _clear_signal(lab)

    served = lab.reserve(now=lab.now + 1_000, count=1, consumer="w1")

    # Sequence numbers: publish 1, promotion 2 (a fresh place at the back), token 3.
    assert served == [(0, "m", 3, 1, "M")]
    expected = (
        lab.expect()
        .leased("m", "M", until=lab.now + 1_000 + lab.lease, token=3, owner="w1", seq=2)
        .plus(born={"m": str(lab.now + 1_000)}, seq="3")
        # promote_due signals; nothing is left ready, but nobody popped the marker here.
        .plus(signal=["1"], stats={"published": "1", "promoted": "1", "delivered": "1"})
    )
    assert lab.state() == expected.state


def test_a_due_message_goes_to_the_back_of_its_band_behind_messages_already_ready(lab: Lab):
    lab.publish("late", "L", 0, due=lab.now + 1_000)  # seq 1
    lab.publish("r1", "R1", 0)  # seq 2
    lab.publish("r2", "R2", 0)  # seq 3

    served = lab.reserve(now=lab.now + 1_000, count=10)

    assert [key for _, key, _, _, _ in served] == ["r1", "r2", "late"]


def test_due_messages_are_served_in_due_time_order_within_a_band(lab: Lab):
    # Published in one order, due in another: the due order wins.
    lab.publish("a", "A", 0, due=lab.now + 3_000)
    lab.publish("b", "B", 0, due=lab.now + 1_000)
    lab.publish("c", "C", 0, due=lab.now + 2_000)

    assert lab.promote(now=lab.now + 5_000) == 3

    # Promotion order b, c, a takes sequence numbers 4, 5, 6.
    assert lab.state()["ready"] == [
        ("b", lab.back(0, 4)),
        ("c", lab.back(0, 5)),
        ("a", lab.back(0, 6)),
    ]
    assert "order" not in lab.state()  # READY: the scores hold band and sequence
    assert [key for _, key, _, _, _ in lab.reserve(now=lab.now + 5_000, count=10)] == [
        "b",
        "c",
        "a",
    ]


def test_equal_due_times_are_promoted_in_lexical_key_order(lab: Lab):
    # ZRANGEBYSCORE breaks ties by member: a documented consequence of the sched ZSET.
    lab.publish("z", "Z", 0, due=lab.now + 1_000)
    lab.publish("y", "Y", 0, due=lab.now + 1_000)

    assert lab.promote(now=lab.now + 1_000) == 2
    assert lab.ready_order() == ["y", "z"]


def test_promoted_messages_keep_their_band(lab: Lab):
    lab.publish("x1", "X", 1)  # ready, band 1
    lab.publish("s0", "S0", 0, due=lab.now + 1_000)  # band 0: goes before x1
    lab.publish("s2", "S2", 2, due=lab.now + 500)  # band 2: after x1, though due first
    lab.publish("s1", "S1", 1, due=lab.now + 200)  # band 1: behind x1

    served = lab.reserve(now=lab.now + 1_000, count=10)

    assert [key for _, key, _, _, _ in served] == ["s0", "x1", "s1", "s2"]
    # `order` keeps each band, with the promotion's sequence number.
    assert lab.state()["order"] == {
        "x1": lab.order(1, 1),
        "s1": lab.order(1, 5),
        "s2": lab.order(2, 6),
        "s0": lab.order(0, 7),
    }


def test_reserve_promotes_due_messages_in_every_queue_it_was_given(
    make_lab: Callable[[str], Lab],
):
    q1, q2 = make_lab("q1"), make_lab("q2")
    q1.publish("a", "A", 0, due=q1.now + 1_000)
    q2.publish("b", "B", 0, due=q1.now + 1_000)
    q2.publish("c", "C", 0, due=q1.now + 60_000)

    flat = _reserve_flat(q1, now=q1.now + 1_000, count=0, others=(q2,))

    assert flat == [q1.now + 60_000]
    assert q1.ready_order() == ["a"]
    assert q2.ready_order() == ["b"]
    assert q2.state()["sched"] == [("c", q1.now + 60_000)]


def test_reserve_promotes_at_most_the_reclaim_limit_per_queue(lab: Lab):
    for i in range(5):
        lab.publish(f"m{i}", "x", 0, due=lab.now + i)

    assert lab.reserve(now=lab.now + 10, count=0, reclaim_limit=2) == []
    assert lab.ready_order() == ["m0", "m1"]
    assert [key for key, _ in lab.state()["sched"]] == ["m2", "m3", "m4"]


# -- promote.lua ---------------------------------------------------------------------------


def test_promote_moves_due_messages_to_ready_counts_and_signals(lab: Lab):
    lab.publish("a", "A", 0, due=lab.now + 1_000)
    lab.publish("b", "B", 3, due=lab.now + 2_000)
    _clear_signal(lab)

    assert lab.promote(now=lab.now + 1_500) == 1

    expected = (
        lab.expect()
        .ready("a", "A", seq=3, born=lab.now + 1_000)  # born: its due time
        .scheduled("b", "B", due=lab.now + 2_000, band=3, seq=2)
        .plus(seq="3", signal=["1"], stats={"published": "2", "promoted": "1"})
    )
    assert lab.state() == expected.state


def test_a_promote_with_nothing_due_writes_nothing(lab: Lab):
    lab.publish("a", "A", 0, due=lab.now + 1_000)
    _clear_signal(lab)
    before = lab.state()

    assert lab.promote(now=lab.now + 999) == 0
    assert lab.state() == before


def test_a_promote_of_an_empty_queue_returns_0_and_writes_nothing(lab: Lab):
    assert lab.promote(now=lab.now) == 0
    assert lab.state() == {}


def test_promote_moves_at_most_its_limit_earliest_due_first(lab: Lab):
    for i, offset in enumerate([50, 10, 40, 20, 30]):
        lab.publish(f"m{i}", "x", 0, due=lab.now + offset)

    assert lab.promote(now=lab.now + 100, limit=2) == 2
    assert lab.ready_order() == ["m1", "m3"]
    assert lab.promote(now=lab.now + 100, limit=2) == 2
    assert lab.ready_order() == ["m1", "m3", "m4", "m2"]
    assert lab.promote(now=lab.now + 100, limit=2) == 1
    assert lab.promote(now=lab.now + 100, limit=2) == 0
    assert lab.ready_order() == ["m1", "m3", "m4", "m2", "m0"]
    assert "sched" not in lab.state()
    assert lab.state()["stats"] == {"published": "5", "promoted": "5"}


def test_a_message_is_promoted_exactly_once(lab: Lab):
    lab.publish("a", "A", 0, due=lab.now + 1_000)
    lab.publish("b", "B", 0, due=lab.now + 1_000)

    assert lab.promote(now=lab.now + 1_000) == 2
    after_first = lab.state()
    assert lab.promote(now=lab.now + 1_000) == 0
    assert lab.promote(now=lab.now + 10**9) == 0

    assert lab.state() == after_first
    assert after_first["stats"]["promoted"] == "2"
    # And a reserve after it serves each once, from its one place in ready.
    assert [k for _, k, _, _, _ in lab.reserve(now=lab.now + 1_000, count=10)] == ["a", "b"]


def test_a_requeued_promoted_message_goes_back_to_the_front_of_its_band(lab: Lab):
    lab.publish("r", "R", 1)
    lab.publish("s", "S", 1, due=lab.now + 1_000)
    [(_, key, token, _, _)] = lab.reserve(now=lab.now + 1_000, count=1)
    assert key == "r"
    [(_, key, token, _, _)] = lab.reserve(now=lab.now + 1_000, count=1)
    assert key == "s"
    lab.publish("r2", "R2", 1)

    assert lab.requeue((key, token)) == [OK]

    assert lab.ready_order() == ["s", "r2"]
    # Promoted as sequence number 3 (after r's 1 and its own publish's 2): at the front, as 3.
    assert dict(lab.state()["ready"])["s"] == lab.front(1, 3)


# -- purge ---------------------------------------------------------------------------------


def test_purge_is_bounded_ready_first_then_scheduled_earliest_first(lab: Lab):
    lab.publish("r1", "x", 0)
    lab.publish("r2", "x", 0)
    lab.publish("s1", "x", 0, due=lab.now + 30)
    lab.publish("s2", "x", 0, due=lab.now + 10)
    lab.publish("s3", "x", 0, due=lab.now + 20)

    assert lab.purge(3) == 3
    assert "ready" not in lab.state()
    assert lab.state()["sched"] == [("s3", lab.now + 20), ("s1", lab.now + 30)]
    assert lab.purge(1) == 1
    assert lab.state()["sched"] == [("s1", lab.now + 30)]
    assert lab.purge(3) == 1
    assert lab.purge(3) == 0
    assert lab.state() == {
        "seq": "5",
        "signal": ["1"],
        "stats": {"published": "5"},
        "clock": lab.ticks((1, lab.now)),  # the newest tick stays
    }


def test_purge_removes_the_dups_entries_of_scheduled_duplicates(lab: Lab):
    lab.publish("t", "first", 0)
    [(_, _, token, _, _)] = lab.reserve(count=1)
    assert lab.publish("t", "retry", 0, due=lab.now + 1_000) == "t/3"

    assert lab.purge(10) == 1

    state = lab.state()
    assert "dups" not in state and "sched" not in state
    assert state["body"] == {"t": "first"}
    assert state["order"] == {"t": lab.order(0, 1)}
    assert lab.ack(("t", token)) == [OK]


# -- unique publish ------------------------------------------------------------------------


def test_a_unique_publish_of_a_ready_id_stores_nothing_and_returns_id_0(lab: Lab):
    lab.publish("u", "first", 0)
    before = lab.state()

    assert lab.publish_reply("u", "second", 3, unique=True) == ("u", 0)

    # Only the counter moved: no sequence number taken, no signal, no second body.
    assert lab.state() == {**before, "stats": {"published": "1", "duplicates": "1"}}


def test_a_unique_publish_of_a_reserved_id_stores_nothing(lab: Lab):
    lab.add_leased("u", "held", token=4, deadline=lab.now + 500, owner="w1", seq=3)
    lab.set_counter("seq", 4)
    before = lab.state()

    assert lab.publish_reply("u", "again", 0, unique=True) == ("u", 0)

    assert lab.state() == {**before, "stats": {"duplicates": "1"}}


def test_a_unique_publish_of_a_scheduled_id_stores_nothing_and_keeps_its_due_time(lab: Lab):
    lab.publish("u", "first", 0, due=lab.now + 5_000)
    _clear_signal(lab)
    before = lab.state()

    # Neither a sooner due time nor an immediate one changes anything.
    assert lab.publish_reply("u", "sooner", 0, due=lab.now + 1_000, unique=True) == ("u", 0)
    assert lab.publish_reply("u", "now", 0, unique=True) == ("u", 0)

    assert lab.state() == {**before, "stats": {"published": "1", "duplicates": "2"}}


def test_a_unique_publish_of_an_acked_id_stores_a_new_message(lab: Lab):
    lab.publish("u", "first", 0)
    [(_, key, token, _, _)] = lab.reserve(count=1)
    assert lab.ack((key, token)) == [OK]

    assert lab.publish_reply("u", "second", 0, unique=True) == ("u", 1)

    state = lab.state()
    # publish 1, token 2, new publish 3.
    assert state["ready"] == [("u", lab.back(0, 3))]
    assert state["body"] == {"u": "second"}
    assert state["stats"] == {"published": "2", "delivered": "1", "acked": "1"}


def test_a_unique_publish_of_a_never_seen_id_stores_it_as_usual(lab: Lab):
    assert lab.publish_reply("u", "B", 1, due=lab.now + 10, unique=True) == ("u", 1)

    expected = lab.expect().scheduled("u", "B", due=lab.now + 10, band=1, seq=1)
    assert lab.state() == expected.plus(seq="1", signal=["1"], stats={"published": "1"}).state


def test_a_unique_publish_of_a_dead_id_stores_a_new_message_beside_the_dead_one(lab: Lab):
    lab.add_dead("u", "dead body", at=lab.now - 1, reason='{"reason": "poison"}')

    assert lab.publish_reply("u", "again", 0, unique=True) == ("u/1", 1)

    assert lab.state() == {
        "ready": [("u/1", lab.back(0, 2))],
        "dead": [("u", lab.now - 1)],
        "reason": {"u": '{"reason": "poison"}'},
        "body": {"u": "dead body", "u/1": "again"},
        "order": {"u": lab.order(0, 0)},
        "deliv": {"u": "1"},
        "seq": "2",
        "signal": ["1"],
        "stats": {"published": "1"},
        "dups": {"u/1": "u"},
        "alias": {"u": "u/1"},
        "clock": lab.ticks((2, lab.now)),
    }


def test_a_second_unique_publish_after_a_dead_one_is_a_no_op(lab: Lab):
    # "u" is dead; the first unique publish stores u/1 (pending). A second unique publish of
    # the same id while u/1 is still pending should store nothing (Broker.publish's docstring:
    # "if message_id is still pending in this queue ... store nothing").
    lab.add_dead("u", "dead body", at=lab.now - 1, reason='{"reason": "poison"}')
    assert lab.publish_reply("u", "again", 0, unique=True) == ("u/1", 1)

    lab.publish_reply("u", "and again", 0, unique=True)

    assert lab.state()["ready"] == [("u/1", lab.back(0, 2))], "a second pending copy of u"


def test_a_unique_publish_of_an_id_pending_only_as_a_duplicate_key_is_a_no_op(lab: Lab):
    # A Celery retry: t runs and republishes itself (t/3), then t is acked. t/3 is pending.
    lab.publish("t", "first", 0)
    [(_, key, token, _, _)] = lab.reserve(count=1)
    assert lab.publish("t", "retry", 0) == "t/3"
    assert lab.ack((key, token)) == [OK]

    lab.publish_reply("t", "unique", 0, unique=True)

    assert [k for k, _ in lab.state()["ready"]] == ["t/3"], "a second pending copy of t"


# -- property: every scheduled message is promoted exactly once, never early -----------------


messages = st.lists(
    st.tuples(st.integers(0, 2), st.one_of(st.just(0), st.integers(1, 60))),
    min_size=1,
    max_size=12,
)
steps = st.lists(
    st.tuples(st.sampled_from(["promote", "reserve0"]), st.integers(0, 70), st.integers(1, 4)),
    min_size=1,
    max_size=15,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(published=messages, ops=steps)
def test_random_due_times_and_clocks_promote_every_message_exactly_once_never_early(
    make_lab: Callable[[str], Lab],
    published: list[tuple[int, int]],
    ops: list[tuple[str, int, int]],
):
    lab = make_lab(f"sched-{uuid.uuid4().hex[:8]}")
    due_of: dict[str, int] = {}
    band_of: dict[str, int] = {}
    for i, (band, offset) in enumerate(published):
        key = f"m{i:02d}"
        due = lab.now + offset if offset else 0
        assert lab.publish_reply(key, f"body {i}", band, due=due) == (key, 1)
        due_of[key] = due
        band_of[key] = band
    every = set(due_of)
    promoted_at: dict[str, int] = {}  # key -> the clock of the call that promoted it
    promoted = 0

    def where() -> tuple[dict[str, int], set[str]]:
        state = lab.state()
        return dict(state.get("sched", [])), {k for k, _ in state.get("ready", [])}

    for op, offset, limit in ops:
        now = lab.now + offset
        sched_before, ready_before = where()
        moved: int | None = None
        next_due: int | None = None
        if op == "promote":
            moved = lab.promote(now=now, limit=limit)
        else:
            next_due = lab.next_due(now=now)  # reserve with count 0: promotes, serves nothing
        sched, ready = where()
        # The stored keys never change: each is scheduled or ready, never both, never neither.
        assert sched.keys() | ready == every
        assert not sched.keys() & ready
        newly = ready - ready_before
        assert ready_before <= ready, "a ready message went back to the schedule"
        assert newly == sched_before.keys() - sched.keys()
        for key in newly:
            assert due_of[key] <= now, f"{key} promoted at {now}, before its due {due_of[key]}"
            assert key not in promoted_at, f"{key} promoted twice"
            promoted_at[key] = now
        promoted += len(newly)
        # Earliest due first: everything moved is due no later than anything left behind.
        if newly and sched:
            assert max((due_of[k], k) for k in newly) < min((d, k) for k, d in sched.items())
        if moved is not None:
            assert moved == len(newly) <= limit
        else:
            # reserve promotes everything due (limit 100) and reports the earliest left.
            assert all(d > now for d in sched.values())
            assert next_due == (min(sched.values()) if sched else 0)
        assert int(lab.state().get("stats", {}).get("promoted", 0)) == promoted

    # Finally everything is served exactly once, lowest band first.
    served = lab.reserve(now=lab.now + 100, count=100)
    keys = [key for _, key, _, _, _ in served]
    assert sorted(keys) == sorted(every)
    assert [band_of[k] for k in keys] == sorted(band_of[k] for k in keys)
    assert "sched" not in lab.state() and "ready" not in lab.state()
    stats = lab.state().get("stats", {})
    assert int(stats.get("promoted", 0)) == sum(1 for d in due_of.values() if d)
