"""The Django example (example_project/django_site) end to end: Django's test client -> the
site's views -> celery-msg -> real ``celery -A proj worker`` processes.

Django is set up in a process of its own (a small driver that runs ``django.test.Client``
requests sent to it as JSON lines), never in the pytest process: its settings, the ``proj``
Celery app (which becomes Celery's current app) and ``sys.path`` must not leak into the other
tests. Workers run from the site's directory, as its README says. Everything runs against the
session's server under a key prefix of this module, deleted afterwards; every process started
here is SIGKILLed (its whole process group) at teardown.

The module runs against the first configured server kind only: it shows the example working,
the server kinds are covered by the rest of the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from celery_helpers import READY_TIMEOUT, REPO_ROOT, Worker, wait_until
from server_kinds import KINDS

if TYPE_CHECKING:
    from conftest import Server

SITE_DIR = REPO_ROOT / "example_project" / "django_site"
#: CELERY_BROKER_TRANSPORT_OPTIONS["lease_timeout"] in the site's settings.
LEASE_TIMEOUT = 5.0
#: What the site's README tells users to consume.
QUEUES = ("emails", "reports", "webhooks", "default", "cache")

pytestmark = pytest.mark.parametrize("server", KINDS[:1], indirect=True)

# Runs in its own process (cwd: the site): answers each JSON request line read from stdin with
# one JSON line on the original stdout; everything else Django or Celery print goes to stderr.
DRIVER = r"""
import json, os, sys, traceback
replies = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.path.insert(0, os.getcwd())
import django
django.setup()
from django.test import Client
from django.test.utils import setup_test_environment
setup_test_environment()
client = Client(enforce_csrf_checks=True)  # as curl would be: no CSRF token, no cookie
for line in sys.stdin:
    request = json.loads(line)
    try:
        if request["method"] == "POST":
            body = json.dumps(request["json"]) if request["json"] is not None else ""
            response = client.post(request["path"], body, content_type="application/json")
        else:
            response = client.get(request["path"])
        content = response.content.decode()
        if response.get("Content-Type", "").startswith("application/json"):
            content = json.loads(content)
        reply = {"status": response.status_code, "body": content}
    except Exception:
        reply = {"status": -1, "body": traceback.format_exc()}
    replies.write(json.dumps(reply) + "\n")
"""


def _environ(server: Server, prefix: str, data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "proj.settings",
        "DJANGO_DB_PATH": str(data_dir / "db.sqlite3"),
        "CELERY_MSG_REDIS_URL": f"{server.url}/0",
        "CELERY_MSG_KEY_PREFIX": prefix,
        "SHOP_DATA_DIR": str(data_dir),
        "SHOP_OUTBOX": str(data_dir / "outbox"),
        "SHOP_CACHE_DIR": str(data_dir / "cache"),
        "PYTHONUNBUFFERED": "1",
    }


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def site_worker(environ: dict[str, str], log_path: Path, *, name: str, pool: str) -> Worker:
    """``celery -A proj worker`` run from the site's directory, as its README says."""
    return Worker(
        environ,
        log_path,
        name=name,
        app="proj",
        cwd=SITE_DIR,
        queues=QUEUES,
        pool="prefork" if pool == "prefork" else "solo",
        concurrency=2 if pool == "prefork" else 1,
    )


class DjangoClient:
    """The driver process: ``get``/``post`` return (status, decoded JSON body)."""

    def __init__(self, environ: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", DRIVER],
                cwd=SITE_DIR,
                env=environ,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                text=True,
            )

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"method": method, "path": path, "json": body}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(
                f"the Django driver did not answer {method} {path}; its log:\n{self.log()}"
            )
        reply = json.loads(line)
        if reply["status"] == -1:
            raise AssertionError(f"{method} {path} raised in the view:\n{reply['body']}")
        return reply["status"], reply["body"]

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        return self.request("POST", path, body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def close(self) -> None:
        _kill_group(self.proc)


@dataclass
class Site:
    """The running example: Django's test client, two workers, the shop's data directory."""

    client: DjangoClient
    workers: list[Worker]
    data_dir: Path
    environ: dict[str, str]

    def enqueue(self, path: str, body: Any = None) -> str:
        status, reply = self.client.post(path, body)
        assert status == 202, (status, reply)
        assert reply["status_url"] == f"/tasks/{reply['task_id']}"
        return str(reply["task_id"])

    def task(self, task_id: str) -> dict[str, Any]:
        status, reply = self.client.get(f"/tasks/{task_id}")
        assert status == 200, (status, reply)
        return dict(reply)

    def wait_task(
        self, task_id: str, timeout: float, state: str, *, broker_empty: bool = True
    ) -> dict[str, Any]:
        """Wait until the result backend says ``state`` (and, by default, the message is acked:
        the broker no longer knows it)."""
        last: dict[str, Any] = {}

        def probe() -> dict[str, Any] | None:
            last.clear()
            last.update(self.task(task_id))
            done = last["state"] == state and (not broker_empty or last["broker"] == [])
            return dict(last) if done else None

        try:
            return wait_until(probe, timeout, f"task {task_id} to be {state}", interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen {last}\n{self.logs()}") from None

    def activity(self, event: str, **match: Any) -> list[dict[str, Any]]:
        try:
            lines = (self.data_dir / "activity.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = [json.loads(line) for line in lines if line.strip()]
        return [
            e
            for e in entries
            if e["event"] == event and all(e.get(k) == v for k, v in match.items())
        ]

    def celery(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``celery -A proj <args>`` from the site's directory."""
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "proj", *args],
            cwd=SITE_DIR,
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def logs(self) -> str:
        return (
            "\n".join(
                f"----- worker {w.nodename} log tail -----\n{w.log_tail(80)}" for w in self.workers
            )
            + f"\n----- django driver log tail -----\n{self.client.log()}"
        )


def _delete_keys(server: Server, prefix: str) -> None:
    with server.process.client() as client:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.unlink(*keys)


@pytest.fixture(scope="module")
def site(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    data_dir = tmp_path_factory.mktemp("django-site")
    prefix = f"shop-t-{uuid.uuid4().hex[:8]}:"
    environ = _environ(server, prefix, data_dir)
    workers: list[Worker] = []
    client: DjangoClient | None = None
    try:
        # Two workers, as on two hosts: a broadcast must reach both.
        for name, pool in (("shop-a", "prefork"), ("shop-b", "solo")):
            log = data_dir / f"{name}.log"
            workers.append(site_worker(environ, log, name=name, pool=pool).spawn())
        client = DjangoClient(environ, data_dir / "django.log")
        for worker in workers:
            worker.wait_for_log(f"{worker.nodename} ready.", READY_TIMEOUT * 2)
        yield Site(client, workers, data_dir, environ)
    finally:
        for worker in workers:
            worker.close()
        if client is not None:
            client.close()
        for worker in workers:
            print(f"----- worker {worker.nodename} log tail -----\n{worker.log_tail()}")
        _delete_keys(server, prefix)


def test_signup_writes_the_welcome_email_to_the_outbox(site: Site):
    task_id = site.enqueue("/signup", {"email": "ada@example.com"})
    done = site.wait_task(task_id, 30, "SUCCESS")
    eml = site.data_dir / "outbox" / f"{task_id}.eml"
    assert done["result"] == {"to": "ada@example.com", "file": str(eml)}
    assert done["name"] == "shop.tasks.send_welcome_email"
    text = eml.read_text()
    assert "To: ada@example.com" in text
    assert "Subject: Welcome to the shop" in text
    assert len(site.activity("welcome-email", task_id=task_id)) == 1


def test_bad_requests_are_answered_400_and_unknown_tasks_are_pending(site: Site):
    assert site.client.post("/signup", {"email": "nobody"}) == (
        400,
        {"error": "'email' must be an e-mail address"},
    )
    assert site.client.post("/webhooks", {"url": "ftp://x", "fail_times": 1})[0] == 400
    assert site.client.get("/signup")[0] == 405
    unknown = site.task(str(uuid.uuid4()))
    assert (unknown["state"], unknown["broker"]) == ("PENDING", [])


def test_a_report_longer_than_the_lease_is_renewed_and_runs_once(site: Site):
    seconds = 2 * LEASE_TIMEOUT + 1
    report = f"sales-{uuid.uuid4().hex[:6]}"
    task_id = site.enqueue("/reports", {"report_id": report, "seconds": seconds})
    running = wait_until(
        lambda: (t := site.task(task_id))["state"] == "STARTED" and t["broker"] and t,
        20,
        "the report to start",
        interval=0.2,
    )
    [info] = running["broker"]
    assert (info["state"], info["queue"], info["deliveries"]) == ("RESERVED", "reports", 1)
    # Renewed: its lease now ends later than the first one did, and it is still the first
    # delivery, to the same worker (had the lease run out, it would be a second delivery).
    first_deadline = info["lease_deadline"]
    renewed = wait_until(
        lambda: (
            [i for i in site.task(task_id)["broker"] if (i["lease_deadline"] or 0) > first_deadline]
            or None
        ),
        2 * LEASE_TIMEOUT,
        "the report's lease to be renewed",
        interval=0.1,
    )
    assert [(i["state"], i["deliveries"], i["owner"]) for i in renewed] == [
        ("RESERVED", 1, info["owner"])
    ]
    done = site.wait_task(task_id, seconds + 30, "SUCCESS")
    assert done["result"]["seconds"] >= seconds
    assert (site.data_dir / "reports" / f"{report}.csv").read_text().startswith("step,")
    assert len(site.activity("report-started", report=report)) == 1
    assert len(site.activity("report-finished", report=report)) == 1


def test_a_flaky_webhook_succeeds_after_the_policys_retries(site: Site):
    fail_times = 2
    url = "https://partner.example/hooks/orders"
    task_id = site.enqueue("/webhooks", {"url": url, "fail_times": fail_times})
    done = site.wait_task(task_id, 40, "SUCCESS")
    assert done["retries"] == fail_times
    assert done["result"] == {"url": url, "delivered": True, "attempts": fail_times + 1}
    attempts = site.activity("webhook-attempt", task_id=task_id)
    assert [a["attempt"] for a in attempts] == [1, 2, 3]


def test_a_webhook_that_keeps_failing_is_dead_lettered_after_max_retries(site: Site):
    task_id = site.enqueue("/webhooks", {"url": "https://down.example/hook", "fail_times": 99})
    # Four retries, each waiting at most 0.5, 1, 2 and 4 s (full jitter).
    failed = site.wait_task(task_id, 40, "FAILURE", broker_empty=False)
    assert failed["error"]["type"] == "ConnectionError"
    assert [a["attempt"] for a in site.activity("webhook-attempt", task_id=task_id)] == [
        1,
        2,
        3,
        4,
        5,
    ]
    [info] = wait_until(
        lambda: (b := site.task(task_id)["broker"]) and b[0]["state"] == "DEAD" and b,
        10,
        "the webhook to be dead-lettered",
    )
    assert (info["queue"], info["dead_reason"]["reason"]) == ("webhooks", "failed")


def test_a_failed_charge_is_dead_lettered_and_a_replay_runs_it_again(site: Site):
    order = 1000 + int(uuid.uuid4().int % 1000)
    task_id = site.enqueue(f"/orders/{order}/charge")
    failed = site.wait_task(task_id, 30, "FAILURE", broker_empty=False)
    assert failed["error"]["type"] == "PaymentGatewayError"

    def dead() -> dict[str, Any] | None:
        broker = site.task(task_id)["broker"]
        return broker[0] if broker and broker[0]["state"] == "DEAD" else None

    info = wait_until(dead, 10, "the charge to be dead-lettered")
    assert info["queue"] == "default"
    assert info["dead_reason"]["reason"] == "failed"

    listed = site.celery("msg", "dlq", "list", "--exc-type", "PaymentGatewayError", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = [row for row in json.loads(listed.stdout) if row["id"] == task_id]
    assert (row["task"], row["reason"], row["exc_type"]) == (
        "shop.tasks.charge_card",
        "failed",
        "shop.tasks.PaymentGatewayError",
    )
    shown = site.celery("msg", "dlq", "show", task_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert "card declined by the payment gateway" in json.loads(shown.stdout)["traceback"]
    assert len(site.activity("charge-attempt", order=order)) == 1

    replayed = site.celery("msg", "dlq", "replay", task_id, "--yes", "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout) == {"matched": 1, "replay": 1, "skipped": 0}
    wait_until(
        lambda: len(site.activity("charge-attempt", order=order)) == 2,
        30,
        "the replayed charge to run again",
    )
    # The gateway still declines: the message is back in the dead-letter store, once.
    info = wait_until(dead, 10, "the replayed charge to be dead-lettered again")
    assert info["dead_reason"]["reason"] == "failed"
    again = site.celery("msg", "dlq", "list", "--json")
    assert [row["id"] for row in json.loads(again.stdout)].count(task_id) == 1


def test_a_reminder_waits_for_its_countdown(site: Site):
    countdown = 4.0
    published = time.time()
    task_id = site.enqueue("/reminders", {"email": "bob@example.com", "countdown": countdown})
    waiting = site.task(task_id)
    [info] = waiting["broker"]
    assert (waiting["state"], info["state"], info["queue"]) == ("PENDING", "SCHEDULED", "emails")
    assert published + countdown - 1 <= info["due"] <= time.time() + countdown + 1
    eml = site.data_dir / "outbox" / f"{task_id}.eml"
    while time.time() < info["due"] - 0.5:
        assert not eml.exists(), "the reminder was sent before it was due"
        time.sleep(0.1)
    done = site.wait_task(task_id, countdown + 30, "SUCCESS")
    assert "Subject: You left something in your cart" in eml.read_text()
    [sent] = site.activity("reminder-email", task_id=task_id)
    assert sent["time"] >= info["due"] - 0.05
    assert done["result"]["to"] == "bob@example.com"


def test_a_cache_invalidation_is_broadcast_to_every_worker(site: Site):
    key = f"product:{uuid.uuid4().hex[:6]}"
    task_id = site.enqueue("/cache/invalidate", {"key": key})
    nodes = {w.nodename for w in site.workers}
    got = wait_until(
        lambda: {e["node"] for e in site.activity("cache-invalidated", key=key)} == nodes,
        30,
        f"{key} to be invalidated on {sorted(nodes)}",
    )
    assert got
    assert len(site.activity("cache-invalidated", task_id=task_id)) == len(nodes)


def test_queues_lists_the_sites_queues_with_their_counts(site: Site):
    status, counts = site.client.get("/queues")
    assert status == 200
    assert {"emails", "reports", "webhooks", "default"} <= set(counts)
    assert set(counts["default"]) >= {"ready", "reserved", "scheduled", "dead"}
