"""Task messages derived from one Celery built, instead of built again by Celery's per-task
path: what groups (:mod:`celery_msg.group_template`) and tasks sent one by one inside a bulk
block (:mod:`celery_msg.send_template`) share.

Why: inside a bulk block a publish no longer waits for Redis, so what is left is Celery's own
work per task (``send_task``: exec options, the router, ``as_task_v2``; ``send_task_message``;
kombu's ``Producer.publish``), while consecutive tasks of the same *shape* (task name and
options) differ only in their id, their arguments and the text of those arguments.

The rule both follow, per shape:

- the first task goes through Celery's path, and the message it built (as the transport
  received it), its buffer entries and its ``after_task_publish`` arguments are kept: the
  :class:`Template`;
- the second goes through Celery's path too, and is derived from the template as well: only if
  the two are equal (the message, its buffer entries, its signal's body, headers, exchange and
  routing key, and what the caller gets back) is the shape trusted. Anything Celery or a
  library adds per task that is not modelled here (a time, a per-task header, a route by
  arguments) shows up as a difference, and then every task of that shape takes Celery's path;
- from the third on, the message is derived: the template with the task's id (also its
  ``correlation_id``, and its ``root_id`` when that was the task's own), its ``group_index`` in
  a group, its body (arguments serialized by the template's serializer) and
  ``argsrepr``/``kwargsrepr`` (Celery's ``saferepr`` with Celery's limits); its stored JSON is
  the template's text with those values put in (:class:`Splice`). Celery's
  ``backend.on_task_call`` is called for a task whose result is tracked, and
  ``after_task_publish`` is sent with what Celery sends, after the message is buffered.

Never derived (:func:`celerys_path_intact`): while ``before_task_publish`` or the deprecated
``task_sent`` have receivers (they may change the message); with ``task_send_sent_event``; with
a router that is not a plain mapping (a function may route by arguments); when one of Celery's
or kombu's functions on the path was replaced or wrapped by another library (Sentry wraps
``Task.apply_async``, ``Celery.send_task`` and kombu's ``Producer.publish``, and must see every
task); compression; protocol 1; more than :data:`MAX_SHAPES` shapes.
"""

from __future__ import annotations

import copy
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
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
from kombu.messaging import Producer
from kombu.utils import json as kombu_json

from .publishing import Outgoing
from .routing import dumps

if TYPE_CHECKING:
    from .bulk_publish import Buffer
    from .bulk_senders import Entry, Origin
    from .core import Route

logger = logging.getLogger(__name__)

#: Options whose message fields depend on the time of the call, or that carry signatures of
#: their own (links, cloned per task by Celery).
NOT_DERIVED_OPTIONS = frozenset({"countdown", "eta", "expires", "link", "link_error"})
#: Shapes per group or bulk block before further new shapes take Celery's path.
MAX_SHAPES = 8

#: Option values a shape keeps a copy of (see :meth:`Deriver.new_shape`).
_CONTAINERS = frozenset({dict, list, set, tuple})

#: The qualified name of the function ``AMQP.send_task_message`` is in Celery.
_SENDER = "AMQP._create_task_sender.<locals>.send_task_message"

#: Celery's and kombu's functions on the derived path as this module found them: each check
#: compares them with what they are now and looks for a wrapper (``__wrapped__``), since a
#: library that wraps one (as Sentry wraps ``Task.apply_async``) expects to see every task.
_CELERYS = {
    (Celery, "send_task"): Celery.send_task,
    (Task, "apply_async"): Task.apply_async,
    (Signature, "apply_async"): Signature.apply_async,
    (AMQP, "as_task_v2"): AMQP.as_task_v2,
    (AMQP, "_create_task_sender"): AMQP._create_task_sender,
    (Producer, "publish"): Producer.publish,
}

#: The attribute marking celery-msg's own ``send_task`` on an app
#: (:mod:`celery_msg.send_template`), which passes to Celery's.
OWN_SEND_TASK = "__celery_msg_send_task__"


def celerys_path_intact(app: Celery) -> bool:
    """Whether ``app`` publishes through Celery's own code, unwrapped, as this module models
    it (see the module's docstring for what turns derivation off)."""
    conf = app.conf
    if conf.task_send_sent_event or conf.task_protocol != 2:
        return False
    if signal_receivers():
        return False
    for (owner, name), found in _CELERYS.items():
        now = getattr(owner, name)
        if now is not found or hasattr(now, "__wrapped__"):
            return False
    own = app.__dict__.get("send_task")
    if type(app).send_task is not Celery.send_task or not (
        own is None or getattr(own, OWN_SEND_TASK, False)
    ):
        return False  # an app whose send_task was replaced
    amqp = app.amqp
    if (
        getattr(amqp.create_task_message, "__func__", None) is not AMQP.as_task_v2
        or getattr(amqp.send_task_message, "__qualname__", "") != _SENDER
    ):
        return False  # an amqp whose send path was replaced
    return all(isinstance(route, MapRoute) for route in amqp.router.routes)


def signal_receivers() -> bool:
    """Whether a receiver that may change a message is connected now (checked per task:
    connecting one turns derivation off at once)."""
    return bool(signals.before_task_publish.receivers or signals.task_sent.receivers)


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
    #: Whether Celery writes ``argsrepr``/``kwargsrepr`` per task (not given as options).
    argsrepr: bool
    kwargsrepr: bool
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
    """A task name and the options that are the same for each of its tasks."""

    task: str
    options: dict[str, Any]
    #: None: every task of this shape takes Celery's path (no template could be taken, or
    #: the second task's derived message differed from Celery's).
    template: Template | None = None
    #: The second task's derived message equalled Celery's: derive the rest.
    trusted: bool = False
    #: What the caller of the first task got back, when the caller uses it (one by one).
    returned: Any = None


@dataclass(slots=True, eq=False)
class Derived:
    """One derived message, with what Celery's signal gets and the per-task values."""

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
class Deriver:
    """The shapes, templates and derived publishes of one thread's group or bulk block."""

    app: Celery
    buffer: Buffer
    shapes: list[Shape] = field(default_factory=list)
    #: Tasks published from a template (the rest went through Celery's path).
    derived: int = 0

    #: Whether ``group_index`` is per task (a group's) in the templates it takes.
    indexed = False

    def __post_init__(self) -> None:
        amqp = self.app.amqp
        # Read once per deriver: Celery reads them per task, and they do not change meanwhile.
        self._saferepr = celery_amqp.saferepr
        self._argsrepr_maxsize = amqp.argsrepr_maxsize
        self._kwargsrepr_maxsize = amqp.kwargsrepr_maxsize
        self._maxlevels = self.app.conf.task_repr_maxlevels

    def find(self, name: str, options: dict[str, Any]) -> Shape | None:
        for shape in self.shapes:
            if shape.task == name and shape.options == options:
                return shape
        return None

    def new_shape(self, name: str, options: dict[str, Any]) -> Shape | None:
        """A new shape, or None past :data:`MAX_SHAPES` or for options that cannot be
        copied. Its plain containers (a ``headers`` dict...) are copied: a caller may change
        the one it passed in place before its next task; objects (the task, a producer, a
        queue) are kept, compared as they compare themselves."""
        if len(self.shapes) >= MAX_SHAPES:
            return None
        try:
            kept = {
                k: copy.deepcopy(v) if type(v) in _CONTAINERS else v for k, v in options.items()
            }
        except Exception:
            return None
        shape = Shape(name, kept)
        self.shapes.append(shape)
        return shape

    def celerys(self, celerys: Callable[[], Any]) -> tuple[Any, Origin | None, list[_Sent]]:
        """Run Celery's path; (its return, the message it buffered or None, its signals)."""
        before = self.buffer.added
        with _capture() as sent:
            result = celerys()
        origin = self.buffer.last if self.buffer.added == before + 1 else None
        return result, origin, sent

    def first(self, shape: Shape, celerys: Callable[[], Any], task_id: str, given: Any) -> Any:
        """Celery's path for the first task of ``shape``, kept as its template. ``task_id``:
        the id Celery was given; ``given``: the options Celery got (``argsrepr`` or
        ``kwargsrepr`` among them are the same for every task)."""
        try:
            result, origin, sent = self.celerys(celerys)
        except BaseException:
            self.shapes.remove(shape)  # the next task of this shape is a first one again
            raise
        shape.template = template_of(
            origin,
            self.buffer.last_entries,
            sent,
            task_id,
            indexed=self.indexed,
            argsrepr="argsrepr" not in given,
            kwargsrepr="kwargsrepr" not in given,
        )
        return result

    def second(
        self,
        shape: Shape,
        template: Template,
        derive: Callable[[], Derived],
        celerys: Callable[[], Any],
        same_return: Callable[[Any], bool] | None = None,
    ) -> Any:
        """Celery's path for the second task of ``shape``, compared with its derived message:
        the shape is trusted only if they are equal."""
        try:
            derived: Derived | None = derive()
        except Exception:  # Celery's path, below, raises what it raises
            derived = None
        result, origin, sent = self.celerys(celerys)
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
            and (same_return is None or same_return(result))
        )
        if not shape.trusted:
            shape.template = None
            logger.debug("celery-msg: %s's messages differ per task", shape.task)
        return result

    def derive(
        self,
        template: Template,
        task_id: str,
        args: Any,
        kwargs: Any,
        group_index: int | None = None,
    ) -> Derived:
        """The message Celery's path would build for this task (see the module's
        docstring)."""
        args, kwargs = args or (), kwargs or {}
        headers = dict(template.message["headers"])
        headers["id"] = task_id
        values: dict[str, Any] = {"id": task_id, "correlation_id": task_id}
        if self.indexed:
            headers["group_index"] = values["group_index"] = group_index
        if template.root_is_id:
            headers["root_id"] = values["root_id"] = task_id
        if template.argsrepr:
            headers["argsrepr"] = values["argsrepr"] = self._saferepr(
                args, self._argsrepr_maxsize, maxlevels=self._maxlevels
            )
        if template.kwargsrepr:
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
        return Derived(message, body, headers, values)

    def publish(self, template: Template, derived: Derived, name: str, producer: Any) -> None:
        """Buffer ``derived`` and tell what Celery tells (the result backend, the signal)."""
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
            sender=name,
            body=derived.body,
            headers=derived.headers,
            exchange=template.signal_exchange,
            routing_key=template.signal_routing_key,
        )


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


def template_of(
    origin: Origin | None,
    entries: list[Entry],
    sent: list[_Sent],
    task_id: str,
    *,
    indexed: bool,
    argsrepr: bool,
    kwargsrepr: bool,
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
        or headers.get("id") != task_id
    ):
        return None
    root_is_id = headers.get("root_id") == task_id
    names = {"id", "correlation_id", "body"}
    if indexed:
        names.add("group_index")
    if argsrepr:
        names.add("argsrepr")
    if kwargsrepr:
        names.add("kwargsrepr")
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
        argsrepr=argsrepr,
        kwargsrepr=kwargsrepr,
        splice=_splice(message, names) if plain else None,
        kombu_json=serializer == "json"
        and serialization.registry._encoders["json"].encoder is kombu_json.dumps,
    )
