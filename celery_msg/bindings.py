"""Exchanges and their bindings: which queues a publish to an exchange goes to.

Why its own module: routing is plain Redis hashes (no script), read by every publisher about once
per ``binding_cache_ttl`` and written when consumers declare or renew their queues. Each
exchange's bindings carry a version that every change moves on; a publish routed with a table
names the version it was read at, and ``publish.lua`` refuses a stale one (see
:class:`~celery_msg.errors.StaleRoute`), so a cached table can never misroute.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import redis

from .keys import bindings_key, bindings_version_key, exchanges_key, expiring_key
from .queues import EXPIRE_QUEUES_BATCH, Queues
from .redisio import text, translated_errors

logger = logging.getLogger(__name__)

_BINDING_SEP = "\x06\x16"


@dataclass(frozen=True, slots=True)
class Binding:
    """A route from an exchange to a queue (kombu's ``(routing_key, pattern, queue)``)."""

    routing_key: str
    pattern: str
    queue: str

    def encode(self) -> str:
        return _BINDING_SEP.join((self.routing_key, self.pattern, self.queue))

    @classmethod
    def decode(cls, raw: bytes | str) -> Binding:
        text = raw.decode() if isinstance(raw, bytes) else raw
        routing_key, pattern, queue = text.split(_BINDING_SEP)
        return cls(routing_key, pattern, queue)


@dataclass(frozen=True, slots=True)
class Route:
    """Which binding table a publish was routed with: the exchange and its bindings version."""

    exchange: str
    version: int


class Table(NamedTuple):
    """An exchange's live bindings, read at one bindings version (None: the stored version is
    not a number; such a table is routed with unguarded and never cached)."""

    route: Route | None
    bindings: list[Binding]


class Bindings(Queues):
    """The exchanges and bindings under the prefix (a part of :class:`~celery_msg.core.Broker`)."""

    def declare_exchange(self, exchange: str, kind: str) -> None:
        """Record ``exchange``'s type (direct, topic, fanout) for every process."""
        with translated_errors(f"declare exchange {exchange!r}"):
            self.client.hset(exchanges_key(self.prefix), exchange, kind)

    def exchange_type(self, exchange: str) -> str | None:
        """The type ``exchange`` was declared with by any process, or None."""
        with translated_errors(f"read exchange {exchange!r}"):
            kind = self.client.hget(exchanges_key(self.prefix), exchange)
        return None if kind is None else text(kind)

    def bind(self, exchange: str, binding: Binding, ttl_ms: int | None = None) -> None:
        """Add a route; with ``ttl_ms`` it expires unless :meth:`refresh_bindings` renews it."""
        expires = 0 if ttl_ms is None else self.now_ms() + ttl_ms
        with translated_errors(f"bind {binding.queue!r} to {exchange!r}"):
            pipe = self.client.pipeline(transaction=True)
            # Registered (as kombu's default type, unless declared) so that unbind_queue finds
            # every exchange that has bindings without scanning the keyspace.
            pipe.hsetnx(exchanges_key(self.prefix), exchange, "direct")
            pipe.hset(bindings_key(self.prefix, exchange), binding.encode(), expires)
            pipe.incr(bindings_version_key(self.prefix, exchange))
            pipe.execute()

    def unbind(self, exchange: str, binding: Binding) -> None:
        with translated_errors(f"unbind {binding.queue!r} from {exchange!r}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(bindings_key(self.prefix, exchange), binding.encode())
            pipe.incr(bindings_version_key(self.prefix, exchange))
            pipe.execute()

    def unbind_queue(self, queue: str) -> None:
        """Remove every binding to ``queue`` from every exchange.

        Rare (a queue deleted); it walks the registry of exchanges, never the keyspace: no
        SCAN, so an ACL user needs no keyspace-wide command and sees no other app's keys."""
        with translated_errors(f"unbind {queue!r}"):
            exchanges = sorted(text(e) for e in self.client.hkeys(exchanges_key(self.prefix)))
            pipe = self.client.pipeline(transaction=False)
            for exchange in exchanges:
                pipe.hkeys(bindings_key(self.prefix, exchange))
            for exchange, fields in zip(exchanges, pipe.execute(), strict=True):
                mine = [f for f in fields if _binding_queue(f) == queue]
                if mine:
                    tx = self.client.pipeline(transaction=True)
                    tx.hdel(bindings_key(self.prefix, exchange), *mine)
                    tx.incr(bindings_version_key(self.prefix, exchange))
                    tx.execute()

    def refresh_bindings(self, bindings: Mapping[str, Mapping[Binding, int]]) -> None:
        """Renew expiring bindings of live consumers (exchange -> binding -> its TTL in ms), in
        one round trip.

        A binding that had expired and was removed meanwhile comes back, and its exchange's
        bindings version moves on, so that cached tables see it."""
        now = self.now_ms()
        with translated_errors("refresh bindings"):
            pipe = self.client.pipeline(transaction=False)
            exchanges: list[str] = []
            for exchange, group in bindings.items():
                for binding, ttl_ms in group.items():
                    pipe.hset(bindings_key(self.prefix, exchange), binding.encode(), now + ttl_ms)
                    exchanges.append(exchange)
            added = {
                exchange for exchange, new in zip(exchanges, pipe.execute(), strict=True) if new
            }
            if added:
                pipe = self.client.pipeline(transaction=False)
                for exchange in sorted(added):
                    pipe.incr(bindings_version_key(self.prefix, exchange))
                pipe.execute()

    def table(self, exchange: str) -> Table:
        """The live bindings of ``exchange``, with the bindings version they were read at.

        Expired ones are removed with their queues; a field that is not a binding (written by
        hand, or by another program) is skipped and logged, never routed to."""
        key = bindings_key(self.prefix, exchange)
        now = self.now_ms()
        with translated_errors(f"read bindings of {exchange!r}"):
            # Every publisher comes here (about once per binding_cache_ttl): a good moment to
            # look for queues unused past their ``expires``, in the same round trip.
            pipe = self.client.pipeline(transaction=True)
            pipe.get(bindings_version_key(self.prefix, exchange))
            pipe.hgetall(key)
            pipe.zrangebyscore(
                expiring_key(self.prefix),
                "-inf",
                f"({now}",
                start=0,
                num=EXPIRE_QUEUES_BATCH,
            )
            version, raw, unused = pipe.execute()
        gone = {text(q) for q in unused if self.expire_queue_if_unused(text(q))}
        live: list[Binding] = []
        expired: list[Binding] = []
        for field, expires in raw.items():
            try:
                binding = Binding.decode(field)
                deadline = int(expires)
            except (ValueError, UnicodeDecodeError):
                logger.warning(
                    "exchange %s: skipping a malformed binding %r -> %r", exchange, field, expires
                )
                continue
            if binding.queue in gone:
                self.unbind(exchange, binding)  # its queue expired: route nothing there
                continue
            (expired if deadline and deadline < now else live).append(binding)
        for binding in expired:
            # Moves the version on: a publish routed with this table is refused as stale and
            # routed again with the table as it is then.
            self._expire_binding(exchange, binding)
        number = _version(version)
        return Table(None if number is None else Route(exchange, number), live)

    def _expire_binding(self, exchange: str, binding: Binding) -> None:
        """Remove an expired binding and its queue, unless a consumer renewed it meanwhile."""
        key = bindings_key(self.prefix, exchange)
        field = binding.encode()
        with (
            translated_errors(f"expire binding of {binding.queue!r}"),
            self.client.pipeline(transaction=True) as pipe,
        ):
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                expires = int(pipe.hget(key, field) or 0)
                if not expires or expires >= self.now_ms():
                    return
                pipe.multi()
                pipe.hdel(key, field)
                pipe.incr(bindings_version_key(self.prefix, exchange))
                pipe.execute()
            except redis.WatchError:
                return  # changed under us: it was renewed (or removed); look again next time
        logger.info(
            "binding of queue %s to exchange %s expired: its consumer is gone; deleting the queue",
            binding.queue,
            exchange,
        )
        self.delete(binding.queue)


def _version(raw: bytes | str | None) -> int | None:
    """A bindings version as stored (None when it is not a number: written by hand)."""
    try:
        return int(raw or 0)
    except ValueError:
        logger.warning("bindings version %r is not a number; routing without a cache", raw)
        return None


def _binding_queue(field: bytes | str) -> str | None:
    """The queue of an encoded binding, or None when the field is not one."""
    try:
        return Binding.decode(field).queue
    except (ValueError, UnicodeDecodeError):
        return None
