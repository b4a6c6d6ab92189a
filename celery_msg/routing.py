"""A channel's publish path: a kombu message routed with the exchange's cached binding table,
then stored through :class:`~celery_msg.core.Broker` (one queue, many, or buffered in bulk).

Why its own module: publishing shares nothing with delivering and settling but the channel it
runs on. Routing uses the exchange's bindings, cached for ``binding_cache_ttl``; a publish
routed with a cached table carries its bindings version, so a change of bindings is seen by the
very next publish: it stores nothing in the queues it names (:class:`StaleRoute`) and is routed
again with a fresh table, never twice into a queue. :class:`RoutingChannel` is the base of
:class:`~celery_msg.transport.Channel`, which sets the attributes below.
"""

from __future__ import annotations

import time
from typing import Any

from kombu.transport import virtual
from kombu.utils.json import JSONEncoder

from .bulk_publish import PublishBatch, bulk_buffer
from .core import Broker, Outgoing, Route, Table
from .errors import StaleRoute
from .headers import UNIQUE_HEADER, due_ms, is_retry
from .messages import band_of, message_id, stamp_first_failure
from .options import TransportOptions, to_ms
from .policy import Unique, unique_for

#: kombu's ``dumps`` builds a ``JSONEncoder`` per call; one instance gives the same output.
dumps = JSONEncoder().encode

#: How often one publish routes again after finding its binding table stale.
ROUTE_ATTEMPTS = 5


class RoutingChannel(virtual.Channel):
    """kombu's channel with celery-msg's publish path (the rest: :class:`Channel`)."""

    broker: Broker
    options: TransportOptions
    #: exchange -> (cached until, its binding table).
    _tables: dict[str, tuple[float, Table]]
    #: exchange -> (cached until, its type), for exchanges this process did not declare.
    _types: dict[str, tuple[float, str]]

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        """The exchange's type, also when this process never declared it: Celery does not
        declare a broadcast queue's exchange before publishing to it, and routing a fanout
        message as direct would drop it silently."""
        if exchange not in self.state.exchanges and exchange:
            cached = self._types.get(exchange)
            now = time.monotonic()
            if cached is None or now >= cached[0]:
                kind = self.broker.exchange_type(exchange) or default
                cached = self._types[exchange] = (now + self.options.binding_cache_ttl, kind)
            kind = cached[1]
            if kind in self.exchange_types:
                return self.exchange_types[kind]
        return super().typeof(exchange, default)

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        """kombu's view of an exchange's bindings: ``(routing_key, pattern, queue)`` tuples."""
        return [(b.routing_key, b.pattern, b.queue) for b in self._table(exchange)[0].bindings]

    def _table(self, exchange: str, fresh: bool = False) -> tuple[Table, bool]:
        """The exchange's bindings and whether they come from the cache (kept for
        ``binding_cache_ttl``). A publish routed with a cached table carries its bindings
        version, so a change of bindings is seen by the very next publish."""
        cached = self._tables.get(exchange)
        now = time.monotonic()
        if not fresh and cached is not None and now < cached[0]:
            return cached[1], True
        table = self.broker.table(exchange)
        if self.options.binding_cache_ttl and table.route is not None:
            self._tables[exchange] = (now + self.options.binding_cache_ttl, table)
        else:
            self._tables.pop(exchange, None)
        return table, False

    def basic_publish(
        self, message: dict[str, Any], exchange: str, routing_key: str, **kwargs: Any
    ) -> None:
        """Route and publish; a publish whose table went stale meanwhile stored nothing in the
        queues it names, so it is routed again with a fresh table (never twice into a queue).
        Inside a :func:`celery_msg.bulk` block of this thread a task message is buffered."""
        self.prepare_for_publish(message, exchange, routing_key)
        buffer = bulk_buffer(message)
        if buffer is not None:
            buffer.add(self, message, exchange, routing_key)
            return
        if not exchange:  # the default exchange: the routing key names the queue
            self._put(routing_key, message, **kwargs)
            return
        stored: set[str] = set()
        fresh = False
        for _ in range(ROUTE_ATTEMPTS):
            queues, route, cached = self.route(exchange, routing_key, fresh=fresh)
            targets = [q for q in queues if q not in stored]
            if not targets and cached:
                # Nothing to write means no version check: a cached table that routes nowhere
                # may lack a binding made since (a reply queue bound just before the request).
                fresh = True
                continue
            try:
                self._publish_routed(targets, message, route)
                return
            except StaleRoute as exc:
                stored.update(q for q in targets if q not in exc.refused)
                fresh = True
        raise StaleRoute(exchange, [])  # bindings changing faster than we can read them

    def create_publish_batch(self, max_size: int) -> PublishBatch:
        """kombu's ``Producer.batch()`` (kombu >= 5.7): that producer's publishes are sent as a
        :func:`celery_msg.bulk` block's are."""
        return PublishBatch(self, max_size)

    def prepare_for_publish(self, message: dict[str, Any], exchange: str, routing_key: str) -> None:
        """kombu's ``_inplace_augment_message`` (body encoding, delivery info), without the
        ``uuid4`` delivery tag it stores in every message: each delivery gets a tag of its own
        (:meth:`_accept`), so the stored one was never read; it cost a few µs of every publish
        and 60 bytes of every waiting message."""
        message["body"], encoding = self.encode_body(message["body"], self.body_encoding)
        props = message["properties"]
        props["body_encoding"] = encoding
        props["delivery_info"].update(exchange=exchange, routing_key=routing_key)

    _inplace_augment_message = prepare_for_publish

    def route(
        self, exchange: str, routing_key: str, *, fresh: bool = False
    ) -> tuple[list[str], Route | None, bool]:
        """The queues (sorted) a message to ``exchange`` with ``routing_key`` goes to, the
        route to guard its publish with, and whether the table came from the cache."""
        kind = self.typeof(exchange)
        table, cached = self._table(exchange, fresh=fresh)
        rows = [(b.routing_key, b.pattern, b.queue) for b in table.bindings]
        if kind.type == "fanout":
            queues = {queue for _, _, queue in rows}
        else:
            queues = set(kind.lookup(rows, exchange, routing_key, None))
        return sorted(q for q in queues if q), table.route, cached

    def _publish_routed(
        self, queues: list[str], message: dict[str, Any], route: Route | None
    ) -> None:
        if len(queues) == 1:
            self._put(queues[0], message, route=route)
        elif queues:
            self.broker.publish_many(
                queues,
                message_id(message),
                dumps(message),
                self._band(message),
                due_ms=due_ms(message),
                route=route,
                retry=is_retry(message),
            )

    def _put(
        self, queue: str, message: dict[str, Any], route: Route | None = None, **kwargs: Any
    ) -> None:
        out = self.outgoing(queue, message)
        self.broker.publish(
            queue,
            out.message_id,
            out.payload,
            out.band,
            due_ms=out.due_ms,
            unique=out.unique,
            lock_until_ms=out.lock_until_ms,
            route=route,
            retry=out.retry,
        )

    def outgoing(self, queue: str, message: dict[str, Any]) -> Outgoing:
        """The arguments of :meth:`Broker.publish` for ``message`` into ``queue`` (a retry
        stamped with its first failure, the unique policy applied), for one publish or a bulk."""
        stamp_first_failure(message, self.broker.now_ms)  # before dumps
        unique = self._unique(queue, message)
        return Outgoing(
            queue,
            message_id(message),
            dumps(message),
            self._band(message),
            due_ms(message),
            unique is not None,
            0 if unique is None else self.broker.now_ms() + to_ms(unique.ttl),
            is_retry(message),
        )

    def _unique(self, queue: str, message: dict[str, Any]) -> Unique | None:
        """How this publish is deduplicated (its task's or queue's policy, or the message's
        ``celery_msg_unique`` header: true, or ``"start"``), or None. A retry never is: it must
        replace the failed delivery."""
        headers = message.get("headers")
        if not isinstance(headers, dict) or headers.get("retries"):
            return None
        task = headers.get("task")
        name = task if isinstance(task, str) else None
        return unique_for(self.options.policies, name, queue, headers.get(UNIQUE_HEADER))

    def _band(self, message: dict[str, Any]) -> int:
        return band_of(message, self.options.default_priority, self.options.priority_order)
