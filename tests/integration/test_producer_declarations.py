"""A configured app's producers (:class:`celery_msg.producer.DeclaringProducer`) skip kombu's
bound copy of a queue it has cached as declared, and declare exactly when kombu's own
``Producer`` declares: once per connection for a queue kombu caches, on every publish for one it
never caches (``expires``, ``auto_delete``), again once the connection is re-established."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from kombu import Exchange, Producer, Queue
from kombu.entity import Queue as KombuQueue
from kombu_helpers import broker, connect

from celery_msg.producer import DeclaringProducer
from celery_msg.transport import Channel

if TYPE_CHECKING:
    from celery_helpers import StackFactory
    from conftest import Server


@pytest.fixture
def declared(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The queues our transport declared (``queue_declare``), in order, during the test."""
    seen: list[str] = []
    original = Channel.queue_declare

    def counting(self: Channel, queue: str | None = None, *args: Any, **kwargs: Any) -> Any:
        seen.append(str(queue))
        return original(self, queue, *args, **kwargs)

    monkeypatch.setattr(Channel, "queue_declare", counting)
    yield seen


def _queues() -> dict[str, Queue]:
    ex = Exchange("ex", type="direct")
    return {
        "plain": Queue("plain", ex, "plain"),
        # kombu never caches a declaration with x-expires (but does one made with expires=).
        "expiring": Queue("expiring", ex, "expiring", queue_arguments={"x-expires": 60_000}),
        "auto_delete": Queue("auto_delete", ex, "auto_delete", auto_delete=True),
    }


def _publish_twice_per_connection(server: Server, prefix: str, cls: type[Any]) -> None:
    """Three publishes on a connection, then two more after it was re-established, as Celery
    publishes a task (``declare=[queue]``, ``retry=True``)."""
    with connect(server, prefix) as conn:
        for count in (3, 2):
            producer = cls(conn)
            for queue in _queues().values():
                for i in range(count):
                    producer.publish({"i": i}, routing_key=queue.name, declare=[queue], retry=True)
            conn.close()  # kombu empties the connection's declaration cache


def test_a_configured_producer_declares_exactly_when_kombus_own_producer_does(
    server: Server, prefix: str, declared: list[str]
):
    _publish_twice_per_connection(server, prefix + "kombu:", Producer)
    theirs = list(declared)
    declared.clear()
    _publish_twice_per_connection(server, prefix, DeclaringProducer)
    assert declared == theirs
    # Once per connection where kombu caches the declaration; on every publish otherwise.
    assert declared.count("plain") == 2
    assert declared.count("expiring") == declared.count("auto_delete") == 5
    look = broker(server, prefix)
    assert {q: look.counts(q)["ready"] for q in _queues()} == dict.fromkeys(_queues(), 5)


def test_a_cached_declaration_binds_no_copy_of_the_queue(
    server: Server, prefix: str, monkeypatch: pytest.MonkeyPatch
):
    bound: list[str] = []
    original = KombuQueue.bind

    def counting(self: Queue, channel: Any) -> Any:
        bound.append(self.name)
        return original(self, channel)

    monkeypatch.setattr(KombuQueue, "bind", counting)
    queue = _queues()["plain"]
    with connect(server, prefix) as conn:
        for cls in (Producer, DeclaringProducer):
            bound.clear()
            producer = cls(conn)
            for i in range(5):
                producer.publish({"i": i}, routing_key="plain", declare=[queue], retry=True)
            # kombu binds a copy on every publish, declared or not; ours on the first only
            # (the declaration itself, on a connection that had none cached).
            assert len(bound) == (5 if cls is Producer else 0)


def test_a_queue_deleted_under_a_publisher_is_declared_again_when_kombu_would(
    server: Server, prefix: str, declared: list[str]
):
    look = broker(server, prefix)
    queues = _queues()
    with connect(server, prefix) as conn:
        producer = DeclaringProducer(conn)

        def send() -> None:
            for queue in queues.values():
                producer.publish({}, routing_key=queue.name, declare=[queue], retry=True)

        send()
        for name in queues:
            look.delete(name)
        declared.clear()
        send()
        # A queue kombu never caches (expires, auto_delete: the ones Redis itself deletes) is
        # declared again at once, with its arguments; a cached one is not, on this connection,
        # as with kombu's Producer: its message is stored all the same (publishing needs no
        # declaration), and the registry lists it again once the connection is re-established.
        assert sorted(declared) == ["auto_delete", "expiring"]
        assert look.exists("expiring") and look.queue_arguments("expiring").expires_ms == 60_000
        assert not look.exists("plain") and look.counts("plain")["ready"] == 1
        conn.close()
        producer = DeclaringProducer(conn)
        send()
        assert look.exists("plain") and look.counts("plain")["ready"] == 2


def test_a_configured_apps_pool_makes_declaring_producers(make_stack: StackFactory):
    stack = make_stack()
    stack.task("add").delay(1, 1)
    with stack.app.producer_or_acquire() as producer:
        assert isinstance(producer, DeclaringProducer)
    plain = make_stack(configure=False)
    plain.task("add").delay(1, 1)
    with plain.app.producer_or_acquire() as producer:
        assert type(producer) is Producer
