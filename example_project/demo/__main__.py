"""``make demo``: the Flask example shop on celery-msg, driven over HTTP, with a worker killed.

It starts Redis (an embedded valkey-server unless ``CELERY_MSG_REDIS_URL`` is set), the example's
web server and a Celery worker, then calls the shop's HTTP API as a client would: sign-ups
(welcome emails, one submitted twice), reports that run longer than the lease, a webhook to a
partner that is down at first, a card charge while the payment gateway is down, a reminder
with a countdown and a cache invalidation broadcast. While worker A runs the reports it is
killed with SIGKILL and worker B takes over. The charge lands in the dead-letter store, the
gateway comes back, the charge is replayed. It ends with a summary table and exits 0 only if
every check holds; no process is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from celery_msg.testing import ServerProcess

from . import summary
from .processes import FLASK_APP, Child, DemoError, Shop, free_port, web_server, worker
from .run import Run

#: Every key of a demo run starts with this, then a random part.
DEMO_PREFIX = "shop-demo-"
SHOWN_QUEUES = ("emails", "reports", "webhooks", "default")
KINDS = ("email", "report", "webhook", "charge", "reminder", "broadcast")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m example_project.demo", description=__doc__)
    parser.add_argument("--short", action="store_true", help="fewer tasks, shorter lease (CI)")
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


def _tables(run: Run) -> tuple[Table, Table]:
    """The queues' counts and the tasks' states, as the shop's HTTP API reports them."""
    queues = Table(title="queues (from GET /queues)")
    for column in ("queue", "ready", "scheduled", "reserved", "dead"):
        queues.add_column(column, justify="left" if column == "queue" else "right")
    for name in SHOWN_QUEUES:
        counts = run.queues.get(name, {})
        queues.add_row(
            name, *(str(counts.get(c, 0)) for c in ("ready", "scheduled", "reserved", "dead"))
        )
    tasks = Table(title="tasks (from GET /tasks)")
    for column in ("kind", "sent", "waiting", "running", "retried", "done", "dead"):
        tasks.add_column(column, justify="left" if column == "kind" else "right")
    for kind in KINDS:
        ids = run.ids(kind)
        states = [run.state(t) for t in ids]
        tasks.add_row(
            kind,
            str(len(ids)),
            str(sum(s in ("PENDING", "RECEIVED") for s in states)),
            str(states.count("STARTED")),
            str(sum("RETRY" in run.saw.get(t, set()) for t in ids)),
            str(states.count("SUCCESS")),
            str(sum(run.broker_state(t) == "DEAD" for t in ids)),
        )
    return queues, tasks


def _view(run: Run) -> Group:
    """The live view on a terminal: the phase, both tables, the timeline's last lines."""
    queues, tasks = _tables(run)
    return Group(f"[bold cyan]{run.phase}[/]", queues, tasks, "\n".join(run.log[-8:]))


class Driver:
    """One demo run: the shop's API, its workers, the live view."""

    def __init__(self, console: Console, shop: Shop, env: dict[str, str], lease: float) -> None:
        self.console = console
        self.shop = shop
        self.env = env
        self.lease = lease
        self.run = Run()
        self.workers: dict[str, Child] = {}
        #: The live view on a terminal; piped, the timeline is printed line by line instead
        #: (a Live prints only its last frame there, after everything else).
        self.live: Live | None = None
        self._printed = 0
        self._phase = ""

    def close(self) -> None:
        for child in self.workers.values():
            child.close()

    def refresh(self) -> None:
        run = self.run
        pending = [t for t in run.sent if run.state(t) != "SUCCESS" or run.broker_state(t)]
        for start in range(0, len(pending), 40):
            batch = pending[start : start + 40]
            for status in self.shop.get("/tasks?ids=" + ",".join(batch)):
                run.status[status["task_id"]] = status
                run.saw.setdefault(status["task_id"], set()).add(status["state"])
        run.queues = self.shop.get("/queues")
        for name, child in self.workers.items():
            if not child.alive() and name != "demo-a":
                raise DemoError(f"worker {name} died:\n{child.tail()}")
        if self.live is not None:
            self.live.update(_view(run))
        else:
            self.echo()

    def echo(self) -> None:
        """Piped output: new phases and timeline lines, in order, as they happen."""
        run = self.run
        for line in run.log[self._printed :]:
            self.console.print(f"  {line}", markup=False, highlight=False)
        self._printed = len(run.log)
        if run.phase != self._phase:
            self._phase = run.phase
            self.console.print(f"[bold cyan]{run.phase}[/]")

    def wait(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        self.run.phase = what
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if done():
                return
            if time.monotonic() >= deadline:
                raise DemoError(f"timed out after {timeout:.0f}s: {what}")
            time.sleep(0.25)

    def start_worker(self, name: str) -> None:
        child = self.workers[name] = worker(name, self.env)
        self.run.note(f"started worker {name} (pid {child.pid}, prefork -c 2)")
        self.wait(
            f"waiting for worker {name} to start consuming",
            lambda: any(q.startswith(f"{name}@") for q in self.run.queues),
            60,
        )
        self.run.consuming[name] = time.time()

    def send(self, kind: str, path: str, body: dict[str, Any] | None = None) -> str:
        task_id = str(self.shop.post(path, body)["task_id"])
        self.run.sent[task_id] = kind
        return task_id

    def scenario(self, emails: int) -> None:
        run = self.run
        report_seconds = round(2.5 * self.lease, 1)
        self.start_worker("demo-a")
        run.phase = "phase 1: the shop enqueues work through its HTTP API"
        for n in range(2):
            self.send("report", "/reports", {"report_id": f"q{n + 1}", "seconds": report_seconds})
        run.note(f"POST /reports x2: {report_seconds}s each, lease {self.lease:.0f}s")
        for i in range(emails):
            self.send("email", "/signup", {"email": f"user{i}@example.com"})
        again = str(self.shop.post("/signup", {"email": "user0@example.com"})["task_id"])
        run.duplicate_signup = (run.ids("email")[0], again)
        run.note(f"POST /signup x{emails}, and user0 twice (same task id: unique publish)")
        self.send("webhook", "/webhooks", {"url": "https://partner.example/hook", "fail_times": 2})
        run.note("POST /webhooks: the partner is down for the first 2 calls")
        self.shop.post("/gateway", {"down": True})
        self.send("charge", "/orders/42/charge", {"amount_cents": 4999})
        run.note("POST /orders/42/charge while the payment gateway is down")
        self.send("reminder", "/reminders", {"email": "user1@example.com", "in_seconds": 3})
        run.note("POST /reminders: countdown 3s, it waits in Redis")

        reports = run.ids("report")
        self.wait(
            "phase 1: worker A runs the reports (and renews their leases)",
            lambda: all(run.state(t) == "STARTED" for t in reports),
            60,
        )
        time.sleep(self.lease * 1.3)  # past one lease: only renewal keeps them
        self.refresh()
        run.killed_holding = [t for t in reports if run.state(t) == "STARTED"]
        run.killed_at = time.time()
        self.workers["demo-a"].kill()
        run.note(f"SIGKILL worker A while it runs {len(run.killed_holding)} reports")
        self.start_worker("demo-b")
        self.wait(
            "phase 2: A's reports come back when their leases expire",
            lambda: all(
                run.result(t) or (run.state(t) == "STARTED" and _moved(run, t))
                for t in run.killed_holding
            ),
            60,
        )
        run.note("A's reports started again on worker B")
        self.send("report", "/reports", {"report_id": "q3", "seconds": report_seconds})
        run.note("POST /reports: one more, on worker B (it too outlives its lease)")

        def settled() -> bool:
            done = all(
                run.state(t) == "SUCCESS" for k in KINDS for t in run.ids(k) if k != "charge"
            )
            return done and all(run.broker_state(t) == "DEAD" for t in run.ids("charge"))

        self.wait("phase 2: worker B takes over; the charge fails for good", settled, 120)
        dead = self.shop.get("/dead-letters?task=shop.tasks.charge_card")
        detail = dead[0]["detail"] if dead else "?"
        run.note(f"GET /dead-letters: the charge is dead: {detail}")
        self.shop.post("/gateway", {"down": False})
        run.replayed = int(
            self.shop.post("/dead-letters/replay", {"task": "shop.tasks.charge_card"})["replayed"]
        )
        run.note(f"gateway back; POST /dead-letters/replay: {run.replayed} replayed")
        self.send("broadcast", "/cache/invalidate", {"key": "catalog"})
        run.note("POST /cache/invalidate: a broadcast to every worker")
        # The broadcast also waits in the dead worker A's queue until its binding expires
        # (durable broadcast), so only the others must have left the broker.
        self.wait(
            "phase 3: replayed charge and broadcast",
            lambda: all(
                run.state(t) == "SUCCESS" and (k == "broadcast" or not run.broker_state(t))
                for t, k in run.sent.items()
            ),
            60,
        )
        run.phase = "finished"
        self.refresh()


def _remove_keys(console: Console, url: str, prefix: str) -> None:
    """Delete every key of this run (broker, results, the shop's own): all under ``prefix``."""
    client = redis.Redis.from_url(url)
    try:
        removed = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += int(client.unlink(*batch))
                batch.clear()
        if batch:
            removed += int(client.unlink(*batch))
        console.print(f"removed the demo's {removed} keys ({prefix}*) from {url}")
    except redis.RedisError as exc:
        console.print(f"[yellow]could not remove the demo's keys ({prefix}*): {exc}[/]")
    finally:
        client.close()


def _moved(run: Run, task_id: str) -> bool:
    """Whether the message is leased again after the kill (its second delivery)."""
    found = run.status.get(task_id, {}).get("broker") or []
    return any(b["state"] == "RESERVED" and b["deliveries"] >= 2 for b in found)


def main() -> int:
    args = _parse()
    console = Console()
    if not (FLASK_APP / "shop").is_dir():
        console.print(f"[red]the Flask example is not at {FLASK_APP}: run the demo from a clone[/]")
        return 2
    lease = 3.0 if args.short else 4.0
    emails = 8 if args.short else 30
    with ExitStack() as stack:
        url = stack.enter_context(_redis_url(console))
        outbox = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shop-outbox-")))
        prefix = f"{DEMO_PREFIX}{uuid.uuid4().hex[:6]}:"
        if os.environ.get("CELERY_MSG_REDIS_URL"):
            # Your own Redis: leave nothing behind (runs after every process here stopped).
            stack.callback(_remove_keys, console, url, prefix)
        env = {
            **os.environ,
            "CELERY_MSG_REDIS_URL": url,
            "SHOP_KEY_PREFIX": prefix,
            "SHOP_LEASE_TIMEOUT": str(lease),
            "SHOP_OUTBOX": str(outbox),
            "PYTHONUNBUFFERED": "1",
        }
        port = free_port()
        server = web_server(env, port)
        stack.callback(server.close)
        shop = Shop(port)
        shop.wait_up(server)
        console.print(f"the Flask example answers on [bold]{shop.base}[/] (pid {server.pid})")
        driver = Driver(console, shop, env, lease)
        stack.callback(driver.close)
        try:
            if console.is_terminal:
                with Live(console=console, refresh_per_second=8) as live:
                    driver.live = live
                    driver.scenario(emails)
            else:
                driver.scenario(emails)
                console.print(*_tables(driver.run))
        except DemoError as exc:
            console.print(f"\n[bold red]demo failed:[/] {exc}")
            for child in driver.workers.values():
                console.print(f"--- {child.name} log ---\n{child.tail()}", markup=False)
            return 1
        return summary.report(console, summary.checks(driver.run, outbox, lease))
    return 1


if __name__ == "__main__":
    sys.exit(main())
