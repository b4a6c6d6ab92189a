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
"""

from __future__ import annotations

from typing import Any

from kombu.messaging import Producer


def declaration_cached(entity: Any, channel: Any) -> bool:
    """kombu's own test in ``kombu.common._maybe_declare``, made before it binds anything."""
    connection = getattr(channel, "connection", None)
    if connection is None or not entity.can_cache_declaration:
        return False
    return hash(entity) in connection.client.declared_entities


class DeclaringProducer(Producer):
    """kombu's ``Producer``; a cached declaration costs one set look-up (see the module)."""

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
