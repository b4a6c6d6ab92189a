"""Celery's remote control over celery-msg: ping, shutdown, and broadcasts that wait for a
worker restarted under the same node name."""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING

import pytest
from celery_helpers import StackFactory

if TYPE_CHECKING:
    pass


def pidbox_queue(nodename: str) -> str:
    """The queue of a worker's remote-control mailbox (kombu's ``<node>.<namespace>.pidbox``)."""
    return f"{nodename}.celery.pidbox"


def test_inspect_ping_is_answered_by_the_running_worker(make_stack: StackFactory):
    stack = make_stack()
    worker = stack.worker()
    replies = stack.app.control.inspect(destination=[worker.nodename], timeout=5).ping()
    assert replies == {worker.nodename: {"ok": "pong"}}


def test_control_shutdown_stops_the_worker_process(make_stack: StackFactory):
    stack = make_stack()
    worker = stack.worker()
    stack.app.control.shutdown(destination=[worker.nodename])
    assert worker.wait_exit(15) == 0
    assert "shutdown" in worker.log().lower()


def test_back_to_back_inspect_calls_are_all_answered(make_stack: StackFactory):
    # Each call binds a new reply queue; the worker's binding table, cached for a second, must
    # not send the next reply to a queue that no longer exists.
    stack = make_stack()
    worker = stack.worker()
    inspect = stack.app.control.inspect(destination=[worker.nodename], timeout=1.0)
    replies = [inspect.revoked() for _ in range(4)]
    assert replies == [{worker.nodename: []}] * 4


@pytest.mark.parametrize("stop", ["warm shutdown", "SIGKILL"])
def test_a_broadcast_sent_while_a_worker_is_down_reaches_it_when_restarted_with_the_same_name(
    make_stack: StackFactory, stop: str
):
    stack = make_stack(binding_ttl=30.0)
    name = f"durable-{uuid.uuid4().hex[:6]}"
    first = stack.worker(name)
    if stop == "SIGKILL":
        first.kill()
    else:
        first.terminate()
        assert first.wait_exit(15) == 0
    stopped_at = time.monotonic()

    token = uuid.uuid4().hex
    # `timeout` is also the command's expiry: the restarted worker must get it within 60 s.
    stack.app.control.broadcast("record_broadcast", arguments={"token": token}, timeout=60)
    assert stack.broker.counts(pidbox_queue(first.nodename))["ready"] == 1
    assert stack.events("control") == []

    second = stack.worker(name)
    assert second.nodename == first.nodename
    events = stack.wait_for_events("control", 1, timeout=10)
    assert [(e.token, e.worker, e.pid) for e in events] == [(token, second.nodename, second.pid)]
    assert time.monotonic() - stopped_at < stack.settings.binding_ttl
    # Delivered once: a ping round trip later, still one record and nothing left in the mailbox.
    assert stack.app.control.inspect(destination=[second.nodename], timeout=5).ping()
    assert len(stack.events("control")) == 1
    stack.settled(pidbox_queue(second.nodename))


def test_inspect_stats_is_answered_by_a_worker_whose_app_has_policies(make_stack: StackFactory):
    # configure() keeps the policies in broker_transport_options, which stats sends back.
    stack = make_stack(policies="retry")
    worker = stack.worker()
    stats = stack.app.control.inspect(destination=[worker.nodename], timeout=5).stats()
    assert stats is not None
    assert list(stats) == [worker.nodename]
    policies = stats[worker.nodename]["broker"]["transport_options"]["policies"]
    assert policies["tasks"]["fatal"]["retry"]["give_up_on"] == ["celery_app.errors.Fatal"]
    assert policies["queues"]["q_late"] == {"ack": "late"}


def test_a_worker_still_answers_after_a_reply_it_could_not_encode_and_two_binding_ttls_later(
    make_stack: StackFactory,
):
    # The failed reply makes Celery replace the mailbox consumer with one on a new channel;
    # its binding must still be renewed, or it expires and the next reader deletes the queue.
    stack = make_stack(binding_ttl=2.0)
    worker = stack.worker()
    control = stack.app.control
    control.broadcast("unencodable_reply", destination=[worker.nodename], reply=True, timeout=1)
    worker.wait_for_log("Control command error", 5)

    inspect = control.inspect(destination=[worker.nodename], timeout=3)
    until = time.monotonic() + 2 * stack.settings.binding_ttl + 1
    while time.monotonic() < until:
        assert inspect.ping() == {worker.nodename: {"ok": "pong"}}
        time.sleep(0.5)
    control.shutdown(destination=[worker.nodename])
    assert worker.wait_exit(15) == 0


def test_ten_back_to_back_pings_of_one_worker_get_ten_answers_and_log_no_warning(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
):
    # Each call has a reply queue of its own, bound just before the request: the worker's
    # cached table of the reply exchange is stale for every reply but must route it anyway.
    stack = make_stack()
    worker = stack.worker()
    with caplog.at_level(logging.WARNING, logger="celery_msg"):
        answers = [
            stack.app.control.ping(destination=[worker.nodename], timeout=3) for _ in range(10)
        ]
    assert answers == [[{worker.nodename: {"ok": "pong"}}]] * 10
    # The reply queue is deleted once its reply is in: the reply's ack goes with it, unlogged.
    assert [r.getMessage() for r in caplog.records if "lease lost" in r.getMessage()] == []
    assert "WARNING" not in worker.log()


def test_a_garbage_binding_does_not_stop_remote_control(make_stack: StackFactory):
    # A binding written by hand or by another program: skipped and logged, never fatal.
    stack = make_stack()
    worker = stack.worker()
    key = f"{stack.settings.prefix}bindings:celery.pidbox"
    stack.redis.hset(key, "not-a-binding", "soon")
    stack.redis.hset(key, "\x06\x16\x06\x16ghost.celery.pidbox", "not-a-deadline")

    replies = stack.app.control.inspect(destination=[worker.nodename], timeout=5).ping()

    assert replies == {worker.nodename: {"ok": "pong"}}


def test_a_prefork_worker_whose_pool_is_busy_answers_remote_control_and_applies_a_revoke(
    make_stack: StackFactory,
):
    # One process and four 3-second tasks: for ~9 s every process is busy and three tasks wait
    # prefetched in the worker. A synchronous transport leaves Celery blocked in the pool's
    # apply_async then, reading no broadcast: every call below would time out.
    stack = make_stack(prefetch_multiplier=4)
    worker = stack.worker(pool="prefork", concurrency=1)
    sleep = stack.task("sleep_then_record")
    tasks = [sleep.delay(3.0, label=f"busy-{i}") for i in range(4)]
    stack.wait_for_events("start", 1, timeout=10)

    inspect = stack.app.control.inspect(destination=[worker.nodename], timeout=1.0)
    pings = inspect.ping()
    answered = sum(1 for _ in range(4) if inspect.revoked() is not None)
    assert pings == {worker.nodename: {"ok": "pong"}}
    assert answered == 4

    stack.settled("celery", reserved=4)  # all four are in the worker: one runs, three wait
    stack.app.control.revoke(tasks[-1].id)
    # Proof that the calls above met a busy pool: the first task has not finished yet.
    assert stack.events("finish") == []
    finished = stack.wait_for_tasks("finish", [t.id for t in tasks[:-1]], timeout=30)
    assert len(finished) == 3
    stack.settled("celery")  # the revoked one is settled too, not left reserved
    started = stack.events("start")
    assert sorted(e.task for e in started) == sorted(t.id for t in tasks[:-1])
