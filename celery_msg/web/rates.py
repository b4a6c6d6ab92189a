"""Publish and ack rates over the last minutes, sampled by the dashboard process itself.

The scripts keep lifetime counters per queue (``published``, ``acked``, ... in the queue's
``stats`` hash); a rate is the difference of two readings over the time between them. A
:class:`RateSampler` thread reads the counters of every queue every ``interval`` seconds (one
pipelined round trip) and keeps the last ``window`` readings in memory: nothing is written to
Redis, and a restarted dashboard starts with an empty chart.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: The counters charted: their names in a queue's ``stats`` hash.
CHARTED = ("published", "acked")


@dataclass(frozen=True)
class Reading:
    """Every queue's charted counters at one moment (seconds since the epoch)."""

    at: float
    counters: Mapping[str, Mapping[str, int]]


class RateSampler:
    """Keeps the last ``window`` readings of ``read()``, one every ``interval`` seconds.

    ``read`` returns ``{queue: {counter: value}}``; a failing read (Redis down) is logged and
    leaves a gap rather than stopping the thread."""

    def __init__(
        self,
        read: Callable[[], Mapping[str, Mapping[str, int]]],
        *,
        interval: float = 5.0,
        window: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, not {interval!r}")
        if window < 2:
            raise ValueError(f"window must be >= 2 readings, not {window!r}")
        self.interval = interval
        self._read = read
        self._clock = clock
        self._readings: deque[Reading] = deque(maxlen=window)
        self._lock = threading.Lock()
        # Charts change only when a reading arrives: drawn once per reading, not per page.
        self._charts: dict[str, tuple[str, ...]] = {}
        self._charted_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one reading now (the thread calls this; tests may too)."""
        try:
            counters = self._read()
        except Exception:  # a dashboard keeps running while Redis is away
            logger.warning("could not read queue counters for the rate charts", exc_info=True)
            return
        with self._lock:
            self._readings.append(Reading(self._clock(), counters))

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="celery-msg-rates", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def charts(self) -> dict[str, tuple[str, ...]]:
        """A sparkline per queue and charted counter (:data:`CHARTED` order), drawn once per
        reading; a queue without readings yet has none (the page draws an empty chart)."""
        with self._lock:
            readings = list(self._readings)
            if not readings or readings[-1].at == self._charted_at:
                return self._charts
        queues = set().union(*(r.counters for r in readings))
        charts = {
            queue: tuple(sparkline(_rates(readings, queue, c)) for c in CHARTED) for queue in queues
        }
        with self._lock:
            self._charts, self._charted_at = charts, readings[-1].at
        return charts

    def rates(self, queue: str, counter: str) -> list[float]:
        """Per-second rates of ``counter`` in ``queue`` between consecutive readings, oldest
        first (a counter that went down, as after a queue was deleted, counts as 0)."""
        with self._lock:
            readings = list(self._readings)
        return _rates(readings, queue, counter)


def _rates(readings: Sequence[Reading], queue: str, counter: str) -> list[float]:
    out: list[float] = []
    for before, after in itertools.pairwise(readings):
        elapsed = after.at - before.at
        old = before.counters.get(queue, {}).get(counter, 0)
        new = after.counters.get(queue, {}).get(counter, 0)
        out.append(max(0, new - old) / elapsed if elapsed > 0 else 0.0)
    return out


def sparkline(values: Sequence[float], width: int = 120, height: int = 24) -> str:
    """An inline SVG polyline of ``values`` (numbers only: nothing from Redis reaches the
    markup as text), scaled to its own maximum, in whole pixels (1,000 rows of two charts
    stay small); an empty chart when there is nothing yet. Stroke and colour are in CSS."""
    head = f'<svg class="spark" width="{width}" height="{height}" role="img"'
    if len(values) < 2:
        return f'{head} aria-label="no data yet"></svg>'
    top = max(values) or 1.0
    step = width / (len(values) - 1)
    points = " ".join(
        f"{round(i * step)},{round(height - 1 - (v / top) * (height - 2))}"
        for i, v in enumerate(values)
    )
    label = f"last {values[-1]:.1f}/s, max {max(values):.1f}/s"
    return f'{head} aria-label="{label}"><polyline points="{points}"/></svg>'
