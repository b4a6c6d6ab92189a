"""One error hierarchy for celery-msg.

Driver errors (redis-py) are translated at the edge, in :mod:`celery_msg.core`, so that callers
catch *our* names and still find the original error in ``__cause__``.
"""

from __future__ import annotations


class CeleryMsgError(Exception):
    """Base class of every error raised by celery-msg."""


class ConfigurationError(CeleryMsgError, ValueError):
    """An option, URL or policy is invalid. The message names the option."""


class AuthenticationFailed(ConfigurationError):
    """Redis refused the credentials of the broker URL (wrong user or password): retrying
    will not help, so it is not a :class:`BrokerConnectionError`."""


class BrokerConnectionError(CeleryMsgError, ConnectionError):
    """Redis cannot be reached, or the connection dropped mid-command."""


class ReplicationTimeout(CeleryMsgError):
    """Fewer replicas than ``min_replicas`` confirmed a write within ``min_replicas_timeout``.

    The write happened on the master; it is lost if the master fails before it reaches a
    replica. A publisher gets this error (the publish is not confirmed: do not assume it is
    durable); a consumer logs it and goes on (``results`` holds the replies it then uses: a
    lost reserve or ack only means a redelivery)."""

    def __init__(self, message: str, confirmed: int, results: list[object] | None = None) -> None:
        super().__init__(message)
        self.confirmed = confirmed
        self.results: list[object] = results or []


class LeaseLost(CeleryMsgError):
    """A consumer tried to ack, reject or renew a delivery whose lease it no longer holds.

    This is what fencing looks like from the outside: the lease expired (the consumer was presumed
    dead) and the message was handed to someone else, or it was purged or deleted meanwhile.

    The transport itself never raises it: inside a worker a lost lease is not an error anyone
    could act on (kombu would take an exception from ``ack`` for a broken channel and
    reconnect). The scripts refuse the settlement (``ack.lua`` compares the fencing token, so
    a stale ack never touches the new holder's delivery), the ``lease_lost`` counter counts it,
    the worker logs it, and a reserved message whose lease is found lost before it is handed
    over is dropped, not run (:meth:`celery_msg.holdings.Holdings.confirmed`). The name stays
    exported (it is public), but nothing in celery-msg raises it.
    """

    def __init__(self, queue: str, key: str, token: int) -> None:
        super().__init__(f"lease lost: queue={queue!r} message={key!r} token={token}")
        self.queue = queue
        self.key = key
        self.token = token


class StaleRoute(CeleryMsgError):
    """A publish was routed with a binding table that changed meanwhile; nothing was stored in
    the queues it names, so routing again with a fresh table and publishing is safe."""

    def __init__(self, exchange: str, refused: list[str]) -> None:
        super().__init__(f"bindings of exchange {exchange!r} changed; not stored in {refused!r}")
        self.exchange = exchange
        self.refused = refused


class PartialFanout(CeleryMsgError):
    """A publish to several queues on a Redis Cluster stored the message in some of them only
    (a shard failed mid-way: a fan-out across shards is not atomic). ``stored`` have it,
    ``failed`` do not; publishing again to ``failed`` only completes it."""

    def __init__(self, stored: list[str], failed: list[str], cause: BaseException) -> None:
        super().__init__(
            f"publish to several queues stored in {stored!r} but not in {failed!r}: {cause}"
        )
        self.stored = stored
        self.failed = failed


class MessageNotFound(CeleryMsgError, LookupError):
    """No message with that ID exists in any known queue (it may have been acked)."""


class ScriptError(CeleryMsgError):
    """A server-side script failed; the message keeps the Redis error text."""


class PermissionDenied(ScriptError):
    """Redis refused a command or key to the broker URL's ACL user ("NOPERM"). The message names
    what was refused; README's Security section lists every command celery-msg needs."""


class PoisonMessage(CeleryMsgError):
    """Stored as a task's result when its message was delivered more than ``max_deliveries``
    times without an ack (it kept killing its worker) and went to the dead-letter store."""
