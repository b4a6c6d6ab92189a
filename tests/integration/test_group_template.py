"""A group's messages derived from a template (celery_msg.group_template) against the same
groups built by Celery's own path: what Redis stores (every message, whole, and the order of
the queue) and what ``after_task_publish`` receivers get are equal once the ids are renamed
by position. Each case also says how many messages were derived, so that a case that
silently fell back to Celery's path fails instead of comparing Celery with itself."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import template_helpers
from celery import Task, chord, group
from celery.signals import before_task_publish
from celery_app.settings import DEFAULT_QUEUE, SECOND_QUEUE
from celery_helpers import Stack, StackFactory
from kombu.exceptions import EncodeError
from template_helpers import (
    ODD_ARGUMENTS,
    Calls,
    Published,
    any_calls,
    assert_stored_as_called,
    stored,
)

from celery_msg import canvas


@pytest.fixture
def stack(make_stack: StackFactory) -> Iterator[Stack]:
    yield from template_helpers.collected_stack(make_stack)


def both_ways(
    stack: Stack,
    publish: Callable[[], Any],
    signalled: Published,
    queues: tuple[str, ...] = (DEFAULT_QUEUE,),
) -> tuple[Any, int]:
    """:func:`template_helpers.both_ways` for groups."""

    def derived() -> int | None:
        publisher = canvas.last_publisher()
        return publisher.derived if publisher is not None else None

    return template_helpers.both_ways(
        stack, publish, signalled, setting="msg_group_templates", derived=derived, queues=queues
    )


def test_plain_arguments(stack: Stack, signalled: Published):
    add = stack.task("add")
    out, derived = both_ways(
        stack, lambda: group(add.s(i, i) for i in range(50)).apply_async(), signalled
    )
    assert derived == 48  # all but the first two of the shape
    assert len(out["messages"]) == 50 and len(out["signals"]) == 50
    assert [m["body"][0] for m in out["messages"]] == [[i, i] for i in range(50)]


def test_arguments_whose_text_celery_writes_its_own_way(stack: Stack, signalled: Published):
    tsum = stack.task("tsum")  # any task: the worker never runs these
    tsum.typing = False  # (also the path without the arguments' check)

    def publish() -> Any:
        sigs = [tsum.s(*args) for args in ODD_ARGUMENTS * 3]
        sigs += [tsum.s(numbers=[i], label="ü" * i, nested={"k": [i, "v"]}) for i in range(6)]
        return group(sigs).apply_async()

    out, derived = both_ways(stack, publish, signalled)
    assert len(out["messages"]) == 24
    assert derived == 22
    texts = [m["headers"]["argsrepr"] for m in out["messages"]]
    assert any(text.endswith("...')") or "..." in text for text in texts)  # a cut text


def test_group_options_routes_priorities_and_two_shapes(stack: Stack, signalled: Published):
    add, routed = stack.task("add"), stack.task("routed")

    def publish() -> Any:
        sigs = []
        for i in range(40):
            sigs.append(add.s(i, 1))
            sigs.append(routed.s())  # task_routes: the second queue
            if i % 4 == 0:
                sigs.append(add.s(i, 2).set(priority=7))
        return group(sigs).apply_async(headers={"tenant": "t1"}, time_limit=30)

    out, derived = both_ways(stack, publish, signalled, queues=(DEFAULT_QUEUE, SECOND_QUEUE))
    assert len(out["messages"]) == 90
    assert derived == 90 - 6  # three shapes, two messages each built by Celery
    assert {m["headers"]["tenant"] for m in out["messages"]} == {"t1"}
    assert {m["properties"]["delivery_info"]["routing_key"] for m in out["messages"]} == {
        DEFAULT_QUEUE,
        SECOND_QUEUE,
    }


def test_a_queue_option_and_results_tracked_or_ignored(stack: Stack, signalled: Published):
    add = stack.task("add")

    def publish() -> Any:
        tracked = [add.s(i, i) for i in range(10)]
        ignored = [add.s(i, i).set(ignore_result=True) for i in range(10)]
        return group(tracked + ignored).apply_async(queue=SECOND_QUEUE)

    out, derived = both_ways(stack, publish, signalled, queues=(SECOND_QUEUE,))
    assert derived == 16
    assert [m["headers"]["ignore_result"] for m in out["messages"]] == [False] * 10 + [True] * 10
    assert len(out["told"]) == 10  # the tracked ones


def test_a_chord_header(stack: Stack, signalled: Published):
    add, tsum = stack.task("add"), stack.task("tsum")
    out, derived = both_ways(
        stack, lambda: chord(add.s(i, i) for i in range(30))(tsum.s()), signalled
    )
    assert derived == 28
    assert all(m["body"][2]["chord"]["task"] == "tsum" for m in out["messages"])


def test_timed_options_are_never_derived(stack: Stack, signalled: Published):
    add = stack.task("add")
    for option in ({"countdown": 3600}, {"expires": 3600}):

        def publish(option: dict[str, int] = option) -> Any:
            return group(add.s(i, i).set(**option) for i in range(10)).apply_async()

        stack.app.conf.msg_group_templates = True
        stack.broker.purge(DEFAULT_QUEUE)
        publish()
        publisher = canvas.last_publisher()
        assert publisher is not None and publisher.derived == 0


def test_a_before_task_publish_receiver_gets_every_task_built_by_celery(stack: Stack):
    add = stack.task("add")
    seen: list[str] = []

    def before(sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
        seen.append(headers["id"])
        headers["seen-by"] = "receiver"

    before_task_publish.connect(before, weak=False)
    try:
        result = group(add.s(i, i) for i in range(20)).apply_async()
    finally:
        before_task_publish.disconnect(before)
    assert canvas.last_publisher() is None  # nothing derived
    assert seen == [r.id for r in result.results]
    assert {m["headers"]["seen-by"] for m in stored(stack, DEFAULT_QUEUE)} == {"receiver"}


def test_errors_in_the_middle_are_celerys_and_what_came_before_is_stored(
    stack: Stack, signalled: Published
):
    add = stack.task("add")
    for bad, error in ((add.s(1), TypeError), (add.s(object(), 1), EncodeError)):
        stored_counts = []
        for on in (False, True):
            stack.app.conf.msg_group_templates = on
            stack.broker.purge(DEFAULT_QUEUE)
            with pytest.raises(error):
                group([*(add.s(i, i) for i in range(6)), bad, add.s(9, 9)]).apply_async()
            stored_counts.append(len(stored(stack, DEFAULT_QUEUE)))
        assert stored_counts == [6, 6]


def test_a_library_that_wraps_apply_async_sees_every_task(stack: Stack, signalled: Published):
    # As Sentry's Celery integration does (functools.wraps), and as a plain replacement would.
    add = stack.task("add")
    original = Task.apply_async
    seen: list[str] = []

    def tracing(self: Task, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["task_id"])
        return original(self, *args, **kwargs)

    for wrapper in (functools.wraps(original)(tracing), tracing):
        seen.clear()
        Task.apply_async = wrapper  # type: ignore[method-assign]
        try:
            result = group(add.s(i, i) for i in range(20)).apply_async()
        finally:
            Task.apply_async = original  # type: ignore[method-assign]
        assert canvas.last_publisher() is None
        assert seen == [r.id for r in result.results]
    # On the task object itself, as ddtrace's Celery patch sets it: that task is not derived.
    seen.clear()
    add.apply_async = functools.partial(tracing, add)
    try:
        result = group(add.s(i, i) for i in range(20)).apply_async()
    finally:
        del add.apply_async
    publisher = canvas.last_publisher()
    assert publisher is not None and publisher.derived == 0
    assert seen == [r.id for r in result.results]


@any_calls
def test_any_arguments_are_stored_as_celery_stores_them(
    stack: Stack, signalled: Published, calls: Calls
):
    tsum = stack.task("tsum")
    tsum.typing = False
    out, derived = both_ways(
        stack, lambda: group(tsum.s(*a, **k) for a, k in calls).apply_async(), signalled
    )
    assert_stored_as_called(out, derived, calls)
