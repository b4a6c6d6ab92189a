"""Stable names for Celery's anonymous ``Broadcast`` queues, so a restarted worker hears what
was broadcast while it was down.

``kombu.common.Broadcast("cache")`` names its queue ``bcast.<uuid4>``, a new name in every
process: a worker that restarts declares a fresh, empty queue, and what was broadcast meanwhile
waits in the old one until its binding expires. celery-msg keeps a broadcast (auto-delete)
queue's binding for ``binding_ttl`` after its last consumer, as it does for the worker's
remote-control mailbox ``<node>.celery.pidbox``; a queue named after the worker's node name
makes the same worker, restarted under the same name, take it over with its messages.

The name is ``<exchange>.<nodename>.bcast`` (``cache.w1@host.bcast``): one queue per broadcast
exchange and worker, found by exchange first in ``celery msg`` listings. Queues given a name
(``Broadcast("cache", queue="mine")``) are left alone: two workers sharing a name then share
one queue, which is what the name asked for. ``Broadcast(unique=True)`` without a name cannot
be told apart from an anonymous queue and is named too.

:func:`configure` does this for its worker consumer; without it, call
:func:`name_broadcast_queues` from a ``celeryd_after_setup`` handler (see the README).
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

from kombu.common import Broadcast

logger = logging.getLogger(__name__)

#: The name kombu gives a Broadcast queue declared without one: ``bcast.`` + ``uuid4()``.
ANONYMOUS_NAME = re.compile(r"bcast\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def stable_name(exchange: str, nodename: str) -> str:
    """The queue name of broadcast exchange ``exchange`` on worker ``nodename``."""
    return f"{exchange}.{nodename}.bcast"


def is_anonymous(queue: Any) -> bool:
    """Whether ``queue`` is a ``Broadcast`` queue declared without a name of its own."""
    return isinstance(queue, Broadcast) and bool(ANONYMOUS_NAME.fullmatch(str(queue.name)))


def name_broadcast_queues(queues: Any, nodename: str) -> dict[str, str]:
    """Rename the anonymous broadcast queues of Celery's queue table (``app.amqp.queues``) after
    ``nodename``; returns ``{old name: new name}``.

    Run it before the worker's consumer starts (it reads the table when it starts consuming):
    the queues selected with ``-Q`` (by their alias, the exchange name) follow the rename.
    """
    renamed: dict[str, str] = {}
    for name, queue in list(queues.items()):
        if not is_anonymous(queue):
            continue
        new_name = stable_name(queue.exchange.name, nodename)
        named = copy.copy(queue)  # unbound: nothing but attributes to copy
        named.name = named.queue = new_name
        del queues[name]
        queues[new_name] = named  # Celery's Queues.__setitem__ also re-points the alias
        # Celery keeps the queues to consume (all, or those picked with -Q) in one of two
        # dicts of the table; replace the entry wherever it is.
        for selected in (queues._consume_from, queues._default_consume_from):
            if selected is not None and selected.pop(name, None) is not None:
                selected[new_name] = named
        renamed[name] = new_name
        logger.info(
            "queue %s of broadcast exchange %s named %s: a restart under the same node name "
            "keeps what was broadcast meanwhile",
            name,
            queue.exchange.name,
            new_name,
        )
    return renamed
