"""Real ``celery worker`` processes for the integration tests, and the state around them.

:class:`Worker` starts ``python -m celery -A celery_app.worker worker`` in its own process
group with its log in a file, waits for its "ready." line, and is always killed (the whole
group, SIGKILL) at teardown. :class:`Stack` is one test's world: settings (a unique key prefix
on a real server), a client app built from the same settings, a :class:`Broker` for looking at
queues, the task event list, and every worker started for the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Self

import redis
from celery import Celery
from celery_app.settings import DEFAULT_QUEUE, Settings
from celery_app.tasks import create_app
from waiting import wait_until as wait_until

from celery_msg.core import Broker
from celery_msg.testing import Closing

REPO_ROOT = Path(__file__).resolve().parents[2]
INTEGRATION_DIR = Path(__file__).resolve().parent
HOSTNAME = socket.gethostname()
#: Seconds a worker gets to log "ready." (imports, connecting, declaring queues).
READY_TIMEOUT = 30.0
#: Lines of each worker's log printed at teardown (pytest shows them only for failed tests).
LOG_TAIL_LINES = 150


class WorkerError(AssertionError):
    """A worker did not start, or did not exit when it should; the message has its log tail."""


class Worker:
    """One ``celery worker`` process group; the process leads its own group (``setsid``)."""

    def __init__(
        self,
        environ: dict[str, str],
        log_path: Path,
        *,
        name: str,
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        pool: Literal["solo", "prefork", "threads"] = "solo",
        concurrency: int = 1,
        extra_args: Sequence[str] = (),
        app: str = "celery_app.worker",
        cwd: Path = REPO_ROOT,
    ) -> None:
        """``app`` and ``cwd``: ``celery -A <app>`` run from ``cwd`` (an example project's
        directory, as its README says); the test app by default."""
        self.environ = environ
        self.cwd = cwd
        self.log_path = log_path
        self.nodename = f"{name}@{HOSTNAME}"
        self.argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-Q",
            ",".join(queues),
            "-n",
            self.nodename,
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            "-l",
            "info",
            *extra_args,
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise WorkerError(f"worker {self.nodename} was not started")
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = READY_TIMEOUT) -> Self:
        """Start and wait for the worker's "<nodename> ready." log line."""
        self.spawn().wait_for_log(f"{self.nodename} ready.", timeout)
        return self

    def process_environ(self) -> dict[str, str]:
        """The process's environment: this one's, the stack's settings, the test app's path."""
        pythonpath = [str(REPO_ROOT), str(INTEGRATION_DIR)]
        if os.environ.get("PYTHONPATH"):
            pythonpath.append(os.environ["PYTHONPATH"])
        return {
            **os.environ,
            **self.environ,
            "PYTHONPATH": os.pathsep.join(pythonpath),
            "PYTHONUNBUFFERED": "1",
        }

    def spawn(self) -> Self:
        """Start without waiting (several workers can then start side by side)."""
        env = self.process_environ()
        with self.log_path.open("ab") as log:
            log.write(f"=== {' '.join(self.argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                raise WorkerError(
                    f"worker {self.nodename} exited with {self.proc.returncode} before logging "
                    f"{text!r}; log:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise WorkerError(
                    f"worker {self.nodename} did not log {text!r} within {timeout}s; log:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children): a crash."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        """SIGTERM to the main process: Celery's warm shutdown."""
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WorkerError(
                f"worker {self.nodename} still running {timeout}s later; log:\n{self.log_tail()}"
            ) from None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the main process so far (from /proc/<pid>/stat)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        # Fields after the ")" closing the command name; utime and stime are fields 14 and 15.
        rest = stat.rsplit(")", 1)[1].split()
        ticks = int(rest[11]) + int(rest[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def close(self) -> None:
        """Kill the group whatever state it is in (also orphaned pool children)."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(10)


@dataclass(frozen=True)
class Event:
    """One entry of the task event list (see ``celery_app.tasks.record``)."""

    event: str
    pid: int
    time: float
    task: str = ""
    label: str = ""
    worker: str = ""
    token: str = ""


class Stack(Closing):
    """One test's app, broker view, event list and workers; :meth:`close` tears all down."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.workers: list[Worker] = []
        self._app: Celery | None = None
        self.redis = redis.Redis.from_url(settings.events_url)
        self.broker = Broker(self.redis, prefix=settings.prefix)

    @property
    def environ(self) -> dict[str, str]:
        return self.settings.environ()

    @property
    def app(self) -> Celery:
        """The client side: same settings as the workers (publish, results, control)."""
        if self._app is None:
            self._app = create_app(self.environ)
        return self._app

    def task(self, name: str) -> Any:
        return self.app.tasks[name]

    def worker(self, name: str | None = None, *, start: bool = True, **options: Any) -> Worker:
        """A worker on this stack (started unless ``start=False``), killed at teardown."""
        name = name or f"w{len(self.workers) + 1}-{uuid.uuid4().hex[:6]}"
        worker = Worker(self.environ, self.log_dir / f"{name}.log", name=name, **options)
        self.workers.append(worker)
        return worker.start() if start else worker

    def events(self, event: str | None = None) -> list[Event]:
        raw = self.redis.lrange(self.settings.events_key, 0, -1)
        events = [Event(**json.loads(item)) for item in raw]
        return [e for e in events if event is None or e.event == event]

    def wait_for_events(self, event: str, count: int, timeout: float) -> list[Event]:
        """Wait until at least ``count`` ``event`` entries are recorded; return them all."""
        return self._wait_events(
            lambda events: len(events) >= count, event, timeout, f"{count} {event!r} events"
        )

    def wait_for_tasks(self, event: str, tasks: Iterable[str], timeout: float) -> list[Event]:
        """Wait until every task in ``tasks`` has an ``event`` entry; return those entries."""
        wanted = set(tasks)
        found = self._wait_events(
            lambda events: wanted <= {e.task for e in events},
            event,
            timeout,
            f"{event!r} events of {len(wanted)} tasks",
        )
        return [e for e in found if e.task in wanted]

    def _wait_events(
        self, done: Callable[[list[Event]], bool], event: str, timeout: float, what: str
    ) -> list[Event]:
        def probe() -> list[Event] | None:
            found = self.events(event)
            return found if done(found) else None

        try:
            return wait_until(probe, timeout, what, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; events so far: {self.events()}\n{self.logs()}") from None

    def settled(self, queue: str, timeout: float = 5.0, **expected: int) -> dict[str, int]:
        """Wait until ``queue``'s counts are ``expected`` (missing ones 0); return them.

        Acks are settled with the worker's next round trip, a moment after the result is
        stored, so a test that just got a result waits for the counts instead of reading them.
        """
        want = {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 0, **expected}
        last: dict[str, int] = {}

        def probe() -> dict[str, int] | None:
            last.update(self.broker.counts(queue))
            return last if last == want else None

        try:
            return wait_until(probe, timeout, f"counts of {queue!r} to be {want}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last counts {last}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(
            f"----- worker {w.nodename} (pid {w.pid if w._proc else '-'}) log tail -----\n"
            f"{w.log_tail()}"
            for w in self.workers
        )

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        if self.workers:
            print(self.logs())  # shown by pytest only when the test failed
        if self._app is not None:
            self._app.close()
        with contextlib.suppress(redis.RedisError):
            backend = redis.Redis.from_url(self.settings.backend_url)
            keys = list(backend.scan_iter(match=f"*{self.settings.prefix}*", count=1000))
            if keys:
                backend.unlink(*keys)
            backend.close()
        self.redis.close()


def stopped_by_its_task(stack: Stack, outcome: str, label: str) -> tuple[Worker, str]:
    """A prefork worker that ran ``stop_worker_then(outcome)`` and was SIGSTOPped by it (so it
    never reads the result: what is acked meanwhile, its pool child acked), and the task id.
    Returns once the child logged the task's end (its trace is over)."""
    worker = stack.worker(pool="prefork", concurrency=1)
    task_id = stack.task("stop_worker_then").delay(outcome, label).id
    ended = {"succeed": "succeeded in", "fail": "raised unexpected", "retry": "retry:"}[outcome]
    worker.wait_for_log(f"[{task_id}] {ended}", timeout=20)
    return worker, task_id


def acked_by_its_pool_child(stack: Stack, label: str, timeout: float) -> tuple[Worker, str]:
    """:func:`stopped_by_its_task` with a success, then its queue settled and the message gone
    within ``timeout`` although the worker is stopped: its pool child acked it."""
    worker, task_id = stopped_by_its_task(stack, "succeed", label)
    stack.settled(DEFAULT_QUEUE, timeout=timeout)
    assert stack.broker.lookup(task_id, [DEFAULT_QUEUE]) == []
    return worker, task_id


def readme_acl(prefix: str, password: str, marker: str = "acl") -> str:
    """The ACL line after ``<!-- marker -->`` in README.md (``acl``: the broker's user, in
    Security; ``acl-cluster``: what a Cluster adds to it), for ``prefix`` and ``password``."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker} -->\n```\n([^\n]+)\n```", readme)
    assert match is not None, f"README.md has no ACL line after <!-- {marker} -->"
    line = match.group(1)
    assert "celery-msg:*" in line
    return line.replace(" >secret ", f" >{password} ").replace("celery-msg:*", f"{prefix}*")


#: ``make(**settings)`` of :func:`stack_factory` (the ``make_stack`` fixture).
StackFactory = Callable[..., "Stack"]


@contextlib.contextmanager
def stack_factory(redis_url: str, prefix: str, log_dir: Path) -> Iterator[Callable[..., Stack]]:
    """Yields ``make(**settings)``: a :class:`Stack` on ``redis_url`` with ``prefix`` and any
    :class:`Settings` overrides. Every stack made is closed (its workers killed) on exit."""
    with contextlib.ExitStack() as stacks:

        def make(**settings: Any) -> Stack:
            base = Settings(redis_url=redis_url, prefix=prefix)
            return stacks.enter_context(Stack(replace(base, **settings), log_dir))

        yield make
