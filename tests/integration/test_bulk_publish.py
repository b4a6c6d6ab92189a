"""``celery_msg.bulk``: every task published inside the block reaches Redis once, by the block's
edge, also when Redis restarts in the middle of it (real servers, no worker needed)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from celery import Celery, group
from celery_app.settings import DEFAULT_QUEUE
from celery_app.tasks import create_app
from celery_helpers import Stack, stack_factory, wait_until
from kombu import Exchange, Producer, Queue

import celery_msg
from bench.proxy import TcpProxy
from celery_msg import canvas, send_template
from celery_msg.bulk_publish import BulkPublishError, RetryPolicy, bulk_buffer

if TYPE_CHECKING:
    from conftest import Server


@pytest.fixture
def durable_server(server_factory: Callable[..., Server]) -> Server:
    """A server of its own that keeps every write across a crash (AOF, fsync always)."""
    return server_factory(appendonly=True, appendfsync="always")


@pytest.fixture
def durable_stack(durable_server: Server, tmp_path: Path) -> Iterator[Stack]:
    with stack_factory(durable_server.url, "bulk:", tmp_path) as make:
        yield make()


def stored_keys(stack: Stack, queue: str = DEFAULT_QUEUE) -> list[str]:
    """Every message key stored in ``queue`` (``id``, or ``id/<n>`` for a second copy)."""
    return sorted(k.decode() for k in stack.redis.hkeys(stack.broker.keys(queue).body))


def declare(stack: Stack, queue: str = DEFAULT_QUEUE) -> None:
    with stack.app.connection_for_write() as conn:
        conn.default_channel.queue_declare(queue)


def test_leaving_the_block_stores_every_task_once(stack: Stack):
    declare(stack)
    with celery_msg.bulk(stack.app, batch=100):
        ids = [stack.task("add").delay(i, i).id for i in range(1050)]
    assert stored_keys(stack) == sorted(ids)
    assert stack.broker.counts(DEFAULT_QUEUE)["ready"] == 1050


def test_tasks_wait_in_the_process_until_a_batch_fills_or_the_block_ends(stack: Stack):
    declare(stack)
    with celery_msg.bulk(stack.app, batch=100) as buffer:
        for i in range(99):
            stack.task("add").delay(i, i)
        assert stored_keys(stack) == []
        stack.task("add").delay(99, 99)  # the 100th: the batch is written now
        wait_until(lambda: len(stored_keys(stack)) == 100 or None, 5, "the first batch")
        stack.task("add").delay(100, 100)
        assert len(stored_keys(stack)) == 100
    assert len(stored_keys(stack)) == 101
    assert 0 < buffer.longest_wait < 60  # the first task waited for 99 more


def test_another_thread_publishes_at_once_on_the_same_app(stack: Stack):
    declare(stack)
    ids: list[str] = []
    with celery_msg.bulk(stack.app):
        ids.append(stack.task("add").delay(1, 1).id)
        other = threading.Thread(target=lambda: ids.append(stack.task("add").delay(2, 2).id))
        other.start()
        other.join()
        assert stored_keys(stack) == [ids[1]]  # the other thread's, not the block's
    assert stored_keys(stack) == sorted(ids)


def test_a_block_inside_a_block_joins_it(stack: Stack):
    declare(stack)
    with celery_msg.bulk(stack.app) as outer:
        with celery_msg.bulk(stack.app) as inner:
            first = stack.task("add").delay(1, 1).id
        assert inner is outer
        assert stored_keys(stack) == []
    assert stored_keys(stack) == [first]


def test_only_task_messages_are_buffered():
    assert bulk_buffer({"headers": {"task": "add"}}) is None  # no block open
    with celery_msg.bulk(_app()):
        assert bulk_buffer({"headers": {"task": "add"}}) is not None
        assert bulk_buffer({"headers": {}, "properties": {}}) is None  # remote control, events
        assert bulk_buffer({"headers": None}) is None


def _app() -> object:
    from celery import Celery

    return Celery("bulk-test", broker="celery-msg://127.0.0.1:1/0", set_as_current=False)


def test_a_broker_that_is_not_celery_msg_is_refused():
    from celery import Celery

    app = Celery("bulk-test", broker="redis://127.0.0.1:1/0", set_as_current=False)
    with (
        pytest.raises(celery_msg.ConfigurationError, match=r"redis://, not ours"),
        celery_msg.bulk(app),
    ):
        pass


def test_a_stale_route_in_a_batch_is_routed_again_and_only_those_messages_sent(stack: Stack):
    exchange = Exchange("bulk-topic", type="topic")
    first, second = Queue("bulk-a", exchange, "jobs.#"), Queue("bulk-b", exchange, "jobs.*")
    with stack.app.connection_for_write() as conn:
        first(conn.default_channel).declare()
        producer = Producer(conn.default_channel, exchange=exchange)
        with celery_msg.bulk(stack.app, batch=1000):
            for i in range(20):
                headers = {"task": "add", "id": f"m{i}"}
                producer.publish({"i": i}, routing_key="jobs.x", headers=headers)
            # Bound after the 20 were routed (to bulk-a only), before they are sent.
            with stack.app.connection_for_write() as other:
                second(other.default_channel).declare()
    expected = [f"m{i}" for i in range(20)]
    assert sorted(stored_keys(stack, "bulk-a")) == sorted(expected)
    assert sorted(stored_keys(stack, "bulk-b")) == sorted(expected)


def crash_with_a_batch_unanswered(
    server: Server, stack: Stack, publish: Callable[[Celery, int], list[str]]
) -> list[str]:
    """In one bulk block of 500-message batches, through a proxy (the test looks at Redis
    directly): ``publish(app, n)`` 1500 tasks and flush; 500 more, one batch Redis runs but
    whose replies are held; Redis killed and restarted from its AOF (the 2000 kept, not its
    scripts); 1000 more. Returns the ids published."""
    declare(stack)
    with TcpProxy(server.process.port) as proxy:
        app = create_app(
            replace(stack.settings, redis_url=f"redis://127.0.0.1:{proxy.port}").environ()
        )
        ids: list[str] = []
        with celery_msg.bulk(app, batch=500) as buffer:
            ids += publish(app, 1500)
            buffer.flush()
            proxy.hold_replies()
            ids += publish(app, 500)  # one batch, run, not answered
            wait_until(lambda: len(stored_keys(stack)) == 2000 or None, 10, "the batch run")
            server.process.kill()
            server.process.restart()
            proxy.drop_all()
            proxy.heal()
            ids += publish(app, 1000)
        app.close()
    return ids


def test_a_batch_run_but_unanswered_before_a_redis_crash_is_sent_again_and_stored_once(
    durable_server: Server, durable_stack: Stack
):
    def delays(app: Celery, n: int) -> list[str]:
        return [app.tasks["add"].delay(i, i).id for i in range(n)]

    ids = crash_with_a_batch_unanswered(durable_server, durable_stack, delays)
    # Past the first two, their messages were derived (celery_msg.send_template), with
    # buffer entries made from a template: the resend after the crash is the same for them.
    publisher = send_template.last_publisher()
    assert publisher is not None and publisher.derived == 2998
    assert stored_keys(durable_stack) == sorted(ids)  # each once: no id/<n> second copy
    stats = durable_stack.broker.stats(DEFAULT_QUEUE)
    # The 500 whose replies were lost went again as unique publishes, found stored: no-ops.
    assert (stats["published"], stats["duplicates"]) == (3000, 500)


def test_a_groups_derived_messages_run_but_unanswered_before_a_redis_crash_are_stored_once(
    durable_server: Server, durable_stack: Stack
):
    # As above, with groups (they join the block): past their first two tasks their messages
    # are derived (celery_msg.group_template), with buffer entries made from a template.
    derived = []

    def groups(app: Celery, n: int) -> list[str]:
        add = app.tasks["add"]
        result = group(add.s(i, i).set(ignore_result=True) for i in range(n)).apply_async()
        publisher = canvas.last_publisher()
        derived.append(publisher.derived if publisher is not None else 0)
        return [r.id for r in result.results]

    ids = crash_with_a_batch_unanswered(durable_server, durable_stack, groups)
    assert derived == [1498, 498, 998]
    assert stored_keys(durable_stack) == sorted(ids)  # each once: no id/<n> second copy
    stats = durable_stack.broker.stats(DEFAULT_QUEUE)
    assert (stats["published"], stats["duplicates"]) == (3000, 500)


def test_a_bulk_that_cannot_reach_redis_names_its_messages_and_a_retry_stores_each_once(
    durable_server: Server, durable_stack: Stack
):
    stack = durable_stack
    declare(stack)
    add = stack.task("add")
    ids: list[str] = []
    policy = RetryPolicy(max_retries=1)
    with pytest.raises(BulkPublishError) as raised, celery_msg.bulk(stack.app, 100, policy):
        ids.extend(add.delay(i, i).id for i in range(250))
        wait_until(lambda: len(stored_keys(stack)) == 200 or None, 10, "two batches")
        durable_server.process.kill()
    error = raised.value
    # The 2nd batch's replies arrived before the crash (read after it); the last 50 were not
    # stored: named, with why.
    assert sorted(u.message_id for u in error.unsent) == sorted(ids[200:])
    assert all("Redis unreachable" in u.reason for u in error.unsent)
    assert "50 messages not confirmed" in str(error)
    durable_server.process.restart()
    error.retry()
    assert stored_keys(stack) == sorted(ids)
    assert stack.broker.stats(DEFAULT_QUEUE).get("duplicates", 0) == 0


def test_kombus_producer_batch_is_sent_as_a_bulk_and_each_message_stored_once(stack: Stack):
    declare(stack, "batched")
    with stack.app.connection_for_write() as conn:
        producer = Producer(conn.default_channel)
        assert producer.supports_batch_publish
        with producer.batch(max_size=50):
            for i in range(120):
                producer.publish({"i": i}, routing_key="batched", message_id=f"b{i}")
                if i == 10:
                    assert stored_keys(stack, "batched") == []
    assert stored_keys(stack, "batched") == sorted(f"b{i}" for i in range(120))


def test_an_exception_inside_kombus_producer_batch_discards_what_was_not_sent(stack: Stack):
    declare(stack, "batched")
    with stack.app.connection_for_write() as conn:
        producer = Producer(conn.default_channel)
        with pytest.raises(KeyError), producer.batch(max_size=50):
            for i in range(10):
                producer.publish({"i": i}, routing_key="batched", message_id=f"b{i}")
            raise KeyError("boom")
    assert stored_keys(stack, "batched") == []


def test_an_exception_inside_a_bulk_block_still_sends_what_was_published(stack: Stack):
    # As without the block: a task published before the error is in Redis after it.
    declare(stack)
    with pytest.raises(KeyError), celery_msg.bulk(stack.app):
        sent = stack.task("add").delay(1, 1).id
        raise KeyError("boom")
    assert stored_keys(stack) == [sent]


def test_a_task_whose_queue_is_declared_while_redis_restarts_is_retried_as_kombu_retries_it(
    durable_server: Server, durable_stack: Stack
):
    # Inside a block the producer first publishes without kombu's ensure (it only buffers);
    # a declaration that meets a dropped connection must still be revived and retried by
    # ensure, as kombu does outside the block, not raised out of apply_async.
    stack = durable_stack
    declare(stack)
    add = stack.task("add")
    policy = {"max_retries": 40, "interval_start": 0.1, "interval_step": 0.1, "interval_max": 0.3}
    with celery_msg.bulk(stack.app, 100):
        # ignore_result: no result backend connection (same server) left to a killed Redis
        first = add.apply_async((1, 1), ignore_result=True)
        durable_server.process.kill()
        restart = threading.Timer(0.5, durable_server.process.restart)
        restart.start()
        try:
            fresh = add.apply_async((2, 2), queue="fresh", retry_policy=policy, ignore_result=True)
        finally:
            restart.join()
    assert stored_keys(stack) == [first.id]
    assert stored_keys(stack, "fresh") == [fresh.id]
