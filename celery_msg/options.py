"""Transport options: one frozen, validated dataclass built from kombu's ``transport_options``.

Unknown options are rejected (a typo must not silently fall back to a default), and numbers are
checked explicitly, never with ``value or DEFAULT`` (which would turn a deliberate 0 into the
default). Times are public in seconds, as in Celery; the core works in integer milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigurationError
from .policy import Policies

QueueOrder = Literal["fair", "strict"]
PriorityOrder = Literal["desc", "asc"]

#: kombu's own transport options that the virtual transport or kombu.Connection read themselves.
#: We accept them so that generic Celery settings keep working, and ignore them.
KOMBU_PASSTHROUGH = frozenset(
    {
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "confirm_publish",
        "polling_interval",
        "body_encoding",
        "deadletter_queue",
        "client_name",
        "global_keyprefix",
        "fanout_prefix",
        "fanout_patterns",
        "visibility_timeout",
        "socket_keepalive",
    }
)


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
    #: (0 = unlimited).
    max_deliveries: int = 0
    #: Seconds to wait for Redis on connect and on each command (None = no timeout).
    socket_timeout: float | None = 30.0
    #: Seconds between client-side health checks of pooled connections.
    health_check_interval: float = 25.0
    #: Ack, retry and dead-letter policies (:class:`celery_msg.Policies`); set by
    #: :func:`celery_msg.configure` from the app's ``msg_policies`` setting.
    policies: Policies = field(default_factory=Policies)

    def __post_init__(self) -> None:
        _positive("lease_timeout", self.lease_timeout)
        _positive("sweep_interval", self.sweep_interval)
        _positive("binding_ttl", self.binding_ttl)
        _non_negative("binding_cache_ttl", self.binding_cache_ttl)
        _non_negative("health_check_interval", self.health_check_interval)
        if self.socket_timeout is not None:
            _positive("socket_timeout", self.socket_timeout)
        for name in ("fetch_batch", "reclaim_batch"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
        if self.lease_timeout < 0.001:
            raise ConfigurationError(
                f"lease_timeout must be at least 0.001 seconds, got {self.lease_timeout!r}"
            )
        if not _is_int(self.max_deliveries) or self.max_deliveries < 0:
            raise ConfigurationError(
                f"max_deliveries must be an integer >= 0, got {self.max_deliveries!r}"
            )
        if not _is_int(self.default_priority) or not 0 <= self.default_priority <= 255:
            raise ConfigurationError(
                f"default_priority must be an integer in 0..255, got {self.default_priority!r}"
            )
        if self.queue_order not in ("fair", "strict"):
            raise ConfigurationError(
                f"queue_order must be 'fair' or 'strict', got {self.queue_order!r}"
            )
        if self.priority_order not in ("desc", "asc"):
            raise ConfigurationError(
                f"priority_order must be 'desc' or 'asc', got {self.priority_order!r}"
            )
        if not isinstance(self.key_prefix, str) or not self.key_prefix:
            raise ConfigurationError(
                f"key_prefix must be a non-empty string, got {self.key_prefix!r}"
            )
        if not isinstance(self.policies, Policies):
            raise ConfigurationError(
                f"policies must be a celery_msg.Policies, got {type(self.policies).__name__}"
            )
        if "{" in self.key_prefix or "}" in self.key_prefix:
            raise ConfigurationError("key_prefix must not contain '{' or '}' (Cluster hash tags)")

    @property
    def lease_ms(self) -> int:
        return to_ms(self.lease_timeout)

    @property
    def binding_ttl_ms(self) -> int:
        return to_ms(self.binding_ttl)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> TransportOptions:
        """Build from kombu's ``transport_options``, rejecting unknown names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known - KOMBU_PASSTHROUGH)
        if unknown:
            raise ConfigurationError(
                f"unknown celery-msg transport option(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        values = {k: v for k, v in options.items() if k in known}
        for name in SECONDS:
            if name in values and _is_int(values[name]):
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
    "health_check_interval",
)


def to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ConfigurationError(f"{name} must be a number > 0 (seconds), got {value!r}")


def _non_negative(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ConfigurationError(f"{name} must be a number >= 0 (seconds), got {value!r}")
