"""Serve the dashboard of a Celery app with uvicorn: ``celery -A proj msg web``."""

from __future__ import annotations

import contextlib
from typing import Any

import uvicorn

from ..api import broker_for
from .app import Dashboard, create_app, sampler_for
from .security import Auth, check_bind

#: Seconds between two readings of the queues' counters for the rate charts.
SAMPLE_INTERVAL = 5.0


def serve(
    celery_app: Any,
    *,
    address: str = "127.0.0.1",
    port: int = 5556,
    auth: Auth | None = None,
    sample_interval: float = SAMPLE_INTERVAL,
) -> None:
    """Run the dashboard until interrupted; refuses a non-loopback ``address`` without
    ``auth`` (:class:`~celery_msg.web.security.InsecureBind`) before opening anything."""
    auth = auth or Auth()
    check_bind(address, auth)
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(broker_for(celery_app))
        dashboard = Dashboard(broker, celery_app, sampler_for(broker, sample_interval))
        app = create_app(dashboard, auth)
        uvicorn.run(app, host=address, port=port, log_level="info", access_log=False)
