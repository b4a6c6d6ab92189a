"""What the tests of derived messages (test_group_template, test_send_template) share: the
same publishes made with derivation off and then on, compared whole after renaming ids."""

from __future__ import annotations

import base64
import gc
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from celery_app.settings import DEFAULT_QUEUE
from celery_helpers import Stack, StackFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

Published = list[dict[str, Any]]

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

#: Arguments whose text (``argsrepr``) or JSON Celery writes its own way.
ODD_ARGUMENTS = [
    ("quote'\"s", "ünïcödé ✓", "\n\t\\"),
    (1.5, -0.0, 10**30, None, True, False),
    ([1, [2, [3, [4, [5, [6]]]]]], {"a": {"b": {"c": {"d": 1}}}}),
    ("x" * 5000,),  # longer than argsrepr's limit: cut by saferepr
    (list(range(300)),),
    ((), [], {}, ""),
]

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
#: (args, kwargs) of one task.
CALLS = st.tuples(
    st.lists(JSON_VALUES, max_size=4), st.dictionaries(st.text(min_size=1), JSON_VALUES, max_size=3)
)
Calls = list[tuple[list[Any], dict[str, Any]]]


def any_calls(test: Callable[..., None]) -> Callable[..., None]:
    """``test(stack, signalled, calls)`` over 40 examples of 3 to 8 calls (one shape)."""
    examples = settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    return examples(given(calls=st.lists(CALLS, min_size=3, max_size=8))(test))  # type: ignore[no-any-return]


def assert_stored_as_called(out: Any, derived: int, calls: Calls) -> None:
    """All but the first two derived, each stored with its own arguments."""
    assert derived == len(calls) - 2
    assert [m["body"][:2] for m in out["messages"]] == renamed([[list(a), k] for a, k in calls])


def collected_stack(make_stack: StackFactory) -> Iterator[Stack]:
    """A stack whose garbage is collected at teardown: the tracked results of these tests are
    in reference cycles, collected then, while their server still answers their unsubscribe,
    not after it stopped."""
    yield make_stack()
    gc.collect()


def stored(stack: Stack, queue: str) -> list[dict[str, Any]]:
    """The messages of ``queue`` in the queue's order (its ready sorted set), whole, with
    their bodies decoded."""
    keys = stack.broker.keys(queue)
    order = [k.decode() for k in stack.redis.zrange(keys.ready, 0, -1)]
    bodies = {k.decode(): json.loads(v) for k, v in stack.redis.hgetall(keys.body).items()}
    assert sorted(order) == sorted(bodies)
    out = []
    for key in order:
        message = bodies[key]
        message["body"] = json.loads(base64.b64decode(message["body"]))
        out.append(message)
    return out


def renamed(value: Any) -> Any:
    """``value`` with every id (task, group, chord body) named by its first appearance."""
    text = json.dumps(value, sort_keys=True, default=repr)
    names: dict[str, str] = {}
    return json.loads(UUID.sub(lambda m: names.setdefault(m[0], f"id-{len(names)}"), text))


def both_ways(
    stack: Stack,
    publish: Callable[[], Any],
    signalled: Published,
    *,
    setting: str,
    derived: Callable[[], int | None],
    queues: tuple[str, ...] = (DEFAULT_QUEUE,),
    returned: Callable[[Any], Any] = lambda _: None,
) -> tuple[Any, int]:
    """Publish with derivation off and then on (the app setting ``setting``; each on empty
    queues); asserts that the stored messages, the signals, the ids told to the result
    backend and ``returned(what publish returned)`` are equal after renaming; returns (what
    derivation stored and signalled, renamed; how many messages it derived, as ``derived()``
    says: None is a publisher that derived nothing and must not have, with the setting off)."""
    results = []
    count = 0
    backend = stack.app.backend
    on_task_call = backend.on_task_call
    called: list[str] = []  # the ids the result backend was told of, as Celery tells it

    def spy(producer: Any, task_id: str) -> Any:
        called.append(task_id)
        return on_task_call(producer, task_id)

    backend.on_task_call = spy
    for on in (False, True):
        setattr(stack.app.conf, setting, on)
        for queue in queues:
            stack.broker.purge(queue)
        signalled.clear()
        called.clear()
        out = returned(publish())
        messages = [m for queue in queues for m in stored(stack, queue)]
        signals = [
            {**s, "body": list(s["body"]), "signal": None}
            for s in signalled
            if s["sender"] in {m["headers"]["task"] for m in messages}
        ]
        results.append(
            renamed({"messages": messages, "signals": signals, "told": called, "returned": out})
        )
        if on:
            count = derived() or 0
        else:
            assert derived() is None  # the setting off: Celery's path only
    del backend.on_task_call
    assert results[1] == results[0]
    return results[1], count
