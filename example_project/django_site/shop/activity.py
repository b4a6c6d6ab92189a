"""The back office's activity log: one JSON line per thing a task did.

Tasks run in several worker processes (and hosts): each line says which process and which
worker node did what, and at which attempt, so that "ran once", "retried twice" and "reached
every worker" can be read back (GET /activity).
"""

import json
import os
import time
from typing import Any

from django.conf import settings


def record(event: str, **fields: Any) -> None:
    """Append one line; a write this small with O_APPEND is not interleaved with others."""
    path = settings.SHOP_ACTIVITY_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"event": event, "time": time.time(), "pid": os.getpid(), **fields})
    with path.open("a", encoding="utf-8") as log:
        log.write(line + "\n")


def entries(event: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """The recorded lines (``event`` ones only, if given), oldest first, the last ``limit``."""
    try:
        lines = settings.SHOP_ACTIVITY_LOG.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    found = [json.loads(line) for line in lines if line.strip()]
    found = [e for e in found if event is None or e["event"] == event]
    return found[-limit:] if limit else found
