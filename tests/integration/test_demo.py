"""The README's demo command, run as a user would (short mode), on its embedded valkey-server:
it drives the Flask example over HTTP, kills a worker, and must end with every check passed."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import psutil
import pytest
import redis
from celery_helpers import REPO_ROOT

if TYPE_CHECKING:
    from conftest import Server


def run_demo(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], dict[int, str]]:
    """``make demo``'s command in short mode; also every process it started, seen while it ran
    (its children start their own sessions, so only their parentage ties them to it)."""
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        subprocess.Popen(
            [sys.executable, "-m", "example_project.demo", "--short"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=err,
            text=True,
        ) as proc,
    ):
        descendants: dict[int, str] = {}
        demo = psutil.Process(proc.pid)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                for child in demo.children(recursive=True):
                    if child.pid not in descendants:
                        with contextlib.suppress(psutil.Error):
                            descendants[child.pid] = " ".join(child.cmdline())
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        returncode = proc.wait()
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(proc.args, returncode, out.read(), err.read())
    return done, descendants


def still_running(pids: dict[int, str]) -> list[list[str]]:
    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.cmdline())
    return alive


@pytest.mark.slow
def test_the_demo_recovers_a_killed_workers_tasks_and_exits_cleanly() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CELERY_MSG_REDIS_URL"}
    env["COLUMNS"] = "120"
    result, started = run_demo(env)
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
    # The demo's own process tree (its valkey-server, web server, workers and their pools):
    # seen while it ran, so an unrelated server elsewhere on the machine does not count.
    assert any("valkey-server" in cmd for cmd in started.values()), started
    assert sum("worker" in cmd for cmd in started.values()) >= 2, started
    assert still_running(started) == []


@pytest.mark.slow
def test_the_demo_on_your_own_redis_piped_prints_in_order_and_leaves_no_keys(server: Server):
    env = {**os.environ, "CELERY_MSG_REDIS_URL": server.url, "COLUMNS": "120"}

    result, started = run_demo(env)

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
    assert still_running(started) == []
    client = redis.Redis.from_url(server.url)
    try:
        assert list(client.scan_iter(match="shop-demo-*", count=1000)) == []
    finally:
        client.close()
