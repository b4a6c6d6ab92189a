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

import contextlib
import time
from collections.abc import Callable

from celery import group

import celery_msg
from celery_msg import canvas, reprs, send_template

from .common import KOMBU, OURS, Bench
from .tasks import make_app


def _timed(
    bench: Bench, transport: str, n: int, body: Callable[..., None], **kw: bool
) -> tuple[float, float]:
    """(tasks/s, client CPU µs per task) of ``body`` publishing ``n`` tasks."""
    bench.flush()
    app = make_app(bench.broker_url(transport))
    try:
        if not kw.get("bulk_groups", True) and transport == OURS:
            canvas.uninstall(app)
        task = app.tasks["bench.noop"]
        task.delay(0)  # connect and declare outside the timing
        # kombu's transport as it is: without the saferepr our configured apps installed.
        with reprs.celerys_own() if transport == KOMBU else contextlib.nullcontext():
            cpu = time.process_time()
            started = time.perf_counter()
            body(app, task, n)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu
    finally:
        app.close()
        bench.flush()
    return n / elapsed, cpu / n * 1e6


#: Tasks whose message was derived: of the last group published (celery_msg.group_template),
#: and of the last block of ``.delay()`` calls (celery_msg.send_template).
_derived: dict[str, int] = {"group": 0, "delay": 0}


def _group(app: object, task: object, n: int) -> None:
    group(task.s(i) for i in range(n)).apply_async()  # type: ignore[attr-defined]
    publisher = canvas.last_publisher()
    _derived["group"] = publisher.derived if publisher is not None else 0


def _delays(app: object, task: object, n: int) -> None:
    for i in range(n):
        task.delay(i)  # type: ignore[attr-defined]


#: The longest a message waited in the process in the last timed block (s): the window.
_window: list[float] = [0.0]


def _delays_in_block(app: object, task: object, n: int) -> None:
    with celery_msg.bulk(app) as buffer:
        _delays(app, task, n)
    _window[0] = buffer.longest_wait
    publisher = send_template.last_publisher()
    _derived["delay"] = publisher.derived if publisher is not None else 0


def _group_in_batch(app: object, task: object, n: int) -> None:
    with app.producer_or_acquire() as producer, producer.batch():  # type: ignore[attr-defined]
        group(task.s(i) for i in range(n)).apply_async(producer=producer)  # type: ignore[attr-defined]


def _delays_in_batch(app: object, task: object, n: int) -> None:
    with app.producer_or_acquire() as producer, producer.batch():  # type: ignore[attr-defined]
        for i in range(n):
            task.apply_async((i,), producer=producer)  # type: ignore[attr-defined]


#: (figure, transport, body, bulk groups on) per shape, run back to back in this order (the
#: order flips from run to run), so that a load spike on the shared machine falls on a shape's
#: figures alike. Kombu's plain figure is the base of both of ours (as is, and bulk).
SHAPES: dict[str, list[tuple[str, str, Callable[..., None], bool]]] = {
    "group": [
        ("group_bulk", OURS, _group, True),
        ("group", KOMBU, _group, False),
        ("group", OURS, _group, False),
        ("group_batch", KOMBU, _group_in_batch, False),
        ("group_batch", OURS, _group_in_batch, False),
    ],
    "delay": [
        ("delay_bulk", OURS, _delays_in_block, True),
        ("delay", KOMBU, _delays, False),
        ("delay", OURS, _delays, False),
        ("delay_batch", KOMBU, _delays_in_batch, False),
        ("delay_batch", OURS, _delays_in_batch, False),
    ],
}


def run(bench: Bench, run_number: int) -> dict[str, dict[str, tuple[float, float]]]:
    """One run: figure -> transport -> (tasks/s, client CPU µs per task); ours also
    ``window_ms``: the longest a task waited in the process inside the bulk block;
    ``derived`` and ``delay_derived``: how many tasks of our bulk group and of our block of
    ``.delay()`` calls had their message derived from Celery's (so that one silently back on
    Celery's path shows in the report)."""
    sizes = {"group": bench.settings.bulk_group_n, "delay": bench.settings.bulk_delay_n}
    out: dict[str, dict[str, tuple[float, float]]] = {}
    derived = delay_derived = 0
    for shape, steps in SHAPES.items():
        for figure, transport, body, bulk_groups in steps if run_number % 2 else steps[::-1]:
            rate_cpu = _timed(bench, transport, sizes[shape], body, bulk_groups=bulk_groups)
            out.setdefault(figure, {})[transport] = rate_cpu
            if figure == "group_bulk":
                derived = _derived["group"]
            elif figure == "delay_bulk":
                delay_derived = _derived["delay"]
    out["window_ms"] = {OURS: (_window[0] * 1000, 0.0)}
    out["derived"] = {OURS: (float(derived), 0.0)}
    out["delay_derived"] = {OURS: (float(delay_derived), 0.0)}
    return out
