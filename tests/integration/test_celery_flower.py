"""Flower, the usual Celery dashboard, as a real process against a real worker on celery-msg.

Its HTTP API lists the worker with its stats (remote control) and the finished tasks (events).
Celery declares an events consumer's queue with a 5 s message TTL: once Flower is gone for good
(SIGKILL), its queue must stop growing within that TTL while the worker keeps sending events.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import pytest
from celery_helpers import (
    INTEGRATION_DIR,
    REPO_ROOT,
    Stack,
    StackFactory,
    wait_until,
)

from celery_msg.testing import free_port

if TYPE_CHECKING:
    pass


#: The message TTL (seconds) Celery gives an events consumer's queue (``event_queue_ttl``).
EVENT_TTL = 5.0


class Flower:
    """``celery -A celery_app.worker flower`` in its own process group, killed at teardown."""

    def __init__(self, stack: Stack, log_path: Path) -> None:
        self.stack = stack
        self.log_path = log_path
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None, "flower was not started"
        return self._proc

    def start(self, timeout: float = 30.0) -> Self:
        pythonpath = os.pathsep.join([str(REPO_ROOT), str(INTEGRATION_DIR)])
        env = {
            **os.environ,
            **self.stack.environ,
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",
            # Flower 2 serves its API only to authenticated users unless told otherwise.
            "FLOWER_UNAUTHENTICATED_API": "true",
        }
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_app.worker",
            "flower",
            f"--port={self.port}",
            "--address=127.0.0.1",
            "--inspect_timeout=3000",
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(lambda: self._healthy(), timeout, f"flower on port {self.port}", 0.2)
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"flower exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url("/healthcheck"), timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 15.0) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=timeout) as response:
            return json.loads(response.read())

    def kill(self) -> None:
        """SIGKILL: Flower is gone without cancelling its consumer or deleting its queue."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.kill()


@pytest.fixture
def flower_for(tmp_path: Path) -> Iterator[Callable[[Stack], Flower]]:
    started: list[Flower] = []

    def start(stack: Stack) -> Flower:
        flower = Flower(stack, tmp_path / f"flower{len(started)}.log")
        started.append(flower)
        return flower.start()

    yield start
    for flower in started:
        print(f"----- flower log -----\n{flower.log()}")  # shown only when the test failed
        flower.close()


def _events_queues(stack: Stack) -> list[str]:
    return [q for q in stack.broker.queues() if q.startswith("celeryev.")]


def test_flower_lists_the_worker_with_its_stats_and_the_tasks_it_finished(
    make_stack: StackFactory, flower_for: Callable[[Stack], Flower]
):
    stack = make_stack()
    worker = stack.worker(extra_args=["-E"])
    flower = flower_for(stack)
    wait_until(lambda: _events_queues(stack) or None, 45, "flower's events queue")
    results = [stack.task("add").delay(i, i) for i in range(3)]
    assert [r.get(timeout=15) for r in results] == [0, 2, 4]

    workers = flower.get("/api/workers?refresh=1")
    assert list(workers) == [worker.nodename], flower.log()
    stats = workers[worker.nodename].get("stats")
    assert stats is not None, f"no stats in {workers}\n{flower.log()}\n{stack.logs()}"
    assert stats["pid"] == worker.pid
    assert stats["broker"]["transport"] == "celery-msg"
    # The test app's own tasks (the client app may also hold shared tasks of other modules).
    own = [name for name, task in stack.app.tasks.items() if type(task).__module__ != "celery"]
    assert sorted(workers[worker.nodename]["registered"]) == sorted(
        name for name in own if stack.app.tasks[name].__module__.startswith("celery_app")
    )

    wanted = {r.id for r in results}

    def finished() -> dict[str, Any] | None:
        tasks = flower.get("/api/tasks")
        done = {i: t for i, t in tasks.items() if i in wanted and t.get("state") == "SUCCESS"}
        return done if set(done) == wanted else None

    done = wait_until(finished, 15, "flower to list the three finished tasks", 0.5)
    assert {t["name"] for t in done.values()} == {"add"}
    assert {t["worker"] for t in done.values()} == {worker.nodename}


def test_the_events_queue_of_a_sigkilled_flower_stops_growing_within_the_event_ttl(
    make_stack: StackFactory, flower_for: Callable[[Stack], Flower]
):
    stack = make_stack()  # binding_ttl 60 s: the binding outlives this test
    stack.worker(extra_args=["-E"])
    flower = flower_for(stack)
    (queue,) = wait_until(lambda: _events_queues(stack) or None, 45, "flower's events queue")

    sent: list[float] = []
    stop = threading.Event()

    def keep_sending() -> None:
        # Tasks keep running, so the worker keeps sending events (received, started, succeeded).
        adder = stack.task("add")
        while not stop.is_set():
            adder.delay(1, 1)
            sent.append(time.monotonic())
            time.sleep(0.02)

    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()
    try:
        flower.kill()
        killed = time.monotonic()
        time.sleep(EVENT_TTL + 1.0)
        first, first_at = stack.broker.size(queue), time.monotonic()
        time.sleep(EVENT_TTL)
        second, second_at = stack.broker.size(queue), time.monotonic()
    finally:
        stop.set()
        sender.join(10)
    arrived = sum(1 for t in sent if first_at <= t < second_at)
    assert first > 0 and arrived >= 20, (first, arrived, stack.logs())
    # Each task adds about three events; messages older than the TTL must be gone, so the queue
    # holds at most one TTL's worth, however long ago its consumer died.
    assert second - first < arrived, (
        f"events queue {queue}: {first} messages {first_at - killed:.1f}s after the SIGKILL, "
        f"{second} {second_at - killed:.1f}s after it; {arrived} tasks ran in between"
    )
