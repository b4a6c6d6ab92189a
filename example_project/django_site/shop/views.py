"""The back office's JSON API: POST endpoints enqueue tasks, GET endpoints show where they are.

CSRF: these views are ``csrf_exempt`` on purpose. CSRF protection guards endpoints that a
browser authenticates with cookies (a session); this API is called by machines (curl, other
services, cron jobs), uses no session or cookie at all, and would be put behind a token or an
internal network in production. Pages of the site that do use sessions keep Django's
CsrfViewMiddleware (it stays in MIDDLEWARE).
"""

import functools
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

from celery import current_app
from celery.result import AsyncResult
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from celery_msg.api import lookup, queue_counts

from . import activity
from .tasks import (
    build_report,
    call_webhook,
    charge_card,
    invalidate_cache,
    send_reminder,
    send_welcome_email,
)

#: celery-msg priorities are exact, 0-255, higher first: a welcome e-mail overtakes reminders.
HIGH_PRIORITY = 200
REMINDER_PRIORITY = 50


class BadRequest(Exception):
    """Invalid input: answered with 400 and the message."""


def _body(request: HttpRequest) -> dict[str, Any]:
    if not request.body:
        return {}
    try:
        data = json.loads(request.body)
    except ValueError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def _field(data: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = data.get(name, default)
    if value is None:
        raise BadRequest(f"{name!r} is required")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f"{name!r} must be a {kind.__name__}")
    return value


def _email(data: dict[str, Any]) -> str:
    email = _field(data, "email", str)
    if "@" not in email:
        raise BadRequest("'email' must be an e-mail address")
    return email


def _enqueued(result: AsyncResult, queue: str) -> JsonResponse:
    """202 Accepted: the work is queued; poll ``Location`` for its state."""
    response = JsonResponse(
        {"task_id": result.id, "queue": queue, "status_url": f"/tasks/{result.id}"}, status=202
    )
    response["Location"] = f"/tasks/{result.id}"
    return response


def api(view: Callable[..., JsonResponse]) -> Callable[..., JsonResponse]:
    """A JSON endpoint: CSRF-exempt (see the module docstring), BadRequest -> 400."""

    @csrf_exempt
    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        try:
            return view(request, *args, **kwargs)
        except BadRequest as exc:
            return JsonResponse({"error": str(exc)}, status=400)

    return wrapped


@api
@require_POST
def signup(request: HttpRequest) -> JsonResponse:
    """POST /signup {"email": ...}: the welcome e-mail, high priority."""
    email = _email(_body(request))
    return _enqueued(send_welcome_email.apply_async(args=[email], priority=HIGH_PRIORITY), "emails")


@api
@require_POST
def reports(request: HttpRequest) -> JsonResponse:
    """POST /reports {"report_id": ..., "seconds": ...}: a slow report."""
    data = _body(request)
    report_id = _field(data, "report_id", str)
    if not report_id.replace("-", "").replace("_", "").isalnum():
        raise BadRequest("'report_id' may only have letters, digits, '-' and '_'")
    seconds = _field(data, "seconds", float, 12.0)
    if not 0 <= seconds <= 3600:
        raise BadRequest("'seconds' must be between 0 and 3600")
    return _enqueued(build_report.delay(report_id, seconds), "reports")


@api
@require_POST
def webhooks(request: HttpRequest) -> JsonResponse:
    """POST /webhooks {"url": ..., "fail_times": n}: the partner refuses the first n calls."""
    data = _body(request)
    url = _field(data, "url", str)
    if urlsplit(url).scheme not in ("http", "https"):
        raise BadRequest("'url' must be an http(s) URL")
    fail_times = _field(data, "fail_times", int, 0)
    if fail_times < 0:
        raise BadRequest("'fail_times' must be >= 0")
    return _enqueued(call_webhook.delay(url, fail_times), "webhooks")


@api
@require_POST
def charge(request: HttpRequest, order_id: int) -> JsonResponse:
    """POST /orders/<id>/charge: the gateway declines; the message ends dead-lettered."""
    return _enqueued(charge_card.delay(order_id), "default")


@api
@require_POST
def reminders(request: HttpRequest) -> JsonResponse:
    """POST /reminders {"email": ..., "countdown": seconds}: sent when due, not before."""
    data = _body(request)
    email = _email(data)
    countdown = _field(data, "countdown", float, 60.0)
    if not 0 <= countdown <= 30 * 24 * 3600:
        raise BadRequest("'countdown' must be between 0 and 30 days")
    result = send_reminder.apply_async(
        args=[email], countdown=countdown, priority=REMINDER_PRIORITY
    )
    return _enqueued(result, "emails")


@api
@require_POST
def cache_invalidate(request: HttpRequest) -> JsonResponse:
    """POST /cache/invalidate {"key": ...}: broadcast to every worker."""
    key = _field(_body(request), "key", str)
    return _enqueued(invalidate_cache.delay(key), "cache")


def _jsonable(value: Any) -> Any:
    """A task's result, or its exception as {"type", "message"}."""
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value)}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


@api
@require_GET
def task_status(request: HttpRequest, task_id: str) -> JsonResponse:
    """GET /tasks/<id>: the result backend's view (state, result, retries) and the broker's
    (where the message is: SCHEDULED, READY, RESERVED by which worker, DEAD and why; nothing
    once acked)."""
    result = AsyncResult(task_id, app=current_app)
    state = result.state
    backend: dict[str, Any] = {
        "state": state,
        "name": result.name,
        "retries": result.retries,
        "worker": result.worker,
        "date_done": result.date_done.isoformat() if result.date_done else None,
    }
    if state == "SUCCESS":
        backend["result"] = _jsonable(result.result)
    elif state in ("FAILURE", "RETRY", "REVOKED"):
        backend["error"] = _jsonable(result.result)
    broker = [
        {k: v for k, v in asdict(info).items() if k not in ("payload", "key")}
        for info in lookup(current_app, task_id)
    ]
    return JsonResponse({"task_id": task_id, **backend, "broker": broker})


@api
@require_GET
def queues(request: HttpRequest) -> JsonResponse:
    """GET /queues: ready / reserved / scheduled / dead counts of every queue."""
    return JsonResponse(queue_counts(current_app))


@api
@require_GET
def activity_log(request: HttpRequest) -> JsonResponse:
    """GET /activity?event=...: the last 100 things tasks did."""
    return JsonResponse({"entries": activity.entries(request.GET.get("event"), limit=100)})
