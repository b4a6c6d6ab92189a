"""How :class:`~celery_msg.core.Broker` sends its script calls: pipelined, with replication.

Why its own module: the Broker's script calls are grouped by job (:mod:`~celery_msg.publishing`,
:mod:`~celery_msg.consuming`, the dead-letter and maintenance calls in :mod:`~celery_msg.core`),
and each group sends them the same way. :class:`ScriptCalls` is the base they share: the
registered scripts (:class:`~celery_msg.transitions.Scripts`), the Broker's settings that go into
ARGV, and one pipelined round trip of many calls (:func:`~celery_msg.redisio.run_scripts`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from .errors import ReplicationTimeout
from .queues import Queues
from .redisio import Replication, ScriptCall, run_scripts, script_replies
from .transitions import Scripts

logger = logging.getLogger(__name__)

#: Seconds between two log lines about the same broken queue (or unconfirmed writes).
BROKEN_REPORT_INTERVAL = 60.0


class ScriptCalls(Queues):
    """The part of :class:`~celery_msg.core.Broker` every script-calling part builds on (the
    Broker sets the attributes below)."""

    scripts: Scripts
    #: ``min_replicas``: every script call waits for replicas to confirm it.
    replication: Replication | None
    lease_ms: int
    reclaim_batch: int
    max_deliveries: int
    _unconfirmed_reported: float
    unconfirmed: int

    def run_scripts(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Script calls in one pipelined round trip (see :func:`redisio.run_scripts`)."""
        return run_scripts(self.client, calls, self.replication)

    def script_replies(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """:meth:`run_scripts`, error replies left in the list (one broken queue must not keep
        the others' replies from being read)."""
        return script_replies(self.client, calls, self.replication)

    def _unconfirmed(self, exc: ReplicationTimeout) -> list[Any]:
        """A consumer's state change that replicas did not confirm in time: log it and go on
        with its replies (what is at stake is a redelivery, not a loss)."""
        self.unconfirmed += 1
        now = time.monotonic()
        if now >= self._unconfirmed_reported:
            self._unconfirmed_reported = now + BROKEN_REPORT_INTERVAL
            logger.warning("%s (a consumer goes on; reported once a minute)", exc)
        return exc.results
