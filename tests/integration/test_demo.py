"""The README's demo command, run as a user would (short mode), on its embedded valkey-server:
it drives the Flask example over HTTP, kills a worker, and must end with every check passed."""

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
    assert "FAILED" not in out
    for check in (
        "reports held by the killed worker, finished on worker B",
        "double-submitted signup enqueued once",
        "webhook: retried with backoff, then delivered",
        "charge: dead-lettered, replayed, charged once",
        "broadcast reached the live worker",
    ):
        assert check in out
    leftovers = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before
        and any(
            "celery_msg.demo" in part
            or "valkey-server" in part
            or "make_celery" in part
            or part == "shop"
            for part in (p.info["cmdline"] or [])
        )
    ]
    assert leftovers == []
