"""Prometheus metrics: ``celery -A app msg metrics`` scraped over HTTP while a real worker runs
real traffic, its text parsed with prometheus-client's own parser; and the collector on its own
(kinds, reasons, a corrupted queue, Redis down).

The counts are checked against what the tasks themselves recorded (their start, fail and finish
events: side effects written outside the broker), not only against numbers worked out here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from celery_app.settings import DEFAULT_QUEUE
from celery_helpers import INTEGRATION_DIR, REPO_ROOT, Stack, StackFactory, wait_until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_msg.core import Broker
from celery_msg.deadletters import DeadFilter, DeadLetters
from celery_msg.headers import UNIQUE_HEADER
from celery_msg.metrics import QueueCollector
from celery_msg.snapshot import QueueKind

if TYPE_CHECKING:
    from conftest import Server

CELERY = Path(sys.executable).with_name("celery")
#: Sample key: (metric sample name, frozenset of label items).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def of_queue(samples: Samples, queue: str) -> dict[str, float]:
    """The samples of one queue: ``name`` or ``name{label=value}`` for its other labels."""
    out: dict[str, float] = {}
    for (name, labels), value in samples.items():
        found = dict(labels)
        if found.pop("queue", None) != queue:
            continue
        found.pop("kind")
        extra = ",".join(f"{k}={v}" for k, v in sorted(found.items()))
        out[f"{name}{{{extra}}}" if extra else name] = value
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Exporter:
    """``celery -A celery_app.worker msg metrics`` as a process, with the stack's settings."""

    def __init__(self, stack: Stack, log: Path, *args: str) -> None:
        self.port = free_port()
        pythonpath = os.pathsep.join([str(REPO_ROOT), str(INTEGRATION_DIR)])
        env = {**os.environ, **stack.environ, "PYTHONPATH": pythonpath}
        argv = [str(CELERY), "-A", "celery_app.worker", "msg", "metrics"]
        self.log = log
        self.proc = subprocess.Popen(
            [*argv, "--port", str(self.port), *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        wait_until(self._serving, 60, "the metrics endpoint")

    def _serving(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exporter exited: {self.log.read_text()}")
        return "serving celery-msg metrics" in self.log.read_text()

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[Callable[..., Exporter]]:
    started: list[Exporter] = []

    def start(stack: Stack, *args: str) -> Exporter:
        started.append(Exporter(stack, tmp_path / f"exporter-{len(started)}.log", *args))
        return started[-1]

    yield start
    for one in started:
        one.close()


def test_the_exported_counts_match_real_traffic_on_a_real_worker(
    make_stack: StackFactory, exporter: Callable[..., Exporter]
):
    stack = make_stack(policies="retry")
    served = exporter(stack)
    # Before any worker: a unique publish of a pending id is refused (deduplicated).
    unique = stack.task("add").apply_async((0, 0), task_id="once", headers={UNIQUE_HEADER: True})
    stack.task("add").apply_async((0, 0), task_id="once", headers={UNIQUE_HEADER: True})
    adds = [stack.task("add").delay(i, 1) for i in range(4)]
    flaky = stack.task("attempt").delay(1, "flaky")  # fails once, retried, succeeds
    doomed = stack.task("attempt").delay(4, "doomed")  # 4 runs fail: dead after 3 retries
    stack.worker()
    assert [r.get(timeout=30) for r in (unique, *adds)] == [0, 1, 2, 3, 4]
    assert flaky.get(timeout=30) == 2
    stack.wait_for_events("fail", 1 + 4, timeout=30)
    stack.settled(DEFAULT_QUEUE, timeout=20, dead=1)

    dead = DeadLetters(stack.broker)
    assert dead.replay(list(dead.iter(DeadFilter(queue=DEFAULT_QUEUE)))) == 1
    # the replayed run (the fifth) succeeds; the backend held the failure until then
    finished = stack.wait_for_tasks("finish", [flaky.id, doomed.id], timeout=30)
    assert sorted(e.token for e in finished) == ["2", "5"]
    stack.settled(DEFAULT_QUEUE, timeout=20)

    starts, fails = stack.events("start"), stack.events("fail")
    deliveries = len(starts) + 5  # `add` records nothing: 5 runs of it (once + 4)
    assert (len(starts), len(fails)) == (2 + 5, 1 + 4)

    last: dict[str, float] = {}

    def settled_metrics() -> dict[str, float] | None:
        last.clear()
        last.update(of_queue(parse(served.scrape()), DEFAULT_QUEUE))
        return last if last["celery_msg_acked_total"] == deliveries else None

    try:
        got = wait_until(settled_metrics, 10, "the last ack in the metrics")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last scrape: {last}") from None
    assert got == {
        "celery_msg_messages{state=ready}": 0,
        "celery_msg_messages{state=reserved}": 0,
        "celery_msg_messages{state=scheduled}": 0,
        "celery_msg_messages{state=dead}": 0,
        "celery_msg_oldest_ready_age_seconds": 0,
        "celery_msg_consumers": 1,
        # 5 adds, flaky twice, doomed four times (the replay publishes nothing)
        "celery_msg_published_total": 5 + 2 + 4,
        "celery_msg_delivered_total": deliveries,
        "celery_msg_redelivered_total": 0,
        # every delivery: Celery acks on receipt by default (acks_late=False); the failure
        # for good was kept as a copy in the dead-letter store
        "celery_msg_acked_total": deliveries,
        "celery_msg_requeued_total": 0,
        "celery_msg_reclaimed_total": 0,
        "celery_msg_promoted_total": len(fails) - 1,  # each retry waits its backoff
        "celery_msg_retried_total": len(fails) - 1,  # the last failure was dead-lettered
        "celery_msg_replayed_total": 1,
        "celery_msg_expired_total": 0,
        "celery_msg_dropped_total": 0,
        "celery_msg_deduplicated_total": 1,
        "celery_msg_lease_lost_total": 0,
        "celery_msg_dead_trimmed_total": 0,
        "celery_msg_dead_lettered_total{reason=failed}": 1,
        "celery_msg_queue_readable": 1,
    }
    samples = parse(served.scrape())
    # Celery's own queues (the worker's mailbox, reply queues) are left out by default.
    exported = {dict(labels).get("queue") for _, labels in samples} - {None}
    assert exported == {DEFAULT_QUEUE}
    assert any(q.endswith(".pidbox") for q in stack.broker.queues())
    assert samples[("celery_msg_up", frozenset())] == 1


def test_the_command_exports_celerys_own_queues_when_asked_labelled_by_kind(
    make_stack: StackFactory, exporter: Callable[..., Exporter]
):
    stack = make_stack()
    worker = stack.worker()
    served = exporter(stack, "--kind", "normal", "--kind", "pidbox")

    samples = parse(served.scrape())

    kinds = {
        dict(labels)["queue"]: dict(labels)["kind"]
        for name, labels in samples
        if name == "celery_msg_consumers"
    }
    assert kinds == {DEFAULT_QUEUE: "normal", f"{worker.nodename}.celery.pidbox": "pidbox"}
    mailbox = f"{worker.nodename}.celery.pidbox"
    consumers = ("celery_msg_consumers", frozenset({("queue", mailbox), ("kind", "pidbox")}))
    assert samples[consumers] == 1


# -- the collector on its own ------------------------------------------------------------------


def _text(collector: QueueCollector) -> Samples:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def test_dead_letters_counted_before_reasons_were_are_exported_as_unknown(
    broker: Broker, redis_client: redis.Redis
):
    broker.declare("q")
    redis_client.hset(broker.keys("q").stats, mapping={"dead": 5, "dead:poison": 2})

    samples = of_queue(_text(QueueCollector(broker)), "q")

    assert samples["celery_msg_dead_lettered_total{reason=poison}"] == 2
    assert samples["celery_msg_dead_lettered_total{reason=unknown}"] == 3


def test_a_corrupted_queue_is_exported_as_unreadable_and_the_others_in_full(
    broker: Broker, redis_client: redis.Redis
):
    broker.declare("good")
    broker.declare("bad")
    broker.publish("good", "m", b"M", 0)
    redis_client.set(broker.keys("bad").dead, "garbage")

    samples = _text(QueueCollector(broker))

    assert of_queue(samples, "bad") == {"celery_msg_queue_readable": 0}
    assert of_queue(samples, "good")["celery_msg_messages{state=ready}"] == 1
    assert samples[("celery_msg_queues", frozenset())] == 2


def test_kinds_choose_the_queues_and_label_them(broker: Broker):
    for name in ("celery", "w1@h.celery.pidbox", "cache.w1@h.bcast", "celeryev.x"):
        broker.declare(name)

    def queues(collector: QueueCollector) -> dict[str, str]:
        return {
            dict(labels)["queue"]: dict(labels)["kind"]
            for name, labels in _text(collector)
            if name == "celery_msg_consumers"
        }

    assert queues(QueueCollector(broker)) == {"celery": "normal"}
    assert queues(QueueCollector(broker, kinds=set(QueueKind))) == {
        "celery": "normal",
        "w1@h.celery.pidbox": "pidbox",
        "cache.w1@h.bcast": "broadcast",
        "celeryev.x": "events",
    }
    with pytest.raises(ValueError, match="QueueKind"):
        QueueCollector(broker, kinds={"normal"})  # type: ignore[arg-type]


def test_with_redis_down_a_scrape_says_so_instead_of_failing(fresh_server: Server, prefix: str):
    client = redis.Redis.from_url(fresh_server.url, socket_timeout=2)
    broker = Broker(client, prefix=prefix)
    broker.declare("q")
    collector = QueueCollector(broker)
    assert _text(collector)[("celery_msg_up", frozenset())] == 1

    fresh_server.process.stop()

    assert _text(collector) == {("celery_msg_up", frozenset()): 0}


def test_registering_the_collector_reads_nothing(fresh_server: Server, prefix: str):
    client = redis.Redis.from_url(fresh_server.url, socket_timeout=2)
    fresh_server.process.stop()
    registry = CollectorRegistry(auto_describe=True)

    registry.register(QueueCollector(Broker(client, prefix=prefix)))  # no error: no read

    names = {name for name, _ in parse(generate_latest(registry).decode())}
    assert names == {"celery_msg_up"}


def test_once_prints_the_metrics_and_exits(stack: Stack):
    stack.broker.declare(DEFAULT_QUEUE)
    stack.broker.publish(DEFAULT_QUEUE, "m", b"{}", 0)
    pythonpath = os.pathsep.join([str(REPO_ROOT), str(INTEGRATION_DIR)])
    argv = [str(CELERY), "-A", "celery_app.worker", "msg", "metrics", "--once"]

    done = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env={**os.environ, **stack.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    samples = of_queue(parse(done.stdout), DEFAULT_QUEUE)
    assert samples["celery_msg_messages{state=ready}"] == 1
    assert samples["celery_msg_published_total"] == 1
