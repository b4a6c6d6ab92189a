"""The README's demo command, run as a user would (short mode), on its embedded valkey-server."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest


@pytest.mark.slow
def test_the_demo_recovers_a_killed_workers_tasks_and_exits_cleanly() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CELERY_MSG_REDIS_URL"}
    env["COLUMNS"] = "120"
    before = {p.pid for p in psutil.process_iter()}
    result = subprocess.run(
        [sys.executable, "-m", "celery_msg.demo", "--short"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "OK: nothing lost, nothing ran twice" in out
    assert "reports held by the killed worker" in out
    assert "unknown task dead-lettered with a reason" in out
    leftovers = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before
        and any(
            "celery_msg.demo" in part or "valkey-server" in part
            for part in (p.info["cmdline"] or [])
        )
    ]
    assert leftovers == []
