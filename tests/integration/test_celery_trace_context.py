"""A ``traceparent`` header set by the publisher travels with the task through delivery, a
countdown, every retry, the dead-letter store and a replay, so OpenTelemetry's Celery
instrumentation (which reads it from ``task.request``) links each run, a replayed one included,
to the trace it started in. Each run records the header it saw (a side effect in Redis)."""

from __future__ import annotations

from celery_app.settings import DEFAULT_QUEUE
from celery_helpers import StackFactory

from celery_msg.deadletters import DeadFilter, DeadLetters

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "vendor=opaque"


def test_traceparent_survives_countdown_retries_dead_letter_and_replay(make_stack: StackFactory):
    stack = make_stack(policies="retry")  # 5 retries, 0.1 s apart, for every task
    stack.worker()
    headers = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}

    # 1 + 5 retries fail: dead-lettered after the sixth run; the replay runs a seventh.
    result = stack.task("traced").apply_async((6, "t"), countdown=1, headers=headers)
    stack.wait_for_events("fail", 6, timeout=30)
    stack.settled(DEFAULT_QUEUE, timeout=20, dead=1)
    [dead] = DeadLetters(stack.broker).iter(DeadFilter(queue=DEFAULT_QUEUE))
    assert dead.id == result.id
    assert (dead.headers["traceparent"], dead.headers["tracestate"]) == (TRACEPARENT, TRACESTATE)
    assert DeadLetters(stack.broker).replay([dead]) == 1
    [finish] = stack.wait_for_events("finish", 1, timeout=30)

    runs = sorted((int(e.token), e.label) for e in stack.events("start"))
    assert runs == [(run, TRACEPARENT) for run in range(1, 8)]
    assert (finish.token, finish.label) == ("7", TRACEPARENT)


def test_a_task_published_without_a_traceparent_gets_none_made_up(make_stack: StackFactory):
    stack = make_stack()
    stack.worker()

    stack.task("traced").delay(0, "plain").get(timeout=10)

    [start] = stack.events("start")
    assert start.label == "None"
