"""reserve.lua: READY -> RESERVED in one call (the fetch is the lease), across queues."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_msg import poison
from celery_msg.keys import Reason, failure_record
from celery_msg.scripts import BAND, MID, MISSING_BODY_GROUP, Code

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py

#: Ready-score layout (see _queue.lua and tests/lua/conftest.py).
OK = Code.OK


def test_a_reserve_leases_the_message_in_the_same_call(lab: Lab):
    lab.add_ready("m1", "B1", band=2, score=lab.back(2, 1))
    lab.set_counter("seq", 1)

    served = lab.reserve(count=1, consumer="worker-1", lease=30_000)

    assert served == [(0, "m1", 2, 1, "B1")]
    expected = lab.expect().leased(
        "m1", "B1", until=lab.now + 30_000, token=2, owner="worker-1", band=2, seq=1
    )
    assert lab.state() == expected.plus(seq="2", stats={"delivered": "1"}).state


def test_a_reserve_of_an_empty_queue_returns_nothing_and_writes_nothing(lab: Lab):
    assert lab.reserve(count=10) == []
    assert lab.state() == {}


def test_a_live_lease_is_not_served_again(lab: Lab):
    lab.add_leased("m", "B", token=3, deadline=lab.now + 1, owner="w1")
    before = lab.state()

    assert lab.reserve(count=5) == []
    assert lab.state() == before


def test_each_delivery_gets_a_new_increasing_fencing_token(lab: Lab):
    for i in range(4):
        lab.publish(f"m{i}", "x", 0)

    tokens = [token for _, _, token, _, _ in lab.reserve(count=4)]

    # Four publishes took one sequence number each (1..4): the tokens follow on.
    assert tokens == [5, 6, 7, 8]


def test_the_count_limit_is_respected_and_the_rest_stays_ready_and_signalled(lab: Lab):
    for i in range(5):
        lab.add_ready(f"m{i}", f"B{i}", score=lab.back(0, i + 1))
    lab.set_counter("seq", 5)

    served = lab.reserve(count=3)

    assert served == [(0, "m0", 6, 1, "B0"), (0, "m1", 7, 1, "B1"), (0, "m2", 8, 1, "B2")]
    assert lab.state() == {
        "ready": [("m3", lab.back(0, 4)), ("m4", lab.back(0, 5))],
        "leased": [(f"m{i}", lab.now + lab.lease) for i in range(3)],
        "body": {f"m{i}": f"B{i}" for i in range(5)},
        # Taken out of `ready`: their band and sequence number go to `order`; m3, m4 have none.
        "order": {f"m{i}": lab.order(0, i + 1) for i in range(3)},
        "deliv": {f"m{i}": "1" for i in range(3)},
        "token": {"m0": "6", "m1": "7", "m2": "8"},
        "owner": {f"m{i}": "c1" for i in range(3)},
        "seq": "8",
        "signal": ["1"],
        "stats": {"delivered": "3"},
    }


def test_a_reserve_that_empties_the_queue_does_not_signal(lab: Lab):
    lab.add_ready("a", "A", score=lab.back(0, 1))
    lab.add_ready("b", "B", score=lab.back(0, 2))

    lab.reserve(count=1)
    assert lab.client.lrange(lab.keys.signal, 0, -1) == [b"1"]
    lab.client.delete(lab.keys.signal)  # a consumer's BLPOP took the marker

    lab.reserve(count=1)
    assert lab.client.exists(lab.keys.signal) == 0


def test_the_wake_up_list_never_holds_more_than_one_element(lab: Lab):
    """publish, reserve, requeue and reclaim each leave exactly one marker, never a second.

    Each is run once with the marker still there (no consumer woke up yet) and once after a
    consumer's BLPOP took it.
    """

    def markers() -> list[bytes]:
        return lab.client.lrange(lab.keys.signal, 0, -1)

    def blpop() -> None:
        assert lab.client.lpop(lab.keys.signal) == b"1"
        assert markers() == []

    for i in range(6):
        lab.publish(f"m{i}", "x", i % 2)
        assert markers() == [b"1"]
    blpop()
    lab.publish("m0", "duplicate", 0)
    assert markers() == [b"1"]

    # Serve order: m0, m2, m4, m0/7 (band 0), then m1, m3, m5 (band 1).
    first = lab.reserve(count=2)  # m0 and m2, with 30 s leases
    assert markers() == [b"1"]
    blpop()
    second = lab.reserve(count=2, lease=100)  # m4 and m0/7, with 100 ms leases
    assert markers() == [b"1"]
    assert [key for _, key, _, _, _ in first + second] == ["m0", "m2", "m4", "m0/7"]

    assert lab.requeue(*[(key, token) for _, key, token, _, _ in first[:1]]) == [OK]
    assert markers() == [b"1"]
    blpop()
    assert lab.requeue(*[(key, token) for _, key, token, _, _ in first[1:]]) == [OK]
    assert markers() == [b"1"]

    lab.add_leased("e", "E", token=100, deadline=lab.now + 50)
    assert lab.reclaim(now=lab.now + 50) == 1  # e
    assert markers() == [b"1"]
    blpop()
    assert lab.reclaim(now=lab.now + 100) == 2  # m4 and m0/7
    assert markers() == [b"1"]

    # A reserve that reclaims first (f) and leaves messages ready: still one marker.
    lab.add_leased("f", "F", token=101, deadline=lab.now + 200)
    blpop()
    assert lab.reserve(count=1, now=lab.now + 200) != []
    assert markers() == [b"1"]
    assert lab.client.hget(lab.keys.stats, "reclaimed") == b"4"
    assert lab.client.zcard(lab.keys.ready) == 8


# -- several queues ---------------------------------------------------------------------------


def _three_queues(make_lab: Callable[[str], Lab]) -> list[Lab]:
    labs = [make_lab(name) for name in ("q0", "q1", "q2")]
    for lab, ids in zip(labs, (["a0", "a1", "a2"], ["b0", "b1"], ["c0", "c1", "c2"]), strict=True):
        for n, message_id in enumerate(ids, start=1):
            lab.add_ready(message_id, message_id.upper(), score=lab.back(0, n))
    return labs


def _served(served: list[tuple[int, str, int, int, str]]) -> list[tuple[int, str]]:
    return [(group, key) for group, key, _, _, _ in served]


def test_strict_order_drains_earlier_queues_first(make_lab: Callable[[str], Lab]):
    q0, q1, q2 = _three_queues(make_lab)

    served = q0.reserve(count=5, mode="strict", others=[q1, q2])

    assert _served(served) == [(0, "a0"), (0, "a1"), (0, "a2"), (1, "b0"), (1, "b1")]
    assert q0.ready_order() == [] and q1.ready_order() == []
    assert q2.ready_order() == ["c0", "c1", "c2"]
    assert q2.state()["signal"] == ["1"]
    assert "signal" not in q0.state()


def test_strict_order_skips_an_empty_first_queue(make_lab: Callable[[str], Lab]):
    empty = make_lab("empty")
    _, q1, q2 = _three_queues(make_lab)

    served = empty.reserve(count=4, mode="strict", others=[q1, q2])

    assert _served(served) == [(1, "b0"), (1, "b1"), (2, "c0"), (2, "c1")]
    assert empty.state() == {}


def test_fair_order_takes_one_message_from_each_queue_in_turn(make_lab: Callable[[str], Lab]):
    q0, q1, q2 = _three_queues(make_lab)

    served = q0.reserve(count=5, mode="fair", start=0, others=[q1, q2])

    assert _served(served) == [(0, "a0"), (1, "b0"), (2, "c0"), (0, "a1"), (1, "b1")]


def test_fair_order_begins_at_the_start_group_and_skips_queues_that_run_dry(
    make_lab: Callable[[str], Lab],
):
    q0, q1, q2 = _three_queues(make_lab)

    served = q0.reserve(count=8, mode="fair", start=1, others=[q1, q2])

    assert _served(served) == [
        (1, "b0"),
        (2, "c0"),
        (0, "a0"),
        (1, "b1"),
        (2, "c1"),
        (0, "a1"),
        (2, "c2"),
        (0, "a2"),
    ]
    assert [lab.state().get("ready") for lab in (q0, q1, q2)] == [None, None, None]


def test_fair_order_wraps_a_start_beyond_the_number_of_queues(make_lab: Callable[[str], Lab]):
    q0, q1, q2 = _three_queues(make_lab)

    served = q0.reserve(count=3, mode="fair", start=5, others=[q1, q2])

    assert _served(served) == [(2, "c0"), (0, "a0"), (1, "b0")]


# -- priority -----------------------------------------------------------------------------


def test_bands_are_served_lowest_first_over_the_whole_0_to_255_range(lab: Lab):
    bands = list(range(256))
    random.Random(7).shuffle(bands)
    for n, band in enumerate(bands, start=1):
        lab.add_ready(f"b{band}", str(band), band=band, score=lab.back(band, n))

    served = lab.reserve(count=300)

    assert [key for _, key, _, _, _ in served] == [f"b{band}" for band in range(256)]
    assert "ready" not in lab.state()


def test_a_lower_band_published_later_is_still_served_first(lab: Lab):
    lab.publish("late-high", "x", 255)
    lab.publish("early-low", "x", 254)
    lab.publish("urgent", "x", 0)

    assert [key for _, key, _, _, _ in lab.reserve(count=3)] == ["urgent", "early-low", "late-high"]


# -- reclaim on fetch ---------------------------------------------------------------------------


def test_expired_leases_are_reclaimed_first_and_served_from_the_front_of_their_band(lab: Lab):
    lab.add_ready("new", "N", score=lab.back(0, 1))
    lab.add_leased("old", "O", token=5, deadline=lab.now - 1, owner="dead-worker", seq=2, deliv=1)
    lab.set_counter("seq", 5)

    served = lab.reserve(count=1, consumer="c2")

    assert served == [(0, "old", 6, 2, "O")]
    expected = (
        lab.expect()
        .ready("new", "N", seq=1)
        .leased("old", "O", until=lab.now + lab.lease, token=6, owner="c2", deliv=2, seq=2)
        .plus(seq="6", signal=["1"])
        .plus(stats={"reclaimed": "1", "delivered": "1", "redelivered": "1"})
    )
    assert lab.state() == expected.state


def test_a_lease_expiring_exactly_now_counts_as_expired(lab: Lab):
    lab.add_leased("due", "D", token=1, deadline=lab.now, owner="w1", seq=1, deliv=1)
    lab.add_leased("live", "L", token=2, deadline=lab.now + 1, owner="w1", seq=2, deliv=1)

    assert lab.reserve(count=0) == []

    assert lab.state() == {
        "ready": [("due", lab.front(0, 1))],
        "leased": [("live", lab.now + 1)],
        "body": {"due": "D", "live": "L"},
        "order": {"live": lab.order(0, 2)},  # due is READY: its score holds them
        "deliv": {"due": "1", "live": "1"},
        "token": {"live": "2"},
        "owner": {"live": "w1"},
        "signal": ["1"],
        "stats": {"reclaimed": "1"},
    }


def test_a_reclaimed_message_goes_to_the_front_of_its_own_band_only(lab: Lab):
    lab.add_ready("x3", "x", band=3, score=lab.back(3, 1))
    lab.add_ready("y1", "y", band=1, score=lab.back(1, 2))
    lab.add_leased("hi", "h", token=3, deadline=lab.now - 100, band=3, seq=3)

    lab.reserve(count=0)

    assert lab.state()["ready"] == [
        ("y1", lab.back(1, 2)),
        ("hi", lab.front(3, 3)),
        ("x3", lab.back(3, 1)),
    ]


def test_reserve_reclaims_at_most_the_reclaim_limit_per_queue(lab: Lab):
    for i, deadline in enumerate([lab.now - 30, lab.now - 20, lab.now - 10]):
        lab.add_leased(f"e{i}", "x", token=i + 1, deadline=deadline, seq=3 - i)

    lab.reserve(count=0, reclaim_limit=2)

    state = lab.state()
    # The two earliest deadlines, e0 and e1, back in publish order (e1 was published first).
    assert state["ready"] == [("e1", lab.front(0, 2)), ("e0", lab.front(0, 3))]
    assert state["leased"] == [("e2", lab.now - 10)]
    assert state["stats"] == {"reclaimed": "2"}


def test_reserve_serves_reclaimed_messages_first_in_publish_order(lab: Lab):
    lab.add_ready("new", "N", score=lab.back(0, 4))
    for n, (key, deadline) in enumerate(
        [("late", lab.now - 10), ("early", lab.now - 30), ("mid", lab.now - 20)], start=1
    ):
        lab.add_leased(key, key.upper(), token=n, seq=n, deadline=deadline, owner="dead-worker")
    lab.set_counter("seq", 4)

    served = lab.reserve(count=2, consumer="c2")

    assert served == [(0, "late", 5, 2, "LATE"), (0, "early", 6, 2, "EARLY")]
    assert lab.state() == {
        "ready": [("mid", lab.front(0, 3)), ("new", lab.back(0, 4))],
        "leased": [("early", lab.now + lab.lease), ("late", lab.now + lab.lease)],
        "body": {"new": "N", "late": "LATE", "early": "EARLY", "mid": "MID"},
        "order": {"late": lab.order(0, 1), "early": lab.order(0, 2)},
        "deliv": {"late": "2", "early": "2", "mid": "1"},
        "token": {"late": "5", "early": "6"},
        "owner": {"late": "c2", "early": "c2"},
        "seq": "6",
        "signal": ["1"],
        "stats": {"reclaimed": "3", "delivered": "2", "redelivered": "2"},
    }


def test_reserve_serves_expired_leases_with_equal_deadlines_in_lexical_order(lab: Lab):
    for n, key in enumerate(["b", "a"], start=1):
        lab.add_leased(key, key.upper(), token=n, deadline=lab.now - 1)

    assert [key for _, key, _, _, _ in lab.reserve(count=2)] == ["a", "b"]


def test_reserve_reclaims_expired_leases_in_every_queue_it_was_given(
    make_lab: Callable[[str], Lab],
):
    q0, q1 = make_lab("q0"), make_lab("q1")
    q0.add_ready("a", "A", score=q0.back(0, 1))
    q1.add_leased("z", "Z", token=9, deadline=q1.now - 5, owner="gone")

    served = q0.reserve(count=1, mode="strict", others=[q1])

    assert _served(served) == [(0, "a")]
    assert q1.state() == {
        "ready": [("z", q1.front(0, 0))],
        "body": {"z": "Z"},
        "deliv": {"z": "1"},
        "signal": ["1"],
        "stats": {"reclaimed": "1"},
    }


# -- poison and leftovers ---------------------------------------------------------------------


def test_a_message_delivered_max_deliveries_times_is_dead_lettered_as_poison(lab: Lab):
    lab.add_ready("p", "P", band=4, score=lab.back(4, 1), deliv=3)
    lab.add_ready("ok", "K", band=4, score=lab.back(4, 2), deliv=2)
    lab.set_counter("seq", 2)

    served = lab.reserve(count=1, max_deliveries=3)

    assert served == [(0, "ok", 3, 3, "K")]
    state = lab.state()
    reason = json.loads(state.pop("reason")["p"])
    assert reason == lab.record("poison", "delivered 3 times without an ack")
    # The record and the rule as Python writes them (the Celery layer's poison): the same.
    assert reason == failure_record(Reason.POISON, poison.detail(3), lab.now)
    assert poison.is_poison(3, 3) and not poison.is_poison(2, 3)
    expected = (
        lab.expect()
        .leased("ok", "K", until=lab.now + lab.lease, token=3, deliv=3, band=4, seq=2)
        .dead("p", "P", at=lab.now, deliv=3, band=4, seq=1)  # its reason: checked above
        .plus(seq="3")
        .plus(stats={"dead": "1", "dead:poison": "1", "delivered": "1", "redelivered": "1"})
    )
    assert state == expected.state


def test_max_deliveries_zero_means_unlimited(lab: Lab):
    lab.add_ready("m", "M", score=lab.back(0, 1), deliv=10_000)

    assert [(key, deliv) for _, key, _, deliv, _ in lab.reserve(count=1)] == [("m", 10_001)]
    assert "dead" not in lab.state()


def test_an_expired_lease_of_a_poison_message_is_dead_lettered_on_the_next_fetch(lab: Lab):
    lab.add_leased("p", "P", token=1, deadline=lab.now - 1, deliv=2)

    assert lab.reserve(count=1, max_deliveries=2) == []

    state = lab.state()
    assert state["dead"] == [("p", lab.now)]
    assert json.loads(state["reason"]["p"])["reason"] == "poison"
    assert "ready" not in state and "leased" not in state and "token" not in state


def test_an_id_in_ready_without_a_body_is_recorded_dead_as_missing_body_without_leftovers(
    lab: Lab,
):
    lab.add_ready("ghost", "x", score=lab.back(0, 1), deliv=1, legacy=True)
    lab.client.hdel(lab.keys.body, "ghost")
    lab.client.hset(lab.keys.dups, "ghost", "g")
    lab.add_ready("real", "R", score=lab.back(0, 2))
    lab.set_counter("seq", 2)
    assert lab.state()["order"] == {"ghost": lab.order(0, 1)}  # as an older version left it

    served = lab.reserve(count=1)

    # Reported to the caller (group MISSING), then the real one served.
    assert served == [(MISSING_BODY_GROUP, "ghost", 0, 0, ""), (0, "real", 3, 1, "R")]
    state = lab.state()
    reason = json.loads(state.pop("reason")["ghost"])
    assert reason == lab.record("missing-body", "listed as ready but its body is gone")
    assert reason == failure_record(Reason.MISSING_BODY, reason["detail"], lab.now)
    # ghost: only its dead entry and its reason (checked above) are left; no body, order,
    # deliv or dups entry.
    expected = lab.expect().leased("real", "R", until=lab.now + lab.lease, token=3, seq=2)
    expected.plus(dead=[("ghost", lab.now)], seq="3")
    expected.plus(stats={"dead": "1", "dead:missing-body": "1", "delivered": "1"})
    assert state == expected.state


# -- property: random operation sequences keep the invariants and the serve order --------------


@dataclass
class Model:
    """What the queue must look like: per band a deque of keys, and the live leases."""

    bands: dict[int, list[str]] = field(default_factory=dict)
    band_of: dict[str, int] = field(default_factory=dict)
    leases: dict[str, int] = field(default_factory=dict)  # key -> current token
    stale: list[tuple[str, int]] = field(default_factory=list)  # settled (key, token) pairs
    published: int = 0
    id_of: dict[str, str] = field(default_factory=dict)  # stored key -> message id
    births: list[str] = field(default_factory=list)  # stored keys, oldest publish first
    seq: int = 0  # the queue's sequence counter: one per publish (two for a duplicate), token
    score_of: dict[str, int] = field(default_factory=dict)  # stored key -> published score
    moved: set[str] = field(default_factory=set)  # stored keys requeued since their publish

    def next_expected(self, count: int) -> list[str]:
        order = [key for band in sorted(self.bands) for key in self.bands[band]]
        return order[:count]

    def take(self, key: str) -> None:
        self.bands[self.band_of[key]].remove(key)

    def to_front(self, key: str) -> None:
        """Back before every key of its band that never came back, among those that did in
        publish order."""
        queue = self.bands.setdefault(self.band_of[key], [])
        self.moved.add(key)
        ahead = [k for k in queue if k in self.moved and self.score_of[k] < self.score_of[key]]
        queue.insert(len(ahead), key)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(0, 3), st.integers(0, 3)),
        st.tuples(st.just("reserve"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("ack"), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("requeue"), st.integers(0, 50), st.booleans()),
    ),
    min_size=1,
    max_size=25,
)


def _check_invariants(lab: Lab, model: Model) -> None:
    state: dict[str, Any] = lab.state()
    ready = [key for key, _ in state.get("ready", [])]
    leased = [key for key, _ in state.get("leased", [])]
    dead = [key for key, _ in state.get("dead", [])]
    stored = ready + leased + dead
    assert len(stored) == len(set(stored)), f"a key is in two states: {state}"
    assert set(state.get("body", {})) == set(stored)
    assert set(state.get("token", {})) == set(leased)
    assert set(state.get("owner", {})) == set(leased)
    assert {k: int(v) for k, v in state.get("token", {}).items()} == model.leases
    assert ready == model.next_expected(len(ready)) and len(ready) == sum(
        map(len, model.bands.values())
    )
    assert int(state.get("stats", {}).get("published", 0)) == model.published
    assert int(state.get("seq", 0)) == model.seq
    # `order` holds the score each key was published with, for exactly the stored keys that
    # are not READY; a READY key has it in its ready score: the published one, or once
    # requeued, its band's front at its published sequence number. Together: their sequence
    # parts order the keys by publish (no two alike), their band parts are the bands published.
    order = {k: int(v) for k, v in state.get("order", {}).items()}
    assert set(order) == set(leased + dead)
    for key, score in state.get("ready", []):
        if key in model.moved:
            assert score == model.score_of[key] - MID
        else:
            assert score == model.score_of[key]
    placed = {**order, **{k: model.score_of[k] for k in ready}}
    assert placed == model.score_of
    seq_part = {k: v % BAND for k, v in placed.items()}
    assert len(set(seq_part.values())) == len(seq_part)
    assert sorted(placed, key=seq_part.__getitem__) == model.births
    assert all(v > MID for v in seq_part.values()), "published at the back of a band"
    assert {k: v // BAND for k, v in placed.items()} == {k: model.band_of[k] for k in stored}
    assert state.get("dups", {}) == {k: i for k, i in model.id_of.items() if k != i}
    # The wake-up list holds at most one element: nobody pops it here, so one after a publish.
    assert state.get("signal") == (["1"] if model.published else None)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=operations)
def test_random_operation_sequences_keep_every_invariant_and_the_serve_order(
    make_lab: Callable[[str], Lab], ops: list[tuple[str, int, Any]]
):
    lab = make_lab(f"prop-{uuid.uuid4().hex[:8]}")
    model = Model()
    for op, a, b in ops:
        if op == "publish":
            message_id = f"m{a}"  # few ids, so duplicates (id/<n>) happen often
            key = lab.publish(message_id, f"{message_id}:{b}", b)
            assert key not in model.band_of
            if message_id in model.band_of:
                # id/<n> with n the sequence number taken first (never a key before), and the
                # next one for its score.
                assert key == f"{message_id}/{model.seq + 1}"
                model.seq += 2
            else:
                assert key == message_id
                model.seq += 1
            model.score_of[key] = b * BAND + MID + model.seq
            model.band_of[key] = b
            model.id_of[key] = message_id
            model.births.append(key)
            model.bands.setdefault(b, []).append(key)
            model.published += 1
        elif op == "reserve":
            expected = model.next_expected(a)
            served = lab.reserve(count=a)
            assert [key for _, key, _, _, _ in served] == expected
            for _, key, token, _, _ in served:
                model.seq += 1
                assert token == model.seq
                model.take(key)
                model.leases[key] = token
        elif model.leases or model.stale:
            zombie = (b or not model.leases) and bool(model.stale)
            if zombie:
                key, token = model.stale[a % len(model.stale)]
            else:
                key = sorted(model.leases)[a % len(model.leases)]
                token = model.leases[key]
            codes = lab.ack((key, token)) if op == "ack" else lab.requeue((key, token))
            if zombie:
                # A settled token never holds a lease again; an ack or a requeue of a key
                # no longer stored finds it gone (not counted as a lost lease).
                gone = key not in model.id_of
                assert codes == [Code.GONE if gone else Code.LEASE_LOST]
            else:
                assert codes == [1]
                del model.leases[key]
                model.stale.append((key, token))
                if op == "ack":
                    del model.band_of[key]
                    del model.id_of[key]
                    del model.score_of[key]
                    model.moved.discard(key)
                    model.births.remove(key)
                else:
                    model.to_front(key)
        _check_invariants(lab, model)


# -- message TTL: an expired message is never delivered ---------------------------------------


def test_a_message_older_than_the_queue_ttl_is_never_delivered_but_removed_and_counted(
    lab: Lab,
):
    lab.set_args(message_ttl=5_000)
    lab.publish("old", "B1", 0)
    lab.publish("fresh", "B2", 0, now=lab.now + 3_000)

    served = lab.reserve(now=lab.now + 6_000, count=10, consumer="c1")

    # The delivered message leaves `ttl`: its TTL bounded only the wait for a consumer.
    assert served == [(0, "fresh", 3, 1, "B2")]
    expected = (
        lab.expect()
        .leased("fresh", "B2", until=lab.now + 6_000 + lab.lease, token=3, seq=2)
        .plus(born={"fresh": str(lab.now + 3_000)}, args={"message_ttl": "5000"})
        .plus(seq="3", signal=["1"], stats={"published": "2", "expired": "1", "delivered": "1"})
        # Ticks go only when a later publish finds no message maps to them: old's stays.
        .plus(clock=lab.ticks((1, lab.now), (2, lab.now + 3_000)))
    )
    assert lab.state() == expected.state


def test_expired_messages_beyond_the_sweep_limit_are_skipped_when_they_come_up(lab: Lab):
    lab.set_args(message_ttl=1_000)
    # Band 0 is served first: the three expired ones come up before the fresh one (band 5).
    for i in range(3):
        lab.publish(f"old{i}", "x", 0)
    lab.publish("fresh", "F", 5, now=lab.now + 9_000)

    served = lab.reserve(now=lab.now + 9_500, count=1, reclaim_limit=1)

    assert [key for _, key, _, _, _ in served] == ["fresh"]
    state = lab.state()
    assert state["body"] == {"fresh": "F"}
    assert "ttl" not in state and "ready" not in state
    assert state["stats"] == {"published": "4", "expired": "3", "delivered": "1"}


def test_a_message_exactly_as_old_as_the_ttl_is_still_delivered(lab: Lab):
    lab.set_args(message_ttl=1_000)
    lab.publish("older", "A", 0)
    lab.publish("edge", "B", 0, now=lab.now + 1_000)

    served = lab.reserve(now=lab.now + 2_000, count=10)

    assert [key for _, key, _, _, _ in served] == ["edge"]
    assert lab.state()["stats"] == {"published": "2", "expired": "1", "delivered": "1"}


def test_a_requeued_message_of_a_ttl_queue_does_not_expire_again(lab: Lab):
    lab.set_args(message_ttl=1_000)
    lab.publish("m", "B", 0)
    lab.publish("never-served", "N", 0)
    [(_, key, token, _, _)] = lab.reserve()
    assert lab.requeue((key, token)) == [OK]

    served = lab.reserve(now=lab.now + 60_000, count=10)

    # The TTL bounds the wait for a first delivery only: `m` was delivered once already.
    assert [(k, deliv) for _, k, _, deliv, _ in served] == [("m", 2)]
    assert lab.state()["stats"] == {
        "published": "2",
        "requeued": "1",
        "expired": "1",
        "delivered": "2",
        "redelivered": "1",
    }


def test_a_purged_message_of_a_ttl_queue_leaves_no_deadline_behind(lab: Lab):
    lab.set_args(message_ttl=1_000)
    lab.publish("a", "A", 0)
    lab.publish("b", "B", 0, due=lab.now + 5_000)
    assert [key for key, _ in lab.state()["ttl"]] == ["a", "b"]

    assert lab.purge(10) == 2

    assert lab.state() == {
        "args": {"message_ttl": "1000"},
        "seq": "2",
        "signal": ["1"],
        "stats": {"published": "2"},
        "clock": lab.ticks((1, lab.now)),  # the newest tick stays
    }
