"""The Celery layer: one call, :func:`configure`, makes an app use celery-msg safely.

Selecting the transport needs only ``broker_url = "celery-msg://..."`` (importing
:mod:`celery_msg` registers the scheme). :func:`configure` adds what Celery itself gets wrong
for a reliable broker: its worker *acks* a message it cannot decode (the message is gone); ours
dead-letters it, with a reason, and so it does for disallowed content types, messages without
task headers and unknown tasks. It also validates the transport options at start-up.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.serialization import prepare_accept_content
from kombu.utils.encoding import safe_repr

from .options import TransportOptions

CONSUMER = "celery_msg.app:Consumer"


def configure(app: Celery, **transport_options: Any) -> Celery:
    """Make ``app`` dead-letter bad input and check its celery-msg options now, not later.

    ``transport_options`` are merged into ``broker_transport_options``. Raises
    :class:`celery_msg.ConfigurationError` naming the first invalid option.
    """
    options = {**(app.conf.broker_transport_options or {}), **transport_options}
    if _uses_celery_msg(app):
        TransportOptions.from_mapping(options)
    app.conf.broker_transport_options = options
    app.conf.worker_consumer = CONSUMER
    app.conf.broker_connection_retry_on_startup = True
    return app


def _uses_celery_msg(app: Celery) -> bool:
    url = app.conf.broker_url or ""
    return str(url).startswith(("celery-msg://", "celery-msgs://"))


def _mark(message: Any, reason: str, detail: str) -> None:
    """Tell the transport why the coming reject dead-letters this message."""
    message.dead_letter_reason = (reason, detail)


class Consumer(CeleryConsumer):
    """Celery's worker consumer, but nothing it cannot run is acked away, and nothing more is
    started once a warm shutdown begins (prefetched messages go back to their queue)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        signals.worker_shutting_down.connect(self._on_shutting_down, weak=True)

    def _on_shutting_down(self, **kwargs: Any) -> None:
        connection = self.connection
        hold = getattr(getattr(connection, "transport", None), "hold_deliveries", None)
        if hold is not None:
            hold()

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        _mark(message, "undecodable", f"{type(exc).__name__}: {exc}")
        self._log_and_reject(message, "cannot decode message body")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        _mark(message, "no-task-headers", "message has no task name in headers or body")
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        _mark(message, "unknown-task", f"task not registered on this worker: {exc}")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        _mark(message, "invalid-task", f"{type(exc).__name__}: {exc}")
        super().on_invalid_task(body, message, exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handler = super().create_task_handler(*args, **kwargs)
        accept = prepare_accept_content(self.app.conf.accept_content)

        def on_task_received(message: Any) -> Any:
            content_type = message.content_type
            if accept and content_type not in accept:
                _mark(
                    message,
                    "content-type-not-accepted",
                    f"content type {content_type!r} is not in accept_content",
                )
                return self._log_and_reject(message, "content type not accepted")
            return handler(message)

        return on_task_received

    def _log_and_reject(self, message: Any, what: str) -> None:
        import logging

        logging.getLogger(__name__).error(
            "%s; dead-lettered: content_type=%s headers=%s",
            what,
            safe_repr(message.content_type),
            safe_repr(message.headers),
        )
        message.reject(requeue=False)
