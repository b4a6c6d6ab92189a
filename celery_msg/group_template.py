"""A group's task messages derived from the one Celery built, instead of built again by
Celery's per-task path, for every task after the first two of each *shape*.

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
- The first task of a shape goes through Celery's path, and the message it built (as the
  transport received it) and its ``after_task_publish`` arguments are kept: the template.
- The second goes through Celery's path too, and is derived from the template as well: only if
  the two are equal (the message, its signal's body, headers, exchange and routing key) is the
  shape trusted. Anything Celery or a library adds per task that is not modelled here (a time,
  a per-task header, a route by arguments) shows up as a difference, and then every task of
  that shape takes Celery's path.
- From the third on: the message is the template with the task's id (also its
  ``correlation_id``, and its ``root_id`` when that was the task's own), ``group_index``, body
  (arguments serialized by the template's serializer) and ``argsrepr``/``kwargsrepr``
  (Celery's ``saferepr`` with Celery's limits); its stored JSON is the template's text with
  those values put in (:class:`Splice`), and its buffer entries the template's. Celery's
  ``backend.on_task_call`` is called for a task whose result is tracked, and
  ``after_task_publish`` is sent with what Celery sends, after the message is buffered. (One
  thing of Celery's is not repeated: ``send_task`` returns an ``AsyncResult`` the group loop
  drops at once, whose ``__del__`` makes a Redis result backend unsubscribe from the task's
  channel, and the loop's own result subscribes again; a derived task stays subscribed.)

Not derived (Celery's path, as before, for the whole group or the shape): while
``before_task_publish`` or the deprecated ``task_sent`` have receivers (they may change the
message, and a derived message would carry the first task's change); with
``task_send_sent_event``; with a router that is not a plain mapping (a function may route by
arguments); a task whose class or object has its own ``apply_async`` or ``shadow_name``
(ddtrace's patch sets one on the task), or uses pydantic arguments; when one of Celery's
functions on this path was replaced or wrapped by another library (Sentry wraps
``Task.apply_async``, and must see every task); options with a time in them (``countdown``,
``eta``, ``expires``), links; partial arguments given to the group's ``apply_async``;
compression; protocol 1; more than :data:`MAX_SHAPES` shapes in one group.
``msg_group_templates = False`` in the app's configuration turns it off.

Pinned by ``tests/integration/test_group_template.py``: the messages stored, the backend calls
and the signals of the same groups, derived and through Celery's path, are equal after
renaming ids.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from celery.app import amqp as celery_amqp
from celery.app.amqp import AMQP
from celery.app.routes import MapRoute
from celery.app.task import Task
from celery.canvas import Signature
from kombu import serialization
from kombu.exceptions import EncodeError
from kombu.utils import json as kombu_json

from .publishing import Outgoing
from .routing import dumps

if TYPE_CHECKING:
    from .bulk_publish import Buffer
    from .bulk_senders import Entry, Origin
    from .core import Route

logger = logging.getLogger(__name__)

#: The options Celery sets per task of a group; every other option defines the shape.
PER_TASK_OPTIONS = frozenset({"task_id", "group_index"})
#: Options whose message fields depend on the time of the call, or that carry signatures of
#: their own (links, cloned per task by Celery).
NOT_DERIVED_OPTIONS = frozenset({"countdown", "eta", "expires", "link", "link_error"})
#: Shapes in one group before the rest of its tasks take Celery's path.
MAX_SHAPES = 8
#: The app setting that turns derivation off.
SETTING = "msg_group_templates"

#: The qualified name of the function ``AMQP.send_task_message`` is in Celery.
_SENDER = "AMQP._create_task_sender.<locals>.send_task_message"

#: Celery's functions on the derived path as this module found them: each group checks that
#: they are still these and not wrapped (``__wrapped__``), since a library that wraps one (as
#: Sentry wraps ``Task.apply_async``) expects to see every task.
_CELERYS = {
    (Celery, "send_task"): Celery.send_task,
    (Task, "apply_async"): Task.apply_async,
    (Signature, "apply_async"): Signature.apply_async,
    (AMQP, "as_task_v2"): AMQP.as_task_v2,
    (AMQP, "_create_task_sender"): AMQP._create_task_sender,
}


@dataclass(slots=True)
class _Sent:
    """What Celery's ``after_task_publish`` said of one task."""

    body: Any
    headers: Any
    exchange: Any
    routing_key: Any


class _Capture:
    """Celery's ``after_task_publish`` of this thread's next publishes, kept while a template
    is taken. The receiver is connected only meanwhile (counted across threads), so no other
    publish of the process pays for it."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._users = 0

    def _receive(
        self,
        sender: Any = None,
        body: Any = None,
        headers: Any = None,
        exchange: Any = None,
        routing_key: Any = None,
        **_: Any,
    ) -> None:
        sink: list[_Sent] | None = getattr(self._local, "sink", None)
        if sink is not None:
            sink.append(_Sent(body, headers, exchange, routing_key))

    @contextmanager
    def __call__(self) -> Iterator[list[_Sent]]:
        with self._lock:
            if not self._users:
                signals.after_task_publish.connect(self._receive, weak=False, dispatch_uid=__name__)
            self._users += 1
        sink: list[_Sent] = []
        self._local.sink = sink
        try:
            yield sink
        finally:
            self._local.sink = None
            with self._lock:
                self._users -= 1
                if not self._users:
                    signals.after_task_publish.disconnect(self._receive, dispatch_uid=__name__)


_capture = _Capture()


@dataclass(slots=True, frozen=True)
class Splice:
    """The stored JSON of a template's message cut around its per-task values: a derived
    message's payload is the parts joined with each value's JSON, what encoding the whole
    message would give (the dict keeps the template's key order)."""

    parts: tuple[str, ...]
    #: The per-task values between the parts, in the order they appear.
    names: tuple[str, ...]

    def join(self, values: dict[str, Any]) -> str:
        out = [self.parts[0]]
        for name, part in zip(self.names, self.parts[1:], strict=True):
            out.append(_json(values[name]))
            out.append(part)
        return "".join(out)


def _json(value: Any) -> str:
    """``dumps(value)``, by the functions it would call for the per-task values' types."""
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)  # the encoder's choice with ensure_ascii
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    return dumps(value)


@dataclass(slots=True, eq=False)
class Template:
    """The first message Celery built for a shape, and what a derived one takes from it."""

    message: dict[str, Any]
    channel: Any
    exchange: str
    routing_key: str
    #: Its entries in the bulk buffer: each queue's ``Outgoing`` and route.
    routed: list[tuple[Outgoing, Route | None]]
    #: ``after_task_publish``'s exchange and routing key (Celery's, maybe an ``Exchange``).
    signal_exchange: Any
    signal_routing_key: Any
    serializer: str
    embed: Any
    ignore_result: bool
    root_is_id: bool
    #: None: the payload is encoded whole, by the buffer (a unique policy's lock time, or a
    #: marker that was not unique in the text).
    splice: Splice | None

    #: True while the serializer is kombu's own JSON (``kombu.utils.json.dumps``).
    kombu_json: bool

    def encode(self, body: Any) -> Any:
        """``body`` serialized as kombu's ``Producer.publish`` does (``serialization.dumps``),
        but kombu's own JSON through one encoder, not one per call (``json.dumps`` with
        ``cls`` builds one with these same defaults); errors raised as kombu raises them."""
        if not self.kombu_json:
            return serialization.dumps(body, serializer=self.serializer)[2]  # type: ignore[no-untyped-call]
        try:
            return dumps(body)
        except Exception as exc:
            raise EncodeError(exc) from exc


@dataclass(slots=True, eq=False)
class Shape:
    """A task name and its merged options without :data:`PER_TASK_OPTIONS`."""

    task: str
    options: dict[str, Any]
    #: None: every task of this shape takes Celery's path (no template could be taken, or
    #: the second task's derived message differed from Celery's).
    template: Template | None = None
    #: The second task's derived message equalled Celery's: derive the rest.
    trusted: bool = False


@dataclass(slots=True, eq=False)
class _Derived:
    message: dict[str, Any]
    body: tuple[Any, Any, Any]
    headers: dict[str, Any]
    #: The per-task values, by :class:`Splice` name.
    values: dict[str, Any]

    def routed(self, template: Template) -> list[tuple[Outgoing, Route | None]]:
        """Its buffer entries: the template's, with this id and payload."""
        if template.splice is None:
            raise ValueError("no splice")
        payload = template.splice.join(self.values)
        task_id = self.values["id"]
        return [
            (Outgoing(out.queue, task_id, payload, *out[3:]), route)
            for out, route in template.routed
        ]


@dataclass(eq=False)
class GroupPublisher:
    """The derived publishes of one group's ``_apply_tasks`` (one thread, one bulk block)."""

    app: Celery
    buffer: Buffer
    shapes: list[Shape] = field(default_factory=list)
    #: Tasks published from a template (the rest went through Celery's path).
    derived: int = 0
    _tasks: dict[str, Task | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        amqp = self.app.amqp
        # Read once per group: Celery reads them per task, and they do not change meanwhile.
        self._saferepr = celery_amqp.saferepr
        self._argsrepr_maxsize = amqp.argsrepr_maxsize
        self._kwargsrepr_maxsize = amqp.kwargsrepr_maxsize
        self._maxlevels = self.app.conf.task_repr_maxlevels

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
        shape = self._find(name, options_shape)
        if shape is None:
            if len(self.shapes) >= MAX_SHAPES:
                return celerys()
            shape = Shape(name, options_shape)
            self.shapes.append(shape)
            result, origin, sent = self._celerys(celerys)
            shape.template = _template(origin, self.buffer.last_entries, sent, merged)
            return result
        template = shape.template
        if template is None:
            return celerys()
        if producer.channel is not template.channel:
            shape.template = None  # a new connection since: its routing table may differ
            return celerys()
        if not shape.trusted:
            return self._second(shape, template, sig, merged, celerys)
        self._publish(template, sig, merged, producer)
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

    def _find(self, name: str, options: dict[str, Any]) -> Shape | None:
        for shape in self.shapes:
            if shape.task == name and shape.options == options:
                return shape
        return None

    def _celerys(self, celerys: Any) -> tuple[Any, Origin | None, list[_Sent]]:
        """Run Celery's path; (its return, the message it buffered or None, its signals)."""
        before = self.buffer.added
        with _capture() as sent:
            result = celerys()
        origin = self.buffer.last if self.buffer.added == before + 1 else None
        return result, origin, sent

    def _second(
        self,
        shape: Shape,
        template: Template,
        sig: Signature,
        merged: dict[str, Any],
        celerys: Any,
    ) -> Any:
        try:
            derived: _Derived | None = self._derive(template, sig, merged)
        except Exception:  # Celery's path, below, raises what it raises
            derived = None
        result, origin, sent = self._celerys(celerys)
        shape.trusted = (
            derived is not None
            and origin is not None
            and len(sent) == 1
            and origin.channel is template.channel
            and (origin.exchange, origin.routing_key) == (template.exchange, template.routing_key)
            and origin.message == derived.message
            and sent[0].body == derived.body
            and sent[0].headers == derived.headers
            and sent[0].exchange == template.signal_exchange
            and sent[0].routing_key == template.signal_routing_key
            and (
                template.splice is None
                or [(e.out, e.route) for e in self.buffer.last_entries] == derived.routed(template)
            )
        )
        if not shape.trusted:
            shape.template = None
            logger.debug("celery-msg: %s's messages in a group differ per task", sig.task)
        return result

    def _derive(self, template: Template, sig: Signature, merged: dict[str, Any]) -> _Derived:
        """The message Celery's path would build for ``sig`` (see the module's docstring)."""
        task_id = merged["task_id"]
        args, kwargs = sig.args, sig.kwargs
        task = self._tasks[sig.task]
        if task is not None and task.typing:
            check_arguments = getattr(task, "__header__", None)
            if check_arguments is not None:
                check_arguments(*(args or ()), **(kwargs or {}))
        args, kwargs = args or (), kwargs or {}
        headers = dict(template.message["headers"])
        headers["id"] = task_id
        headers["group_index"] = group_index = merged.get("group_index")
        values = {"id": task_id, "correlation_id": task_id, "group_index": group_index}
        if template.root_is_id:
            headers["root_id"] = values["root_id"] = task_id
        if "argsrepr" not in merged:
            headers["argsrepr"] = values["argsrepr"] = self._saferepr(
                args, self._argsrepr_maxsize, maxlevels=self._maxlevels
            )
        if "kwargsrepr" not in merged:
            headers["kwargsrepr"] = values["kwargsrepr"] = self._saferepr(
                kwargs, self._kwargsrepr_maxsize, maxlevels=self._maxlevels
            )
        body = (args, kwargs, template.embed)
        data = template.encode(body)
        channel = template.channel
        values["body"], _ = channel.encode_body(data, channel.body_encoding)
        properties = dict(template.message["properties"])
        properties["correlation_id"] = task_id
        properties["delivery_info"] = dict(properties["delivery_info"])
        message = dict(template.message)
        message["body"], message["headers"], message["properties"] = (
            values["body"],
            headers,
            properties,
        )
        return _Derived(message, body, headers, values)

    def _publish(
        self, template: Template, sig: Signature, merged: dict[str, Any], producer: Any
    ) -> None:
        derived = self._derive(template, sig, merged)
        if not template.ignore_result:
            self.app.backend.on_task_call(producer, derived.headers["id"])
        buffer, message = self.buffer, derived.message
        if template.splice is None:
            buffer.add(template.channel, message, template.exchange, template.routing_key)
        else:
            routed = derived.routed(template)
            buffer.add_routed(
                template.channel, message, template.exchange, template.routing_key, routed
            )
        self.derived += 1
        signals.after_task_publish.send(
            sender=sig.task,
            body=derived.body,
            headers=derived.headers,
            exchange=template.signal_exchange,
            routing_key=template.signal_routing_key,
        )


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


#: Where each per-task value sits in a message: (part, key) -> its :class:`Splice` name.
_VALUES = {
    ("headers", "id"): "id",
    ("headers", "group_index"): "group_index",
    ("headers", "root_id"): "root_id",
    ("headers", "argsrepr"): "argsrepr",
    ("headers", "kwargsrepr"): "kwargsrepr",
    ("properties", "correlation_id"): "correlation_id",
}


def _splice(message: dict[str, Any], names: set[str]) -> Splice | None:
    """The :class:`Splice` of ``message`` for the per-task values ``names``, or None when a
    marker is not found exactly once in its text."""
    token = uuid.uuid4().hex
    marked = {**message, "body": f"{token}:body"}
    for part in ("headers", "properties"):
        marked[part] = dict(message[part])
    for (part, key), name in _VALUES.items():
        if name in names:
            marked[part][key] = f"{token}:{name}"
    text = dumps(marked)
    found = []
    for name in names:
        marker = dumps(f"{token}:{name}")
        if text.count(marker) != 1:
            return None
        at = text.index(marker)
        found.append((at, at + len(marker), name))
    found.sort()
    parts, start = [], 0
    for at, end, _ in found:
        parts.append(text[start:at])
        start = end
    parts.append(text[start:])
    return Splice(tuple(parts), tuple(name for _, _, name in found))


def _template(
    origin: Origin | None, entries: list[Entry], sent: list[_Sent], merged: dict[str, Any]
) -> Template | None:
    """The template of Celery's first message of a shape (as the transport got it, with its
    buffer entries and ``after_task_publish``), or None if it cannot be one."""
    if origin is None or len(sent) != 1 or not entries:
        return None
    message = copy.deepcopy(origin.message)
    headers, properties = message.get("headers"), message.get("properties")
    body = sent[0].body
    serializer = serialization.registry.type_to_name.get(message.get("content-type"))
    if (
        not isinstance(headers, dict)
        or not isinstance(properties, dict)
        or not isinstance(properties.get("delivery_info"), dict)
        or "compression" in headers
        or serializer is None
        or not isinstance(body, tuple)
        or len(body) != 3
        or headers.get("id") != merged["task_id"]
    ):
        return None
    root_is_id = headers.get("root_id") == headers.get("id")
    names = {"id", "group_index", "correlation_id", "body"}
    names.update(name for name in ("argsrepr", "kwargsrepr") if name not in merged)
    if root_is_id:
        names.add("root_id")
    routed = [(e.out, e.route) for e in entries]
    plain = all(not out.unique and not out.retry and not out.due_ms for out, _ in routed)
    return Template(
        message=message,
        channel=origin.channel,
        exchange=origin.exchange,
        routing_key=origin.routing_key,
        routed=routed,
        signal_exchange=sent[0].exchange,
        signal_routing_key=sent[0].routing_key,
        serializer=serializer,
        embed=copy.deepcopy(body[2]),
        ignore_result=bool(headers.get("ignore_result")),
        root_is_id=root_is_id,
        splice=_splice(message, names) if plain else None,
        kombu_json=serializer == "json"
        and serialization.registry._encoders["json"].encoder is kombu_json.dumps,
    )


def publisher_for(app: Celery, buffer: Buffer) -> GroupPublisher | None:
    """A publisher deriving this group's messages, or None where they must all be built by
    Celery (see the module's docstring)."""
    conf = app.conf
    if not conf.get(SETTING, True) or conf.task_send_sent_event or conf.task_protocol != 2:
        return None
    if signals.before_task_publish.receivers or signals.task_sent.receivers:
        return None
    for (owner, name), found in _CELERYS.items():
        now = getattr(owner, name)
        if now is not found or hasattr(now, "__wrapped__"):
            return None
    amqp = app.amqp
    if (
        getattr(app.send_task, "__func__", None) is not Celery.send_task
        or getattr(amqp.create_task_message, "__func__", None) is not AMQP.as_task_v2
        or getattr(amqp.send_task_message, "__qualname__", "") != _SENDER
    ):
        return None  # an app, or its amqp, whose send path was replaced
    if not all(isinstance(route, MapRoute) for route in amqp.router.routes):
        return None
    return GroupPublisher(app, buffer)
