"""Transport options: one frozen, validated dataclass built from kombu's ``transport_options``.

Unknown options are rejected (a typo must not silently fall back to a default), and numbers are
checked explicitly, never with ``value or DEFAULT`` (which would turn a deliberate 0 into the
default). Times are public in seconds, as in Celery; the core works in integer milliseconds.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from . import validate as check
from .errors import ConfigurationError
from .policy import Policies
from .redisio import Replication

QueueOrder = Literal["fair", "strict"]
PriorityOrder = Literal["desc", "asc"]

#: kombu's generic transport options, honoured by ``kombu.Connection`` itself (connection
#: retries) or true of every celery-msg publish (``confirm_publish``: a publish returns once
#: Redis stored it). Accepted silently.
KOMBU_GENERIC = frozenset(
    {"max_retries", "interval_start", "interval_step", "interval_max", "confirm_publish"}
)

#: Options of kombu's ``redis://`` transport that celery-msg cannot apply, each with why: a
#: config written for kombu still starts, and says once (an :class:`IgnoredOptionWarning`)
#: what it set for nothing. Connection options are honoured instead (fields below).
KOMBU_IGNORED: Mapping[str, str] = {
    "visibility_timeout": "leases replace the visibility timeout: set lease_timeout (seconds)",
    "ack_emulation": "every delivery is leased and acked; there is nothing to emulate",
    "unacked_key": "leases are kept per queue under key_prefix",
    "unacked_index_key": "leases are kept per queue under key_prefix",
    "unacked_mutex_key": "expired leases are reclaimed by a script, without a mutex",
    "unacked_mutex_expire": "expired leases are reclaimed by a script, without a mutex",
    "unacked_restore_limit": "set reclaim_batch",
    "unacked_restore_interval": "set sweep_interval",
    "unacked_restore_throttle": "set sweep_interval",
    "sep": "priorities are exact (0..255): there are no per-priority queue names",
    "priority_steps": "priorities are exact (0..255); set priority_order for their direction",
    "queue_order_strategy": "set queue_order ('fair' or 'strict')",
    "fanout_prefix": "broadcast queues are kept per binding under key_prefix",
    "fanout_patterns": "broadcast queues are kept per binding under key_prefix",
    "body_encoding": "bodies are stored as kombu sends them",
    "deadletter_queue": "the dead-letter store of each queue keeps failed messages",
    "polling_interval": "consumers block in Redis (BLPOP); they never poll",
    "retry_on_timeout": (
        "no command is retried inside redis-py (a script whose reply was lost must not run "
        "twice); kombu and Celery reconnect with their own backoff"
    ),
    "reauth_check_interval": "streaming credential providers are not supported",
    "sentinel_fanout_compat": "broadcast queues are kept per binding under key_prefix",
}

#: kombu's name for ``key_prefix``.
KOMBU_KEY_PREFIX = "global_keyprefix"


class IgnoredOptionWarning(UserWarning):
    """A transport option of kombu's redis transport that celery-msg accepts but cannot apply.

    Python shows each one once per process; ``warnings.filterwarnings("ignore",
    category=IgnoredOptionWarning)`` silences them."""


@dataclass(frozen=True)
class TransportOptions:
    """Every option of the celery-msg transport, with its default.

    Set them with Celery's ``broker_transport_options`` (a dict).
    """

    #: Prefix of every key this transport writes; lets several apps share one Redis, and lets an
    #: ACL user be restricted to ``~<prefix>*``.
    key_prefix: str = "celery-msg:"
    #: Seconds a delivery stays leased to its consumer without renewal. A live consumer renews it
    #: every ``lease_timeout / 3``; a dead consumer's messages come back after it.
    lease_timeout: float = 10.0
    #: How often (seconds) an idle consumer wakes to reclaim expired leases of its queues.
    sweep_interval: float = 1.0
    #: Order across the queues one worker consumes: ``fair`` (round-robin) or ``strict``
    #: (earlier queues first, later ones only when those are empty).
    queue_order: QueueOrder = "fair"
    #: ``desc``: higher priority first (0..255, as RabbitMQ). ``asc``: 0 first, as kombu's redis.
    priority_order: PriorityOrder = "desc"
    #: Priority given to messages published without one.
    default_priority: int = 0
    #: Most messages fetched in one script call when the consumer has no prefetch limit.
    fetch_batch: int = 100
    #: Most expired leases one fetch moves back to the queue (bounds each script's run time).
    reclaim_batch: int = 100
    #: Seconds a binding of an ephemeral queue (auto_delete or x-expires, e.g. a worker's
    #: broadcast queue) outlives its last consumer; within it, broadcasts wait for the consumer.
    binding_ttl: float = 60.0
    #: Seconds a publisher caches an exchange's binding table (0 disables the cache).
    binding_cache_ttl: float = 1.0
    #: Deliveries after which a message is dead-lettered as ``poison`` instead of delivered again
    #: (0 = unlimited); ``configure`` hands it to the policies (:mod:`celery_msg.poison`).
    max_deliveries: int = 0
    #: Seconds to wait for Redis on connect and on each command (None = no timeout).
    socket_timeout: float | None = 30.0
    #: Seconds to wait for a new connection (None = ``socket_timeout``).
    socket_connect_timeout: float | None = None
    #: TCP keepalive on every connection to Redis.
    socket_keepalive: bool = True
    #: ``TCP_KEEPIDLE``-style socket options for keepalive (redis-py's mapping).
    socket_keepalive_options: Mapping[int, int | bytes] | None = None
    #: Most connections in one transport's pool (None = redis-py's default, unbounded).
    max_connections: int | None = None
    #: Connection name shown by ``CLIENT LIST`` (None = ``celery-msg:<host>:<pid>``).
    client_name: str | None = None
    #: Seconds between client-side health checks of pooled connections.
    health_check_interval: float = 25.0
    #: Redis Sentinel (``celery-msg+sentinel://`` URLs): the name of the monitored master.
    master_name: str | None = None
    #: Sentinel: keyword arguments for the connections to the sentinels themselves (e.g.
    #: ``{"password": ...}``, ``{"username": ..., "password": ...}``); the URL's credentials
    #: are the data nodes'.
    sentinel_kwargs: Mapping[str, Any] | None = None
    #: Sentinel: a master address is trusted only if this many other sentinels also see it.
    min_other_sentinels: int = 0
    #: Replicas that must confirm every publish, ack and other state change (``WAIT``) before
    #: it returns; 0 = do not wait (a master that fails may lose its last writes: see README).
    min_replicas: int = 0
    #: Seconds to wait for ``min_replicas`` confirmations before failing the publish (a
    #: consumer logs it and goes on).
    min_replicas_timeout: float = 1.0
    #: Ack, retry and dead-letter policies (:class:`celery_msg.Policies`); set by
    #: :func:`celery_msg.configure` from the app's ``msg_policies`` setting.
    policies: Policies = field(default_factory=Policies)

    def __post_init__(self) -> None:
        for name in ("lease_timeout", "sweep_interval", "binding_ttl"):
            check.positive_number(name, getattr(self, name), SECONDS_UNIT)
        for name in ("binding_cache_ttl", "health_check_interval"):
            check.non_negative_number(name, getattr(self, name), SECONDS_UNIT)
        for name in ("socket_timeout", "socket_connect_timeout"):
            if getattr(self, name) is not None:
                check.positive_number(name, getattr(self, name), SECONDS_UNIT)
        if self.lease_timeout < 0.001:
            raise ConfigurationError(
                f"lease_timeout: must be at least 0.001 seconds, got {self.lease_timeout!r}"
            )
        check.boolean("socket_keepalive", self.socket_keepalive)
        if self.socket_keepalive_options is not None:
            check.instance_of(
                "socket_keepalive_options",
                self.socket_keepalive_options,
                Mapping,
                "a mapping of socket options",
            )
        check.int_at_least("max_connections", self.max_connections, 1, optional=True)
        if self.client_name is not None and (
            not isinstance(self.client_name, str) or not self.client_name or " " in self.client_name
        ):
            raise ConfigurationError(
                f"client_name: must be a non-empty string without spaces, got {self.client_name!r}"
            )
        check.int_at_least("fetch_batch", self.fetch_batch, 1)
        check.int_at_least("reclaim_batch", self.reclaim_batch, 1)
        check.int_at_least("max_deliveries", self.max_deliveries, 0)
        check.int_between("default_priority", self.default_priority, 0, 255)
        check.one_of("queue_order", self.queue_order, get_args(QueueOrder))
        check.one_of("priority_order", self.priority_order, get_args(PriorityOrder))
        if not isinstance(self.key_prefix, str) or not self.key_prefix:
            raise ConfigurationError(
                f"key_prefix: must be a non-empty string, got {self.key_prefix!r}"
            )
        if "{" in self.key_prefix or "}" in self.key_prefix:
            raise ConfigurationError("key_prefix: must not contain '{' or '}' (Cluster hash tags)")
        check.instance_of("policies", self.policies, Policies, "a celery_msg.Policies")
        if self.master_name is not None and (
            not isinstance(self.master_name, str) or not self.master_name
        ):
            raise ConfigurationError(
                f"master_name: must be a non-empty string, got {self.master_name!r}"
            )
        if self.sentinel_kwargs is not None:
            check.instance_of(
                "sentinel_kwargs", self.sentinel_kwargs, Mapping, "a mapping of keyword arguments"
            )
        check.int_at_least("min_other_sentinels", self.min_other_sentinels, 0)
        check.int_at_least("min_replicas", self.min_replicas, 0)
        check.positive_number("min_replicas_timeout", self.min_replicas_timeout, SECONDS_UNIT)

    @property
    def lease_ms(self) -> int:
        return to_ms(self.lease_timeout)

    @property
    def replication(self) -> Replication | None:
        """The ``WAIT`` every state change ends with, or None when ``min_replicas`` is 0."""
        if not self.min_replicas:
            return None
        return Replication(self.min_replicas, max(1, to_ms(self.min_replicas_timeout)))

    @property
    def binding_ttl_ms(self) -> int:
        return to_ms(self.binding_ttl)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> TransportOptions:
        """Build from kombu's ``transport_options``, rejecting unknown names.

        kombu's redis options are honoured where they apply (connection options;
        ``global_keyprefix`` as ``key_prefix``, which wins when both are set) and warned about
        once each (:class:`IgnoredOptionWarning`, naming the option and why) where they do not.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(
            set(options) - known - KOMBU_GENERIC - set(KOMBU_IGNORED) - {KOMBU_KEY_PREFIX}
        )
        if unknown:
            raise ConfigurationError(
                f"unknown celery-msg transport option(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        for name in sorted(set(options) & set(KOMBU_IGNORED)):
            warnings.warn(
                f"transport option {name!r} of kombu's redis transport is ignored by "
                f"celery-msg: {KOMBU_IGNORED[name]}",
                IgnoredOptionWarning,
                stacklevel=2,
            )
        values = {k: v for k, v in options.items() if k in known}
        if KOMBU_KEY_PREFIX in options:
            given = options[KOMBU_KEY_PREFIX]
            if "key_prefix" not in values:
                values["key_prefix"] = given
            elif values["key_prefix"] != given:
                warnings.warn(
                    f"transport options key_prefix={values['key_prefix']!r} and "
                    f"global_keyprefix={given!r} differ: key_prefix wins",
                    IgnoredOptionWarning,
                    stacklevel=2,
                )
        for name in SECONDS:
            if name in values and check.is_int(values[name]):
                values[name] = float(values[name])
        return cls(**values)

    def replace(self, **changes: Any) -> TransportOptions:
        return dataclasses.replace(self, **changes)


#: Options given in seconds: an int given for one of them becomes a float.
SECONDS = (
    "lease_timeout",
    "sweep_interval",
    "binding_ttl",
    "binding_cache_ttl",
    "socket_timeout",
    "socket_connect_timeout",
    "health_check_interval",
    "min_replicas_timeout",
)


#: How a time option's error names its unit.
SECONDS_UNIT = " (seconds)"


def to_ms(seconds: float) -> int:
    return round(seconds * 1000)
