"""The celery-msg dashboard: ``celery -A proj msg web`` (needs the ``web`` extra).

Queues with their counts and rates, each queue's messages by state, the dead-letter store
with replay and purge, and look-ups by id: the same reads and scripts as ``celery msg``, in a
browser. Safe by default (see :mod:`celery_msg.web.security`).
"""

from __future__ import annotations

from .app import Dashboard, create_app
from .security import Auth, InsecureBind

__all__ = ["Auth", "Dashboard", "InsecureBind", "create_app"]
