"""Every script is all-or-nothing in effect, whatever it finds in Redis.

Redis does not roll a script back when it fails half-way, and a queue's keys can be corrupted
(a buggy producer, a hand edit, a bad migration). For every script and every key it touches,
each wrong type and each non-numeric field where a number belongs: the script either fails
with a clear error and leaves every key exactly as it was, or succeeds and leaves no message
orphaned (a body in no state: lost and invisible).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import redis

from celery_msg.counters import DEAD_REASON_PREFIX
from celery_msg.keys import KEY_TYPES, QUEUE_KEY_PARTS, Counter

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py

Call = Callable[[], Any]


def _publish(lab: Lab) -> Call:
    lab.add_ready("r", "R", score=lab.back(0, 1))
    lab.set_counter("seq", 1)
    return lambda: lab.publish("new", "N", 0)


def _publish_with_limits(lab: Lab) -> Call:
    lab.set_args(message_ttl=5_000, max_length=1)
    lab.publish("old", "O", 0)
    return lambda: lab.publish("new", "N", 0, now=lab.now + 10_000)


def _reserve(lab: Lab) -> Call:
    lab.add_ready("r", "R", score=lab.back(0, 1))
    lab.add_leased("e", "E", token=2, deadline=lab.now - 1, seq=2)
    lab.add_scheduled("s", "S", due=lab.now - 1, seq=3)
    lab.set_counter("seq", 3)
    return lambda: lab.reserve(count=5)


def _publish_retry(lab: Lab) -> Call:
    lab.add_ready("r", "R", score=lab.back(0, 1))
    lab.set_counter("seq", 1)
    return lambda: lab.publish_reply("new", "N", 0, retry=True)


def _reserve_poison(lab: Lab) -> Call:
    lab.add_ready("r", "R", score=lab.back(0, 1), deliv=3)
    lab.add_ready("ok", "OK", score=lab.back(0, 2))
    lab.set_counter("seq", 2)
    return lambda: lab.reserve(count=5, max_deliveries=3)


def _oldest(lab: Lab) -> Call:
    lab.publish("r", "R", 2)
    lab.publish("s", "S", 0, due=lab.now - 5)
    return lambda: lab.oldest()


def _leased(lab: Lab) -> None:
    lab.add_leased("m", "M", token=1, deadline=lab.now + 100, seq=1)
    lab.set_counter("seq", 1)


def _ack(lab: Lab) -> Call:
    _leased(lab)
    return lambda: lab.ack(("m", 1))


def _extend(lab: Lab) -> Call:
    _leased(lab)
    return lambda: lab.extend(("m", 1))


def _requeue(lab: Lab) -> Call:
    _leased(lab)
    return lambda: lab.requeue(("m", 1), uncount=True)


def _dead_letter(lab: Lab) -> Call:
    _leased(lab)
    return lambda: lab.dead_letter("m", 1, '{"reason": "x"}')


def _reclaim(lab: Lab) -> Call:
    lab.add_leased("m", "M", token=1, deadline=lab.now - 1, seq=1)
    return lambda: lab.reclaim()


def _purge(lab: Lab) -> Call:
    lab.add_ready("r", "R", score=lab.back(0, 1))
    lab.add_scheduled("s", "S", due=lab.now + 1_000, seq=2)
    return lambda: lab.purge(100)


def _promote(lab: Lab) -> Call:
    lab.add_scheduled("s", "S", due=lab.now - 1, seq=1)
    lab.set_counter("seq", 1)
    return lambda: lab.promote()


def _bury(lab: Lab) -> Call:
    return lambda: lab.bury("m", "M")


def _dead(lab: Lab) -> None:
    lab.add_dead("d", "D", at=lab.now - 10, reason='{"reason": "x"}', seq=1)
    lab.add_dead("e", "E", at=lab.now - 5, reason='{"reason": "x"}', seq=2)


def _replay(lab: Lab) -> Call:
    _dead(lab)
    lab.set_counter("seq", 2)
    return lambda: lab.scripts.replay.script(keys=lab.keys.all, args=["d"])


def _discard(lab: Lab) -> Call:
    _dead(lab)
    return lambda: lab.scripts.discard.script(keys=lab.keys.all, args=["d"])


def _trim_dead(lab: Lab) -> Call:
    _dead(lab)
    return lambda: lab.scripts.trim_dead.script(keys=lab.keys.all, args=[lab.now, 1, 0, 100])


SCENARIOS: dict[str, Callable[[Lab], Call]] = {
    "publish": _publish,
    "publish with limits": _publish_with_limits,
    "publish a retry": _publish_retry,
    "reserve": _reserve,
    "reserve a poison message": _reserve_poison,
    "oldest": _oldest,
    "ack": _ack,
    "extend": _extend,
    "requeue": _requeue,
    "dead_letter": _dead_letter,
    "reclaim": _reclaim,
    "purge": _purge,
    "promote": _promote,
    "bury": _bury,
    "replay": _replay,
    "discard": _discard,
    "trim_dead": _trim_dead,
}

#: Hash fields read as numbers: (part, field) with field None = every field of the scenario's
#: messages.
NUMERIC_FIELDS = ["order", "deliv", "stats", "args", "born"]


def _corruptions() -> list[tuple[str, str]]:
    cases = [(part, "wrong type") for part in QUEUE_KEY_PARTS]
    cases += [(part, "not a number") for part in NUMERIC_FIELDS]
    cases += [("seq", "not a number"), ("clock", "not a number")]
    return cases


def _corrupt(lab: Lab, part: str, how: str) -> None:
    key = getattr(lab.keys, part)
    client = lab.client
    if how == "wrong type":
        client.delete(key)
        if KEY_TYPES[part] == "hash":
            client.rpush(key, "garbage")
        else:
            client.hset(key, "garbage", "x")
        return
    if part == "seq":
        client.set(key, "x")
        return
    if part == "clock":  # a tick whose time is not a number, before and after the real ones
        client.zadd(key, {"not-a-time": 0, "not-a-time-either": 2**40})
        return
    reasons = [f"{DEAD_REASON_PREFIX}{word}" for word in ("failed", "poison", "missing-body")]
    fields = {"stats": [*(c.value for c in Counter), *reasons]}
    fields["args"] = ["message_ttl", "max_length", "expires"]
    names = fields.get(part) or ["r", "e", "s", "m", "d", "old", "new"]
    client.hset(key, mapping={name: "not-a-number" for name in names})


def _snapshot(lab: Lab) -> dict[str, bytes | None]:
    return {part: lab.client.dump(getattr(lab.keys, part)) for part in QUEUE_KEY_PARTS}


def _orphans(lab: Lab) -> set[str]:
    client, k = lab.client, lab.keys
    try:
        bodies = {b.decode() for b in client.hkeys(k.body)}
    except redis.ResponseError:
        return set()  # the body hash itself is the corrupted key
    placed: set[str] = set()
    for part in ("ready", "leased", "dead", "sched"):
        try:
            placed |= {m.decode() for m in client.zrange(getattr(k, part), 0, -1)}
        except redis.ResponseError:
            return set()  # a corrupted state set: nothing can be judged from it
    return bodies - placed


@pytest.mark.parametrize(("part", "how"), _corruptions(), ids=lambda v: str(v))
@pytest.mark.parametrize("script", list(SCENARIOS))
def test_a_script_on_a_corrupted_key_changes_nothing_or_leaves_no_orphan(
    lab: Lab, script: str, part: str, how: str
):
    call = SCENARIOS[script](lab)
    assert _orphans(lab) == set()
    _corrupt(lab, part, how)
    before = _snapshot(lab)

    try:
        call()
    except redis.ResponseError as exc:
        assert _snapshot(lab) == before, f"{script} failed half-way: {exc}"
        if how == "wrong type":  # the error names the key
            assert getattr(lab.keys, part) in str(exc)
    else:
        assert _orphans(lab) == set(), f"{script} left orphans"
