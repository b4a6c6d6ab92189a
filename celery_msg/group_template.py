"""A group's task messages derived from the one Celery built, instead of built again by
Celery's per-task path, for every task after the first two of each *shape*
(:mod:`celery_msg.templates` says how a template is taken, checked and used).

Why: in a bulk block a group's publish no longer waits for Redis, so what is left is Celery's
own work per task: ``Signature.apply_async`` -> ``Task.apply_async`` -> ``send_task`` (exec
options, the router, ``as_task_v2``) -> ``send_task_message`` -> kombu's ``Producer.publish``,
about 500k instructions per task, while the tasks of a group differ only in their id, index,
arguments and the text of those arguments.

How, inside :func:`celery_msg.canvas`'s bulk wrap of ``group._apply_tasks``: Celery's own loop
still clones, freezes and iterates the signatures, counts the chord size, fills the barrier
and builds every ``AsyncResult``; only the call ``sig.apply_async(...)`` it makes per task is
answered here (an attribute on Celery's clone of the signature, dropped with it).

- A shape is the task name and the signature's options merged as ``Signature.apply_async``
  merges them, without the two Celery sets per task (``task_id``, ``group_index``).
- A derived task skips ``Task.apply_async``, so its arguments are checked against the task's
  signature here, as Celery checks them (``typing``).
- One thing of Celery's is not repeated: ``send_task`` returns an ``AsyncResult`` the group
  loop drops at once, whose ``__del__`` makes a Redis result backend unsubscribe from the
  task's channel, and the loop's own result subscribes again; a derived task stays subscribed.

Not derived, besides what :mod:`celery_msg.templates` lists: a task whose class or object has
its own ``apply_async`` or ``shadow_name`` (ddtrace's patch sets one on the task), or uses
pydantic arguments; options with a time in them (``countdown``, ``eta``, ``expires``), links;
partial arguments given to the group's ``apply_async``; more than
:data:`~celery_msg.templates.MAX_SHAPES` shapes in one group.
``msg_group_templates = False`` in the app's configuration turns it off.

Pinned by ``tests/integration/test_group_template.py``: the messages stored, the backend calls
and the signals of the same groups, derived and through Celery's path, are equal after
renaming ids.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.app.task import Task
from celery.canvas import Signature

from .templates import NOT_DERIVED_OPTIONS, Derived, Deriver, Template, celerys_path_intact

if TYPE_CHECKING:
    from .bulk_publish import Buffer

#: The options Celery sets per task of a group; every other option defines the shape.
PER_TASK_OPTIONS = frozenset({"task_id", "group_index"})
#: The app setting that turns derivation off.
SETTING = "msg_group_templates"


@dataclass(eq=False)
class GroupPublisher(Deriver):
    """The derived publishes of one group's ``_apply_tasks`` (one thread, one bulk block)."""

    _tasks: dict[str, Task | None] = field(default_factory=dict)

    indexed = True

    def tasks(self, prepared: Iterator[Any]) -> Iterator[Any]:
        """Celery's ``(signature, result, group_id)`` items, each signature answering
        ``apply_async`` here."""
        for item in prepared:
            sig = item[0]
            if type(sig) is Signature:
                # An attribute of Celery's own clone: the loop's call comes here.
                sig.apply_async = functools.partial(self._apply, sig)
            yield item

    def _apply(self, sig: Signature, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        def celerys() -> Any:
            return Signature.apply_async(sig, args, kwargs, **options)

        name = sig.task
        merged = _merged(sig, args, kwargs, options)
        producer = options.get("producer")
        if merged is None or producer is None or self._task(name) is None:
            return celerys()
        options_shape = {k: v for k, v in merged.items() if k not in PER_TASK_OPTIONS}
        shape = self.find(name, options_shape)
        if shape is None:
            shape = self.new_shape(name, options_shape)
            if shape is None:
                return celerys()
            return self.first(shape, celerys, merged["task_id"], merged)
        template = shape.template
        if template is None:
            return celerys()
        if producer.channel is not template.channel:
            shape.template = None  # a new connection since: its routing table may differ
            return celerys()
        if not shape.trusted:
            return self.second(
                shape, template, lambda: self._derive(template, sig, merged), celerys
            )
        self.publish(template, self._derive(template, sig, merged), name, producer)
        return None

    def _task(self, name: str) -> Task | None:
        """The registered task if its messages may be derived."""
        try:
            return self._tasks[name]
        except KeyError:
            pass
        task = self.app.tasks.get(name)
        # Bound to Celery's own functions: neither the class nor this task object (as
        # ddtrace's Celery patch sets it on the task) has its own apply_async or shadow_name.
        ok = (
            task is not None
            and getattr(task.apply_async, "__func__", None) is Task.apply_async
            and getattr(task.shadow_name, "__func__", None) is Task.shadow_name
            and getattr(task, "_dump_pydantic_arguments", None) is None
            and not getattr(task, "__v2_compat__", False)
        )
        self._tasks[name] = task if ok else None
        return self._tasks[name]

    def _derive(self, template: Template, sig: Signature, merged: dict[str, Any]) -> Derived:
        """The message Celery's path would build for ``sig``, its arguments checked as
        ``Task.apply_async`` checks them (which a derived task skips)."""
        args, kwargs = sig.args, sig.kwargs
        task = self._tasks[sig.task]
        if task is not None and task.typing:
            check_arguments = getattr(task, "__header__", None)
            if check_arguments is not None:
                check_arguments(*(args or ()), **(kwargs or {}))
        return self.derive(template, merged["task_id"], args, kwargs, merged.get("group_index"))


def _merged(
    sig: Signature, args: Any, kwargs: Any, options: dict[str, Any]
) -> dict[str, Any] | None:
    """The options ``Signature.apply_async`` would send the task with (merged as it merges
    them), or None when the task is not derived (partial arguments, a time, a link, not
    frozen, ``add_to_parent``)."""
    if args or kwargs or options.get("add_to_parent"):
        return None
    given = {k: v for k, v in options.items() if v is not None}
    merged: dict[str, Any] = sig._merge((), {}, given)[2] if given else sig.options
    if "task_id" not in merged or not NOT_DERIVED_OPTIONS.isdisjoint(merged):
        return None
    return merged


def publisher_for(app: Celery, buffer: Buffer) -> GroupPublisher | None:
    """A publisher deriving this group's messages, or None where they must all be built by
    Celery (see the module's docstring)."""
    if not app.conf.get(SETTING, True) or not celerys_path_intact(app):
        return None
    return GroupPublisher(app, buffer)
