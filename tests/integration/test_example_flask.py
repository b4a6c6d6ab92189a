"""The Flask example (example_project/flask_app) end to end: Flask's test client -> the shop's
routes -> celery-msg -> a real ``celery -A make_celery worker`` run from the app's directory.

The app is built with ``create_app(environ)`` in this process, against the session's server
under a key prefix of this module; Celery's default app, which the Flask app factory sets, is
put back afterwards so that it does not leak into other tests.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import celery._state
import pytest
import redis
from celery_helpers import REPO_ROOT, Worker, wait_until
from server_kinds import KINDS

if TYPE_CHECKING:
    from conftest import Server

APP_DIR = REPO_ROOT / "example_project" / "flask_app"
LEASE_TIMEOUT = 2.0
QUEUES = ("emails", "reports", "webhooks", "default", "cache")

pytestmark = pytest.mark.parametrize("server", KINDS[:1], indirect=True)


class Shop:
    """The Flask test client, plus waiting for a task's state."""

    def __init__(self, client: Any, worker: Worker, outbox: Path) -> None:
        self.client = client
        self.worker = worker
        self.outbox = outbox

    def enqueue(self, path: str, body: dict[str, Any] | None = None) -> str:
        response = self.client.post(path, json=body or {})
        assert response.status_code == 202, response.get_data(as_text=True)
        return str(response.json["task_id"])

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.client.get(f"/tasks/{task_id}")
        assert response.status_code == 200
        return dict(response.json)

    def wait(self, task_id: str, done: Any, timeout: float = 30.0) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def probe() -> dict[str, Any] | None:
            last.update(self.task(task_id))
            return last if done(last) else None

        try:
            return wait_until(probe, timeout, f"task {task_id}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last {last}\n{self.worker.log_tail()}") from None

    def succeeded(self, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
        status = self.wait(task_id, lambda s: s["state"] == "SUCCESS" and not s["broker"], timeout)
        return dict(status["result"])


@pytest.fixture(scope="module")
def shop(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """One app and one worker for the module (the app is imported once: its shared tasks
    register once)."""
    tmp_path = tmp_path_factory.mktemp("flask-example")
    prefix = f"flask-example-{uuid.uuid4().hex[:8]}:"
    environ = {
        **os.environ,
        "CELERY_MSG_REDIS_URL": f"{server.url}/0",
        "SHOP_KEY_PREFIX": prefix,
        "SHOP_LEASE_TIMEOUT": str(LEASE_TIMEOUT),
        "SHOP_OUTBOX": str(tmp_path / "outbox"),
        "PYTHONUNBUFFERED": "1",
    }
    default_app = celery._state.default_app
    sys.path.insert(0, str(APP_DIR))
    worker = Worker(
        environ,
        tmp_path / "worker.log",
        name="flask-example",
        app="make_celery",
        cwd=APP_DIR,
        queues=QUEUES,
        pool="prefork",
        concurrency=2,
    )
    try:
        from shop import create_app

        app = create_app(environ)
        worker.start()
        yield Shop(app.test_client(), worker, tmp_path / "outbox")
    finally:
        worker.kill()
        sys.path.remove(str(APP_DIR))
        for name in [m for m in sys.modules if m == "shop" or m.startswith("shop.")]:
            del sys.modules[name]
        celery._state.default_app = default_app
        client = redis.Redis.from_url(f"{server.url}/0")
        with contextlib.suppress(redis.RedisError):
            for key in client.scan_iter(match=f"*{prefix}*"):
                client.delete(key)
        client.close()


def test_a_signup_writes_one_welcome_email_even_when_submitted_twice(shop: Shop):
    first = shop.enqueue("/signup", {"email": "ada@example.com"})
    again = shop.enqueue("/signup", {"email": "ada@example.com"})

    assert again == first  # the id comes from the address; the second publish stored nothing
    result = shop.succeeded(first)
    assert result["queue"] == "emails" and result["delivery"] == 1
    # The form sent again once the first email went out (its queue acks on receipt): still
    # one email, counted as files written (one per send).
    assert shop.enqueue("/signup", {"email": "ada@example.com"}) == first
    bob = shop.enqueue("/signup", {"email": "bob@example.com"})
    shop.succeeded(bob)  # queued behind ada's second send, had it been stored
    sent = sorted(p.name.split(".")[0] for p in shop.outbox.glob("*.eml"))
    assert sent == sorted([first, bob])


def test_a_report_longer_than_the_lease_runs_once(shop: Shop):
    task_id = shop.enqueue("/reports", {"report_id": "r1", "seconds": 2.5 * LEASE_TIMEOUT})

    running = shop.wait(task_id, lambda s: s["state"] == "STARTED")
    assert running["broker"][0]["state"] == "RESERVED"
    result = shop.succeeded(task_id, timeout=30)

    assert (result["starts"], result["delivery"]) == (1, 1)
    assert (shop.outbox / "report-r1.txt").read_text() == "report r1\n"


def test_a_flaky_webhook_is_retried_with_backoff_then_delivered(shop: Shop):
    task_id = shop.enqueue("/webhooks", {"fail_times": 2})

    result = shop.succeeded(task_id)

    assert result["retries"] == 2 and result["queue"] == "webhooks"


def test_a_failed_charge_is_dead_lettered_and_replayed_once_the_gateway_is_back(shop: Shop):
    shop.client.post("/gateway", json={"down": True})
    task_id = shop.enqueue("/orders/7/charge", {"amount_cents": 1234})

    # One status reads the result backend, then the broker: wait for both to have caught up.
    shop.wait(
        task_id,
        lambda s: [b["state"] for b in s["broker"]] == ["DEAD"] and s["state"] == "FAILURE",
    )
    [letter] = shop.client.get("/dead-letters?task=shop.tasks.charge_card").json
    assert letter["id"] == task_id and letter["reason"] == "failed"
    assert letter["detail"].startswith("RuntimeError: payment gateway unavailable")

    shop.client.post("/gateway", json={"down": False})
    assert shop.client.post("/dead-letters/replay", json={"ids": [task_id]}).json == {"replayed": 1}
    assert shop.client.post("/dead-letters/replay", json={"ids": [task_id]}).json == {"replayed": 0}

    assert shop.succeeded(task_id)["charged"] == 1234
    assert shop.client.get("/dead-letters").json == []


def test_a_reminder_waits_in_redis_until_its_countdown_is_over(shop: Shop):
    task_id = shop.enqueue("/reminders", {"email": "ada@example.com", "in_seconds": 2})

    [waiting] = shop.task(task_id)["broker"]
    assert waiting["state"] == "SCHEDULED" and waiting["due"] > time.time()
    counts = shop.client.get("/queues").json["emails"]
    assert counts["scheduled"] == 1 and counts["ready"] == 0
    result = shop.succeeded(task_id)

    assert result["ran_at"] >= waiting["due"]


def test_a_cache_invalidation_is_broadcast_to_the_worker(shop: Shop):
    task_id = shop.enqueue("/cache/invalidate", {"key": "catalog"})

    result = shop.wait(task_id, lambda s: s["state"] == "SUCCESS")["result"]

    assert result["key"] == "catalog" and result["worker"] == shop.worker.nodename
    # configure() names the worker's anonymous Broadcast queue after it: a restart keeps it.
    assert result["queue"] == f"cache.{shop.worker.nodename}.bcast"
