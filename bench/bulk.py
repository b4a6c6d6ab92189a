"""Enqueue rates with bulk publishing: a 10,000-task group, and N ``.delay()`` calls inside a
``celery_msg.bulk`` block, against the same without bulk and against kombu's redis transport,
each also inside kombu's own ``Producer.batch()`` (kombu >= 5.7: pipelined LPUSHes; Celery does
not use it by itself, the caller passes the batch's producer to every ``apply_async``).

Each figure is tasks/s from the first publish to the return of ``apply_async`` (a group) or the
end of the block (delays): at that point Redis holds every message (for kombu's transport and
for a publish outside a block, each ``publish`` returns when Redis has its message). The app is
connected and its queue declared outside the timing; the server is emptied between figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from celery import group

import celery_msg
from celery_msg import canvas

from .common import OURS, Bench
from .tasks import make_app


def _timed(bench: Bench, transport: str, n: int, body: Callable[..., None], **kw: bool) -> float:
    bench.flush()
    app = make_app(bench.broker_url(transport))
    try:
        if not kw.get("bulk_groups", True) and transport == OURS:
            canvas.uninstall(app)
        task = app.tasks["bench.noop"]
        task.delay(0)  # connect and declare outside the timing
        started = time.perf_counter()
        body(app, task, n)
        elapsed = time.perf_counter() - started
    finally:
        app.close()
        bench.flush()
    return n / elapsed


def _group(app: object, task: object, n: int) -> None:
    group(task.s(i) for i in range(n)).apply_async()  # type: ignore[attr-defined]


def _delays(app: object, task: object, n: int) -> None:
    for i in range(n):
        task.delay(i)  # type: ignore[attr-defined]


#: The longest a message waited in the process in the last timed block (s): the window.
_window: list[float] = [0.0]


def _delays_in_block(app: object, task: object, n: int) -> None:
    with celery_msg.bulk(app) as buffer:  # type: ignore[arg-type]
        _delays(app, task, n)
    _window[0] = buffer.longest_wait


def _group_in_batch(app: object, task: object, n: int) -> None:
    with app.producer_or_acquire() as producer, producer.batch():  # type: ignore[attr-defined]
        group(task.s(i) for i in range(n)).apply_async(producer=producer)  # type: ignore[attr-defined]


def _delays_in_batch(app: object, task: object, n: int) -> None:
    with app.producer_or_acquire() as producer, producer.batch():  # type: ignore[attr-defined]
        for i in range(n):
            task.apply_async((i,), producer=producer)  # type: ignore[attr-defined]


def run(bench: Bench, transport: str) -> dict[str, float]:
    """The figures of one transport: each shape as it is, and in kombu's ``Producer.batch()``
    (kombu >= 5.7; the caller passes its producer to every publish); ours also without bulk
    groups and inside a ``celery_msg.bulk`` block."""
    groups, delays = bench.settings.bulk_group_n, bench.settings.bulk_delay_n
    figures = {
        "group": _timed(bench, transport, groups, _group, bulk_groups=False),
        "group_batch": _timed(bench, transport, groups, _group_in_batch, bulk_groups=False),
        "delay": _timed(bench, transport, delays, _delays),
        "delay_batch": _timed(bench, transport, delays, _delays_in_batch),
    }
    if transport == OURS:
        figures["group_bulk"] = _timed(bench, transport, groups, _group)
        figures["delay_bulk"] = _timed(bench, transport, delays, _delays_in_block)
        figures["window_ms"] = _window[0] * 1000
    return figures
