"""Publishing: the Broker's calls of ``publish.lua`` (one, many, packed for a pipeline) and
of ``unlock.lua`` (the unique-publish locks).

Why its own module: the publish path is every producer's hot path and has concerns of its own:
the command's fixed part packed once per queue and sent on the publisher's own connection
(:class:`~celery_msg.redisio.DedicatedConnection`), routes guarded by their bindings version
(:class:`~celery_msg.errors.StaleRoute`), and on a Cluster a fan-out that is not atomic across
shards (:class:`~celery_msg.errors.PartialFanout`). :class:`Publishing` is a part of
:class:`~celery_msg.core.Broker`, the one place that calls scripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .bindings import Route
from .errors import PartialFanout, StaleRoute
from .keys import bindings_version_key
from .queues import KEYS_CACHE_SIZE
from .redisio import BUSY, DedicatedConnection, bulk, pack_head, translated, translated_errors
from .scriptcalls import ScriptCalls
from .scripts import Code
from .transitions import UNROUTED, Publish, Published, Unlock


class Outgoing(NamedTuple):
    """One message on its way into one queue: the arguments of :meth:`Broker.publish`."""

    queue: str
    message_id: str
    payload: bytes | str
    band: int
    due_ms: int
    unique: bool
    lock_until_ms: int
    #: A Celery retry (its ``retries`` header is above 0): counted as ``retried`` too.
    retry: bool = False


class Publishing(ScriptCalls):
    """Storing messages (a part of :class:`~celery_msg.core.Broker`, which sets the attributes
    below)."""

    _publish_heads: dict[str | tuple[str, str], bytes]
    _publisher: DedicatedConnection

    def publish(
        self,
        queue: str,
        message_id: str,
        payload: bytes | str,
        band: int,
        *,
        due_ms: int = 0,
        unique: bool = False,
        lock_until_ms: int = 0,
        route: Route | None = None,
        retry: bool = False,
    ) -> str:
        """Append a message to its priority band, or schedule it when ``due_ms`` (epoch ms) is
        in the future; returns its key in this queue.

        ``unique``: if ``message_id`` is still pending in this queue (ready, reserved or
        scheduled), store nothing and return it (an idempotent ``.delay()``); with
        ``lock_until_ms`` (epoch ms), the id is refused instead while it is locked, and a
        stored message locks it until then or until :meth:`unlock`.
        ``retry``: the message is a Celery retry (counted as ``retried`` as well).
        ``route``: the binding table this queue was chosen from; if the exchange's bindings
        changed since, nothing is stored and :class:`StaleRoute` is raised."""
        # Every publisher's hot path: the command's fixed part (script and keys) is packed once
        # per queue, the rest here, and errors are translated inline (no context manager).
        head_key = queue if route is None else (queue, route.exchange)
        try:
            head = self._publish_heads[head_key]
        except KeyError:
            head = self._publish_head(head_key, queue, route)
        args = self._publish_args(
            message_id,
            payload,
            band,
            due_ms,
            unique=unique,
            route=route,
            lock_until_ms=lock_until_ms,
            retry=retry,
        )
        publish = self.scripts.publish
        if self.cluster:
            return self._publish_on_cluster(queue, args, route).key
        try:
            raw = self._publisher.execute(
                publish.script, head + b"".join(bulk(arg) for arg in args)
            )
            if raw is BUSY:
                raw = publish.script(keys=self._publish_keys(queue, route), args=args)
        except Exception as exc:
            ours = translated(exc, f"publish to {queue!r}")
            if ours is None:
                raise
            raise ours from exc
        reply = publish.reply(raw)
        if route is not None and reply.code == Code.STALE_ROUTE:
            raise StaleRoute(route.exchange, [queue])
        return reply.key

    def _route_is_current(self, route: Route) -> bool:
        """On a Cluster: whether ``route``'s bindings version is still the exchange's.

        The version key is global, in another slot than the queue, so publish.lua cannot read
        it; it is read just before the publish instead. A change of the bindings between that
        read and the publish is not caught: the publish then counts as made before the change.
        """
        with translated_errors(f"read bindings version of {route.exchange!r}"):
            raw = self.client.get(bindings_version_key(self.global_prefix, route.exchange))
        try:
            return int(raw or 0) == route.version
        except ValueError:
            return False

    def _publish_on_cluster(
        self, queue: str, args: Sequence[Any], route: Route | None
    ) -> Published:
        """A publish on a Cluster: the route checked first, then publish.lua without the
        version key (see :meth:`_route_is_current`)."""
        if route is not None and not self._route_is_current(route):
            raise StaleRoute(route.exchange, [queue])
        with translated_errors(f"publish to {queue!r}"):
            return self.scripts.publish.run(self.keys(queue).publish, args)

    def pack_publish(self, out: Outgoing, route: Route | None, *, unique: bool) -> bytes:
        """The ``EVALSHA`` of :meth:`publish` for ``out``, packed for a pipeline of many
        (:mod:`celery_msg.bulk_publish`). ``unique`` overrides ``out.unique`` (a resend is
        unique, so a message whose reply was lost is not stored twice)."""
        head_key = out.queue if route is None else (out.queue, route.exchange)
        try:
            head = self._publish_heads[head_key]
        except KeyError:
            head = self._publish_head(head_key, out.queue, route)
        args = self._publish_args(
            out.message_id,
            out.payload,
            out.band,
            out.due_ms,
            unique=unique,
            route=route,
            lock_until_ms=out.lock_until_ms,
            retry=out.retry,
        )
        return head + b"".join(map(bulk, args))

    def publish_once(
        self, queue: str, message_id: str, payload: bytes | str, band: int, *, due_ms: int = 0
    ) -> bool:
        """A unique publish (see :meth:`publish`) that says whether it stored the message
        (False: ``message_id`` was still pending in ``queue``). For tools, not the hot path."""
        args = self._publish_args(message_id, payload, band, due_ms, unique=True)
        with translated_errors(f"publish to {queue!r}"):
            return self.scripts.publish.run(self._publish_keys(queue, None), args).stored

    def unlock(self, queue: str, message_ids: Sequence[str]) -> int:
        """Let unique publishes of ``message_ids`` into ``queue`` through again (their task
        started or succeeded); returns how many were locked."""
        if not message_ids:
            return 0
        with translated_errors(f"unlock {len(message_ids)} ids in {queue!r}"):
            return self.scripts.unlock.run(self.keys(queue).all, Unlock.args(message_ids))

    def _publish_args(
        self,
        message_id: str,
        payload: bytes | str,
        band: int,
        due_ms: int,
        *,
        unique: bool = False,
        route: Route | None = None,
        lock_until_ms: int = 0,
        retry: bool = False,
    ) -> tuple[Any, ...]:
        """publish.lua's ARGV: a due time already past is now; a lock only for a unique one;
        ``retry``: a Celery retry (counted as ``retried`` too)."""
        now = self.now_ms()
        return Publish.args(
            message_id=message_id,
            payload=payload,
            band=band,
            due_ms=due_ms if due_ms > now else 0,
            unique=unique,
            route_version=UNROUTED if route is None else route.version,
            now_ms=now,
            lock_until_ms=lock_until_ms if unique else 0,
            retry=retry,
        )

    def _publish_keys(self, queue: str, route: Route | None) -> tuple[str, ...]:
        keys = self.keys(queue).publish
        if route is None:
            return keys
        return (*keys, bindings_version_key(self.global_prefix, route.exchange))

    def _publish_head(
        self, head_key: str | tuple[str, str], queue: str, route: Route | None
    ) -> bytes:
        if len(self._publish_heads) >= KEYS_CACHE_SIZE:
            self._publish_heads.clear()
        head = self._publish_heads[head_key] = pack_head(
            self.scripts.publish.script, self._publish_keys(queue, route), Publish.ARGC
        )
        return head

    def publish_many(
        self,
        queues: Sequence[str],
        message_id: str,
        payload: bytes | str,
        band: int,
        *,
        due_ms: int = 0,
        route: Route | None = None,
        retry: bool = False,
    ) -> list[str]:
        """Publish one message into several queues (a broadcast) in one round trip.

        With ``route``, a queue whose publish found the bindings changed stores nothing; they
        are raised together as :class:`StaleRoute` (the others were stored)."""
        if not queues:
            return []
        args = self._publish_args(message_id, payload, band, due_ms, route=route, retry=retry)
        publish = self.scripts.publish
        if self.cluster:
            return self._publish_many_on_cluster(list(queues), args, route)
        with translated_errors(f"publish to {len(queues)} queues"):
            raw = self.run_scripts(
                [(publish.script, self._publish_keys(q, route), args) for q in queues]
            )
        replies = [publish.reply(r) for r in raw]
        if route is not None:
            refused = [
                q for q, r in zip(queues, replies, strict=True) if r.code == Code.STALE_ROUTE
            ]
            if refused:
                raise StaleRoute(route.exchange, refused)
        return [r.key for r in replies]

    def _publish_many_on_cluster(
        self, queues: list[str], args: Sequence[Any], route: Route | None
    ) -> list[str]:
        """A fan-out on a Cluster: one publish per queue (each its own slot), in order.

        Not atomic across shards: if one fails, the queues before it have the message and the
        error says so (:class:`PartialFanout`), instead of a half-done fan-out passing as a
        failed one (or as a success)."""
        if route is not None and not self._route_is_current(route):
            raise StaleRoute(route.exchange, queues)
        keys: list[str] = []
        for i, queue in enumerate(queues):
            try:
                keys.append(self._publish_on_cluster(queue, args, None).key)
            except Exception as exc:
                if not keys:
                    raise
                raise PartialFanout(queues[:i], queues[i:], exc) from exc
        return keys
