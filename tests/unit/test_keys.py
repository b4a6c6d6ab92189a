"""QueueKeys: every key of a queue shares the prefix and the ``{queue}`` hash tag (one slot)."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from celery_msg.keys import QUEUE_KEY_PARTS, SIDE_KEY_PARTS, QueueKeys, bindings_key, queues_key

QUEUE_NAMES = ["celery", "celery.pidbox", "q:with:colons", "ünïcode ✓", "a}b", "x{y}z", "  "]


def _hash_tag(key: str) -> str:
    """The part Redis Cluster hashes: between the first '{' and the next '}', if non-empty."""
    start = key.find("{")
    if start == -1:
        return key
    end = key.find("}", start + 1)
    if end == -1 or end == start + 1:
        return key
    return key[start + 1 : end]


def test_the_keys_come_in_script_keys_order_one_per_part():
    keys = QueueKeys("celery", "app:")

    assert keys.all == tuple(f"app:{{celery}}:{part}" for part in QUEUE_KEY_PARTS)
    assert len(set(keys.all)) == len(QUEUE_KEY_PARTS) == 20


def test_the_key_tuple_is_built_once_per_queue_keys():
    keys = QueueKeys("celery", "app:")

    assert isinstance(keys.all, tuple)
    assert keys.all is keys.all
    assert keys.base is keys.base
    # The cache is no field: equality and hash still come from queue and prefix alone.
    assert keys == QueueKeys("celery", "app:")
    assert hash(keys) == hash(QueueKeys("celery", "app:"))


def test_the_parts_are_in_the_order_the_scripts_expect_them():
    # The scripts read KEYS by this order (the preamble's PARTS); new parts go at the end.
    # `order` (the published score: band and sequence) took the place of `prio`; `born` went,
    # and came back as the enqueue time (ms) for the oldest message's age; `front` went when
    # requeued messages began to keep their publish sequence number; `clock` (sequence number
    # -> time ticks) times the messages waiting at the back of a band, which have no `born`.
    assert QUEUE_KEY_PARTS == (
        "ready",
        "leased",
        "body",
        "order",
        "deliv",
        "token",
        "owner",
        "seq",
        "signal",
        "dead",
        "reason",
        "stats",
        "dups",
        "sched",
        "alias",
        "args",
        "ttl",
        "uniq",
        "born",
        "clock",
    )


def test_every_key_starts_with_the_prefix_and_the_braced_queue_name():
    keys = QueueKeys("celery", "celery-msg:")

    for key in (*keys.all, *keys.side):
        assert key.startswith("celery-msg:{celery}:")
        assert _hash_tag(key) == "celery"


@pytest.mark.parametrize("queue", QUEUE_NAMES)
def test_every_key_of_a_queue_maps_to_one_cluster_slot(queue: str):
    keys = QueueKeys(queue, "app:")

    assert len({_hash_tag(key) for key in keys.all}) == 1
    assert len({key_slot(key.encode()) for key in keys.all}) == 1


def test_a_part_is_also_reachable_as_an_attribute():
    keys = QueueKeys("q", "p:")

    assert tuple(getattr(keys, part) for part in QUEUE_KEY_PARTS) == keys.all
    assert keys.ready == "p:{q}:ready"
    assert keys.stats == "p:{q}:stats"
    assert keys.order == "p:{q}:order"
    assert keys.dups == "p:{q}:dups"


def test_the_class_declares_exactly_the_parts_in_keys_order_then_the_side_keys():
    declared = [name for name, value in vars(QueueKeys).items() if type(value).__name__ == "_Part"]
    assert declared == [*QUEUE_KEY_PARTS, *SIDE_KEY_PARTS]


def test_an_unknown_part_raises_attribute_error():
    with pytest.raises(AttributeError, match="redy"):
        _ = QueueKeys("q", "p:").redy


@pytest.mark.parametrize("gone", ["prio", "front"])
def test_the_parts_replaced_by_order_are_no_longer_keys(gone: str):
    with pytest.raises(AttributeError, match=gone):
        _ = getattr(QueueKeys("q", "p:"), gone)


def test_queues_with_different_names_or_prefixes_share_no_key():
    a = QueueKeys("q", "one:").all
    b = QueueKeys("q", "two:").all
    c = QueueKeys("q2", "one:").all

    assert not set(a) & set(b)
    assert not set(a) & set(c)


def test_queue_keys_are_frozen_values():
    keys = QueueKeys("q", "p:")

    assert keys == QueueKeys("q", "p:")
    assert hash(keys) == hash(QueueKeys("q", "p:"))
    with pytest.raises(AttributeError):
        keys.queue = "other"  # type: ignore[misc]


def test_global_keys_carry_the_prefix_and_no_hash_tag():
    assert queues_key("app:") == "app:queues"
    assert bindings_key("app:", "celery.pidbox") == "app:bindings:celery.pidbox"
    assert "{" not in queues_key("app:") + bindings_key("app:", "x")
