"""Policies inside a Celery worker: ack modes, retries, poison and expired messages, failures.

Celery decides when a message is acked from attributes of the *task* (``acks_late``,
``acks_on_failure``, ``acks_on_timeout``, ``reject_on_worker_lost``), read when the worker builds
the task's strategy. A policy may give the same task another ack mode in another queue, so the
consumer keeps one strategy per (task, ack mode), each built from a :class:`TaskView` that
shows the task with that mode's attributes, and picks one per message (:class:`Strategies`).

Retries run inside the task, as Celery's own ``autoretry_for`` does: a failure the policy
retries becomes ``task.retry(countdown=...)``, so the result backend sees RETRY (never a
FAILURE followed by a success) and the retry waits in Redis like any ETA message.

When a task has failed for good, :class:`PolicyRequest` (the worker's request class) records it
in the dead-letter store with the exception, or drops it when the policy keeps no dead letters.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery import Celery, Task
from celery.exceptions import (
    Ignore,
    Reject,
    Retry,
    TaskRevokedError,
    Terminated,
    TimeLimitExceeded,
    WorkerLostError,
)
from celery.worker.request import Request
from kombu.utils.imports import symbol_by_name
from kombu.utils.json import dumps

from .childack import LEASE_REQUEST_KEY, lease_for_child
from .headers import FIRST_FAILURE_HEADER, UNIQUE_HEADER
from .keys import Reason, RecordField
from .messages import band_of
from .outcome import broker_of, mark_dead_letter, mark_drop, transport_of
from .policy import AckMode, Policies, Resolved, unique_for

logger = logging.getLogger(__name__)

#: The Celery task attributes that make up each ack mode (see the module docstring).
ACK_ATTRIBUTES: dict[str, dict[str, bool]] = {
    # Acked when received: a lost worker loses the task (at most once).
    "early": {"acks_late": False, "reject_on_worker_lost": False},
    # Acked when the task ends, whatever the outcome: a failure, a time limit or a lost pool
    # process are final (the failure is dead-lettered), never run again.
    "late": {
        "acks_late": True,
        "acks_on_failure": False,
        "acks_on_timeout": True,
        "reject_on_worker_lost": False,
    },
    # Acked only on success: a lost pool process or a time limit redelivers (bounded by
    # max_deliveries); an exception goes to the retry policy, then to the dead-letter store.
    "on_success": {
        "acks_late": True,
        "acks_on_failure": False,
        "acks_on_timeout": False,
        "reject_on_worker_lost": True,
    },
}

#: Request attribute (in the task's ``self.request``) naming the queue the message came from.
QUEUE_REQUEST_KEY = "celery_msg_queue"
#: Request attribute: how many times the message was delivered, this delivery included.
DELIVERIES_REQUEST_KEY = "celery_msg_deliveries"

_WRAPPED = "__celery_msg_retry__"
_CONTROL_FLOW = (Retry, Ignore, Reject)


class TaskView:
    """A task as one ack mode shows it: those attributes overridden, everything else the task's.

    Only the worker's strategy and requests see it (the pool process runs the real task), so
    results, signals of the task run and ``self.request`` are the task's own.
    """

    def __init__(self, task: Task, attributes: dict[str, bool]) -> None:
        self.__dict__["_task"] = task
        self.__dict__.update(attributes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_task"], name)

    def __repr__(self) -> str:
        return f"<{self.__dict__['_task']!r} as {sorted(self.__dict__.items())[1:]}>"


class Strategies(dict[str, Any]):
    """The consumer's task strategies, with a variant per ack mode chosen per message.

    Celery's message handler looks strategies up by task name; the consumer sets ``mode`` for
    the message being handled (one thread handles messages), so the lookup finds the variant.
    """

    def __init__(self) -> None:
        super().__init__()
        self.variants: dict[tuple[str, AckMode], Any] = {}
        self._local = threading.local()

    @property
    def mode(self) -> AckMode | None:
        return getattr(self._local, "mode", None)

    @mode.setter
    def mode(self, value: AckMode | None) -> None:
        self._local.mode = value

    def __getitem__(self, name: str) -> Any:
        mode = self.mode
        if mode is not None:
            variant = self.variants.get((name, mode))
            if variant is not None:
                return variant
        return super().__getitem__(name)

    def build_variants(
        self,
        tasks: Iterable[Task],
        modes: Iterable[AckMode],
        start: Callable[[Task, TaskView], Any],
    ) -> None:
        """One strategy per task and ack mode; ``start(task, view)`` builds one from a view."""
        self.variants.clear()
        wanted = sorted(set(modes))
        for task in tasks:
            for mode in wanted:
                view = TaskView(task, ACK_ATTRIBUTES[mode])
                self.variants[(task.name, mode)] = start(task, view)


def ack_modes(policies: Policies) -> set[AckMode]:
    """Every ack mode some policy names."""
    layers = [policies.default, *policies.queues.values(), *policies.tasks.values()]
    return {layer.ack for layer in layers if layer.ack is not None}


def install(app: Celery, policies: Policies) -> None:
    """Prepare ``app``'s tasks in this worker: retry policies wrapped around ``run``, the
    request class that records failures and unlocks unique ids when they start. Idempotent;
    runs before the pool forks."""
    for task in app.tasks.values():
        _use_policy_request(task)
        _wrap_run(task, policies)


def _use_policy_request(task: Task) -> None:
    base = symbol_by_name(task.Request)
    if isinstance(base, type) and issubclass(base, PolicyRequest):
        return
    task.Request = _policy_request_for(base)


@functools.cache
def _policy_request_for(base: type[Request]) -> type[Request]:
    if base is Request:
        return PolicyRequest
    return type(f"Policy{base.__name__}", (PolicyRequest, base), {})


def _wrap_run(task: Task, policies: Policies) -> None:
    """Turn failures the policy retries into ``task.retry``, and unlock a unique id once the
    task returned. A task that declares Celery's own ``autoretry_for`` keeps it: one retry
    mechanism per task."""
    if getattr(task, _WRAPPED, False):
        return
    run = task.run
    retries_by_policy = not getattr(task, "autoretry_for", None)

    @functools.wraps(run)
    def run_with_policy(*args: Any, **kwargs: Any) -> Any:
        try:
            result = run(*args, **kwargs)
        except _CONTROL_FLOW:
            raise
        except Exception as exc:
            request = task.request
            if request.called_directly or not retries_by_policy:
                raise
            queue = getattr(request, QUEUE_REQUEST_KEY, None)
            retry = policies.resolve(task.name, queue).retry
            retries = int(request.retries or 0)
            if retry is None or not retry.applies_to(exc) or retries >= retry.max_retries:
                raise
            countdown = retry.countdown(retries)
            logger.info(
                "task %s[%s] failed (%s: %s); retry %d of %d in %.2fs",
                task.name,
                request.id,
                type(exc).__name__,
                exc,
                retries + 1,
                retry.max_retries,
                countdown,
            )
            # task.retry raises Retry itself (or exc once retries run out), as autoretry_for.
            task.retry(exc=exc, countdown=countdown, max_retries=retry.max_retries)
            raise  # not reached: retry() always raises
        _unlock_on_success(task, policies)
        return result

    task.run = run_with_policy
    setattr(task, _WRAPPED, True)


def _unlock_on_success(task: Task, policies: Policies) -> None:
    """The task returned and its policy says ``Unique(until="success")``: its id may be
    published again. Called inside the task, before Celery stores the result, so a caller that
    sees SUCCESS and publishes again is not refused. Runs where the task runs (a prefork
    child too: Celery replaces the request's success callback per task class)."""
    try:
        request = task.request
        if request.called_directly:
            return
        # Celery keeps only exchange and routing key of the delivery: PolicyRequest passes
        # the source queue in the request.
        queue = getattr(request, QUEUE_REQUEST_KEY, None)
        asked = getattr(request, UNIQUE_HEADER, None) or (request.headers or {}).get(UNIQUE_HEADER)
        unique = unique_for(policies, task.name, queue, asked)
        if not queue or unique is None or unique.until != "success":
            return
        # The app's pool: one connection per process, reused (not one built per task).
        with task.app.pool.acquire(block=True) as connection:
            broker = broker_of(connection)
            if broker is not None:
                broker.unlock(queue, [request.id])
    except Exception:
        logger.exception("task %s: could not unlock its unique id", task.name)


class PolicyRequest(Request):
    """Celery's request, plus: the source queue and delivery count passed to the task (as
    ``self.request.celery_msg_queue`` / ``celery_msg_deliveries``), the lease for a prefork
    child's own ack of an ``acks_late`` success (:mod:`celery_msg.childack`), failures
    recorded."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        info = message.delivery_info or {}
        if "queue" in info:
            self._request_dict[QUEUE_REQUEST_KEY] = info["queue"]
            self._request_dict[DELIVERIES_REQUEST_KEY] = info.get("delivery_count")
        # Never one from the message: Celery copies unknown request fields into a retry's
        # headers, so a retried message carries the lease of the delivery it came from.
        self._request_dict.pop(LEASE_REQUEST_KEY, None)
        # self.task shows the ack mode chosen for this message (TaskView).
        lease = lease_for_child(info, bool(self.task.acks_late))
        if lease is not None:
            self._request_dict[LEASE_REQUEST_KEY] = lease

    def on_accepted(self, pid: Any, time_accepted: float) -> None:
        super().on_accepted(pid, time_accepted)
        self._unlock_on_start()

    def _unlock_on_start(self) -> None:
        """Let unique publishes of this task id through again, if its policy's
        ``Unique.until`` is ``"start"`` (success is handled inside the task, see
        :func:`_unlock_on_success`)."""
        try:
            message = self.message
            transport = transport_of(message)
            if transport is None:
                return
            queue = (message.delivery_info or {}).get("queue")
            headers = message.headers if isinstance(message.headers, dict) else {}
            unique = unique_for(
                transport.options.policies, self.task.name, queue, headers.get(UNIQUE_HEADER)
            )
            if unique is not None and unique.until == "start" and queue:
                transport.broker.unlock(queue, [self.id])
        except Exception:
            logger.exception("task %s[%s]: could not unlock its unique id", self.task.name, self.id)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        try:
            self._record_failure(exc_info)
        except Exception:
            logger.exception("task %s[%s]: could not record its failure", self.task.name, self.id)
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )

    def _not_final(self, exc: WorkerLostError) -> bool:
        """A lost pool process is no failure for good when Celery retries the task for it
        (``retry_on_worker_lost``) or the task had stored its success before it was lost."""
        if getattr(self.task, "retry_on_worker_lost", False) and _retries_left(
            self.task, int(self._context.retries or 0)
        ):
            return True
        stored = getattr(self, "_success_was_stored", None)
        return bool(stored and stored())

    def _record_failure(self, exc_info: Any) -> None:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, (TaskRevokedError, Terminated, *_CONTROL_FLOW)):
            return
        message = self.message
        transport = transport_of(message)
        if transport is None:
            return  # not a celery-msg connection
        if isinstance(exc, WorkerLostError) and self._not_final(exc):
            return
        settled = _settlement(self.task, exc)
        if settled == "requeue":
            return  # it comes back and runs again: not a failure for good
        queue = message.delivery_info.get("queue")
        policy: Resolved = transport.options.policies.resolve(self.task.name, queue)
        detail = f"{type(exc).__name__}: {exc}"
        if not policy.dead_letter.enabled:
            logger.warning(
                "task %s[%s] failed for good (%s); dropped: its policy keeps no dead letters",
                self.task.name,
                self.id,
                detail,
            )
            mark_drop(message)
            transport.broker.unlock(queue, [self.id])  # failed for good: may be sent again
            return
        extra: dict[str, Any] = {
            "task": self.task.name,
            "exc_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "exc_message": str(exc)[:4000],
            "traceback": (getattr(exc_info, "traceback", "") or "")[-20000:],
            "retries": int(self.request_dict.get("retries") or 0),
        }
        first = (message.headers or {}).get(FIRST_FAILURE_HEADER)
        if first:
            extra[RecordField.FIRST_FAILURE] = int(first)
        if settled == "reject":
            # Celery rejects it without requeue: the transport moves it, atomically.
            mark_dead_letter(message, Reason.FAILED, detail, **extra)
        else:
            # Acked (ack mode early, or a time limit in mode late): keep a copy.
            payload = message.serializable()
            transport.broker.bury(
                queue,
                self.id,
                dumps(payload),
                band=band_of(
                    payload, transport.options.default_priority, transport.options.priority_order
                ),
                deliveries=int(message.delivery_info.get("delivery_count") or 1),
                reason=Reason.FAILED,
                detail=detail,
                **extra,
            )


def _retries_left(task: Any, retries: int) -> bool:
    return task.max_retries is None or retries < task.max_retries


def _settlement(task: Any, exc: BaseException) -> str:
    """What Celery's request does with a failed message: ``ack``, ``reject`` (no requeue) or
    ``requeue``; mirrors ``celery.worker.request.Request.on_failure``."""
    if not task.acks_late:
        return "ack"  # acked when received
    is_timeout = isinstance(exc, TimeLimitExceeded)
    ack_flag = task.acks_on_timeout if is_timeout else task.acks_on_failure
    if (task.reject_on_worker_lost and isinstance(exc, WorkerLostError)) or (
        is_timeout and not ack_flag
    ):
        return "requeue"
    return "ack" if ack_flag else "reject"
