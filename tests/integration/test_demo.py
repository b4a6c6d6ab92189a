"""The README's demo command, run as a user would (short mode), on its embedded valkey-server:
it drives the Flask example over HTTP, kills a worker, and must end with every check passed."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

import psutil
import pytest
import redis

if TYPE_CHECKING:
    from conftest import Server


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
    # Only this venv's processes: other checkouts on the machine run their own servers.
    leftovers = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before
        and (p.info["cmdline"] or [""])[0].startswith(sys.prefix)
        and any(
            "celery_msg.demo" in part
            or "valkey-server" in part
            or "make_celery" in part
            or part == "shop"
            for part in (p.info["cmdline"] or [])
        )
    ]
    assert leftovers == []


@pytest.mark.slow
def test_the_demo_on_your_own_redis_piped_prints_in_order_and_leaves_no_keys(server: Server):
    env = {**os.environ, "CELERY_MSG_REDIS_URL": server.url, "COLUMNS": "120"}

    result = subprocess.run(
        [sys.executable, "-m", "celery_msg.demo", "--short"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )

    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # Piped (not a terminal): the timeline as it happens, then the final tables, the summary.
    order = [
        out.index("SIGKILL worker A"),
        out.index("POST /cache/invalidate"),
        out.index("\nfinished\n"),
        out.index("queues (from GET /queues)"),
        out.index("summary"),
        out.index("OK: nothing lost"),
    ]
    assert order == sorted(order), out
    assert out.count("POST /cache/invalidate") == 1 and out.count("\nfinished\n") == 1
    assert "delivered after 2 retries" in out
    assert "replayed once, charged 49.99 once" in out
    assert "removed the demo's" in out
    client = redis.Redis.from_url(server.url)
    try:
        assert list(client.scan_iter(match="shop-demo-*", count=1000)) == []
    finally:
        client.close()
