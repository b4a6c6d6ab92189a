"""The next reserve sent while the last reserved task still runs; its reply read after it.

Why: a worker's round is a round trip in which it waits for Redis to lease the next batch
(``reserve.lua`` over the batch: most of the round's time is Redis's), and a ``-P solo`` worker
runs its batch inline, so it used to wait for every batch after the previous one was done:
the worker idle while Redis works, then Redis idle while the worker runs the batch. Sending the
next reserve just before the batch's last task runs lets the two overlap.

Prefetch stays a bound: the reserve asks for what the channels may take *now* (their prefetch
minus what they hold, the message about to run included), exactly what a round after that
task's ack would ask for minus one.

How: on a connection of its own (replies are read later, so it cannot be a pooled one), the
event loop sends the round's ``EVALSHA`` calls without reading; the reply is read, waiting if it
must, once the loop has nothing else to deliver. Only reserves go this way (the round is sent
when no ack is buffered), and only on a single server without ``min_replicas`` (there, rounds
stay synchronous: per-node calls, a ``WAIT`` to confirm).

Failures lose nothing: a reserve whose script Redis lost (``NOSCRIPT``) did not run and is run
again through the broker (which loads it); a connection error while the reply is outstanding
leaves what the reserve leased, if it ran, unknown to this consumer: those leases are never
renewed and come back after ``lease_timeout``, as a dead consumer's do.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import redis

from .consuming import PreparedRound
from .core import REDIS_CONNECTION_ERRORS, Broker, Lease, Round, pack_evalsha
from .redisio import translated_errors

logger = logging.getLogger(__name__)

#: Seconds to wait for the reply of a reserve sent ahead before the connection is presumed dead.
REPLY_TIMEOUT = 30.0

_IO_ERRORS: tuple[type[BaseException], ...] = (*REDIS_CONNECTION_ERRORS, OSError)


class ReadAhead:
    """At most one round in flight on a connection of its own (event-loop thread only)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        pool = broker.client.connection_pool
        self.conn: Any = pool.connection_class(**pool.connection_kwargs)
        self._pending: PreparedRound | None = None
        self._sent_ms = 0
        self._sent_at = 0.0

    @staticmethod
    def usable(broker: Broker) -> bool:
        """Only where one connection reaches every queue and nothing waits for replicas."""
        return broker.replication is None and not broker.cluster

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def send(self, prepared: PreparedRound) -> bool:
        """Send ``prepared``'s calls without waiting; False when it could not be sent (the
        caller then goes on as if nothing was sent: its next round reserves normally)."""
        assert self._pending is None, "one round ahead at a time"
        packed = [pack_evalsha(script, keys, args) for script, keys, args in prepared.calls]
        try:
            if self.conn._sock is None:
                self.conn.connect()
            self.conn.send_packed_command(packed, check_health=False)
        except _IO_ERRORS as exc:
            logger.debug("read-ahead connection failed while sending: %s", exc)
            self._disconnect()
            return False
        self._pending = prepared
        self._sent_ms = self.broker.now_ms()
        self._sent_at = time.monotonic()
        return True

    def read(self) -> tuple[Round, float] | None:
        """The round sent ahead (waiting for its replies), and when its leases were granted or
        last renewed (monotonic s: the consumer's book counts their age from there); None
        when nothing is pending or the connection failed (what the round leased then comes
        back after ``lease_timeout``)."""
        prepared, self._pending = self._pending, None
        if prepared is None:
            return None
        results: list[Any] = []
        try:
            if self.conn._sock is None:
                raise redis.ConnectionError("the connection closed")
            for _ in prepared.calls:
                if not self.conn.can_read(timeout=REPLY_TIMEOUT):
                    raise redis.TimeoutError(f"no reply within {REPLY_TIMEOUT:.0f}s")
                try:
                    results.append(self.conn.read_response())
                except redis.ResponseError as exc:  # NOSCRIPT too: handled below
                    results.append(exc)
        except _IO_ERRORS as exc:
            logger.warning(
                "a reserve sent ahead got no reply (%s): what it leased, if anything, comes "
                "back when its lease expires",
                exc,
            )
            self._disconnect()
            return None
        lost_script = redis.exceptions.NoScriptError
        missing = [i for i, r in enumerate(results) if isinstance(r, lost_script)]
        if missing:
            # Those calls did not run (Redis restarted, SCRIPT FLUSH): run them now, through
            # the broker, which loads the script first.
            with translated_errors("reserve"):
                again = self.broker.script_replies([prepared.calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                results[i] = reply
        return self._still_held(self.broker.finish_round(prepared, results))

    def _still_held(self, round_: Round) -> tuple[Round, float]:
        """The round without what this consumer may no longer hold.

        Its leases ran from the moment Redis served it, but nobody renewed them while the reply
        waited unread (the renewer knows only what was handed over): after a long last task
        they may have expired, been reclaimed and been delivered to another consumer. So when
        as long as a renewal interval (a third of the lease) has passed, they are renewed
        first, and any found lost is dropped, not delivered a second time."""
        if self.broker.now_ms() - self._sent_ms < self.broker.lease_ms // 3:
            return round_, self._sent_at
        renewed_at = time.monotonic()
        held = [Lease(d.queue, d.key, d.token) for ds in round_.deliveries for d in ds]
        with translated_errors("renew what a reserve sent ahead leased"):
            lost = {(lease.queue, lease.key, lease.token) for lease in self.broker.extend(held)}
        if not lost:
            return round_, renewed_at
        logger.warning(
            "%d messages reserved ahead were taken back before this worker could run them "
            "(their leases expired while the task before them ran); dropped here",
            len(lost),
        )
        kept = [
            [d for d in ds if (d.queue, d.key, d.token) not in lost] for ds in round_.deliveries
        ]
        return round_._replace(deliveries=kept), renewed_at

    def close(self) -> None:
        self._pending = None
        self._disconnect()

    def _disconnect(self) -> None:
        with contextlib.suppress(*_IO_ERRORS):
            self.conn.disconnect()
