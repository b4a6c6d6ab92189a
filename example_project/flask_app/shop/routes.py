"""The HTTP API: each endpoint enqueues a task and answers at once with its id; the status
endpoints read the result backend and what the broker knows of the message."""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from celery_msg import api as broker_api
from celery_msg.deadletters import DeadFilter

from . import tasks

api = Blueprint("shop", __name__)


def _celery() -> Celery:
    app: Celery = current_app.extensions["celery"]
    return app


def _body() -> dict[str, Any]:
    return request.get_json(silent=True) or {}


def _queued(result: AsyncResult) -> ResponseReturnValue:
    return jsonify({"task_id": result.id, "status_url": f"/tasks/{result.id}"}), 202


@api.post("/signup")
def signup() -> ResponseReturnValue:
    email = str(_body()["email"])
    # One welcome email per address: the task id is derived from it, and the task's policy
    # makes a second publish of a pending id a no-op (a double-submitted form sends one).
    task_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailto:{email}"))
    return _queued(tasks.send_welcome_email.apply_async((email,), task_id=task_id))


@api.post("/reports")
def reports() -> ResponseReturnValue:
    body = _body()
    report_id = str(body.get("report_id") or uuid.uuid4().hex[:8])
    return _queued(tasks.build_report.delay(report_id, float(body.get("seconds", 10))))


@api.post("/webhooks")
def webhooks() -> ResponseReturnValue:
    body = _body()
    url = str(body.get("url", "https://partner.example/hook"))
    return _queued(tasks.call_webhook.delay(url, int(body.get("fail_times", 2))))


@api.post("/orders/<int:order_id>/charge")
def charge(order_id: int) -> ResponseReturnValue:
    return _queued(tasks.charge_card.delay(order_id, int(_body().get("amount_cents", 1999))))


@api.post("/gateway")
def gateway() -> ResponseReturnValue:
    """Simulate the payment gateway going down (``{"down": true}``) or coming back."""
    down = bool(_body().get("down"))
    if down:
        tasks.store().set(tasks.key(tasks.GATEWAY_DOWN), 1)
    else:
        tasks.store().delete(tasks.key(tasks.GATEWAY_DOWN))
    return jsonify({"gateway_down": down})


@api.post("/reminders")
def reminders() -> ResponseReturnValue:
    body = _body()
    countdown = float(body.get("in_seconds", 60))
    result = tasks.send_reminder.apply_async((str(body["email"]),), countdown=countdown)
    return _queued(result)


@api.post("/cache/invalidate")
def invalidate() -> ResponseReturnValue:
    return _queued(tasks.invalidate_cache.delay(str(_body().get("key", "catalog"))))


def _status(task_id: str) -> dict[str, Any]:
    result = AsyncResult(task_id, app=_celery())
    value = result.result
    return {
        "task_id": task_id,
        "state": result.state,
        # A result, STARTED's {pid, hostname}, or an exception (FAILURE, RETRY) as its repr.
        "result": repr(value) if isinstance(value, BaseException) else value,
        "broker": [
            {
                "queue": info.queue,
                "state": str(info.state),
                "deliveries": info.deliveries,
                "owner": info.owner,
                "lease_deadline": info.lease_deadline,
                "due": info.due,
                "dead_reason": (info.dead_reason or {}).get("detail"),
            }
            for info in broker_api.lookup(_celery(), task_id)
        ],
    }


@api.get("/tasks/<task_id>")
def task_status(task_id: str) -> ResponseReturnValue:
    return jsonify(_status(task_id))


@api.get("/tasks")
def tasks_status() -> ResponseReturnValue:
    """Several at once: ``/tasks?ids=a,b,c``."""
    ids = [i for i in request.args.get("ids", "").split(",") if i]
    return jsonify([_status(i) for i in ids])


@api.get("/queues")
def queues() -> ResponseReturnValue:
    return jsonify(broker_api.queue_counts(_celery()))


@api.get("/dead-letters")
def dead_letters() -> ResponseReturnValue:
    found = broker_api.dead_letters(_celery(), DeadFilter(task=request.args.get("task")))
    return jsonify([m.as_dict() for m in found])


@api.post("/dead-letters/replay")
def replay() -> ResponseReturnValue:
    """Replay dead letters by id (``{"ids": [...]}``) or task name glob (``{"task": "..."}``)."""
    body = _body()
    found = broker_api.dead_letters(_celery(), DeadFilter(task=body.get("task")))
    ids = set(body.get("ids") or [])
    chosen = [m for m in found if not ids or m.id in ids]
    return jsonify({"replayed": broker_api.replay(_celery(), chosen)})
