"""Bulk publishing: ``with celery_msg.bulk(app):`` buffers every task message this thread
publishes and sends them as pipelined rounds of publish scripts.

One publish is one round trip (kombu's contract: ``publish`` returns when Redis holds the
message). Inside the block the guarantee moves to the block's edge: leaving it returns only
when Redis holds every message published inside, or raises :class:`BulkPublishError` naming
those it could not confirm. Meanwhile messages wait in this process (up to ``batch`` of them;
a full batch is written at once and its replies are read while the next one fills), so a
process that dies inside the block loses what it had not sent, as a process that dies before
calling ``publish`` would.

Exactly once into Redis, also across a lost connection: a message whose reply was lost (Redis
restarted, the link dropped) may or may not be stored. It is sent again as a *unique* publish
(ARGV[5] of publish.lua): stored if absent, a no-op while its id is pending (ready, reserved or
scheduled) in that queue; a message with a :class:`~celery_msg.policy.Unique` policy keeps its
lock, which refuses the resend. Two limits: a Celery retry message (``retries`` header) is sent
again as a plain publish (its id is pending by design: the failed delivery is still leased),
and a message consumed *and acked* between the lost reply and the resend is stored again.

Threads: the buffer belongs to the thread that opened the block. A publish from another thread
goes out at once, as outside any block, even on the same connection or channel: the block sends
on a connection of its own and only reads the channel's routing table.

Only Celery task messages (a ``task`` header) are buffered: remote control, events and replies
go out at once, so a ``celery inspect`` inside the block still gets its answers. An exception
inside the block still sends what was published before it (as without the block).

kombu's own ``Producer.batch()`` (kombu >= 5.7) uses the same buffer (:class:`PublishBatch`),
for every message of that producer.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .bulk_senders import ClusterSender, Entry, Origin, Sender, Status, Unsent
from .errors import CeleryMsgError, ConfigurationError
from .registration import URL_SCHEMES

if TYPE_CHECKING:
    from celery import Celery

    from .core import Outgoing, Route
    from .routing import RoutingChannel as Channel

logger = logging.getLogger(__name__)

#: Messages per pipelined round (and most messages kept in this process at a time).
DEFAULT_BATCH = 1000

#: Times a stale route is routed again within one flush (as :data:`transport.ROUTE_ATTEMPTS`).
ROUTE_ATTEMPTS = 5

#: On a Cluster, rounds of sending again what a node redirected (MOVED, ASK) or asked to try
#: again (TRYAGAIN while a queue's keys are split by a slot migration, CLUSTERDOWN) within one
#: flush; the n-th waits ``min(REDIRECT_WAIT_MAX, n * REDIRECT_WAIT_STEP)`` seconds first.
REDIRECT_ATTEMPTS = 60
REDIRECT_WAIT_STEP = 0.01
REDIRECT_WAIT_MAX = 0.1


_local = threading.local()

T = TypeVar("T")

#: Per app, what a block of it does when it opens: each opener returns what to do when it
#: closes (:mod:`celery_msg.send_template` sets the app's ``send_task`` only meanwhile).
_openers: weakref.WeakKeyDictionary[Celery, list[Callable[[], Callable[[], None]]]] = (
    weakref.WeakKeyDictionary()
)


def on_open(app: Celery, opener: Callable[[], Callable[[], None]]) -> None:
    """Run ``opener`` when a bulk block of ``app`` opens, and what it returns when it closes
    (not for a block that joins an open one)."""
    _openers.setdefault(app, []).append(opener)


def bulk_buffer(message: dict[str, Any]) -> Buffer | None:
    """The open block's buffer if this thread is inside one and ``message`` is a task; the
    transport's publish hook (every publish calls it, so it is cheap when no block is open)."""
    buffer: Buffer | None = getattr(_local, "buffer", None)
    if buffer is None:
        return None
    headers = message.get("headers")
    return buffer if isinstance(headers, dict) and "task" in headers else None


def current_buffer() -> Buffer | None:
    """The buffer of the bulk block open in this thread, if any."""
    buffer: Buffer | None = getattr(_local, "buffer", None)
    return buffer


class BulkPublishError(CeleryMsgError):
    """Leaving a bulk block, some messages were not confirmed as stored (see ``unsent``).

    Those lost in a dropped connection may be stored or not; :meth:`retry` sends them again
    (unique: none is stored twice) and raises this again for any still unconfirmed. Messages
    a script refused (``reason`` has the Redis error) are sent again too."""

    def __init__(self, unsent: list[Unsent], retry: Buffer) -> None:
        shown = ", ".join(f"{u.message_id} -> {u.queue}" for u in unsent[:10])
        more = f" and {len(unsent) - 10} more" if len(unsent) > 10 else ""
        super().__init__(
            f"{len(unsent)} messages not confirmed as stored ({shown}{more}); "
            f"first reason: {unsent[0].reason}"
        )
        self.unsent = unsent
        self._buffer = retry

    def retry(self) -> None:
        """Send the unconfirmed messages again (unique publishes); raises this error again,
        naming those still unconfirmed."""
        try:
            self._buffer.flush()
        finally:
            self._buffer.close()


@dataclass(frozen=True)
class RetryPolicy:
    """How a flush sends again the messages whose reply was lost (the fields of Celery's
    ``task_publish_retry_policy``): up to ``max_retries`` rounds, waiting ``interval_start``
    seconds before the first, ``interval_step`` more before each next, at most
    ``interval_max`` (defaults: Celery's)."""

    max_retries: int = 3
    interval_start: float = 0.0
    interval_step: float = 0.2
    interval_max: float = 1.0

    @classmethod
    def of(cls, app: Celery) -> RetryPolicy:
        """The app's: ``task_publish_retry`` (off: no retries) and its policy."""
        if not app.conf.task_publish_retry:
            return cls(max_retries=0)
        given = dict(app.conf.task_publish_retry_policy or {})
        names = ("max_retries", "interval_start", "interval_step", "interval_max")
        return cls(**{name: given[name] for name in names if given.get(name) is not None})

    def wait(self, attempt: int) -> float:
        return min(self.interval_max, self.interval_start + attempt * self.interval_step)


class Buffer:
    """The messages of one bulk block (one thread) not yet confirmed."""

    def __init__(self, batch: int, policy: RetryPolicy) -> None:
        self.batch = batch
        self.policy = policy
        self._pending: list[Entry] = []
        self._again: list[Entry] = []
        self._senders: dict[int, Sender | ClusterSender] = {}
        self._held: dict[int, tuple[Any, Callable[[Any], None]]] = {}
        self._oldest = 0.0
        #: The longest a message of this buffer waited in the process before it was written
        #: (seconds): the window the block opens (the guarantee moves to the block's edge).
        self.longest_wait = 0.0
        #: Messages added so far, the last one and its entries (:mod:`celery_msg.group_template`
        #: takes its templates from them).
        self.added = 0
        self.last: Origin | None = None
        self.last_entries: list[Entry] = []

    def add(self, channel: Channel, message: dict[str, Any], exchange: str, key: str) -> None:
        """Route ``message`` as :meth:`Channel.basic_publish` would and buffer it for each of
        its queues; a full batch is written at once."""
        origin = self._origin(channel, message, exchange, key)
        start = len(self._pending)
        self._route(origin, fresh=False)
        self.last_entries = self._pending[start:]
        self._full()

    def add_routed(
        self,
        channel: Channel,
        message: dict[str, Any],
        exchange: str,
        key: str,
        routed: Sequence[tuple[Outgoing, Route | None]],
    ) -> None:
        """Buffer ``message`` with its entries already made (each queue's :class:`Outgoing`
        and route, as :meth:`add` would make them): :mod:`celery_msg.group_template`'s derived
        messages. A route gone stale is routed again from ``message`` as for :meth:`add`."""
        origin = self._origin(channel, message, exchange, key)
        for out, route in routed:
            origin.queues.add(out.queue)
            self._pending.append(Entry(out, route, origin))
        self._full()

    def _origin(self, channel: Channel, message: dict[str, Any], exchange: str, key: str) -> Origin:
        if not self._pending:
            self._oldest = time.monotonic()
        origin = self.last = Origin(channel, message, exchange, key)
        self.added += 1
        return origin

    def _full(self) -> None:
        if len(self._pending) >= self.batch:
            self._write()
            # Redis lost the script (restarted, or it is new there): reloaded; they go again
            # with the next batch. Lost replies and stale routes wait for the flush.
            again = self._again
            self._pending.extend(e for e in again if e.status is Status.NO_SCRIPT)
            self._again = [e for e in again if e.status is not Status.NO_SCRIPT]

    def _route(self, origin: Origin, *, fresh: bool) -> None:
        channel = origin.channel
        if not origin.exchange:  # the default exchange: the routing key names the queue
            queues, route = [origin.routing_key], None
        else:
            queues, route, cached = channel.route(origin.exchange, origin.routing_key, fresh=fresh)
            if not queues and cached:
                # As basic_publish: a cached table that routes nowhere may lack a new binding.
                queues, route, _ = channel.route(origin.exchange, origin.routing_key, fresh=True)
        for queue in queues:
            if queue not in origin.queues:
                origin.queues.add(queue)
                self._pending.append(Entry(channel.outgoing(queue, origin.message), route, origin))

    def _write(self) -> None:
        """Write the pending entries, one pipelined batch per broker, each broker's batch in
        flight read first."""
        pending, self._pending = self._pending, []
        if pending:
            self.longest_wait = max(self.longest_wait, time.monotonic() - self._oldest)
        batches: dict[int, list[Entry]] = {}
        for entry in pending:
            broker = entry.origin.channel.broker
            if id(broker) not in self._senders:
                sender = ClusterSender(broker) if broker.cluster else Sender(broker)
                self._senders[id(broker)] = sender
            batches.setdefault(id(broker), []).append(entry)
        for key, sender in self._senders.items():
            self._again.extend(sender.write(batches.get(key, ())))

    def flush(self) -> None:
        """Send everything and wait until Redis confirmed every message: stale routes are
        routed again, lost replies sent again (unique) as the retry policy says; raises
        :class:`BulkPublishError` naming the rest (which the next flush sends again)."""
        attempt = routed = reloads = redirects = 0
        failed: list[Entry] = []
        while True:
            self._write()
            for sender in self._senders.values():
                self._again.extend(sender.read())
            if not self._again:
                break
            again, self._again = self._again, []
            kinds = {entry.status for entry in again}
            for entry in again:
                if entry.status is Status.STALE and routed < ROUTE_ATTEMPTS:
                    entry.origin.queues.discard(entry.out.queue)  # nothing stored there
                    self._route(entry.origin, fresh=True)
                elif (
                    (entry.status is Status.NO_SCRIPT and reloads < ROUTE_ATTEMPTS)
                    or (entry.status is Status.MOVED and redirects < REDIRECT_ATTEMPTS)
                    or (entry.status is Status.LOST and attempt < self.policy.max_retries)
                ):
                    self._pending.append(entry)
                else:
                    failed.append(entry)
            routed += Status.STALE in kinds
            reloads += Status.NO_SCRIPT in kinds
            if Status.MOVED in kinds and redirects < REDIRECT_ATTEMPTS:
                time.sleep(min(REDIRECT_WAIT_MAX, redirects * REDIRECT_WAIT_STEP))
                redirects += 1
            if Status.LOST in kinds and attempt < self.policy.max_retries:
                time.sleep(self.policy.wait(attempt))
                attempt += 1
        if failed:
            self._pending = failed  # what the next flush (a retry) sends
            raise BulkPublishError([entry.unsent() for entry in failed], self)

    def discard(self) -> None:
        """Forget the messages not written yet (a batch already written may be stored)."""
        self._pending.clear()

    def hold(self, owner: object, acquire: Callable[[], T], release: Callable[[T], None]) -> T:
        """A resource of ``owner`` kept for the block's life (an app's producer: every
        ``.delay()`` in the block would take one from the pool and give it back), taken on
        first use and released when the block closes."""
        held = self._held.get(id(owner))
        if held is None:
            resource = acquire()
            self._held[id(owner)] = (resource, release)
            return resource
        return cast(T, held[0])

    def close(self) -> None:
        """Give the connections and held resources back (after a flush; a retry takes new
        connections)."""
        for sender in self._senders.values():
            sender.close()
        held, self._held = self._held, {}
        for resource, release in held.values():
            release(resource)


class PublishBatch:
    """kombu's publish batch protocol (``Producer.batch()``, kombu >= 5.7) on celery-msg: the
    producer's publishes are buffered and sent as a bulk block's are, every message confirmed
    one by one. kombu's contract on an exception inside ``Producer.batch()``: what was not
    sent yet is discarded (a bulk block sends it instead)."""

    def __init__(self, channel: Channel, max_size: int) -> None:
        self.channel = channel
        self._buffer = Buffer(max_size, RetryPolicy())

    def publish(self, message: dict[str, Any], exchange: str, routing_key: str, **_: Any) -> None:
        self.channel.prepare_for_publish(message, exchange, routing_key)
        self._buffer.add(self.channel, message, exchange, routing_key)

    def flush(self) -> None:
        self._buffer.flush()

    def discard(self) -> None:
        self._buffer.discard()

    def close(self) -> None:
        self._buffer.close()


def uses_celery_msg(app: Celery) -> bool:
    """Whether ``app``'s broker URL selects the celery-msg transport."""
    url = str(app.conf.broker_url or "")
    return url.startswith(tuple(f"{scheme}://" for scheme in URL_SCHEMES))


@contextmanager
def bulk(
    app: Celery, batch: int = DEFAULT_BATCH, retry_policy: RetryPolicy | None = None
) -> Iterator[Buffer]:
    """Buffer every task this thread publishes inside the block (any Celery API: ``delay``,
    ``apply_async``, ``send_task``, groups, chords, chunks) and send them in pipelined batches
    of ``batch``; on leaving, return once Redis holds them all, or raise
    :class:`BulkPublishError`. A block opened inside another joins it (the outer one sends).

    ``retry_policy``: how messages whose reply was lost are sent again (default: the app's
    ``task_publish_retry`` / ``task_publish_retry_policy``)."""
    if not uses_celery_msg(app):
        scheme = str(app.conf.broker_url or "").split("://")[0]
        raise ConfigurationError(f"celery_msg.bulk: the app's broker is {scheme}://, not ours")
    if batch < 1:
        raise ConfigurationError(f"batch: must be at least 1, got {batch!r}")
    outer: Buffer | None = getattr(_local, "buffer", None)
    if outer is not None:
        yield outer
        return
    buffer = _local.buffer = Buffer(batch, retry_policy or RetryPolicy.of(app))
    closers = [opener() for opener in _openers.get(app, ())]
    try:
        yield buffer
    finally:
        _local.buffer = None
        for close in closers:
            close()
        try:
            buffer.flush()
        finally:
            buffer.close()
