"""Queue arguments: kombu's AMQP ``x-...`` arguments checked at declaration, stored values
decoded defensively (a garbage value reads as "not set", as the scripts treat it)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_msg import ConfigurationError
from celery_msg.queueargs import QueueArguments


def test_kombu_queue_arguments_become_milliseconds_and_a_count():
    args = QueueArguments.from_amqp(
        {"x-message-ttl": 5000, "x-expires": 60000, "x-max-length": 10, "x-max-priority": 9}
    )

    assert args == QueueArguments(message_ttl_ms=5_000, expires_ms=60_000, max_length=10)
    assert args.to_redis() == {"message_ttl": 5_000, "expires": 60_000, "max_length": 10}


def test_no_arguments_store_nothing():
    assert QueueArguments.from_amqp(None).to_redis() == {}
    assert QueueArguments.from_amqp({"x-message-ttl": None}) == QueueArguments()


def test_a_whole_float_is_accepted_and_drop_head_overflow_is_the_one_supported():
    args = QueueArguments.from_amqp({"x-message-ttl": 1500.0, "x-overflow": "drop-head"})

    assert args == QueueArguments(message_ttl_ms=1_500)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"x-message-ttl": "5000"}, "x-message-ttl must be a number"),
        ({"x-message-ttl": -1}, "x-message-ttl must be in 0"),
        ({"x-message-ttl": float("nan")}, "x-message-ttl must be a whole number"),
        ({"x-expires": 0}, "x-expires must be in 1"),
        ({"x-expires": 2**41}, "x-expires must be in 1"),
        ({"x-max-length": 2.5}, "x-max-length must be a whole number"),
        ({"x-max-length": False}, "x-max-length must be a number"),
        ({"x-overflow": "reject-publish"}, "x-overflow: only 'drop-head'"),
    ],
)
def test_an_invalid_argument_is_refused_with_its_name(arguments: dict[str, Any], named: str):
    with pytest.raises(ConfigurationError, match=named):
        QueueArguments.from_amqp(arguments)


def test_a_stored_garbage_value_reads_as_not_set_and_valid_ones_survive():
    raw = {b"message_ttl": b"five", b"expires": b"0", b"max_length": b"7", b"other": b"1"}

    assert QueueArguments.from_redis(raw) == QueueArguments(max_length=7)
    assert QueueArguments.from_redis({b"message_ttl": b"-3", b"expires": b"\xff"}) == (
        QueueArguments()
    )
