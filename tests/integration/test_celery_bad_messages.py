"""Messages a worker cannot run end in the queue's dead-letter store, with a reason, and the
worker carries on: Celery itself would ack (and so lose) most of them."""

from __future__ import annotations

import base64
import json
import math
from typing import TYPE_CHECKING, Any

import pytest
from celery_app.settings import DEFAULT_QUEUE
from celery_helpers import Stack, wait_until

from celery_msg.core import MessageInfo, State

if TYPE_CHECKING:
    pass


def test_bad_messages_are_dead_lettered_with_their_reason_and_the_worker_keeps_running(
    stack: Stack,
):
    worker = stack.worker()
    app = stack.app
    unknown = app.send_task("no.such.task", args=[1])
    pickled = stack.task("add").apply_async(args=[1, 2], serializer="pickle")
    with app.connection_for_write() as connection:
        # A plain kombu message: a dict body and no Celery task headers.
        connection.Producer().publish(
            {"hello": "world"}, exchange="", routing_key=DEFAULT_QUEUE, serializer="json"
        )
    stack.broker.publish(DEFAULT_QUEUE, "garbage-1", b"not json", 255)

    def four_dead() -> list[MessageInfo] | None:
        dead = stack.broker.dead_letters(DEFAULT_QUEUE)
        return dead if len(dead) == 4 else None

    dead = wait_until(four_dead, 15, "four dead letters")
    reasons = {info.id: info.dead_reason["reason"] for info in dead if info.dead_reason}
    headerless = [key for key in reasons if key not in (unknown.id, pickled.id, "garbage-1")]
    assert reasons == {
        unknown.id: "unknown-task",
        pickled.id: "content-type-not-accepted",
        headerless[0]: "no-task-headers",
        "garbage-1": "undecodable",
    }
    assert {info.state for info in dead} == {State.DEAD}
    assert {info.deliveries for info in dead} == {1}
    assert next(i for i in dead if i.id == "garbage-1").payload == b"not json"

    assert worker.running
    assert stack.task("add").delay(20, 22).get(timeout=10) == 42
    stack.settled(DEFAULT_QUEUE, dead=4)


def _corrupt(envelope: dict[str, Any], case: str) -> dict[str, Any]:
    """A copy of a real Celery task message, broken the way a buggy producer would."""
    bad = json.loads(json.dumps(envelope))
    if case == "expires NaN":
        bad["headers"]["expires"] = math.nan
    elif case == "expires Infinity":
        bad["headers"]["expires"] = math.inf
    elif case == "delivery_info not a dict":
        bad["properties"]["delivery_info"] = "x"
    elif case == "headers not a dict":
        bad["headers"] = ["add"]
    elif case == "properties not a dict":
        bad["properties"] = 7
    elif case == "body not base64":
        bad["body"] = "%%% not base64 %%%"
    elif case == "unknown body_encoding":
        bad["properties"]["body_encoding"] = "rot13"
    elif case == "task name a list":
        bad["headers"]["task"] = ["add"]
    elif case == "body a dict":
        bad["body"] = base64.b64encode(b'{"x": 1}').decode()
    elif case == "eta garbage":
        bad["headers"]["eta"] = "tomorrow-ish"
    else:
        raise AssertionError(case)
    return bad


BAD_CASES = [
    "expires NaN",
    "expires Infinity",
    "delivery_info not a dict",
    "headers not a dict",
    "properties not a dict",
    "body not base64",
    "unknown body_encoding",
    "task name a list",
    "body a dict",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_a_malformed_message_is_dead_lettered_and_the_worker_keeps_running(stack: Stack, case: str):
    # A real message, taken from a queue nobody consumes, then broken and stored by hand.
    sample = stack.task("add").apply_async(args=[1, 2], queue="nobody")
    raw = stack.broker.lookup(sample.id, ["nobody"])[0].payload
    assert raw is not None
    bad = _corrupt(json.loads(raw), case)
    stack.broker.publish(DEFAULT_QUEUE, "bad-1", json.dumps(bad), 0)
    worker = stack.worker()

    def dead() -> list[MessageInfo] | None:
        found = stack.broker.dead_letters(DEFAULT_QUEUE)
        return found or None

    [info] = wait_until(dead, 15, f"the {case} message dead-lettered")
    assert info.id == "bad-1"
    assert info.dead_reason is not None
    assert info.dead_reason["reason"] in {"undecodable", "invalid-task"}
    assert worker.running
    assert stack.task("add").delay(20, 22).get(timeout=10) == 42
    assert worker.running
    stack.settled(DEFAULT_QUEUE, dead=1)


def test_a_worker_keeps_serving_its_other_queues_when_one_of_them_is_corrupt(stack: Stack):
    broken = stack.broker.keys("other")
    stack.broker.publish("other", "o1", "{}", 0)
    stack.redis.delete(broken.ready)
    stack.redis.set(broken.ready, "garbage")  # every script on "other" now fails
    worker = stack.worker(queues=(DEFAULT_QUEUE, "other"))

    results = [stack.task("add").delay(i, i) for i in range(5)]

    assert [r.get(timeout=10) for r in results] == [0, 2, 4, 6, 8]
    assert worker.running
    worker.wait_for_log("queue other is skipped", 5)


def test_a_ready_id_whose_body_is_gone_is_recorded_dead_as_missing_body_and_logged(stack: Stack):
    stack.broker.publish(DEFAULT_QUEUE, "ghost", "{}", 0)
    stack.redis.hdel(stack.broker.keys(DEFAULT_QUEUE).body, "ghost")
    worker = stack.worker()

    assert stack.task("add").delay(1, 1).get(timeout=10) == 2
    [info] = stack.broker.lookup("ghost", [DEFAULT_QUEUE])
    assert (info.state, info.payload) == (State.DEAD, None)
    assert info.dead_reason is not None and info.dead_reason["reason"] == "missing-body"
    worker.wait_for_log("message ghost was ready", 5)
