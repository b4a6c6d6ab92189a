"""What one demo run sent and what the shop last said about it: read by the driver, the live
tables and the closing checks alike."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Run:
    """What the demo sent, and what the shop last said about it."""

    sent: dict[str, str] = field(default_factory=dict)  # task id -> kind
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    queues: dict[str, dict[str, int]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    phase: str = ""
    killed_at: float | None = None
    killed_holding: list[str] = field(default_factory=list)
    duplicate_signup: tuple[str, str] = ("", "")
    replayed: int = 0
    saw: dict[str, set[str]] = field(default_factory=dict)  # task id -> states seen
    consuming: dict[str, float] = field(default_factory=dict)  # worker -> when it consumed

    def ids(self, kind: str) -> list[str]:
        return [t for t, k in self.sent.items() if k == kind]

    def state(self, task_id: str) -> str:
        return str(self.status.get(task_id, {}).get("state", "PENDING"))

    def broker_state(self, task_id: str) -> str:
        found = self.status.get(task_id, {}).get("broker") or []
        return str(found[-1]["state"]) if found else ""

    def result(self, task_id: str) -> dict[str, Any]:
        """The task's return value once it succeeded (a STARTED task's result is Celery's
        {pid, hostname} meta, not what it returns)."""
        status = self.status.get(task_id, {})
        value = status.get("result")
        return value if status.get("state") == "SUCCESS" and isinstance(value, dict) else {}

    def note(self, line: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {line}")
