"""Tasks sent one by one inside a bulk block, their messages derived from a template
(celery_msg.send_template), against the same calls built by Celery's own path: what Redis
stores (every message, whole, in the queue's order), what ``after_task_publish`` receivers
get, the ids the result backend is told of and what each call returns are equal once the ids
are renamed by position. Each case also says how many messages were derived, so that a case
that silently fell back to Celery's path fails instead of comparing Celery with itself."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import template_helpers
from celery import Celery, Task, group
from celery._state import _task_stack
from celery.result import AsyncResult
from celery.signals import before_task_publish
from celery_app.settings import DEFAULT_QUEUE, SECOND_QUEUE
from celery_app.tasks import runs_key
from celery_helpers import Stack, StackFactory
from kombu.exceptions import EncodeError
from kombu.messaging import Producer
from template_helpers import Calls, Published, any_calls, assert_stored_as_called, stored

import celery_msg
from celery_msg import canvas, send_template


@pytest.fixture
def stack(make_stack: StackFactory) -> Iterator[Stack]:
    yield from template_helpers.collected_stack(make_stack)


def results(returned: list[AsyncResult]) -> list[Any]:
    """What each call returned, as a caller sees it."""
    return [[type(r).__name__, r.id, r.ignored, getattr(r, "task_name", None)] for r in returned]


def both_ways(
    stack: Stack,
    calls: Callable[[], list[AsyncResult]],
    signalled: Published,
    queues: tuple[str, ...] = (DEFAULT_QUEUE,),
) -> tuple[Any, int]:
    """:func:`template_helpers.both_ways` for ``calls`` made inside a bulk block."""

    def publish() -> list[AsyncResult]:
        with celery_msg.bulk(stack.app):
            return calls()

    def derived() -> int | None:
        publisher = send_template.last_publisher()
        return publisher.derived if publisher is not None else None

    return template_helpers.both_ways(
        stack,
        publish,
        signalled,
        setting="msg_send_templates",
        derived=derived,
        queues=queues,
        returned=results,
    )


def test_delay_calls(stack: Stack, signalled: Published):
    add = stack.task("add")
    out, derived = both_ways(stack, lambda: [add.delay(i, i) for i in range(50)], signalled)
    assert derived == 48  # all but the first two of the shape
    assert len(out["messages"]) == 50 and len(out["signals"]) == 50 and len(out["told"]) == 50
    assert [m["body"][0] for m in out["messages"]] == [[i, i] for i in range(50)]
    assert [r[0] for r in out["returned"]] == ["AsyncResult"] * 50


def test_arguments_whose_text_celery_writes_its_own_way(stack: Stack, signalled: Published):
    tsum = stack.task("tsum")  # any task: the worker never runs these
    tsum.typing = False

    def calls() -> list[AsyncResult]:
        out = [tsum.apply_async(args) for args in template_helpers.ODD_ARGUMENTS * 3]
        out += [
            tsum.apply_async(kwargs={"numbers": [i], "label": "ü" * i, "nested": {"k": [i]}})
            for i in range(6)
        ]
        return out

    out, derived = both_ways(stack, calls, signalled)
    assert len(out["messages"]) == 24
    assert derived == 22  # arguments are not part of a shape
    texts = [m["headers"]["argsrepr"] for m in out["messages"]]
    assert any("..." in text for text in texts)  # a cut text


def test_options_routes_priorities_ids_and_shapes(stack: Stack, signalled: Published):
    add, routed = stack.task("add"), stack.task("routed")

    def calls() -> list[AsyncResult]:
        out = []
        headers = {"tenant": "t0"}
        for i in range(40):
            out.append(add.delay(i, 1))
            out.append(routed.delay())  # task_routes: the second queue
            if i % 4 == 0:
                out.append(add.apply_async((i, 2), priority=7, time_limit=30))
            # One dict changed in place between calls: each call's own value is sent.
            headers["tenant"] = f"t{i % 3}"
            out.append(add.apply_async((i, 3), headers=headers))
            out.append(add.apply_async((i, 4), task_id=f"given-{i}", queue=SECOND_QUEUE))
            out.append(stack.app.send_task("add", (i, 5)))
        return out

    out, derived = both_ways(stack, calls, signalled, queues=(DEFAULT_QUEUE, SECOND_QUEUE))
    assert len(out["messages"]) == 210
    # Shapes: add, routed, add with priority, add with each of three tenants, add with its
    # queue, send_task by name: two messages each built by Celery.
    assert derived == 210 - 2 * 8
    tenants = [m["headers"].get("tenant") for m in out["messages"] if "tenant" in m["headers"]]
    assert tenants == [f"t{i % 3}" for i in range(40)]
    assert {m["headers"]["id"] for m in out["messages"]} >= {f"given-{i}" for i in range(40)}


def test_results_tracked_or_ignored(stack: Stack, signalled: Published):
    add = stack.task("add")

    def calls() -> list[AsyncResult]:
        tracked = [add.delay(i, i) for i in range(10)]
        return tracked + [add.apply_async((i, i), ignore_result=True) for i in range(10)]

    out, derived = both_ways(stack, calls, signalled)
    assert derived == 16
    assert [m["headers"]["ignore_result"] for m in out["messages"]] == [False] * 10 + [True] * 10
    assert len(out["told"]) == 10  # the tracked ones
    assert [r[2] for r in out["returned"]] == [False] * 10 + [True] * 10


def test_inside_a_worker_task_root_parent_and_trail(stack: Stack, signalled: Published):
    # As inside a worker's task: the message's root_id and parent_id are the parent's, and
    # each result is added to the parent's trail; another parent is another shape.
    add, tsum = stack.task("add"), stack.task("tsum")

    def calls() -> list[AsyncResult]:
        out = []
        for parent in ("parent-a", "parent-b"):
            tsum.push_request(id=parent, root_id="root-1", called_directly=False)
            _task_stack.push(tsum)
            try:
                mine = [add.delay(i, i) for i in range(10)]
                assert [r.id for r in tsum.request.children] == [r.id for r in mine]
            finally:
                _task_stack.pop()
                tsum.pop_request()
            out += mine
        return out

    out, derived = both_ways(stack, calls, signalled)
    assert derived == 16
    heads = [m["headers"] for m in out["messages"]]
    assert {(h["root_id"], h["parent_id"]) for h in heads[:10]} == {("root-1", "parent-a")}
    assert {(h["root_id"], h["parent_id"]) for h in heads[10:]} == {("root-1", "parent-b")}


def test_a_group_inside_the_block_and_the_block_around_it(stack: Stack, signalled: Published):
    add = stack.task("add")

    def calls() -> list[AsyncResult]:
        out = [add.delay(i, 0) for i in range(5)]
        out += group(add.s(i, 1) for i in range(20)).apply_async().results
        out += [add.delay(i, 2) for i in range(5)]
        return out

    stack.app.conf.msg_group_templates = False
    out, derived = both_ways(stack, calls, signalled)
    assert derived == 8  # the block's own: the group's tasks are given a producer
    assert [m["body"][0][1] for m in out["messages"]] == [0] * 5 + [1] * 20 + [2] * 5


@pytest.mark.parametrize(
    "option",
    [{"countdown": 3600}, {"expires": 3600}, {"eta": "2100-01-01T00:00:00+00:00"}],
    ids=["countdown", "expires", "eta"],
)
def test_timed_options_are_never_derived(stack: Stack, option: dict[str, Any]):
    add = stack.task("add")
    with celery_msg.bulk(stack.app):
        for i in range(10):
            add.apply_async((i, i), **option)
    publisher = send_template.last_publisher()
    assert publisher is not None and publisher.derived == 0
    assert stack.redis.hlen(stack.broker.keys(DEFAULT_QUEUE).body) == 10  # ready or scheduled


def test_a_receiver_connected_in_the_middle_gets_every_later_task(stack: Stack):
    add = stack.task("add")
    seen: list[str] = []

    def before(sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
        seen.append(headers["id"])
        headers["seen-by"] = "receiver"

    with celery_msg.bulk(stack.app):
        first = [add.delay(i, i) for i in range(10)]
        before_task_publish.connect(before, weak=False)
        try:
            later = [add.delay(i, i) for i in range(10)]
        finally:
            before_task_publish.disconnect(before)
    publisher = send_template.last_publisher()
    assert publisher is not None and publisher.derived == 8  # of the first ten
    assert seen == [r.id for r in later]
    messages = stored(stack, DEFAULT_QUEUE)
    assert [m["headers"].get("seen-by") for m in messages] == [None] * 10 + ["receiver"] * 10
    assert [m["headers"]["id"] for m in messages] == [r.id for r in first + later]


def test_errors_in_the_middle_are_celerys_and_what_came_before_is_stored(stack: Stack):
    add = stack.task("add")
    for bad, error in (((1,), TypeError), ((object(), 1), EncodeError)):
        stored_counts = []
        for on in (False, True):
            stack.app.conf.msg_send_templates = on
            stack.broker.purge(DEFAULT_QUEUE)
            with pytest.raises(error), celery_msg.bulk(stack.app):
                for i in range(6):
                    add.delay(i, i)
                add.delay(*bad)
            stored_counts.append(len(stored(stack, DEFAULT_QUEUE)))
        assert stored_counts == [6, 6]


def wrapping(owner: Any, name: str, seen: list[Any]) -> Iterator[Callable[..., Any]]:
    """A ``functools.wraps`` wrapper of ``owner.name`` and a plain replacement, each noting
    every call's first argument after self in ``seen``."""
    original = getattr(owner, name)

    def tracing(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(args[0] if args else kwargs)
        return original(self, *args, **kwargs)

    for wrapper in (functools.wraps(original)(tracing), tracing):
        seen.clear()
        setattr(owner, name, wrapper)
        try:
            yield wrapper
        finally:
            setattr(owner, name, original)


@pytest.mark.parametrize(
    ("owner", "name"),
    [(Celery, "send_task"), (Task, "apply_async"), (Producer, "publish")],
    ids=["send_task", "apply_async", "publish"],
)
def test_a_library_that_wraps_the_path_sees_every_task(stack: Stack, owner: Any, name: str):
    # As Sentry's Celery integration wraps all three (functools.wraps).
    add = stack.task("add")
    seen: list[Any] = []
    for _ in wrapping(owner, name, seen):
        with celery_msg.bulk(stack.app):
            for i in range(20):
                add.delay(i, i)
        assert send_template.last_publisher() is None
        assert len(seen) == 20


def test_an_app_whose_send_task_another_library_set_keeps_celerys_path(stack: Stack):
    add = stack.task("add")
    assert "send_task" not in stack.app.__dict__  # celery-msg's is set inside blocks only
    celerys = stack.app.send_task
    seen: list[str] = []

    def own(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[0])
        return celerys(*args, **kwargs)

    stack.app.send_task = own  # type: ignore[method-assign]
    canvas.install(stack.app)  # configure() after it: ours is not put over it
    assert stack.app.send_task is own
    with celery_msg.bulk(stack.app):
        assert stack.app.send_task is own  # a block does not put ours over it either
        for i in range(20):
            add.delay(i, i)
        group(add.s(i, i) for i in range(20)).apply_async()
    assert seen == ["add"] * 40
    assert send_template.last_publisher() is None and canvas.last_publisher() is None


@any_calls
def test_any_arguments_are_stored_as_celery_stores_them(
    stack: Stack, signalled: Published, calls: Calls
):
    tsum = stack.task("tsum")
    tsum.typing = False
    out, derived = both_ways(stack, lambda: [tsum.apply_async(a, k) for a, k in calls], signalled)
    assert_stored_as_called(out, derived, calls)


def test_the_apps_send_task_is_celery_msgs_only_while_a_block_is_open(stack: Stack):
    # Set by the first block to open (in any thread), removed when the last one closes: a
    # .delay() outside every block calls Celery's send_task directly.
    add, app = stack.task("add"), stack.app
    opened, closing = threading.Event(), threading.Event()
    derived_there: list[int] = []

    def other_thread() -> None:
        with celery_msg.bulk(app):
            opened.set()
            closing.wait(10)
            for i in range(10):
                add.delay(i, i)
        publisher = send_template.last_publisher()
        derived_there.append(publisher.derived if publisher is not None else 0)

    assert "send_task" not in app.__dict__
    with celery_msg.bulk(app):
        assert "send_task" in app.__dict__
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert opened.wait(10)
        for i in range(10):
            add.delay(i, i)
    assert "send_task" in app.__dict__  # the other thread's block is still open
    add.delay(0, 0)  # outside any block of this thread: Celery's path, stored at once
    closing.set()
    thread.join(10)
    assert "send_task" not in app.__dict__
    assert derived_there == [8]
    assert len(stored(stack, DEFAULT_QUEUE)) == 21


def test_derived_delay_calls_run_once_each_through_a_real_worker(make_stack: StackFactory):
    # Counted by the task itself, outside the broker: every derived message runs, once.
    stack = make_stack(prefetch_multiplier=100)
    counted = stack.task("counted")
    with celery_msg.bulk(stack.app):
        results = [counted.delay(i) for i in range(2000)]
    publisher = send_template.last_publisher()
    assert publisher is not None and publisher.derived == 1998
    stack.worker()
    assert [r.get(timeout=120) for r in results] == list(range(2000))
    runs = {k.decode(): int(v) for k, v in stack.redis.hgetall(runs_key(stack.settings)).items()}
    assert runs == {r.id: 1 for r in results}
    stack.settled(DEFAULT_QUEUE, timeout=30)
