"""The one ``wait_until`` of the integration tests (kombu-level and Celery-level alike)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T | None], timeout: float = 5.0, what: str = "", interval: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something other than None or False; fail naming ``what``.

    An empty list, 0 or "" *is* an answer (a probe for "no messages left" may return ``[]``):
    a probe that waits for something to appear must return ``x or None``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}")
        time.sleep(interval)
