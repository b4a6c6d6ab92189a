"""The kombu adapter: a virtual transport whose every broker operation is a core call.

With :mod:`celery_msg.qos` (kombu's QoS) and :mod:`celery_msg.routing` (the channel's publish
path) it is the only code that touches kombu's untyped virtual-transport classes; everything
that knows Redis is in :mod:`celery_msg.core`, the drain loop in :mod:`celery_msg.drain`, the
leases a channel holds in :mod:`celery_msg.holdings`, the renewal rounds in
:mod:`celery_msg.renewer`. How kombu's contract maps onto the core:

* ``basic_publish``             -> routing with the exchange's cached binding table, guarded by
  its bindings version (:mod:`celery_msg.routing`); :meth:`Broker.publish` /
  :meth:`Broker.publish_many`
* delivering (``drain_events``) -> :meth:`Broker.reserve`: the fetch *is* the lease
* ``QoS.ack`` / ``QoS.reject``  -> ack, requeue (front of queue) or dead-letter, all fenced,
  as the Celery layer's :class:`~celery_msg.outcome.Outcome` says
* ``QoS.restore_unacked``       -> requeue, without counting the delivery (unless handling it
  raised: then it counts, so ``max_deliveries`` ends a crash loop)
* a background :class:`Renewer` keeps the leases of everything this connection holds alive,
  flushes buffered acks and keeps this consumer's ephemeral (broadcast) bindings alive.

The transport is asynchronous (``implements.asynchronous = True``): a Celery worker registers it
with its event loop and runs ``asynloop`` (see :mod:`celery_msg.eventloop`), so a busy prefork
pool never keeps remote control waiting. Plain kombu consumers call
:meth:`Transport.drain_events`, which blocks in one BLPOP on the wake-up markers of every consumed
queue. Both share the same round (:meth:`~celery_msg.drain.DrainLoop.deliver_round`), so an idle
worker costs nothing either way.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import deque
from queue import Empty
from typing import Any

import redis
from amqp.protocol import queue_declare_ok_t
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.json import loads

from .connection import redis_client
from .core import REDIS_CONNECTION_ERRORS, Binding, Broker, Delivery, Lease, Table
from .deadletters import DeadLetters
from .drain import DrainLoop
from .ephemeral import EphemeralBindings
from .errors import (
    AuthenticationFailed,
    BrokerConnectionError,
    ConfigurationError,
    ScriptError,
)
from .holdings import Holdings
from .messages import checked_envelope, stamp_delivery
from .options import TransportOptions
from .qos import QoS
from .queueargs import QueueArguments
from .renewer import LeaseRenewal
from .routing import RoutingChannel

logger = logging.getLogger(__name__)


class Channel(RoutingChannel):
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
        self.holdings = Holdings(self.broker)
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

    def accept_all(self, deliveries: list[Delivery], granted_at: float | None = None) -> int:
        """Register the leases of a whole reserved batch at once, so the renewer covers every
        message from the moment it is reserved (a solo worker runs the first task inside the
        delivery callback while the others wait); returns how many were accepted.
        ``granted_at``: when the server granted them (monotonic s), if not just now."""
        accepted = 0
        for delivery in deliveries:
            payload = self._accept(delivery, granted_at)
            if payload is not None:
                self._ready.append((payload["properties"]["delivery_tag"], delivery.queue, payload))
                accepted += 1
        return accepted

    def deliver_one(self) -> bool:
        """Hand one reserved message to kombu; one per ``drain_events`` call, so that Celery
        sees a shutdown request between two tasks and the rest go back at close."""
        while self._ready:
            tag, queue, payload = self._ready.popleft()
            if not self.holdings.confirmed(tag):
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

    def _accept(self, delivery: Delivery, granted_at: float | None = None) -> dict[str, Any] | None:
        """Decode one delivery and register its lease; undecodable ones are dead-lettered.

        Anything kombu would fail on later, in the worker's consuming thread (which Celery
        treats as fatal: the worker exits and the message comes back to crash the next one),
        is checked here: the envelope's shape and that the body decodes with its encoding."""
        lease = Lease(delivery.queue, delivery.key, delivery.token)
        try:
            payload = checked_envelope(loads(delivery.payload))
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
        stamp_delivery(
            payload, tag, delivery.queue, delivery.key, delivery.token, delivery.deliveries
        )
        self.holdings.add(tag, lease, granted_at)
        return payload

    def decode_body(self, body: Any, encoding: str | None = None) -> Any:
        """kombu's, but an unknown encoding is an error that says so (not an AttributeError)."""
        if encoding and encoding.lower() != "utf-8" and self.codecs.get(encoding) is None:
            raise ValueError(f"unknown body_encoding {encoding!r}")
        return super().decode_body(body, encoding)

    # -- settling (the leases themselves: holdings.py) ------------------------------------

    def settle_ack(self, tag: str, now: bool = False) -> None:
        """Ack a delivery. In an event loop (a Celery worker) the loop thread writes it at once
        without waiting for the reply (:mod:`celery_msg.acks`); a plain ``drain_events``
        consumer's ack rides on its next fetch (same round trip) or the renewer's next round;
        from pool threads, or with ``now`` (an at-most-once ack, written before the task may
        start), it is written at once and confirmed."""
        if not now and self.transport.in_drain_thread():
            sender = self.transport.ack_sender
            if sender is None:
                self.holdings.buffer_ack_or_log(tag)
            else:
                # Written now, without waiting for the reply (celery_msg.acks).
                self.holdings.ack_through(tag, sender.add)
            return
        if self.holdings.ack_now(tag):
            self.transport.wake_if_waiting()

    def settle_requeue(self, tag: str) -> None:
        """Reject with requeue: back to the front of its band, the delivery counted."""
        self.holdings.requeue(tag)

    def settle_dead(self, tag: str, reason: str, detail: str, **extra: Any) -> None:
        """Reject without requeue: into the queue's dead-letter store, with a reason."""
        self.holdings.dead_letter(tag, reason, detail, **extra)

    def _restore_tags(self, tags: list[str]) -> None:
        """Back to the front, uncounted (never started, or a clean close) unless handling it
        crashed the consumer."""
        crashed = {tag for tag in tags if tag in self._crashed}
        self._crashed.difference_update(crashed)
        self.holdings.restore(tags, crashed)

    def _restore(self, message: Any) -> None:
        self._restore_tags([message.delivery_tag])

    def _restore_at_beginning(self, message: Any) -> None:
        self._restore(message)

    def close(self) -> None:
        if self.transport.abandoned:
            self._close_abandoned()
            return
        if not self.closed:
            self.holdings.flush_acks()
        super().close()
        # Whatever was reserved but never handed to kombu goes back too.
        self._ready.clear()
        self.holdings.requeue_all()

    def _close_abandoned(self) -> None:
        """Close with the connection given up after an error (:meth:`DrainLoop.abandon`): what
        kombu handed to Celery is not restored (this process still runs it; its book lingers);
        what was reserved but never handed over goes back."""
        if not self.closed:
            self.qos.restore_at_shutdown = False
            self.holdings.give_back([tag for tag, _, _ in self._ready])
            self._ready.clear()
        super().close()


class Transport(DrainLoop, LeaseRenewal, virtual.Transport):  # type: ignore[misc]
    """kombu transport for ``celery-msg://`` and ``celery-msgs://`` (TLS) URLs.

    Its drain loop is :class:`~celery_msg.drain.DrainLoop`, its renewal rounds
    :class:`~celery_msg.renewer.LeaseRenewal`."""

    Channel = Channel
    default_port = 6379  # type: ignore[assignment]
    driver_type = "redis"
    driver_name = "redis"
    polling_interval = None  # type: ignore[assignment]  # we block in Redis, never poll

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        batch_publish=True,
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
        self.redis, self.where = redis_client(client, self.options)
        self.broker = Broker(
            self.redis,
            prefix=self.options.key_prefix,
            lease_ms=self.options.lease_ms,
            reclaim_batch=self.options.reclaim_batch,
            max_deliveries=self.options.max_deliveries,
            replication=self.options.replication,
        )
        self.dead_letters = DeadLetters(self.broker)
        self.ephemeral = EphemeralBindings()
        self._init_drain()
        self._init_renewal()

    # -- connection ------------------------------------------------------------------------

    def establish_connection(self) -> Any:
        # A Cluster client has no pool of its own (one per node), nor a database.
        pool = getattr(self.redis, "connection_pool", None)
        params = pool.connection_kwargs if pool is not None else {}
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
            raise BrokerConnectionError(f"cannot reach Redis at {self.where}: {exc}") from exc
        return super().establish_connection()

    def _collect(self, connection: Any) -> None:
        """kombu's ``Connection.collect``: the connection is given up after a connection error
        (Celery then reconnects with a new transport); see :meth:`DrainLoop.abandon`."""
        self.abandon()

    def close_connection(self, connection: Any) -> None:
        if self.abandoned:
            return  # the lingering renewer closes what is left (LeaseRenewal.linger)
        self.unregister_from_event_loop(connection, None)
        self._stop_renewer()
        super().close_connection(connection)
        self.broker.close()
        self.redis.close()
