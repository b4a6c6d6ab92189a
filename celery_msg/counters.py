"""The per-queue lifetime counters the scripts keep in a queue's ``stats`` hash.

One name per field, defined here once: the scripts write them (``count(q, '<name>', n)`` in
``celery_msg/lua``; tests/unit/test_counters.py holds the two together) and the snapshot and the
Prometheus collector read them. Every counter is bumped by the same script call as the state
change it counts, so a counter never disagrees with the transitions that happened.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Counter(StrEnum):
    """A field of a queue's ``stats`` hash."""

    #: stored by publish (a new message; a refused duplicate is ``duplicates``)
    PUBLISHED = "published"
    #: handed to a consumer under a lease (every delivery, first or not)
    DELIVERED = "delivered"
    #: deliveries of a message delivered before (its lease expired, it was requeued)
    REDELIVERED = "redelivered"
    ACKED = "acked"
    #: given back by its consumer (reject with requeue, a warm shutdown, a lost connection)
    REQUEUED = "requeued"
    #: leases that expired and went back to ready (the consumer died or hung)
    RECLAIMED = "reclaimed"
    #: scheduled messages (ETA, countdown, retry) that fell due and became ready
    PROMOTED = "promoted"
    #: publishes of a Celery retry (the message's ``retries`` header is above 0)
    RETRIED = "retried"
    #: dead-lettered, for any reason (``dead:<reason>`` counts each reason apart)
    DEAD = "dead"
    #: dead messages put back into their queue
    REPLAYED = "replayed"
    #: acks, renewals, requeues and dead-letterings refused: the lease was no longer held
    LEASE_LOST = "lease_lost"
    #: unique publishes refused: the id was still pending or locked (deduplicated)
    DUPLICATES = "duplicates"
    #: removed unserved: past their message TTL or Celery's ``expires``
    EXPIRED = "expired"
    #: dropped from the head of a queue over its ``max_length``
    DROPPED = "dropped"
    #: dead messages removed by the dead-letter store's retention
    DEAD_TRIMMED = "dead_trimmed"


#: The prefix of the fields that count dead-letterings per reason: ``dead:poison``, ...
DEAD_REASON_PREFIX = "dead:"
#: Longest reason word that names a counter (the scripts get it in their preamble).
REASON_MAX = 40
#: What a reason that is no word (a free text from a caller) is counted as.
OTHER_REASON = "other"
_WORD = re.compile(rf"[a-z][a-z0-9_-]{{0,{REASON_MAX - 1}}}")


def reason_word(reason: str) -> str:
    """``reason`` if it can name a counter and a metrics label (a short lower-case word, as
    every reason celery-msg writes: ``failed``, ``poison``, ``undecodable``, ...), else
    ``other``: a free text must not make counters (and label values) without bound."""
    return reason if _WORD.fullmatch(reason) else OTHER_REASON
