"""The Celery layer: one call, :func:`configure`, makes an app use celery-msg safely.

Selecting the transport needs only ``broker_url = "celery-msg://..."`` (importing
:mod:`celery_msg` registers the scheme). :func:`configure` adds what Celery itself gets wrong
for a reliable broker: its worker *acks* a message it cannot decode (the message is gone); ours
dead-letters it, with a reason, and so it does for disallowed content types, messages without
task headers and unknown tasks. Its consumer also applies the app's policies per message
(expired and poison messages, the ack mode; see :mod:`celery_msg.worker` for the rest), and it
validates the transport options and policies at start-up.

For operators, on a celery-msg connection, the consumer also names the worker's anonymous
``Broadcast`` queues after its node name (:mod:`celery_msg.broadcast`: a restarted worker gets
what was broadcast meanwhile) and answers ``inspect scheduled`` from the queues' schedules in
Redis (:mod:`celery_msg.control`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, signals
from celery.concurrency.solo import TaskPool as SoloPool
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.serialization import prepare_accept_content
from kombu.utils.encoding import safe_repr

from . import childack, poison
from .broadcast import name_broadcast_queues
from .bulk_publish import uses_celery_msg
from .canvas import install as bulk_groups
from .control import install_scheduled
from .errors import PoisonMessage
from .headers import expires_ms
from .keys import Counter, Reason
from .options import TransportOptions
from .outcome import broker_of, channel_of, mark_dead_letter, mark_drop, outcome_of
from .policy import Policies, Resolved, policies_from
from .startup import check_configure
from .transport import Transport
from .worker import Strategies, ack_modes, install

CONSUMER = "celery_msg.app:Consumer"

logger = logging.getLogger(__name__)


def configure(app: Celery, *, policies: Policies | None = None, **transport_options: Any) -> Celery:
    """Make ``app`` dead-letter bad input, apply its policies, and check its celery-msg options
    now, not later.

    ``policies`` (else the app's ``msg_policies`` setting, ``CELERY_MSG_POLICIES`` in Django)
    and ``transport_options`` go into ``broker_transport_options``. Call it after the app's
    configuration is loaded. Raises :class:`celery_msg.ConfigurationError` naming the first
    invalid option or policy field, a broker URL that is a typo of ``celery-msg://`` ("did you
    mean"), and policies given for a broker that is not celery-msg. Warns
    (:class:`~celery_msg.startup.PolicyNotAppliedWarning`) that ``task_always_eager`` tasks run
    without the policies. From then on the app's groups (chunks, chord headers) publish in
    bulk (:mod:`celery_msg.canvas`).
    """
    options = {**(app.conf.broker_transport_options or {}), **transport_options}
    chosen = policies_from(policies if policies is not None else app.conf.get("msg_policies"))
    check_configure(app, chosen)
    options, chosen = poison.hand_to_policies(options, chosen)
    options["policies"] = chosen
    if uses_celery_msg(app):
        TransportOptions.from_mapping(options)
    app.conf.broker_transport_options = options
    app.conf.worker_consumer = CONSUMER
    app.conf.broker_connection_retry_on_startup = True
    bulk_groups(app)
    return app


def app_policies(app: Celery) -> Policies:
    """The policies :func:`configure` put into ``app``'s transport options."""
    return policies_from((app.conf.broker_transport_options or {}).get("policies"))


class Consumer(CeleryConsumer):
    """Celery's worker consumer, but nothing it cannot run is acked away, and nothing more is
    started once a warm shutdown begins (prefetched messages go back to their queue)."""

    Strategies = Strategies

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policies = app_policies(self.app)
        # Before the pool forks: its processes inherit the prepared tasks.
        install(self.app, self.policies)
        childack.install()
        if uses_celery_msg(self.app):
            # Before the consumer starts: it reads the queue table when it starts consuming.
            name_broadcast_queues(self.app.amqp.queues, self.hostname)
        install_scheduled(Consumer)
        signals.worker_shutting_down.connect(self._on_shutting_down, weak=True)

    def update_strategies(self) -> None:
        install(self.app, self.policies)
        super().update_strategies()
        transport = self._transport()
        if transport is not None:
            # Only a solo pool runs tasks inside the event loop, where the next reserve can
            # overlap the last task (celery_msg.readahead). With another pool the loop would
            # only wait for the reply it could have had from a normal round.
            transport.reads_ahead = isinstance(self.pool, SoloPool)
        self.strategies.build_variants(
            self.app.tasks.values(),
            ack_modes(self.policies),
            lambda task, view: type(task).start_strategy(view, self.app, self),
        )

    def _on_shutting_down(self, **kwargs: Any) -> None:
        transport = self._transport()
        if transport is not None:
            transport.hold_deliveries()

    def call_soon_ack(self, p: Any, *args: Any, **kwargs: Any) -> Any:
        """Ack or reject now, not at the event loop's next iteration (Celery's way there).

        Our ack only buffers the ack for the next round (or writes it, from another thread),
        so waiting gains nothing; and a solo worker would start the next due task before the
        ack of the one that finished was even buffered: a crash then runs it again.
        """
        if self._transport() is None:
            return super().call_soon_ack(p, *args, **kwargs)
        try:
            p(*args, **kwargs)
        except Exception as exc:
            logger.exception("ack or reject of a task message failed: %r", exc)
        return p

    def apply_eta_task(self, task: Any) -> None:
        """Write the acks made so far, then run a task whose ETA came (a hub timer).

        The hub fires up to ten due timers in a row, and a solo worker runs each task right
        here: without this, the ack of the task before would wait for this one to finish,
        and a crash in between would run a finished task again.
        """
        transport = self._transport()
        if transport is not None and transport.has_buffered_acks():
            transport.flush_acks()
        super().apply_eta_task(task)

    def _transport(self) -> Transport | None:
        transport = getattr(self.connection, "transport", None)
        return transport if isinstance(transport, Transport) else None

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        mark_dead_letter(message, Reason.UNDECODABLE, f"{type(exc).__name__}: {exc}")
        self._log_and_reject(message, "cannot decode message body")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        mark_dead_letter(
            message, Reason.NO_TASK_HEADERS, "message has no task name in headers or body"
        )
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        mark_dead_letter(message, Reason.UNKNOWN_TASK, f"task not registered on this worker: {exc}")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        mark_dead_letter(message, Reason.INVALID_TASK, f"{type(exc).__name__}: {exc}")
        super().on_invalid_task(body, message, exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handler = super().create_task_handler(*args, **kwargs)
        accept = prepare_accept_content(self.app.conf.accept_content)

        strategies = self.strategies

        def on_task_received(message: Any) -> Any:
            content_type = message.content_type
            if accept and content_type not in accept:
                mark_dead_letter(
                    message,
                    Reason.CONTENT_TYPE_NOT_ACCEPTED,
                    f"content type {content_type!r} is not in accept_content",
                )
                return self._log_and_reject(message, "content type not accepted")
            headers = message.headers if isinstance(message.headers, dict) else {}
            task = headers.get("task")
            if task is not None and not isinstance(task, str):
                mark_dead_letter(
                    message, Reason.INVALID_TASK, f"task name {task!r} is not a string"
                )
                return self._log_and_reject(message, "invalid task name")
            queue = (message.delivery_info or {}).get("queue")
            policy = self.policies.resolve(task, queue)
            if self._expired(message, headers, queue, policy) or self._poison(message, policy):
                return None
            if policy.ack == "early":
                # At most once: the ack is in Redis before the task can start. Celery acks when
                # the pool accepts the task, which for prefork is after the child started it.
                channel = channel_of(message)
                if channel is not None:
                    channel.settle_ack(message.delivery_tag, now=True)
                    outcome_of(message).settled = True
            strategies.mode = policy.ack
            try:
                return handler(message)
            except self.connection_errors:
                raise  # Celery reconnects
            except Exception as exc:
                # Celery lets anything its strategies raise on a malformed message (a body that
                # is not [args, kwargs, embed], a header of the wrong type) end the worker, and
                # the message comes back to end the next one: dead-letter it instead.
                if message.acknowledged:
                    raise
                mark_dead_letter(message, Reason.INVALID_TASK, f"{type(exc).__name__}: {exc}")
                logger.exception("task %s[%s] cannot be run", task, headers.get("id"))
                return self._log_and_reject(message, "malformed task message")
            finally:
                strategies.mode = None

        return on_task_received

    def _expired(
        self, message: Any, headers: dict[str, Any], queue: str | None, policy: Resolved
    ) -> bool:
        """Count a message whose ``expires`` has passed; dead-letter it if its policy says so
        (True). Otherwise Celery's own check revokes it (it is not run) and acks it."""
        expires = expires_ms(headers)
        if expires is None or expires > time.time() * 1000:
            return False
        broker = broker_of(message)
        if broker is not None and queue is not None:
            broker.count(queue, Counter.EXPIRED)
            if headers.get("id"):
                broker.unlock(queue, [str(headers["id"])])  # never to run: may be sent again
        dead_letter = policy.dead_letter
        if not (dead_letter.enabled and dead_letter.expired):
            return False
        task_id = headers.get("id")
        mark_dead_letter(
            message, Reason.EXPIRED, f"expired at {headers.get('expires')}, before it could run"
        )
        logger.warning("task %s[%s] expired; dead-lettered", headers.get("task"), task_id)
        message.reject(requeue=False)
        if task_id:
            self._store_state(task_id, lambda backend: backend.mark_as_revoked(task_id, "expired"))
        return True

    def _poison(self, message: Any, policy: Resolved) -> bool:
        """Dead-letter (or drop) a message delivered ``max_deliveries`` times already without
        an ack (the rule: :mod:`celery_msg.poison`)."""
        # delivery_count counts this delivery too; the rule counts the ones before it.
        delivered = int((message.delivery_info or {}).get("delivery_count") or 0) - 1
        if not poison.is_poison(delivered, policy.max_deliveries):
            return False
        headers = message.headers if isinstance(message.headers, dict) else {}
        detail = poison.detail(delivered)
        if policy.dead_letter.enabled:
            mark_dead_letter(message, Reason.POISON, detail)
        else:
            mark_drop(message)
        logger.error(
            "task %s[%s] is poison (%s); %s",
            headers.get("task"),
            headers.get("id"),
            detail,
            "dead-lettered" if policy.dead_letter.enabled else "dropped",
        )
        message.reject(requeue=False)
        task_id = headers.get("id")
        broker = broker_of(message)
        queue = (message.delivery_info or {}).get("queue")
        if task_id and broker is not None and queue:
            broker.unlock(queue, [str(task_id)])  # never to run again: may be sent again
        if task_id:
            error = PoisonMessage(f"{detail}: it kept killing its worker")
            self._store_state(task_id, lambda backend: backend.mark_as_failure(task_id, error))
        return True

    def _store_state(self, task_id: str, store: Callable[[Any], Any]) -> None:
        """Tell the result backend (if any), so that callers waiting on the result return."""
        try:
            backend = self.app.backend
            if type(backend).__name__ != "DisabledBackend":
                store(backend)
        except Exception:
            logger.exception("task %s: could not store its state in the result backend", task_id)

    def _log_and_reject(self, message: Any, what: str) -> None:
        logger.error(
            "%s; dead-lettered: content_type=%s headers=%s",
            what,
            safe_repr(message.content_type),
            safe_repr(message.headers),
        )
        message.reject(requeue=False)
