"""What a consumer gets from the broker and holds: deliveries, leases, reserve requests, rounds.

Plain values, no Redis: the kombu adapter (holdings, the drain loop, the ack writer) and the
core both speak them. A *lease* is what a consumer needs to settle a delivery; its fencing token
makes a settle by a consumer whose lease expired (and was handed to another) a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to one consumer: it holds the lease until ack, requeue or expiry."""

    queue: str
    key: str
    token: int
    deliveries: int
    payload: bytes


class Round(NamedTuple):
    """The outcome of one :meth:`Broker.settle_and_reserve` round trip."""

    #: The deliveries of each request, in request order.
    deliveries: list[list[Delivery]]
    #: Acks refused because their lease was lost.
    lost: list[Lease]
    #: Earliest due time (ms) of a scheduled message in the requested queues, or None.
    next_due_ms: int | None


@dataclass(frozen=True, slots=True)
class Lease:
    """What a consumer needs to settle a delivery (ack, requeue, dead-letter, renew)."""

    queue: str
    key: str
    token: int


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """What one consumer wants in a combined round (see :meth:`Broker.settle_and_reserve`)."""

    queues: list[str]
    count: int
    consumer: str
    order: Literal["fair", "strict"] = "fair"
    start: int = 0
