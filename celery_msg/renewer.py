"""The background thread that keeps a live consumer's leases alive.

It is what turns a visibility timeout into a lease: while the process lives, everything it
holds is renewed in one batched call per round, so a task may run for hours; when the process
dies, renewal stops and the leases expire, so its messages come back within one lease.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from .errors import BrokerConnectionError
from .options import TransportOptions

logger = logging.getLogger(__name__)


class Renewable(Protocol):
    """What the renewer drives (the transport)."""

    options: TransportOptions

    def renew(self) -> None:
        """One round: flush buffered acks, renew held leases, refresh live bindings."""

    def renew_interval(self) -> float:
        """Seconds until the next round (it may change as queues are consumed)."""


class Renewer(threading.Thread):
    """Calls ``renew()`` every ``renew_interval()`` (a third of the shortest of the lease, the
    binding TTL and the consumed queues' ``expires``) until stopped."""

    def __init__(self, target: Renewable, name: str) -> None:
        super().__init__(name=f"celery-msg-renewer-{name}", daemon=True)
        self.target = target
        self.stopped = threading.Event()
        self.interval = target.renew_interval()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.target.renew()
                self.interval = self.target.renew_interval()
            except BrokerConnectionError as exc:
                logger.warning("lease renewal failed, retrying in %.1fs: %s", self.interval, exc)
            except Exception:
                logger.exception("lease renewal failed; retrying in %.1fs", self.interval)

    def stop(self) -> None:
        """Stop, and wait for a round in progress (its acks) to finish."""
        self.stopped.set()
        if self is not threading.current_thread():
            self.join(timeout=self.target.options.socket_timeout or None)
