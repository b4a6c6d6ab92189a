"""Dead-letter retention: a live consumer trims its queues' dead-letter stores to their policy.

The renewer does it in its first round and then once a minute, for the queues its connection
consumes, one pipelined script call per queue: by length (oldest first) and by age.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kombu_helpers import FAST, Receiver, broker, connect, direct_queue

from celery_msg import DeadLetter, Policies, Policy
from celery_msg.core import Broker
from celery_msg.deadletters import DeadFilter, DeadLetters

if TYPE_CHECKING:
    from conftest import Server
    from kombu import Connection


def _bury(look: Broker, queue: str, ids: list[str]) -> None:
    for message_id in ids:
        look.bury(
            queue, message_id, b"{}", band=0, deliveries=1, reason="failed", detail=message_id
        )


def _consume_until(conn: Connection, done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Drain (so that the connection's renewer runs) until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.1)


def test_a_consumer_keeps_the_newest_dead_letters_its_queue_policy_allows(
    server: Server, prefix: str
):
    policies = Policies(queues={"kept": Policy(dead_letter=DeadLetter(max_length=2))})
    look = broker(server, prefix)
    store = DeadLetters(look)
    _bury(look, "kept", ["d1", "d2", "d3", "d4"])
    _bury(look, "other", ["o1", "o2", "o3"])  # default policy: 10,000 kept

    with connect(server, prefix, policies=policies, **FAST) as conn:
        receiver = Receiver(conn, [direct_queue("kept")])
        _consume_until(conn, lambda: look.counts("kept")["dead"] == 2)
        receiver.consumer.cancel()

    assert [m.id for m in store.iter(DeadFilter(queue="kept"))] == ["d3", "d4"]
    assert [m.id for m in store.iter(DeadFilter(queue="other"))] == ["o1", "o2", "o3"]
    assert look.stats("kept")["dead_trimmed"] == 2


def test_dead_letters_older_than_max_age_are_dropped_by_a_live_consumer(
    server: Server, prefix: str
):
    policies = Policies(default=Policy(dead_letter=DeadLetter(max_age=2.0)))
    look = broker(server, prefix)
    store = DeadLetters(look)
    _bury(look, "aging", ["old1", "old2"])
    time.sleep(2.1)
    _bury(look, "aging", ["new"])

    with connect(server, prefix, policies=policies, **FAST) as conn:
        Receiver(conn, [direct_queue("aging")])
        _consume_until(conn, lambda: look.counts("aging")["dead"] == 1)

    assert [m.id for m in store.iter(DeadFilter(queue="aging"))] == ["new"]
