"""Fixtures shared by the integration tests (servers and ``prefix``: tests/conftest.py).

- ``make_stack``: ``make_stack(**settings)`` builds a :class:`celery_helpers.Stack` (settings on
  this test's server and key prefix, a client app, a Broker, workers) closed after the test.
- ``stack``: one such stack with the default settings.
- ``consumer_process``: ``start(queue, **options)`` runs a kombu consumer in a child process
  (fast leases) that the test can SIGKILL or SIGSTOP; all are closed after the test.
- ``signalled``: the ``after_task_publish`` calls of the test.
- ``clock`` and ``broker``: a :class:`celery_msg.core.Broker` on this test's server and prefix
  whose clock is pinned (``clock.t``, seconds, from ``pinned.T0``; lease ``pinned.LEASE_MS``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from celery.signals import after_task_publish
from celery_helpers import Stack, StackFactory, stack_factory
from kombu_helpers import FAST, ConsumerProcess
from pinned import LEASE_MS, T0, Clock

from celery_msg.core import Broker

if TYPE_CHECKING:
    from conftest import Server


@pytest.fixture
def make_stack(server: Server, prefix: str, tmp_path: Path) -> Iterator[StackFactory]:
    with stack_factory(server.url, prefix, tmp_path) as make:
        yield make


@pytest.fixture
def stack(make_stack: StackFactory) -> Stack:
    return make_stack()


@pytest.fixture
def consumer_process(server: Server, prefix: str) -> Iterator[Callable[..., ConsumerProcess]]:
    started: list[ConsumerProcess] = []

    def start(queue: str, **options: Any) -> ConsumerProcess:
        process = ConsumerProcess(server, prefix, queue, **{**FAST, **options})
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


@pytest.fixture
def signalled() -> Iterator[list[dict[str, Any]]]:
    """The ``after_task_publish`` calls of the test (a receiver does not turn derived
    messages off: only ``before_task_publish`` ones may change a message)."""
    seen: list[dict[str, Any]] = []

    def after(sender: Any = None, **kwargs: Any) -> None:
        seen.append({"sender": sender, **kwargs})

    after_task_publish.connect(after, weak=False)
    yield seen
    after_task_publish.disconnect(after)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def broker(redis_client: redis.Redis, prefix: str, clock: Clock) -> Broker:
    return Broker(redis_client, prefix=prefix, lease_ms=LEASE_MS, clock=clock)
