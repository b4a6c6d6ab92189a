"""The kombu adapter: a virtual transport whose every broker operation is a core call.

This is the only module that touches kombu's untyped virtual-transport classes; everything that
knows Redis is in :mod:`celery_msg.core`. How kombu's contract maps onto the core:

* ``basic_publish``             -> routing with the exchange's cached binding table, guarded by
  its bindings version; :meth:`Broker.publish` / :meth:`Broker.publish_many`
* delivering (``drain_events``) -> :meth:`Broker.reserve`: the fetch *is* the lease
* ``QoS.ack`` / ``QoS.reject``  -> ack, requeue (front of queue) or dead-letter, all fenced
* ``QoS.restore_unacked``       -> requeue, without counting the delivery (unless handling it
  raised: then it counts, so ``max_deliveries`` ends a crash loop)
* a background :class:`Renewer` keeps the leases of everything this connection holds alive,
  flushes buffered acks and keeps this consumer's ephemeral (broadcast) bindings alive.

The transport is asynchronous (``implements.asynchronous = True``): a Celery worker registers it
with its event loop and runs ``asynloop`` (see :mod:`celery_msg.eventloop`), so a busy prefork
pool never keeps remote control waiting. Plain kombu consumers call
:meth:`Transport.drain_events`, which blocks in one BLPOP on the wake-up markers of every consumed
queue. Both share the same round (:meth:`Transport.deliver_round`), so an idle worker costs nothing
either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from queue import Empty
from typing import Any

import redis
from amqp.protocol import queue_declare_ok_t
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.json import JSONEncoder, loads
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import consumers
from .connection import BrokerAddress, redis_params
from .core import (
    REDIS_CONNECTION_ERRORS,
    Binding,
    Broker,
    Delivery,
    Lease,
    ReserveRequest,
    Route,
    Table,
)
from .deadletters import DeadLetters
from .ephemeral import EphemeralBindings
from .errors import (
    AuthenticationFailed,
    BrokerConnectionError,
    CeleryMsgError,
    ConfigurationError,
    ScriptError,
    StaleRoute,
)
from .eventloop import EventLoopDrain
from .headers import FIRST_FAILURE_HEADER, UNIQUE_HEADER, due_ms, is_retry
from .holdings import Holdings
from .keys import wake_key
from .messages import band_of, message_id
from .options import TransportOptions, to_ms
from .policy import Unique, unique_for
from .queueargs import QueueArguments
from .renewer import Renewer

logger = logging.getLogger(__name__)

#: kombu's ``dumps`` builds a ``JSONEncoder`` per call; one instance gives the same output.
dumps = JSONEncoder().encode


class QoS(virtual.QoS):
    """Prefetch accounting (kombu's) plus settlement of deliveries in Redis (ours)."""

    restore_at_shutdown = True

    def ack(self, delivery_tag: str) -> None:
        message = self._delivered.get(delivery_tag)
        if not getattr(message, "settled", False):  # else acked in Redis on receipt already
            self.channel.settle_ack(delivery_tag)
        super().ack(delivery_tag)
        self.channel.transport.note_room()

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        message = self._delivered.get(delivery_tag)
        if getattr(message, "settled", False):
            pass  # acked in Redis on receipt (ack mode early): nothing left to settle
        elif requeue:
            self.channel.settle_requeue(delivery_tag)
        elif getattr(message, "drop_on_reject", False):
            # Its policy keeps no dead letters: the worker recorded the failure; drop it.
            self.channel.settle_ack(delivery_tag)
        else:
            record = getattr(message, "dead_letter_reason", None) or (
                "rejected",
                "the consumer rejected the message without requeue",
            )
            reason, detail, *extra = record
            self.channel.settle_dead(delivery_tag, reason, detail, **(extra[0] if extra else {}))
        self._quick_ack(delivery_tag)
        self.channel.transport.note_room()

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Return every unacked delivery to the front of its queue, in one batched call."""
        self._flush()
        tags = [tag for tag in self._delivered if tag not in self._dirty]
        self._delivered.clear()
        try:
            self.channel._restore_tags(tags)
        except BrokerConnectionError as exc:
            # Not lost: their leases expire and any live consumer reclaims them.
            logger.warning(
                "could not return %d unacked messages (%s); they come back when their "
                "leases expire",
                len(tags),
                exc,
            )
        return []

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: expired leases are reclaimed by every fetch."""


class Channel(virtual.Channel):
    """One kombu channel; leases and buffered acks are per channel."""

    QoS = QoS
    supports_fanout = True
    do_restore = True
    min_priority = 0
    max_priority = 255

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.transport: Transport = connection
        self.broker: Broker = connection.broker
        self.options: TransportOptions = connection.options
        self.consumer_id = f"{connection.consumer_id}/{self.channel_id}"
        # kombu fills in `priority or default_priority` when publishing.
        self.default_priority = self.options.default_priority
        self.holdings = Holdings()
        self.ephemeral: EphemeralBindings = connection.ephemeral
        #: Queues declared with ``expires`` -> it (ms): a live consumer touches them.
        self._expires: dict[str, int] = {}
        #: Queues whose arguments this channel knows (it declared them or read them).
        self._known: set[str] = set()
        self._no_ack: set[str] = set()
        self._crashed: set[str] = set()
        self._ready: deque[tuple[str, str, dict[str, Any]]] = deque()
        self._tables: dict[str, tuple[float, Table]] = {}
        self._types: dict[str, tuple[float, str]] = {}
        self._start = 0

    # -- kombu's storage contract ----------------------------------------------------------

    def prepare_queue_arguments(self, arguments: Any, **kwargs: Any) -> Any:
        """kombu's ``Queue(message_ttl=, expires=, max_length=)`` as AMQP arguments (``x-...``,
        times in ms), as for RabbitMQ; the virtual transport's default drops them."""
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        """kombu's, except that a passive declaration of an existing queue changes nothing
        (kombu's would declare it again, without its arguments)."""
        if passive and queue and self._has_queue(queue):
            return queue_declare_ok_t(queue, self._size(queue), 0)
        return super().queue_declare(queue, passive=passive, **kwargs)

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        args = QueueArguments.from_amqp(kwargs.get("arguments"))
        self.broker.declare(queue, args)
        self._remember(queue, args)
        if kwargs.get("auto_delete") or args.expires_ms is not None:
            # Its binding outlives its last consumer by `expires`, else by binding_ttl.
            ttl = self.options.binding_ttl_ms if args.expires_ms is None else args.expires_ms
            self.ephemeral.declare(queue, ttl)

    def _remember(self, queue: str, args: QueueArguments) -> None:
        self._known.add(queue)
        if args.expires_ms is None:
            self._expires.pop(queue, None)
        else:
            self._expires[queue] = args.expires_ms

    def expiring_queues(self) -> dict[str, int]:
        """The consumed queues declared with ``expires`` -> it (ms): this consumer uses them."""
        return {q: self._expires[q] for q in self._active_queues if q in self._expires}

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self.broker.exists(queue)

    def _size(self, queue: str) -> int:
        try:
            return self.broker.size(queue)
        except ScriptError as exc:
            # A corrupt queue must not keep a worker from starting on its other queues (kombu
            # asks for the size when it declares): its scripts fail and are reported later.
            logger.error("queue %s: cannot read its size (a key of it is corrupt?): %s", queue, exc)
            return 0

    def _purge(self, queue: str) -> int:
        return self.broker.purge(queue)

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        """Delete ``queue`` in Redis even when this connection never bound it."""
        if if_empty and self._size(queue):
            return
        super().queue_delete(queue, if_unused=if_unused, if_empty=if_empty, **kwargs)
        self.ephemeral.forget_queue(queue)
        self.broker.unbind_queue(queue)
        self.broker.delete(queue)
        self._tables.clear()
        # Deliveries of the queue still held or with an ack buffered (a reply queue is deleted
        # as soon as its reply arrives, before the buffered ack of that reply is written)
        # went with it: settling them later would be refused and logged as a lost lease.
        for channel in self.transport.channels:
            channel.holdings.drop_queue(queue)

    def _delete(
        self, queue: str, exchange: str, routing_key: str, pattern: str, *args: Any, **kwargs: Any
    ) -> None:
        """kombu's per-binding hook of ``queue_delete``: only this channel's own bookkeeping;
        ``queue_delete`` removes the queue and all its bindings in Redis once."""
        self.ephemeral.discard(exchange, Binding(routing_key or "", pattern or "", queue))

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        binding = Binding(routing_key or "", pattern or "", queue)
        ttl = self.ephemeral.ttl_of(queue)
        if ttl is not None:
            self.broker.bind(exchange, binding, ttl)
            self.ephemeral.add(exchange, binding)
        else:
            self.broker.bind(exchange, binding)
        self._tables.pop(exchange, None)

    def exchange_declare(  # type: ignore[override]
        self, exchange: str | None = None, type: str = "direct", **kwargs: Any
    ) -> None:
        super().exchange_declare(exchange, type, **kwargs)
        if exchange and not kwargs.get("passive"):
            self.broker.declare_exchange(exchange, type or "direct")

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
        queues it names, so it is routed again with a fresh table (never twice into a queue)."""
        self._inplace_augment_message(message, exchange, routing_key)
        if not exchange:  # the default exchange: the routing key names the queue
            self._put(routing_key, message, **kwargs)
            return
        kind = self.typeof(exchange)
        stored: set[str] = set()
        fresh = False
        for _ in range(ROUTE_ATTEMPTS):
            table, cached = self._table(exchange, fresh=fresh)
            rows = [(b.routing_key, b.pattern, b.queue) for b in table.bindings]
            if kind.type == "fanout":
                queues = {queue for _, _, queue in rows}
            else:
                queues = set(kind.lookup(rows, exchange, routing_key, None))
            targets = sorted(q for q in queues if q and q not in stored)
            if not targets and cached:
                # Nothing to write means no version check: a cached table that routes nowhere
                # may lack a binding made since (a reply queue bound just before the request).
                fresh = True
                continue
            try:
                self._publish_routed(targets, message, table.route)
                return
            except StaleRoute as exc:
                stored.update(q for q in targets if q not in exc.refused)
                fresh = True
        raise StaleRoute(exchange, [])  # bindings changing faster than we can read them

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
            )

    def _put(
        self, queue: str, message: dict[str, Any], route: Route | None = None, **kwargs: Any
    ) -> None:
        _stamp_first_failure(message, self.broker.now_ms)  # before dumps
        unique = self._unique(queue, message)
        self.broker.publish(
            queue,
            message_id(message),
            dumps(message),
            self._band(message),
            due_ms=due_ms(message),
            unique=unique is not None,
            lock_until_ms=0 if unique is None else self.broker.now_ms() + to_ms(unique.ttl),
            route=route,
            retry=is_retry(message),
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

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        """``basic_get``: lease one message, synchronously (skipping undecodable ones)."""
        if queue in self._expires:
            self.broker.touch({queue: self._expires[queue]})  # a get is a use (RabbitMQ)
        while True:
            deliveries = self.broker.reserve([queue], 1, self.consumer_id)
            if not deliveries:
                raise Empty()
            payload = self._accept(deliveries[0])
            if payload is not None:
                return payload

    # -- delivering ------------------------------------------------------------------------

    def consumable(self) -> bool:
        return bool(self._active_queues) and self.want() > 0

    def want(self) -> int:
        """How many more messages this channel may reserve (prefetch minus what it holds)."""
        estimate = self.qos.can_consume_max_estimate()
        limit = (
            self.options.fetch_batch
            if estimate is None
            else min(estimate, self.options.fetch_batch)
        )
        return max(0, int(limit) - len(self._ready))

    def next_start(self) -> int:
        """Round-robin start position for fair order across this channel's queues."""
        self._start = (self._start + 1) % max(1, len(self._active_queues))
        return self._start

    def accept_all(self, deliveries: list[Delivery]) -> int:
        """Register the leases of a whole reserved batch at once, so the renewer covers every
        message from the moment it is reserved (a solo worker runs the first task inside the
        delivery callback while the others wait); returns how many were accepted."""
        accepted = 0
        for delivery in deliveries:
            payload = self._accept(delivery)
            if payload is not None:
                self._ready.append((payload["properties"]["delivery_tag"], delivery.queue, payload))
                accepted += 1
        return accepted

    def deliver_one(self) -> bool:
        """Hand one reserved message to kombu; one per ``drain_events`` call, so that Celery
        sees a shutdown request between two tasks and the rest go back at close."""
        while self._ready:
            tag, queue, payload = self._ready.popleft()
            if not self.holdings.holds(tag):
                logger.warning(
                    "queue %s delivery %s dropped before handing over: lease lost", queue, tag
                )
                continue
            if queue in self._no_ack:
                # At-most-once consumer (e.g. Celery's remote-control mailbox): settled on
                # receipt, with the next round trip.
                self.settle_ack(tag)
            self.hand_over(tag, queue, payload)
            return True
        return False

    def hand_over(self, tag: str, queue: str, payload: dict[str, Any]) -> None:
        """Give one message to kombu's callbacks. If handling it raises (the consumer's own
        code, a malformed message Celery chokes on), the delivery is marked: restoring it at
        the shutdown that follows counts it, so ``max_deliveries`` ends a crash loop."""
        try:
            self.connection._deliver(payload, queue)
        except BaseException:
            self._crashed.add(tag)
            raise

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self.settle_ack(message.delivery_tag)
        return message

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if queue not in self._known:
            # Declared by another channel or process: keep it alive too while consuming it.
            self._remember(queue, self.broker.queue_arguments(queue))
        if no_ack:
            self._no_ack.add(queue)
        else:
            self._no_ack.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _accept(self, delivery: Delivery) -> dict[str, Any] | None:
        """Decode one delivery and register its lease; undecodable ones are dead-lettered.

        Anything kombu would fail on later, in the worker's consuming thread (which Celery
        treats as fatal: the worker exits and the message comes back to crash the next one),
        is checked here: the envelope's shape and that the body decodes with its encoding."""
        lease = Lease(delivery.queue, delivery.key, delivery.token)
        try:
            payload = _checked_envelope(delivery.payload)
            props = payload["properties"]
            self.decode_body(payload["body"], props.get("body_encoding"))
        except Exception as exc:
            logger.error(
                "queue %s message %s: undecodable, dead-lettered: %r",
                delivery.queue,
                delivery.key,
                exc,
            )
            self.broker.dead_letter(lease, "undecodable", f"{type(exc).__name__}: {exc}")
            return None
        tag = f"{delivery.token}@{delivery.queue}"
        props["delivery_tag"] = tag
        info = props["delivery_info"]
        info["delivery_count"] = delivery.deliveries
        info["queue"] = delivery.queue
        info["message_key"] = delivery.key
        payload["redelivered"] = info["redelivered"] = delivery.deliveries > 1
        self.holdings.add(tag, lease)
        return payload

    def decode_body(self, body: Any, encoding: str | None = None) -> Any:
        """kombu's, but an unknown encoding is an error that says so (not an AttributeError)."""
        if encoding and encoding.lower() != "utf-8" and self.codecs.get(encoding) is None:
            raise ValueError(f"unknown body_encoding {encoding!r}")
        return super().decode_body(body, encoding)

    # -- settling --------------------------------------------------------------------------

    def settle_ack(self, tag: str, now: bool = False) -> None:
        """Ack a delivery. From the consuming thread the ack rides on its next fetch (same
        round trip) or the renewer's next round; from pool threads, or with ``now`` (an
        at-most-once ack, written before the task may start), it is written at once."""
        if not now and self.transport.in_drain_thread():
            if not self.holdings.buffer_ack(tag):
                _log_ignored(tag, "ack")
            return
        lease = self._release(tag, "ack")
        if lease is not None:
            _log_lost(self.broker.ack([lease]), "ack")
            self.transport.wake_if_waiting()

    def settle_requeue(self, tag: str) -> None:
        """Reject with requeue: back to the front of its band, the delivery counted."""
        lease = self._release(tag, "requeue")
        if lease is not None:
            _log_lost(self.broker.requeue([lease]), "requeue")

    def settle_dead(self, tag: str, reason: str, detail: str, **extra: Any) -> None:
        """Reject without requeue: into the queue's dead-letter store, with a reason."""
        lease = self._release(tag, "dead-letter")
        if lease is None:
            return
        if self.broker.dead_letter(lease, reason, detail, **extra):
            logger.warning(
                "queue %s message %s dead-lettered: %s: %s", lease.queue, lease.key, reason, detail
            )
        else:
            _log_lost([lease], "dead-letter")

    def _release(self, tag: str, action: str) -> Lease | None:
        lease = self.holdings.settle(tag)
        if lease is None:
            _log_ignored(tag, action)
        return lease

    def _restore_tags(self, tags: list[str]) -> None:
        """Back to the front, uncounted (never started, or a clean close) unless handling it
        crashed the consumer."""
        crashed = [tag for tag in tags if tag in self._crashed]
        self._crashed.difference_update(crashed)
        plain = [tag for tag in tags if tag not in crashed]
        _log_lost(self.broker.requeue(self.holdings.settle_many(plain), uncount=True), "restore")
        if crashed:
            leases = self.holdings.settle_many(crashed)
            for lease in leases:
                logger.warning(
                    "queue %s message %s: its handling raised; back in the queue, counted as a "
                    "delivery",
                    lease.queue,
                    lease.key,
                )
            _log_lost(self.broker.requeue(leases), "restore")

    def _restore(self, message: Any) -> None:
        self._restore_tags([message.delivery_tag])

    def _restore_at_beginning(self, message: Any) -> None:
        self._restore(message)

    def close(self) -> None:
        if not self.closed:
            acks = self.holdings.take_acks()
            try:
                _log_lost(self.broker.ack(acks), "ack")
            except BrokerConnectionError as exc:
                logger.warning("could not flush %d acks at close: %s", len(acks), exc)
        super().close()
        # Whatever was reserved but never handed to kombu goes back too.
        self._ready.clear()
        leftovers = self.holdings.take_all()
        if leftovers:
            with contextlib.suppress(BrokerConnectionError):
                self.broker.requeue(leftovers, uncount=True)


def _checked_envelope(raw: bytes) -> dict[str, Any]:
    """A stored kombu message, its shape checked (ValueError says what is wrong); a missing
    ``delivery_info`` is added."""
    payload = loads(raw)
    if not isinstance(payload, dict) or "body" not in payload:
        raise ValueError("not a kombu message (no body)")
    props = payload.get("properties")
    if not isinstance(props, dict):
        raise ValueError("properties is not a mapping")
    info = props.setdefault("delivery_info", {})
    if not isinstance(info, dict):
        raise ValueError("properties.delivery_info is not a mapping")
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise ValueError("headers is not a mapping")
    for field in ("content-type", "content-encoding"):
        if payload.get(field) is not None and not isinstance(payload[field], str):
            raise ValueError(f"{field} is not a string")
    return payload


def _stamp_first_failure(message: dict[str, Any], now_ms: Callable[[], int]) -> None:
    """A Celery retry carries the time of the task's first failure (Celery copies headers from
    retry to retry), for the dead-letter record should its retries run out."""
    headers = message.get("headers")
    if headers and headers.get("retries"):
        headers.setdefault(FIRST_FAILURE_HEADER, now_ms())


def _log_ignored(tag: str, action: str) -> None:
    logger.warning("delivery %s: %s ignored, its lease was lost", tag, action)


def _log_lost(lost: list[Lease], action: str) -> None:
    for lease in lost:
        logger.warning(
            "queue %s message %s: %s refused, lease lost (token %d): it was presumed dead and "
            "redelivered, or purged",
            lease.queue,
            lease.key,
            action,
            lease.token,
        )


#: How often one publish routes again after finding its binding table stale.
ROUTE_ATTEMPTS = 5

#: Seconds between two trims of the consumed queues' dead-letter stores (by the renewer).
TRIM_INTERVAL = 60.0

#: How long before a due time a consumer stops blocking in Redis and sleeps in the client:
#: Redis ends a blocking command's timeout up to 1/hz (100 ms by default) late.
DUE_SLACK = 0.1


class Transport(virtual.Transport):
    """kombu transport for ``celery-msg://`` and ``celery-msgs://`` (TLS) URLs."""

    Channel = Channel
    default_port = 6379  # type: ignore[assignment]
    driver_type = "redis"
    driver_name = "redis"
    polling_interval = None  # type: ignore[assignment]  # we block in Redis, never poll

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    connection_errors = (
        *virtual.Transport.connection_errors,
        BrokerConnectionError,
        *REDIS_CONNECTION_ERRORS,
        socket.error,
    )
    channel_errors = (  # type: ignore[assignment]
        *virtual.Transport.channel_errors,
        ScriptError,
        redis.ResponseError,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        self.options = TransportOptions.from_mapping(client.transport_options or {})
        super().__init__(client, **kwargs)
        self.consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # No retries inside redis-py: a script whose reply was lost must not silently run twice
        # (a second publish, a second fetch), and outages must surface at once so that kombu and
        # Celery reconnect with their own backoff.
        params = redis_params(BrokerAddress.from_kombu(client), self.options)
        self.redis = redis.Redis(**params, retry=Retry(NoBackoff(), 0))
        self.broker = Broker(
            self.redis,
            prefix=self.options.key_prefix,
            lease_ms=self.options.lease_ms,
            reclaim_batch=self.options.reclaim_batch,
            max_deliveries=self.options.max_deliveries,
        )
        self.dead_letters = DeadLetters(self.broker)
        self.ephemeral = EphemeralBindings()
        self.wake_key = wake_key(self.options.key_prefix, self.consumer_id)
        self._drain_thread: int | None = None
        self._waiting_for_room = False
        self._renewer: Renewer | None = None
        #: Queues this consumer heartbeats on (counted as attached to them).
        self._attached: set[str] = set()
        self._turn = 0
        self._holding = False
        self._next_due_ms: int | None = None
        self._next_trim = 0.0
        self._event_loop: EventLoopDrain | None = None
        self._room = False

    # -- connection ------------------------------------------------------------------------

    def establish_connection(self) -> Any:
        params = self.redis.connection_pool.connection_kwargs
        try:
            self.redis.ping()
        except redis.AuthenticationError as exc:
            raise AuthenticationFailed(
                f"Redis refused the credentials of the broker URL "
                f"(user {params.get('username') or 'default'!r}): {exc}"
            ) from exc
        except redis.ResponseError as exc:
            raise ConfigurationError(
                f"Redis refused the broker URL's database {params.get('db')!r}: {exc}"
            ) from exc
        except REDIS_CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(
                f"cannot reach Redis at {params.get('host')}:{params.get('port')}: {exc}"
            ) from exc
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        self.unregister_from_event_loop(connection, None)
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = None
        with contextlib.suppress(CeleryMsgError):  # its heartbeats run out on their own
            consumers.detach(self.broker, self.consumer_id, self._attached)
        self._attached = set()
        super().close_connection(connection)
        self.broker.close()
        self.redis.close()

    def hold_deliveries(self) -> None:
        """Deliver nothing more (a warm shutdown began); reserved messages go back at close.

        Celery's loop drains once more after it sees the stop flag; without this, a solo
        worker would start one more prefetched task while it is shutting down.
        """
        self._holding = True

    def _take_acks(self) -> list[Lease]:
        return [lease for channel in self.channels for lease in channel.holdings.take_acks()]

    def _flush_acks(self) -> None:
        acks = self._take_acks()
        if acks:
            _log_lost(self.broker.ack(acks), "ack")

    def in_drain_thread(self) -> bool:
        return self._drain_thread == threading.get_ident()

    def wake_if_waiting(self) -> None:
        """Wake the draining thread if it sleeps because prefetch was full (an ack freed room)."""
        if self._event_loop is not None:
            self._event_loop.kick()
        elif self._waiting_for_room:
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.lpush(self.wake_key, 1)
                pipe.expire(self.wake_key, 60)
                pipe.execute()
            except REDIS_CONNECTION_ERRORS:
                pass

    def _ensure_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            # Counted as attached from the start, not from the renewer's first round; only
            # metrics read it, so a failure here never stops consuming (the renewer retries).
            try:
                self._attach({q for c in self.channels for q in c._active_queues})
            except CeleryMsgError as exc:
                logger.warning("could not mark this consumer attached to its queues: %s", exc)
            self._renewer = Renewer(self, self.consumer_id)
            self._renewer.start()

    def _attach(self, queues: set[str]) -> None:
        """Heartbeat on the consumed ``queues`` (see :mod:`celery_msg.consumers`); leave the
        ones no longer consumed."""
        left = self._attached - queues
        if left:
            consumers.detach(self.broker, self.consumer_id, left)
        consumers.heartbeat(self.broker, self.consumer_id, queues, self.options.lease_ms)
        self._attached = set(queues)

    def renew(self) -> None:
        """One renewal round: flush buffered acks, renew leases, refresh bindings."""
        channels = list(self.channels)
        self._flush_acks()
        held = [lease for channel in channels for lease in channel.holdings.renewable()]
        lost = self.broker.extend(held)
        if lost:
            _log_lost(lost, "renew")
            for channel in channels:
                channel.holdings.forget(lost)
        # Renewed while any channel consumes the queue, whichever channel bound it.
        consumed = {queue for channel in channels for queue in channel._active_queues}
        bindings = self.ephemeral.live(consumed)
        if bindings:
            self.broker.refresh_bindings(bindings)
        expiring = {q: ms for channel in channels for q, ms in channel.expiring_queues().items()}
        self.broker.touch(expiring)
        self.broker.expire_queues()
        queues = {queue for channel in channels for queue in channel._active_queues}
        if queues and time.monotonic() >= self._next_trim:
            # Retention is counted in days: once a minute is plenty.
            self._next_trim = time.monotonic() + TRIM_INTERVAL
            self.dead_letters.trim({queue: self._retention(queue) for queue in queues})
        self._attach(queues)  # last: only metrics depend on it

    def renew_interval(self) -> float:
        """Seconds between renewal rounds: a third of the shortest of the lease, the binding
        TTL and the ``expires`` of a consumed queue, so none runs out while this consumer
        lives."""
        shortest = min(self.options.lease_timeout, self.options.binding_ttl)
        for channel in list(self.channels):
            for ms in channel.expiring_queues().values():
                shortest = min(shortest, ms / 1000.0)
        return shortest / 3

    def _retention(self, queue: str) -> tuple[int, int]:
        """(most entries, most age in ms) of ``queue``'s dead-letter store; 0 = unbounded."""
        policy = self.options.policies.resolve(None, queue).dead_letter
        max_age = 0 if policy.max_age is None else to_ms(policy.max_age)
        return policy.max_length or 0, max_age

    # -- draining --------------------------------------------------------------------------

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Drain inside ``loop`` (a kombu ``Hub``): Celery's worker calls this on every
        (re)connection, then runs ``asynloop`` instead of calling :meth:`drain_events`."""
        if self._event_loop is not None:
            self._event_loop.close()
        self._event_loop = EventLoopDrain(self, loop)

    def unregister_from_event_loop(self, connection: Any, loop: Any) -> None:
        if self._event_loop is not None:
            self._event_loop.close()
            self._event_loop = None

    def on_readable(self, fileno: int) -> None:  # type: ignore[override]
        """kombu's hook for a readable socket of this transport (the BLPOP in flight)."""
        if self._event_loop is not None:
            self._event_loop.on_readable(fileno)

    def drain_events(  # type: ignore[override]
        self, connection: Any, timeout: float | None = None
    ) -> None:
        """Deliver at least one message, or raise ``socket.timeout`` after ``timeout``."""
        self.start_draining()
        if self._holding:
            self._flush_acks()
            raise TimeoutError()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.deliver_one():
                return
            if self.deliver_round() and self.deliver_one():
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError()
            wait = self.options.sweep_interval
            if deadline is not None:
                wait = min(wait, deadline - now)
            due_in = self._due_in()
            if due_in is not None and due_in <= wait:
                if due_in <= DUE_SLACK:
                    # Too close for a blocking timeout: Redis checks those about every 100 ms
                    # (hz 10), so BLPOP would wake up to that late. Sleep here instead.
                    time.sleep(due_in)
                    continue
                wait = due_in - DUE_SLACK
            self._wait(max(wait, 0.001))

    # The draining half that both drain_events and the event loop use (eventloop.Drainable).

    def start_draining(self) -> None:
        """The calling thread is the consumer thread (its acks ride on the next round)."""
        self._drain_thread = threading.get_ident()
        self._ensure_renewer()

    def holding(self) -> bool:
        return self._holding

    def has_buffered_acks(self) -> bool:
        return any(channel.holdings.has_acks() for channel in self.channels)

    def flush_acks(self) -> None:
        self._flush_acks()

    def next_due_ms(self) -> int | None:
        return self._next_due_ms

    def wake(self) -> None:
        """End the wait of this consumer's BLPOP in flight (it watches the wake key)."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.lpush(self.wake_key, 1)
            pipe.expire(self.wake_key, 60)
            pipe.execute()
        except REDIS_CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"waking the consumer: Redis unreachable: {exc}") from exc

    def deliver_round(self) -> bool:
        """One round trip: flush buffered acks and reserve for every consumable channel.

        Reserving also reclaims expired leases of the queues, so an idle consumer, woken at
        least every ``sweep_interval``, brings a dead consumer's messages back.
        """
        acks = self._take_acks()
        channels = [c for c in self.channels if c.consumable()]
        requests = [
            ReserveRequest(
                list(c._active_queues),
                c.want(),
                c.consumer_id,
                self.options.queue_order,
                c.next_start(),
            )
            for c in channels
        ]
        round_ = self.broker.settle_and_reserve(acks, requests)
        _log_lost(round_.lost, "ack")
        # Only a round that asked for messages learns when the next one is due; a full consumer
        # must not wake early for messages it could not take anyway.
        self._next_due_ms = round_.next_due_ms if requests else None
        accepted = zip(channels, round_.deliveries, strict=True)
        return sum(c.accept_all(d) for c, d in accepted) > 0

    def _due_in(self) -> float | None:
        """Seconds until the next scheduled message of the consumed queues falls due (the next
        round then promotes and delivers it), or None when nothing is scheduled."""
        if self._next_due_ms is None:
            return None
        return max(0.0, self._next_due_ms / 1000.0 - time.time())

    def deliver_one(self) -> bool:
        """Hand over one already reserved message, taking channels in turn."""
        channels = list(self.channels)
        for i in range(len(channels)):
            channel = channels[(self._turn + i) % len(channels)]
            if channel.deliver_one():
                self._turn = (self._turn + i + 1) % len(channels)
                return True
        return False

    def room_for_a_batch(self) -> bool:
        """Whether a channel with a prefetch limit may take at least half of it: then a round
        for buffered acks refills a worthwhile batch (channels without a limit, such as the
        remote-control mailbox, are woken by their queue's signal instead)."""
        for channel in self.channels:
            limit = channel.qos.prefetch_count
            if limit and channel._active_queues and channel.want() >= max(1, limit // 2):
                return True
        return False

    def note_room(self) -> None:
        """A delivery was settled, so prefetch has room again: the event loop looks (and is
        woken when this runs in another thread, e.g. a threads pool)."""
        self._room = True
        if self._event_loop is not None and not self.in_drain_thread():
            self._event_loop.kick()

    def room_freed(self) -> bool:
        room, self._room = self._room, False
        return room

    def wait_keys(self) -> list[str]:
        """The keys to BLPOP on: this consumer's wake key and the signal of every queue a
        channel may take a message from; ``[]`` when none may (prefetch full, no consumer)."""
        queues = [
            q
            for c in self.channels
            if c._active_queues and c.consumable()
            for q in c._active_queues
        ]
        if not queues:
            return []
        return [self.wake_key] + [self.broker.keys(q).signal for q in dict.fromkeys(queues)]

    def _wait(self, timeout: float) -> None:
        """Sleep until a consumed queue may have something, an ack frees room, or timeout."""
        keys = self.wait_keys() or [self.wake_key]
        self._waiting_for_room = any(
            channel._active_queues and not channel.consumable() for channel in self.channels
        )
        try:
            self.redis.blpop(keys, timeout=timeout)
        except REDIS_CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"waiting for messages: Redis unreachable: {exc}") from exc
        finally:
            self._waiting_for_room = False
