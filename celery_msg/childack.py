"""A prefork pool child acks its own successful ``acks_late`` task, before the parent hears of it.

Why: with ``-P prefork`` the task runs in a pool child, and the worker (the parent) acks only
once the child's result has crossed the pipe and its event loop got round to reading it: 20-60 ms
under load in bench/chaos.py, and a SIGKILL of the worker in that window re-runs a task that
had finished (its lease expires, the message comes back). Nearly every duplicate completion
per kill left on prefork was one of these. The child that ran the task writes the ack itself,
right after Celery stored the result (the ``task_success`` signal: after ``mark_as_done`` and
``on_success``), so the window shrinks to the child's own ack write.

How: the parent's request (:class:`celery_msg.worker.PolicyRequest`) puts the delivery's lease
(queue, key, fencing token) into the request Celery sends to the child, under
:data:`LEASE_REQUEST_KEY`, only when the task is ``acks_late`` in the ack mode chosen for that
message. In the child (marked by ``worker_process_init``: solo and threads pools never run it,
their acks are written by the consumer at once), :func:`ack_from_child` acks that lease
through the app's connection pool: a connection of this process, built from the broker URL and
transport options the way the worker's own is (a Cluster node, a Sentinel master), made on the
first ack after the fork. The ack is fenced by the token like any other.

What it leaves to the parent: everything but a success. A failure, a retry, a rejection, a
time limit or a lost child are settled by the parent as before. The parent still acks a
success when it reads the result; ack.lua then finds the message GONE (no longer stored) and
says so, and the parent stays quiet (no "lease lost", no ``lease_lost`` count); a renewal round
in between gets GONE too: the lease is dropped from the book quietly (it must not be run
again: a message reserved ahead and gone meanwhile is not delivered) and so is the parent's
ack that follows (:meth:`celery_msg.holdings.Holdings.forget_gone`). A child that cannot
reach Redis logs it and lets the task succeed: the parent's ack is then the one that counts, as
without this module.

The window left: a SIGKILL of the *child* between the result being stored and its ack write
(one EVALSHA on the child's open connection, and its reply), and a SIGKILL of the worker while a
child's ack is being written. A task that raises ``Reject`` from ``after_return`` (after
``task_success``) is acked by the child nonetheless.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from .errors import CeleryMsgError
from .leases import Lease
from .outcome import broker_of
from .redisio import REDIS_CONNECTION_ERRORS

logger = logging.getLogger(__name__)

#: Request attribute (``task.request.celery_msg_lease`` in the child): ``[queue, key, token]``
#: of the delivery, set by the parent only for an ``acks_late`` delivery from celery-msg.
LEASE_REQUEST_KEY = "celery_msg_lease"

#: What the child's ack may meet without failing its task: Redis unreachable or refusing
#: (translated into celery-msg's errors, or raw from the connection).
_ACK_ERRORS: tuple[type[BaseException], ...] = (CeleryMsgError, *REDIS_CONNECTION_ERRORS, OSError)

#: Set in a prefork pool child by ``worker_process_init``; the worker's own process never is.
_in_pool_child = False


def lease_for_child(delivery_info: dict[str, Any] | None, acks_late: bool) -> list[Any] | None:
    """What the parent puts under :data:`LEASE_REQUEST_KEY`: the lease of a celery-msg delivery
    (its ``delivery_info`` as stamped by :func:`celery_msg.messages.stamp_delivery`) of an
    ``acks_late`` task, else None."""
    info = delivery_info or {}
    if not acks_late:
        return None
    queue, key, token = info.get("queue"), info.get("message_key"), info.get("lease_token")
    if not isinstance(queue, str) or not isinstance(key, str) or not isinstance(token, int):
        return None
    return [queue, key, token]


def lease_of(request: Any) -> Lease | None:
    """The lease the parent handed to this task's request, or None (checked: it crossed a
    process boundary, and a task may be called with any request)."""
    raw = getattr(request, LEASE_REQUEST_KEY, None)
    if not isinstance(raw, (list, tuple)) or len(raw) != 3:
        return None
    queue, key, token = raw
    if not isinstance(queue, str) or not isinstance(key, str) or not isinstance(token, int):
        return None
    return Lease(queue, key, token)


def install() -> None:
    """Connect the two signal handlers, before the pool forks (idempotent: ``dispatch_uid``).
    The ack goes through the app of the task that succeeded."""
    signals.worker_process_init.connect(_mark_pool_child, weak=False, dispatch_uid=__name__)
    signals.task_success.connect(_on_task_success, weak=False, dispatch_uid=__name__)


def in_pool_child() -> bool:
    """Whether this process is a prefork pool child (its successes are acked here)."""
    return _in_pool_child


def _mark_pool_child(**kwargs: Any) -> None:
    global _in_pool_child
    _in_pool_child = True


def _on_task_success(sender: Any = None, **kwargs: Any) -> None:
    if _in_pool_child and sender is not None:
        ack_from_child(sender)


def ack_from_child(task: Any) -> bool:
    """Ack the lease of ``task``'s current request, if the parent handed one; True when the ack
    settled it. Never raises: the parent's ack is still to come."""
    request = getattr(task, "request", None)
    if request is None or getattr(request, "called_directly", True):
        return False
    lease = lease_of(request)
    if lease is None:
        return False
    try:
        with task.app.pool.acquire(block=True) as connection:
            broker = broker_of(connection)
            if broker is None:
                return False
            lost = broker.ack([lease])
    except _ACK_ERRORS as exc:
        logger.warning(
            "queue %s message %s: the pool child could not ack it (%s); the worker will",
            lease.queue,
            lease.key,
            exc,
        )
        return False
    if lost:
        # The parent's ack meets the same refusal and logs it.
        logger.debug("queue %s message %s: child ack refused, lease lost", lease.queue, lease.key)
        return False
    logger.debug("queue %s message %s: acked by the pool child", lease.queue, lease.key)
    return True
