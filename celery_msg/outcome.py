"""The typed contract between the Celery layer and the kombu adapter: no kombu import.

The Celery layer (``app.py``, ``worker.py``) decides what a delivery's coming ack or reject
means: it was acked in Redis on receipt already (ack mode ``early``), it is to be dropped (its
policy keeps no dead letters), or it goes to the dead-letter store with a reason and a failure
record. The kombu adapter's ``QoS`` reads that decision when kombu settles the delivery. Before,
these were free attributes set on kombu's message and read back with ``getattr(..., default)``:
a typo turned a dead-letter into an ack, silently. Here both sides import one :class:`Outcome`
and its accessors, so mypy checks every link.

:func:`transport_of` / :func:`broker_of` reach the celery-msg transport behind a kombu message,
channel or connection (the one place that walks kombu's attributes), returning None for any
other transport.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from .core import Broker
from .keys import Reason
from .options import TransportOptions

#: The one attribute of a kombu message that carries its :class:`Outcome`.
_ATTRIBUTE = "celery_msg_outcome"


@dataclass(frozen=True)
class DeadLetterRecord:
    """Why a rejected delivery is dead-lettered: ``reason`` (``failed``, ``poison``,
    ``expired``, ``undecodable`` ...), a one-line ``detail`` and the failure record's fields."""

    reason: str
    detail: str
    extra: Mapping[str, Any] = field(default_factory=dict)


#: What a reject without requeue records when the Celery layer said nothing.
REJECTED = DeadLetterRecord(Reason.REJECTED, "the consumer rejected the message without requeue")


@dataclass
class Outcome:
    """The Celery layer's decision for one delivery, read by the QoS on ack or reject.

    ``settled``: acked in Redis already (on receipt): an ack or reject has nothing to settle.
    ``drop``: a reject without requeue acks it (its policy keeps no dead letters).
    ``dead_letter``: a reject without requeue moves it to the store with this record.
    """

    settled: bool = False
    drop: bool = False
    dead_letter: DeadLetterRecord | None = None

    @property
    def rejected(self) -> DeadLetterRecord:
        """The record a reject without requeue stores (the generic one when none was set)."""
        return self.dead_letter or REJECTED


def outcome_of(message: object) -> Outcome:
    """The outcome of ``message`` (a kombu message), created empty on first use."""
    found = getattr(message, _ATTRIBUTE, None)
    if isinstance(found, Outcome):
        return found
    outcome = Outcome()
    setattr(message, _ATTRIBUTE, outcome)
    return outcome


def read_outcome(message: object | None) -> Outcome:
    """The outcome of ``message`` without attaching one (an empty one when none was set)."""
    found = getattr(message, _ATTRIBUTE, None)
    return found if isinstance(found, Outcome) else Outcome()


def mark_dead_letter(message: object, reason: str, detail: str, **extra: Any) -> None:
    """The coming reject of ``message`` dead-letters it with this reason and record."""
    outcome_of(message).dead_letter = DeadLetterRecord(reason, detail, extra)


def mark_drop(message: object) -> None:
    """The coming reject of ``message`` drops it (acks it away)."""
    outcome_of(message).drop = True


class CeleryMsgTransport(Protocol):
    """What the Celery layer uses of :class:`celery_msg.transport.Transport`."""

    broker: Broker
    options: TransportOptions


class CeleryMsgChannel(Protocol):
    """What the Celery layer uses of :class:`celery_msg.transport.Channel`."""

    transport: CeleryMsgTransport

    def settle_ack(self, tag: str, now: bool = False) -> None: ...


def transport_of(source: object) -> CeleryMsgTransport | None:
    """The celery-msg transport behind a kombu message, channel or connection; None when it
    uses another transport (or is None)."""
    # A channel or a connection has a transport; a message has the channel it came on.
    for transport in (
        getattr(source, "transport", None),
        getattr(getattr(source, "channel", None), "transport", None),
    ):
        if isinstance(getattr(transport, "broker", None), Broker):
            return cast(CeleryMsgTransport, transport)
    return None


def broker_of(source: object) -> Broker | None:
    """The :class:`Broker` behind a kombu message, channel or connection, or None."""
    transport = transport_of(source)
    return None if transport is None else transport.broker


def channel_of(message: object) -> CeleryMsgChannel | None:
    """The celery-msg channel a kombu message was delivered on, or None."""
    channel = getattr(message, "channel", None)
    if transport_of(channel) is None:
        return None
    return cast(CeleryMsgChannel, channel)
