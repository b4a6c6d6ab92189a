"""publish.lua with a lock (ARGV[8]) and unlock.lua: unique means "once until unlocked", not only
"once while pending", so an early-acked task is not published again while it runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery_msg.scripts import Code

if TYPE_CHECKING:
    from conftest import Lab  # tests/lua/conftest.py

UNTIL = 1_000_000 + 60_000


def _locked(lab: Lab, message_id: str, *, now: int | None = None) -> tuple[str, int]:
    kwargs = {} if now is None else {"now": now}
    return lab.publish_reply(message_id, "B", 0, unique=True, lock_until=UNTIL, **kwargs)


def test_a_locked_publish_stores_the_message_and_locks_its_id_until_the_deadline(lab: Lab):
    assert _locked(lab, "u") == ("u", 1)

    state = lab.state()
    assert state["uniq"] == [("u", UNTIL)]
    assert state["ready"] == [("u", lab.back(0, 1))]


def test_a_locked_id_is_refused_even_once_its_message_was_acked(lab: Lab):
    _locked(lab, "u")
    [(_, key, token, _, _)] = lab.reserve(count=1)
    assert lab.ack((key, token)) == [Code.OK]  # ack mode early: acked before it runs

    assert _locked(lab, "u") == ("u", 0)
    assert lab.state()["stats"]["duplicates"] == "1"
    assert "body" not in lab.state()


def test_an_unlocked_or_expired_id_publishes_again(lab: Lab):
    _locked(lab, "u")
    assert lab.unlock("u", "never-locked") == 1
    assert _locked(lab, "u") == ("u/2", 1)  # u is still stored (ready): a key of its own

    _locked(lab, "v")
    assert _locked(lab, "v", now=UNTIL + 1) == ("v/5", 1)


def test_dead_lettering_purging_and_poison_unlock_the_id(lab: Lab):
    _locked(lab, "d")
    [(_, key, token, _, _)] = lab.reserve(count=1)
    assert lab.dead_letter(key, token, '{"reason": "failed"}') == Code.OK
    _locked(lab, "p")
    assert lab.purge(10) == 1

    assert "uniq" not in lab.state()


def test_a_unique_publish_without_a_lock_keeps_the_pending_rule(lab: Lab):
    assert lab.publish_reply("u", "B", 0, unique=True) == ("u", 1)
    assert lab.publish_reply("u", "B", 0, unique=True) == ("u", 0)
    assert "uniq" not in lab.state()
