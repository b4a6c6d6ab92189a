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


class Renewer(threading.Thread):
    """Calls ``renew()`` every third of ``min(lease_timeout, binding_ttl)`` until stopped."""

    def __init__(self, target: Renewable, name: str) -> None:
        super().__init__(name=f"celery-msg-renewer-{name}", daemon=True)
        self.target = target
        self.stopped = threading.Event()
        self.interval = min(target.options.lease_timeout, target.options.binding_ttl) / 3

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.target.renew()
            except BrokerConnectionError as exc:
                logger.warning("lease renewal failed, retrying in %.1fs: %s", self.interval, exc)
            except Exception:
                logger.exception("lease renewal failed; retrying in %.1fs", self.interval)

    def stop(self) -> None:
        """Stop, and wait for a round in progress (its acks) to finish."""
        self.stopped.set()
        if self is not threading.current_thread():
            self.join(timeout=self.target.options.socket_timeout or None)
