"""The producers of a configured app: kombu's ``Producer``, with a declaration kombu has
cached for the connection checked before anything else.

Celery publishes every task with ``declare=[queue]`` and ``retry=True``; kombu's
``maybe_declare`` then binds a copy of the queue (and of its exchange) to the channel, wraps
the check in ``Connection.ensure``, and only then finds the queue in the connection's
``declared_entities`` and returns without declaring. The copies are thrown away: about a sixth
of a bulk group's time (``python -m bench.instructions``). :class:`DeclaringProducer` looks in
the same cache first, exactly as kombu's ``_maybe_declare`` does (the entity's hash, only for an
entity that ``can_cache_declaration``, only on a live channel) and, when found, returns what
kombu returns (False, nothing declared); in every other case it is kombu's own code.

So declarations are cached exactly as kombu caches them, per connection: the cache is emptied
when the connection is closed or re-established (kombu's ``Connection``), and an entity kombu
never caches (an ``auto_delete`` or ``x-expires`` queue) is declared on every publish as
before. Pinned by ``tests/integration/test_producer_declarations.py`` (the same publishes
through both producers declare the same queues).

Inside a bulk block of this thread, a publish Celery asks to retry (``retry=True``: every task)
is first made without kombu's ``Connection.ensure`` around it: there it buffers the message
(the block's flush sends it, and sends again what was not confirmed, by the app's retry
policy), so the wrapper made per publish retried nothing (20,000 of the 775,000 instructions of
a ``.delay()`` in a block, ``python -m bench.instructions delay-bulk``). kombu's other step for
such a publish (the retry policy into the connection's transport options) is kept, and a
publish that still fails on a recoverable connection error (routing read a binding table, or a
queue was declared, on a dropped connection) is made again as kombu makes it, inside ``ensure``
(``tests/integration/test_bulk_publish.py``: a declaration across a Redis restart).
"""

from __future__ import annotations

from typing import Any

from kombu.messaging import Producer

from .bulk_publish import current_buffer


def declaration_cached(entity: Any, channel: Any) -> bool:
    """kombu's own test in ``kombu.common._maybe_declare``, made before it binds anything."""
    connection = getattr(channel, "connection", None)
    if connection is None or not entity.can_cache_declaration:
        return False
    return hash(entity) in connection.client.declared_entities


class DeclaringProducer(Producer):
    """kombu's ``Producer``; a cached declaration costs one set look-up, and inside a bulk
    block a publish is not wrapped in ``ensure`` until it fails (see the module)."""

    def publish(self, body: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("retry") and current_buffer() is not None:
            policy = kwargs.get("retry_policy")
            if policy:
                self.connection.transport_options.update(policy)  # as kombu's publish does
            kwargs["retry"] = False
            try:
                return super().publish(body, *args, **kwargs)  # type: ignore[no-untyped-call]
            except self.connection.recoverable_connection_errors:
                kwargs["retry"] = True  # made again as kombu makes it: revived, retried
        return super().publish(body, *args, **kwargs)  # type: ignore[no-untyped-call]

    def maybe_declare(self, entity: Any, retry: bool = False, **retry_policy: Any) -> Any:
        if entity and declaration_cached(entity, self.channel):
            return False
        return super().maybe_declare(entity, retry, **retry_policy)  # type: ignore[no-untyped-call]


def adopt(pool: Any) -> None:
    """Make ``pool`` (an app's producer pool) create :class:`DeclaringProducer` s from now on,
    if it makes kombu's own (a pool given another class is left alone); the producers it made
    before stay kombu's."""
    if pool.Producer is Producer:
        pool.Producer = DeclaringProducer
