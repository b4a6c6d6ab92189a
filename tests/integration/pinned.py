"""A pinned clock for Broker-level tests: ``clock.t`` (seconds) is the broker's "now", so
deadlines, ages and heartbeats are exact. The ``clock`` and ``broker`` fixtures
(tests/integration/conftest.py) start it at :data:`T0`."""

from __future__ import annotations

#: Seconds since the epoch at which the pinned clock starts.
T0 = 1_000.0
#: The lease of the ``broker`` fixture (ms).
LEASE_MS = 30_000


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
