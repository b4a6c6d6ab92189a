"""Per-queue arguments (AMQP's ``x-message-ttl``, ``x-expires``, ``x-max-length``), checked once.

kombu turns ``Queue(message_ttl=5, expires=60, max_length=1000)`` into the RabbitMQ queue
arguments ``x-message-ttl`` (ms), ``x-expires`` (ms) and ``x-max-length``; the transport hands
them here when the queue is declared. They are checked *before* anything is written, so a bad
one fails the declaration with an error naming it, and stored in the queue's ``args`` hash
(fields :class:`QueueArg`), where publish.lua reads them: every publisher honours them, also
one that never declared the queue.

What they mean here (RabbitMQ's semantics, see README "Queue arguments"):

- ``message_ttl``: a message not delivered within it after it was enqueued (published, or
  due when scheduled) is never delivered: it is removed and counted as ``expired``;
- ``max_length``: a publish that makes the READY messages more than this drops the oldest
  (the head: RabbitMQ's default ``drop-head`` overflow), counted as ``dropped``;
- ``expires``: a queue unused for this long (no consumer, no ``get``, no redeclaration) is
  deleted with its messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import ConfigurationError

#: Largest accepted time argument (ms): about 35 years; keeps deadlines exact in a ZSET score.
MAX_MS = 2**40
#: Largest accepted ``x-max-length``.
MAX_LENGTH = 2**40


class QueueArg(StrEnum):
    """The fields of a queue's ``args`` hash (handed to the scripts by the preamble)."""

    MESSAGE_TTL = "message_ttl"
    EXPIRES = "expires"
    MAX_LENGTH = "max_length"


#: AMQP argument name -> (our field, smallest valid value).
_AMQP: dict[str, tuple[QueueArg, int]] = {
    "x-message-ttl": (QueueArg.MESSAGE_TTL, 0),
    "x-expires": (QueueArg.EXPIRES, 1),
    "x-max-length": (QueueArg.MAX_LENGTH, 0),
}


@dataclass(frozen=True, slots=True)
class QueueArguments:
    """The honoured arguments of one queue; ``None`` = not set (no limit)."""

    message_ttl_ms: int | None = None
    expires_ms: int | None = None
    max_length: int | None = None

    @classmethod
    def from_amqp(cls, arguments: Mapping[str, Any] | None) -> QueueArguments:
        """Check kombu's queue arguments; raises :class:`ConfigurationError` naming a bad one.

        Arguments this transport does not implement (``x-max-priority``, ...) are left alone,
        as kombu's own Redis transport does, except ``x-overflow``: anything but RabbitMQ's
        default ``drop-head`` would silently mean something else here.
        """
        values: dict[QueueArg, int] = {}
        for name, raw in (arguments or {}).items():
            if name == "x-overflow":
                if raw != "drop-head":
                    raise ConfigurationError(
                        f"queue argument x-overflow: only 'drop-head' is supported, got {raw!r}"
                    )
                continue
            if name not in _AMQP or raw is None:
                continue
            field, least = _AMQP[name]
            values[field] = _check(name, raw, least)
        return cls(
            message_ttl_ms=values.get(QueueArg.MESSAGE_TTL),
            expires_ms=values.get(QueueArg.EXPIRES),
            max_length=values.get(QueueArg.MAX_LENGTH),
        )

    @classmethod
    def from_redis(cls, raw: Mapping[bytes | str, bytes | str]) -> QueueArguments:
        """Decode a stored ``args`` hash; a garbage value counts as not set (as the scripts
        treat it)."""
        values: dict[str, int] = {}
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else key
            number = _stored_int(value)
            if name in QueueArg.__members__.values() and number is not None:
                least = 1 if name == QueueArg.EXPIRES else 0
                if number >= least:
                    values[name] = number
        return cls(
            message_ttl_ms=values.get(QueueArg.MESSAGE_TTL),
            expires_ms=values.get(QueueArg.EXPIRES),
            max_length=values.get(QueueArg.MAX_LENGTH),
        )

    def to_redis(self) -> dict[str, int]:
        """The ``args`` hash to store (only the arguments that are set)."""
        fields = {
            QueueArg.MESSAGE_TTL: self.message_ttl_ms,
            QueueArg.EXPIRES: self.expires_ms,
            QueueArg.MAX_LENGTH: self.max_length,
        }
        return {str(name): value for name, value in fields.items() if value is not None}


def _check(name: str, raw: object, least: int) -> int:
    """An integral number in ``least .. MAX``; kombu sends ints (ms), a hand-written argument
    may be a float such as ``5000.0``."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ConfigurationError(
            f"queue argument {name} must be a number, got {type(raw).__name__} {raw!r}"
        )
    if isinstance(raw, float) and (not math.isfinite(raw) or not raw.is_integer()):
        raise ConfigurationError(f"queue argument {name} must be a whole number, got {raw!r}")
    value = int(raw)
    most = MAX_LENGTH if name == "x-max-length" else MAX_MS
    if not least <= value <= most:
        raise ConfigurationError(f"queue argument {name} must be in {least}..{most}, got {raw!r}")
    return value


def _stored_int(value: bytes | str) -> int | None:
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    try:
        number = int(text)
    except ValueError:
        return None
    return number if 0 <= number <= max(MAX_MS, MAX_LENGTH) else None
