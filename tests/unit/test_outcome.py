"""The typed contract between the Celery layer and the kombu adapter (celery_msg.outcome)."""

from __future__ import annotations

from types import SimpleNamespace

from kombu import Connection

import celery_msg  # noqa: F401  (registers the celery-msg:// scheme)
from celery_msg.core import Broker
from celery_msg.outcome import (
    REJECTED,
    DeadLetterRecord,
    broker_of,
    mark_dead_letter,
    mark_drop,
    outcome_of,
    read_outcome,
    transport_of,
)


def test_a_message_nobody_marked_is_rejected_with_the_generic_record_and_stays_unmarked():
    message = SimpleNamespace()
    outcome = read_outcome(message)
    assert (outcome.settled, outcome.drop, outcome.rejected) == (False, False, REJECTED)
    assert vars(message) == {}
    assert read_outcome(None).rejected == REJECTED


def test_marks_accumulate_on_one_outcome_per_message():
    message = SimpleNamespace()
    mark_dead_letter(message, "failed", "Boom: x", retries=2)
    outcome_of(message).settled = True
    assert read_outcome(message).rejected == DeadLetterRecord("failed", "Boom: x", {"retries": 2})
    assert read_outcome(message).settled
    mark_drop(message)
    assert read_outcome(message).drop
    assert read_outcome(SimpleNamespace()).drop is False


def test_the_broker_is_found_behind_a_celery_msg_connection_channel_and_message_only():
    with Connection("celery-msg://127.0.0.1:1/0") as conn:
        transport = conn.transport
        assert isinstance(broker_of(conn), Broker)
        assert transport_of(conn) is transport
        channel = SimpleNamespace(transport=transport)
        assert broker_of(SimpleNamespace(channel=channel)) is transport.broker
    with Connection("memory://") as other:
        assert broker_of(other) is None
    assert broker_of(None) is None
