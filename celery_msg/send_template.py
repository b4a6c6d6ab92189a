"""Tasks sent one by one inside a bulk block (``.delay()``, ``apply_async``, ``send_task``):
past the first two of each *shape*, their messages are derived from the one Celery built
(:mod:`celery_msg.templates` says how a template is taken, checked and used).

Why: a management command or a request handler that publishes a loop of ``.delay()`` calls
inside ``with celery_msg.bulk(app):`` no longer waits for Redis per task, so what is left is
Celery's work per task, and most of it (``send_task``: exec options, the router,
``as_task_v2``, ``send_task_message``, kombu's ``Producer.publish``) builds the same message
again with another id and other arguments.

How: while a bulk block of a configured app is open (in any thread), the app has its own
``send_task`` (an attribute of the app, which ``Task.apply_async`` calls; set by the first
block to open, removed when the last closes, so that outside blocks a ``.delay()`` pays
nothing for it). Outside this thread's block, or for a call it does not derive, it is Celery's
own (``type(app).send_task``, so a later patch of Celery's is still called).
``Task.apply_async`` itself still runs for every task (the arguments' check, ``shadow_name``,
the task's exec options): only what it calls is answered here.

- A shape is the task name and ``send_task``'s keyword arguments other than ``task_id``, and,
  inside a worker's task, the parent's id, root id and priority (Celery takes the message's
  ``root_id``/``parent_id`` from them, and adds the result to the parent's trail).
- The id is made here as Celery makes it (``task_id or uuid()``) and given to Celery's path,
  so the template and the second task's check know it.
- The caller gets what Celery returns: ``(result_cls or app.AsyncResult)(task_id)`` with
  ``ignored`` set; the second task's check compares its type and ``ignored`` too.

Not derived, besides what :mod:`celery_msg.templates` lists: a given ``producer``,
``connection`` or ``router``; ``countdown``, ``eta``, ``expires``, links; name, arguments and
keyword arguments not given as Celery's ``Task.apply_async`` gives them (more than three
positional arguments). ``msg_send_templates = False`` in the app's configuration (Django:
``CELERY_MSG_SEND_TEMPLATES``) turns it off.

Pinned by ``tests/integration/test_send_template.py``: the messages stored, the results, the
backend calls and the signals of the same calls, derived and through Celery's path, are equal
after renaming ids.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.utils import uuid

from .bulk_publish import current_buffer, on_open
from .templates import (
    NOT_DERIVED_OPTIONS,
    OWN_SEND_TASK,
    Deriver,
    celerys_path_intact,
    signal_receivers,
)

if TYPE_CHECKING:
    from .bulk_publish import Buffer

#: The app setting that turns derivation off.
SETTING = "msg_send_templates"
#: ``send_task`` arguments that, given, send the task through Celery's path.
NOT_DERIVED = NOT_DERIVED_OPTIONS | {"producer", "publisher", "connection", "router"}
#: The key of a worker task's parent in a shape's options.
_PARENT = "<parent>"
#: ``send_task`` positional parameters a call may give positionally (name, args, kwargs).
_POSITIONAL = 3

_last = threading.local()
#: Apps given the hook (:func:`install`), once each.
_hooked: weakref.WeakSet[Celery] = weakref.WeakSet()


def last_publisher() -> SendPublisher | None:
    """The publisher of this thread's last bulk block that sent a task one by one (its
    ``derived`` count says how many of its messages were derived), None where they were all
    built by Celery; for tests and benchmarks."""
    publisher: SendPublisher | None = getattr(_last, "publisher", None)
    return publisher


@dataclass(eq=False)
class SendPublisher(Deriver):
    """The derived publishes of one app's tasks sent one by one in one bulk block."""

    def send(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """What Celery's ``send_task`` does, derived where it can be (see the module)."""
        app = self.app
        task_id = options["task_id"] = options.get("task_id") or uuid()

        def celerys() -> Any:
            return type(app).send_task(app, name, args, kwargs, **options)

        if signal_receivers():
            return celerys()
        for option in NOT_DERIVED:
            if options.get(option) is not None:
                return celerys()
        key = {k: v for k, v in options.items() if k != "task_id"}
        parent = app.current_worker_task
        if parent is not None:
            request = parent.request
            priority = (request.delivery_info or {}).get("priority")
            key[_PARENT] = (request.id, request.root_id, priority)
        shape = self.find(name, key)
        if shape is None:
            shape = self.new_shape(name, key)
            if shape is None:
                return celerys()
            result = self.first(shape, celerys, task_id, options)
            shape.returned = (type(result), getattr(result, "ignored", None))
            return result
        template = shape.template
        if template is None:
            return celerys()
        with app.producer_or_acquire() as producer:
            if producer.channel is not template.channel:
                shape.template = None  # a new connection since: its routing table may differ
                return celerys()
            if not shape.trusted:
                returned = shape.returned

                def same(result: Any) -> bool:
                    return bool((type(result), getattr(result, "ignored", None)) == returned)

                return self.second(
                    shape,
                    template,
                    lambda: self.derive(template, task_id, args, kwargs),
                    celerys,
                    same,
                )
            self.publish(template, self.derive(template, task_id, args, kwargs), name, producer)
        result = (options.get("result_cls") or app.AsyncResult)(task_id)
        result.ignored = shape.returned[1]
        if parent is not None and options.get("add_to_parent", True):
            parent.add_trail(result)
        return result


def publisher_for(app: Celery, buffer: Buffer) -> SendPublisher | None:
    """A publisher deriving this block's tasks of ``app``, or None where they must all be
    built by Celery (see the module's docstring)."""
    publisher = None
    if app.conf.get(SETTING, True) and celerys_path_intact(app):
        publisher = SendPublisher(app, buffer)
    _last.publisher = publisher
    return publisher


def _nothing(_: Any) -> None:
    """A publisher holds nothing to give back when its block closes."""


class _Hook:
    """celery-msg's ``send_task`` on one app, set while a bulk block of the app is open in
    any thread (counted): outside blocks ``app.send_task`` is Celery's own, at no cost."""

    def __init__(self, app: Celery) -> None:
        self._app = weakref.ref(app)
        self._lock = threading.Lock()
        self._open = 0

    def open(self) -> Callable[[], None]:
        app = self._app()
        with self._lock:
            self._open += 1
            if app is not None and self._open == 1 and "send_task" not in app.__dict__:
                app.send_task = _send_task(app)
        return self.close

    def close(self) -> None:
        app = self._app()
        with self._lock:
            self._open -= 1
            # Only ours: a send_task another library set meanwhile stays.
            if self._open or app is None:
                return
            if getattr(app.__dict__.get("send_task"), OWN_SEND_TASK, False):
                del app.send_task


def _send_task(app: Celery) -> Callable[..., Any]:
    def send_task(*args: Any, **kwargs: Any) -> Any:
        buffer = current_buffer()
        if buffer is None or not 1 <= len(args) <= _POSITIONAL:
            return type(app).send_task(app, *args, **kwargs)
        publisher: SendPublisher | None = buffer.hold(send_task, _publisher(app, buffer), _nothing)
        if publisher is None:
            return type(app).send_task(app, *args, **kwargs)
        return publisher.send(*args, **kwargs)

    setattr(send_task, OWN_SEND_TASK, True)
    return send_task


def install(app: Celery) -> None:
    """Give ``app`` celery-msg's ``send_task`` inside its bulk blocks (once; never over a
    ``send_task`` another library set on the app, which then keeps Celery's path)."""
    if app not in _hooked:
        _hooked.add(app)
        on_open(app, _Hook(app).open)


def _publisher(app: Celery, buffer: Buffer) -> Callable[[], SendPublisher | None]:
    return lambda: publisher_for(app, buffer)
