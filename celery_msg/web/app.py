"""The dashboard as a Starlette application: pages, the htmx fragment that refreshes the
overview, and the POST actions on dead letters.

Pages read through the same :class:`~celery_msg.core.Broker` and
:class:`~celery_msg.deadletters.DeadLetters` as ``celery msg``; handlers that read Redis are
plain functions (Starlette runs them in its thread pool), so the event loop never waits on a
round trip. Replay and purge take two POSTs: the first counts what the selection matches and
asks, the second (with ``confirm=yes``) acts and says how many were done.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click
import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..core import Broker, MessageInfo, State
from ..deadletters import DeadFilter, DeadLetters, DeadMessage, decode_body
from ..errors import CeleryMsgError
from . import reads
from .overview import read_counters, read_overview
from .rates import RateSampler, sparkline
from .security import CSRF_FIELD, Auth, Guard, check_csrf

#: Most dead letters one "all matching" replay or purge touches per request.
BULK_LIMIT = 100_000


@dataclass
class Dashboard:
    """What every handler needs: the broker, the Celery app (result backend, options; None
    when the dashboard runs on a bare broker, as in the benchmark) and the rate sampler."""

    broker: Broker
    celery: Any = None
    sampler: RateSampler | None = None

    @property
    def ascending(self) -> bool:
        if self.celery is None:
            return False
        options = self.celery.conf.broker_transport_options or {}
        return bool(options.get("priority_order") == "asc")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("celery_msg.web", "templates"),
        autoescape=True,  # every template: a task argument "<script>" shows as text
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = _when
    env.filters["age"] = _age
    env.filters["pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str)
    env.filters["selection"] = lambda m: json.dumps([m.queue, m.key])
    return env


def _when(seconds: float | None) -> str:
    if not seconds:
        return "-"
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return f"? ({seconds!r})"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def create_app(dashboard: Dashboard, auth: Auth | None = None) -> Starlette:
    """The ASGI application; the sampler (if any) runs while the application does."""
    templates = Jinja2Templates(env=_environment())

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("csrf", request.scope.get("state", {}).get("csrf", ""))
        context.setdefault("csrf_field", CSRF_FIELD)
        return templates.TemplateResponse(request, name, context, status_code=status)

    def overview(request: Request) -> HTMLResponse:
        return page(request, "overview.html", **_overview_context(dashboard))

    def overview_rows(request: Request) -> HTMLResponse:
        return page(request, "_overview_rows.html", **_overview_context(dashboard))

    def queue(request: Request) -> HTMLResponse:
        name = request.path_params["name"]
        state = _state(request.query_params.get("state"))
        offset = _int(request.query_params.get("offset"))
        listing = reads.queue_page(dashboard.broker, name, state, offset)
        counts = dashboard.broker.counts(name)
        return page(
            request, "queue.html", queue=name, state=state, page=listing, counts=counts,
            states=list(reads.STATE_KEYS), now=time.time(),
        )  # fmt: skip

    def dead(request: Request) -> HTMLResponse:
        where, errors = _filter(request.query_params)
        cursor = reads.DeadCursor.decode(request.query_params.get("cursor"))
        listing = reads.dead_page(dashboard.broker, where, cursor)
        return page(
            request, "dead.html", page=listing, where=where, errors=errors, now=time.time(),
            filters=_filter_values(request.query_params), queues=dashboard.broker.queues(),
        )  # fmt: skip

    def dead_record(request: Request) -> HTMLResponse:
        queue_name = request.query_params.get("queue", "")
        key = request.query_params.get("key", "")
        message = reads.dead_message(dashboard.broker, queue_name, key)
        if message is None:
            return page(request, "gone.html", 404, queue=queue_name, key=key)
        return page(
            request, "dead_record.html", m=message, body=decode_body(message.payload),
            message=message.as_dict(with_body=True)["message"],
        )  # fmt: skip

    async def dead_action(request: Request) -> HTMLResponse:
        form = await _checked_form(request)
        return await run_in_threadpool(_dead_action, dashboard, request, form, page)

    def message(request: Request) -> HTMLResponse:
        message_id = request.query_params.get("id", "").strip()
        found: list[tuple[MessageInfo, list[str]]] = []
        unreadable = 0
        result = None
        if message_id:
            # The same story as `celery msg inspect` tells, from the same functions.
            from ..cli import _result_state, history

            _, unreadable = dashboard.broker.queue_registry()
            try:
                infos = dashboard.broker.lookup(message_id)
            except (ValueError, TypeError, UnicodeDecodeError):
                infos, unreadable = [], unreadable + 1  # a stored field that does not decode
            found = [(info, history(info, dashboard.ascending)) for info in infos]
            result = _result_state(dashboard.celery, message_id) if dashboard.celery else None
        return page(
            request, "message.html", message_id=message_id, found=found, result=result,
            unreadable=unreadable,
        )  # fmt: skip

    async def broker_error(request: Request, exc: Exception) -> Response:
        return page(request, "error.html", 503, error=f"{type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if dashboard.sampler is not None:
            dashboard.sampler.start()
        try:
            yield
        finally:
            if dashboard.sampler is not None:
                await run_in_threadpool(dashboard.sampler.stop)

    static = StaticFiles(packages=[("celery_msg.web", "static")])
    app = Starlette(
        routes=[
            Route("/", overview),
            Route("/overview/rows", overview_rows),
            Route("/queues/{name:path}", queue),
            Route("/dead", dead),
            Route("/dead/record", dead_record),
            Route("/dead/action", dead_action, methods=["POST"]),
            Route("/message", message),
            Mount("/static", static, name="static"),
        ],
        exception_handlers={CeleryMsgError: broker_error},
        lifespan=lifespan,
    )
    app.add_middleware(Guard, auth=auth or Auth())
    return app


def sampler_for(broker: Broker, interval: float = 5.0) -> RateSampler:
    return RateSampler(lambda: read_counters(broker), interval=interval)


def _overview_context(dashboard: Dashboard) -> dict[str, Any]:
    data = read_overview(dashboard.broker)
    sampler = dashboard.sampler
    charts = sampler.charts() if sampler else {}
    empty = (sparkline([]),) * 2
    return {
        "overview": data,
        "charts": {q.queue: charts.get(q.queue, empty) for q in data.queues},
        "interval": sampler.interval if sampler else None,
        "now": time.time(),
    }


def _state(text: str | None) -> State:
    try:
        return State((text or "READY").upper())
    except ValueError:
        raise HTTPException(400, f"unknown state {text!r}") from None


def _int(text: str | None) -> int:
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0


FILTER_FIELDS = ("queue", "task", "exc_type", "reason", "older_than", "newer_than")


def _filter_values(params: Any) -> dict[str, str]:
    return {name: str(params.get(name) or "").strip() for name in FILTER_FIELDS}


def _filter(params: Any) -> tuple[DeadFilter, list[str]]:
    """The CLI's dead-letter filters from a query string or form; bad durations are reported
    (and ignored) rather than failing the page."""
    from ..cli import parse_duration

    values = _filter_values(params)
    errors: list[str] = []
    ages: dict[str, float | None] = {}
    for name in ("older_than", "newer_than"):
        ages[name] = None
        if values[name]:
            try:
                ages[name] = parse_duration(values[name])
            except click.BadParameter as exc:  # shown on the page, the filter left out
                errors.append(f"{name.replace('_', ' ')}: {exc.message}")
    where = DeadFilter(
        queue=values["queue"] or None,
        task=values["task"] or None,
        exc_type=values["exc_type"] or None,
        reason=values["reason"] or None,
        older_than=ages["older_than"],
        newer_than=ages["newer_than"],
    )
    return where, errors


async def _checked_form(request: Request) -> FormData:
    form = await request.form()
    if not check_csrf(request.scope.get("state", {}).get("csrf"), form.get(CSRF_FIELD)):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    return form


def _selected(dashboard: Dashboard, form: FormData) -> tuple[list[DeadMessage], int]:
    """The dead letters ticked on the page (``["queue", "key"]`` pairs); ones no longer dead
    are left out, and counted."""
    chosen: list[DeadMessage] = []
    gone = 0
    for raw in form.getlist("selected"):
        try:
            queue, key = json.loads(str(raw))
        except (ValueError, TypeError):
            gone += 1
            continue
        message = reads.dead_message(dashboard.broker, str(queue), str(key))
        if message is None:
            gone += 1
        else:
            chosen.append(message)
    return chosen, gone


class _Counted:
    """Dead letters streamed to a replay or purge (never held all at once: a match of
    100,000 would be every payload in memory), counted, the first few kept for the page."""

    SAMPLE = 20

    def __init__(self, messages: Iterable[DeadMessage]) -> None:
        self._messages = messages
        self.count = 0
        self.sample: list[DeadMessage] = []

    def __iter__(self) -> Iterator[DeadMessage]:
        for message in self._messages:
            if self.count >= BULK_LIMIT:
                return
            self.count += 1
            if len(self.sample) < self.SAMPLE:
                self.sample.append(message)
            yield message

    def drain(self) -> _Counted:
        for _ in self:
            pass
        return self


def _dead_action(
    dashboard: Dashboard, request: Request, form: FormData, page: Callable[..., HTMLResponse]
) -> HTMLResponse:
    # The button pressed: "replay selected", "purge matching", ...
    verb, _, scope = str(form.get("op", "")).partition(" ")
    if verb not in ("replay", "purge"):
        raise HTTPException(400, f"unknown action {verb!r}")
    where, errors = _filter(form)
    if errors:
        raise HTTPException(400, "; ".join(errors))
    store = DeadLetters(dashboard.broker)
    gone = 0
    if scope == "matching":
        chosen = _Counted(store.iter(where))
    elif scope == "selected":
        ticked, gone = _selected(dashboard, form)
        chosen = _Counted(ticked)
    else:
        raise HTTPException(400, f"unknown scope {scope!r}")
    context: dict[str, Any] = {
        "verb": verb, "scope": scope, "chosen": chosen, "gone": gone,
        "filters": _filter_values(form), "selected": form.getlist("selected"),
    }  # fmt: skip
    if form.get("confirm") != "yes":
        chosen.drain()
        return page(request, "confirm.html", **context)
    done = store.replay(chosen) if verb == "replay" else store.purge(chosen)
    if not chosen.count:
        return page(request, "confirm.html", **context)
    return page(request, "done.html", done=done, **context)
