"""Which consumers are attached to a queue: a heartbeat per consumer and queue.

Redis cannot tell who waits on a queue (a consumer blocks on the queue's signal list, shared by
all), so each live consumer says so itself: its renewer, which runs every third of the lease,
writes ``consumer id -> alive until`` into the queue's ``consumers`` ZSET (a side key, never
touched by a script). A consumer that dies stops writing and drops out of the count when its
deadline passes; one that closes removes itself at once. Readers count members whose deadline
lies ahead (:mod:`celery_msg.snapshot`); writers prune the ones long gone.
"""

from __future__ import annotations

from collections.abc import Iterable

from .core import Broker, translated_errors

#: Entries whose deadline passed this long ago (ms) are removed by the next heartbeat.
PRUNE_AFTER_MS = 60_000


def heartbeat(broker: Broker, consumer: str, queues: Iterable[str], alive_ms: int) -> None:
    """Mark ``consumer`` as attached to ``queues`` for the next ``alive_ms``: one round trip."""
    names = sorted(set(queues))
    if not names:
        return
    now = broker.now_ms()
    with translated_errors(f"heartbeat of {consumer} on {len(names)} queues"):
        pipe = broker.client.pipeline(transaction=False)
        for queue in names:
            key = broker.keys(queue).consumers
            pipe.zadd(key, {consumer: now + alive_ms})
            pipe.zremrangebyscore(key, "-inf", f"({now - PRUNE_AFTER_MS}")
        pipe.execute()


def detach(broker: Broker, consumer: str, queues: Iterable[str]) -> None:
    """``consumer`` stopped consuming ``queues`` (it closed): not counted any more."""
    names = sorted(set(queues))
    if not names:
        return
    with translated_errors(f"detach {consumer} from {len(names)} queues"):
        pipe = broker.client.pipeline(transaction=False)
        for queue in names:
            pipe.zrem(broker.keys(queue).consumers, consumer)
        pipe.execute()
