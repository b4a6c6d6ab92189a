"""Drive the demo: start Redis (embedded if none is configured), workers, tasks, and a crash.

What it shows, live: welcome emails flow through the ``default`` queue; reports that run longer
than the lease keep their lease (the worker renews it) and run once; then worker A is killed
with SIGKILL while it holds reports, worker B starts, and A's reports come back within the
lease and finish on B; a message for a task nobody knows lands in the dead-letter store with a
reason. It ends with a summary table and exits 0 only if every task finished exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from celery_msg.core import Broker
from celery_msg.servers import ServerProcess

QUEUES = ("default", "reports")


@dataclass
class Run:
    """What the driver knows about the run so far (read back from Redis events)."""

    sent: dict[str, str] = field(default_factory=dict)  # task id -> kind
    starts: Counter[str] = field(default_factory=Counter)
    done: Counter[str] = field(default_factory=Counter)
    workers: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    log: list[str] = field(default_factory=list)
    first_start_after_kill: dict[str, float] = field(default_factory=dict)
    killed_at: float | None = None
    killed_holding: set[str] = field(default_factory=set)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m celery_msg.demo", description=__doc__)
    parser.add_argument("--short", action="store_true", help="fewer tasks, shorter lease (CI)")
    parser.add_argument("--emails", type=int, default=None, help="welcome emails to send")
    return parser.parse_args()


@contextmanager
def _redis_url(console: Console) -> Iterator[str]:
    url = os.environ.get("CELERY_MSG_REDIS_URL")
    if url:
        console.print(f"Using Redis from CELERY_MSG_REDIS_URL: [bold]{url}[/]")
        yield url
        return
    with ServerProcess("valkey") as server:
        console.print(
            f"CELERY_MSG_REDIS_URL is not set: started an embedded valkey-server "
            f"{server.version} on [bold]{server.url}[/]"
        )
        yield server.url


@contextmanager
def _worker(name: str, env: dict[str, str], console: Console) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_msg.demo.tasks",
        "worker",
        "-P",
        "prefork",
        "-c",
        "2",
        "-Q",
        ",".join(QUEUES),
        "-n",
        f"{name}@%h",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
        "-l",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    console.print(f"started worker [bold]{name}[/] (pid {proc.pid})")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_events(client: redis.Redis, key: str, run: Run, cursor: int) -> int:
    raw = client.lrange(key, cursor, -1)
    for item in raw:
        event: dict[str, Any] = json.loads(item)
        task, kind = event["task"], event["kind"]
        label = run.sent.get(task, "?")
        if kind == "start":
            run.starts[task] += 1
            run.workers[task].add(event["pid"])
            if run.killed_at is not None and task in run.killed_holding:
                run.first_start_after_kill.setdefault(task, event["time"])
            if run.starts[task] > 1:
                run.log.append(f"{label} {task[:8]} started again (redelivered)")
        elif kind == "done":
            run.done[task] += 1
    return cursor + len(raw)


def _view(run: Run, broker: Broker, phase: str) -> Group:
    depth = Table(title="queues", expand=False)
    for col in ("queue", "ready", "reserved", "dead"):
        depth.add_column(col, justify="right" if col != "queue" else "left")
    for queue in QUEUES:
        c = broker.counts(queue)
        depth.add_row(queue, str(c["ready"]), str(c["reserved"]), str(c["dead"]))
    tasks = Table(title="tasks", expand=False)
    for col in ("kind", "sent", "running", "done", "ran twice"):
        tasks.add_column(col, justify="right" if col != "kind" else "left")
    for kind in ("email", "report"):
        ids = [t for t, k in run.sent.items() if k == kind]
        running = sum(1 for t in ids if run.starts[t] and not run.done[t])
        done = sum(1 for t in ids if run.done[t])
        twice = sum(1 for t in ids if run.done[t] > 1)
        tasks.add_row(kind, str(len(ids)), str(running), str(done), str(twice))
    log = "\n".join(run.log[-6:])
    return Group(f"[bold cyan]{phase}[/]", depth, tasks, log)


def main() -> int:
    args = _parse()
    console = Console()
    lease = 3.0 if args.short else 4.0
    emails = args.emails if args.emails is not None else (20 if args.short else 60)
    reports = 2  # one per process of worker A, so both are running when it is killed
    report_seconds = 2.5 * lease
    prefix = f"celery-msg-demo-{uuid.uuid4().hex[:6]}:"
    with ExitStack() as stack:
        url = stack.enter_context(_redis_url(console))
        broker_url = url.replace("rediss://", "celery-msgs://", 1).replace(
            "redis://", "celery-msg://", 1
        )
        env = {
            **os.environ,
            "CELERY_MSG_DEMO_BROKER": broker_url,
            "CELERY_MSG_DEMO_PREFIX": prefix,
            "CELERY_MSG_DEMO_LEASE": str(lease),
        }
        os.environ.update(env)
        from celery_msg.demo import tasks  # configured by the environment set above

        client = redis.Redis.from_url(url)
        broker = Broker(client, prefix=prefix)
        stack.callback(_cleanup, client, prefix)
        run = Run()
        cursor = 0
        worker_a = stack.enter_context(_worker("demo-a", env, console))

        def refresh(live: Live, phase: str) -> None:
            nonlocal cursor
            cursor = _read_events(client, tasks.EVENTS, run, cursor)
            live.update(_view(run, broker, phase))

        with Live(console=console, refresh_per_second=8, transient=False) as live:
            for _ in range(reports):
                res = tasks.build_report.delay(report_seconds)
                run.sent[res.id] = "report"
            for i in range(emails):
                res = tasks.send_welcome_email.delay(f"user{i}@example.com")
                run.sent[res.id] = "email"
            run.log.append(
                f"sent {emails} emails and {reports} reports of {report_seconds:.0f}s "
                f"(lease {lease:.0f}s: the worker must renew it to finish)"
            )
            # Phase 1: wait until worker A is running two reports, then kill it.
            deadline = time.monotonic() + 60
            holding: set[str] = set()
            while time.monotonic() < deadline:
                refresh(live, "phase 1: worker A runs emails and reports")
                holding = {
                    t
                    for t, k in run.sent.items()
                    if k == "report" and run.starts[t] and not run.done[t]
                }
                if len(holding) >= reports:
                    break
                time.sleep(0.2)
            time.sleep(lease * 1.2)  # past one lease: A renews while it runs them
            refresh(live, "phase 1: worker A runs emails and reports")
            holding = {
                t
                for t, k in run.sent.items()
                if k == "report" and run.starts[t] and not run.done[t]
            }
            run.killed_holding = holding
            run.killed_at = time.time()
            _kill(worker_a)
            run.log.append(f"SIGKILL worker A while it ran {len(holding)} reports")
            stack.enter_context(_worker("demo-b", env, console))
            run.log.append("started worker B")
            # Phase 2: everything must finish, A's reports included.
            bad = tasks.app.send_task("reports.no_such_task", queue="default")
            run.log.append(f"sent a message for an unknown task ({bad.id[:8]})")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                refresh(live, "phase 2: worker A is dead; worker B takes over")
                if all(run.done[t] for t in run.sent) and broker.counts("default")["dead"]:
                    break
                time.sleep(0.25)
            refresh(live, "finished")

        return _summary(console, run, broker, lease, bad.id)
    return 1


def _summary(console: Console, run: Run, broker: Broker, lease: float, bad_id: str) -> int:
    completed = sum(1 for t in run.sent if run.done[t] >= 1)
    twice = [t for t in run.sent if run.done[t] > 1]
    lost = [t for t in run.sent if run.done[t] == 0]
    recovered = [t for t in run.killed_holding if run.done[t]]
    delays = [
        run.first_start_after_kill[t] - (run.killed_at or 0) for t in run.first_start_after_kill
    ]
    dead = broker.dead_letters("default")
    dead_ok = any(
        info.id == bad_id and (info.dead_reason or {}).get("reason") == "unknown-task"
        for info in dead
    )
    console.print()
    table = Table(title="summary")
    table.add_column("check")
    table.add_column("result", justify="right")
    table.add_row("tasks sent", str(len(run.sent)))
    table.add_row("finished", str(completed))
    table.add_row("finished twice", str(len(twice)))
    table.add_row("lost", str(len(lost)))
    table.add_row("reports held by the killed worker", str(len(run.killed_holding)))
    table.add_row("... finished on worker B", str(len(recovered)))
    if delays:
        table.add_row("... back after the kill within", f"{max(delays):.1f}s (lease {lease:.0f}s)")
    table.add_row("unknown task dead-lettered with a reason", "yes" if dead_ok else "NO")
    console.print(table)
    ok = not twice and not lost and dead_ok and len(recovered) == len(run.killed_holding)
    console.print(
        "[bold green]OK[/]: nothing lost, nothing ran twice" if ok else "[bold red]FAILED[/]"
    )
    return 0 if ok else 1


def _cleanup(client: redis.Redis, prefix: str) -> None:
    for key in client.scan_iter(match=f"*{prefix}*", count=1000):
        client.delete(key)
    client.close()


if __name__ == "__main__":
    sys.exit(main())
