"""``celery -A proj msg migrate --from redis://...``: tasks left waiting in kombu's ``redis://``
transport, moved into celery-msg by the real CLI, then run by a real celery-msg worker: each
once, in priority order, with its ETA kept; a second run moves nothing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis
from celery import Celery
from celery_app.settings import DEFAULT_QUEUE, SECOND_QUEUE
from celery_helpers import Stack
from test_cli import CLI

if TYPE_CHECKING:
    from conftest import Server


@pytest.fixture
def old_app(server: Server, prefix: str) -> Iterator[Celery]:
    """The app as it was: kombu's redis:// on the same server, keys under a prefix of its own."""
    app = Celery("old", broker=f"{server.url}/0", set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}kombu:"}
    app.conf.task_default_queue = DEFAULT_QUEUE
    yield app
    app.close()


def _send(app: Celery, **options: Any) -> str:
    return str(app.send_task("record_now", kwargs={"label": str(options)}, **options).id)


def _raw(server: Server, prefix: str, task_id: str) -> bytes:
    """The message of ``task_id`` as kombu's transport stores it."""
    client = redis.Redis.from_url(f"{server.url}/0")
    try:
        for key in client.scan_iter(match=f"{prefix}kombu:{DEFAULT_QUEUE}*"):
            for raw in client.lrange(key, 0, -1):
                if task_id.encode() in raw:
                    return bytes(raw)
    finally:
        client.close()
    raise AssertionError(f"{task_id} is not in kombu's lists")


def _kombu_keys(server: Server, prefix: str) -> set[str]:
    client = redis.Redis.from_url(f"{server.url}/0")
    keys = {k.decode() for k in client.scan_iter(match=f"{prefix}kombu:*")}
    client.close()
    return {k for k in keys if "_kombu.binding" not in k}


def test_tasks_waiting_in_kombus_redis_transport_move_and_run_once_in_priority_order(
    stack: Stack, old_app: Celery, server: Server, prefix: str
):
    low = [_send(old_app, priority=0) for _ in range(2)]
    mid = _send(old_app, priority=5)
    high = _send(old_app, priority=9)
    later = _send(old_app, countdown=3600)
    elsewhere = [_send(old_app, queue=SECOND_QUEUE) for _ in range(2)]
    # An interrupted earlier run: mid already moved, not yet removed from the source.
    stack.broker.publish_once(DEFAULT_QUEUE, mid, _raw(server, prefix, mid), 255 - 5)
    assert _kombu_keys(server, prefix)  # kombu's lists hold them
    cli = CLI(stack)
    source = ["--from", f"{server.url}/0", "--global-keyprefix", f"{prefix}kombu:"]

    dry = cli.json("migrate", *source, "--dry-run")
    assert dry["dry_run"] is True
    assert dry["queues"][DEFAULT_QUEUE]["waiting"] == 5
    assert dry["queues"][SECOND_QUEUE]["waiting"] == 2
    assert stack.broker.counts(DEFAULT_QUEUE)["ready"] == 1  # nothing moved

    done = cli.json("migrate", *source, "--yes")
    assert done["total"] == {
        "waiting": 7, "moved": 6, "already_there": 1, "undecodable": 0, "scheduled": 1,
    }  # fmt: skip
    assert _kombu_keys(server, prefix) == set()
    assert stack.broker.counts(DEFAULT_QUEUE) == {
        "ready": 4, "reserved": 0, "scheduled": 1, "dead": 0,
    }  # fmt: skip
    assert stack.broker.counts(SECOND_QUEUE)["ready"] == 2
    assert [i.id for i in stack.broker.lookup(later, [DEFAULT_QUEUE])] == [later]
    assert cli.json("migrate", *source, "--yes")["total"]["waiting"] == 0

    stack.worker()
    starts = stack.wait_for_tasks("start", [high, mid, *low], timeout=15)
    assert Counter(e.task for e in starts) == Counter([high, mid, *low])
    assert [e.task for e in starts][:2] == [high, mid]  # priority 9, then 5, then 0
    assert later not in {e.task for e in stack.events("start")}
    assert not set(elsewhere) & {e.task for e in stack.events("start")}


def test_messages_kombu_workers_hold_move_only_with_include_unacked(
    stack: Stack, old_app: Celery, server: Server, prefix: str
):
    # What a stopped kombu worker left in its `unacked` hash: [message, exchange, routing key].
    held = _send(old_app)
    raw = _raw(server, prefix, held)
    client = redis.Redis.from_url(f"{server.url}/0")
    client.delete(*[k for k in _kombu_keys(server, prefix)])
    client.hset(f"{prefix}kombu:unacked", "tag-1", f'[{raw.decode()}, "", "{DEFAULT_QUEUE}"]')
    client.zadd(f"{prefix}kombu:unacked_index", {"tag-1": 1})
    cli = CLI(stack)
    source = ["--from", f"{server.url}/0", "--global-keyprefix", f"{prefix}kombu:"]

    assert cli.json("migrate", *source, "--yes", "--queue", DEFAULT_QUEUE)["total"]["moved"] == 0
    done = cli.json("migrate", *source, "--yes", "--queue", DEFAULT_QUEUE, "--include-unacked")
    assert done["total"]["moved"] == 1
    assert client.hlen(f"{prefix}kombu:unacked") == 0
    assert client.zcard(f"{prefix}kombu:unacked_index") == 0
    client.close()
    stack.worker()
    assert [e.task for e in stack.wait_for_events("start", 1, timeout=15)] == [held]
