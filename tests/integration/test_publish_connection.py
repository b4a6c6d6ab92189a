"""The connection kept for publishing survives what idle pooled connections survive."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_msg.core import Broker
from celery_msg.errors import ScriptError

if TYPE_CHECKING:
    from conftest import Server


def _broker(server: Server, prefix: str) -> Broker:
    # As the transport builds it: no retries inside redis-py.
    client = redis.Redis.from_url(server.url, retry=Retry(NoBackoff(), 0))
    return Broker(client, prefix=prefix)


def test_a_publish_after_the_server_restarted_reconnects_instead_of_failing(
    fresh_server: Server,
) -> None:
    broker = _broker(fresh_server, "p:")
    assert broker.publish("q", "a", b"1", 0) == "a"

    fresh_server.process.restart()

    assert broker.publish("q", "b", b"2", 0) == "b"
    assert broker.counts("q")["ready"] == 1  # no persistence: only the message sent after


def test_a_publish_after_the_server_closed_the_idle_connection_reconnects(
    server: Server, prefix: str
) -> None:
    broker = _broker(server, prefix)
    assert broker.publish("q", "a", b"1", 0) == "a"
    admin = redis.Redis.from_url(server.url)
    names = [c for c in admin.client_list() if c.get("cmd") == "evalsha"]
    assert names, "the publishing connection should be open"
    for client in names:
        admin.client_kill_filter(_id=client["id"])

    assert broker.publish("q", "b", b"2", 0) == "b"
    assert broker.counts("q")["ready"] == 2


def test_an_error_reply_keeps_the_publishing_connection(server: Server, prefix: str) -> None:
    broker = _broker(server, prefix)
    broker.publish("q", "a", b"1", 0)
    admin = redis.Redis.from_url(server.url)
    before = {c["id"] for c in admin.client_list() if c.get("cmd") == "evalsha"}
    admin.set(broker.keys("q").body, "not a hash")

    with pytest.raises(ScriptError, match="WRONGTYPE"):
        broker.publish("q", "b", b"2", 0)

    admin.delete(broker.keys("q").body)
    broker.publish("q", "c", b"3", 0)
    after = {c["id"] for c in admin.client_list() if c.get("cmd") == "evalsha"}
    assert after == before
