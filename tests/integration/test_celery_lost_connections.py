"""A real ``celery worker`` that loses its connection to Redis while it holds tasks: its
connections killed, Redis restarted, or a partition longer than the lease (the chaos
benchmark's faults, bench/chaos.py). Executions are counted from the task event list, outside
the broker; the worker reaches Redis through a :class:`~bench.proxy.TcpProxy`, so that only
its own connections are cut."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
import redis
from celery_app.settings import DEFAULT_QUEUE
from celery_helpers import Stack, Worker, stack_factory, wait_until

from bench.proxy import TcpProxy
from celery_msg.core import Broker

if TYPE_CHECKING:
    from conftest import Server


#: Seconds Redis is down: as in the chaos benchmark, long enough that the worker loses its
#: connection (redis-py's own retries give up) and Celery reconnects.
OUTAGE = 1.0


def proxied_url(proxy: TcpProxy) -> str:
    return f"celery-msg://127.0.0.1:{proxy.port}/0"


@pytest.fixture
def proxy(server: Server) -> Iterator[TcpProxy]:
    with TcpProxy(server.process.port, name="worker-proxy") as proxy:
        yield proxy


def cut_connections(server: Server, proxy: TcpProxy) -> None:
    """CLIENT KILL every connection the proxied worker has (as the chaos benchmark does)."""
    admin = server.process.client()
    try:
        for address in proxy.upstream_addresses():
            with contextlib.suppress(redis.ResponseError):  # a link that closed meanwhile
                admin.client_kill(address)
    finally:
        admin.close()


def reconnected(worker: Worker) -> None:
    """Wait until Celery gave the lost connection up and connected again."""
    wait_until(
        lambda: worker.log().count("Connected to celery-msg://") == 2 or None,
        15,
        f"{worker.nodename} to reconnect",
    )


def started_once(stack: Stack, ids: list[str]) -> None:
    assert Counter(e.task for e in stack.events("start")) == Counter(ids)


@pytest.mark.slow
def test_tasks_running_when_the_workers_connections_are_killed_run_once_and_are_acked(
    make_stack: Callable[..., Stack], server: Server, proxy: TcpProxy
):
    """Celery reconnects with a new transport, but the prefork pool goes on running what it
    was handed: those messages must not go back to the queue (another worker would run them
    a second time), and their acks, made through the old channel, must still land."""
    # Two views of one queue (same prefix): the cut worker goes through the proxy.
    stack = make_stack(
        lease_timeout=3.0, sweep_interval=0.25, broker_url_override=proxied_url(proxy)
    )
    direct = make_stack(lease_timeout=3.0, sweep_interval=0.25)
    cut = stack.worker(pool="prefork", concurrency=2)
    sleeper = direct.task("sleep_then_record")
    ids = [sleeper.apply_async([2.0, f"t{i}"], ignore_result=True).id for i in range(2)]
    stack.wait_for_tasks("start", ids, timeout=15)
    other = direct.worker(pool="threads", concurrency=2)  # would run anything put back

    cut_connections(server, proxy)
    reconnected(cut)

    stack.wait_for_tasks("finish", ids, timeout=15)
    # Acked: nothing left reserved (a lost ack would leave it reserved until its lease ran
    # out, then run it again); and no task was handed to the other worker meanwhile.
    stack.settled(DEFAULT_QUEUE, timeout=10)
    started_once(stack, ids)
    assert {e.worker for e in stack.events("start")} == {cut.nodename}
    assert other.running


@pytest.mark.slow
def test_tasks_running_through_a_short_redis_restart_run_once_and_are_acked(
    server_factory: Callable[..., Server], prefix: str, tmp_path: Path
):
    """Redis down for less than the lease: the connection is lost and replaced, the tasks
    running meanwhile finish, their leases are renewed once Redis is back and their acks
    land; none runs a second time."""
    server = server_factory(appendonly=True, appendfsync="always")
    with stack_factory(server.url, prefix, tmp_path) as make:
        stack = make(lease_timeout=5.0, sweep_interval=0.25)
        sleeper = stack.task("sleep_then_record")
        worker = stack.worker(pool="prefork", concurrency=2)
        results = [sleeper.apply_async([3.0, f"t{i}"], ignore_result=True) for i in range(2)]
        ids = [r.id for r in results]
        stack.wait_for_tasks("start", ids, timeout=15)

        server.process.kill()
        time.sleep(OUTAGE)
        server.process.restart()
        reconnected(worker)

        stack.wait_for_tasks("finish", ids, timeout=20)
        stack.settled(DEFAULT_QUEUE, timeout=15)
        started_once(stack, ids)
        assert worker.running


@pytest.mark.slow
def test_a_worker_cut_off_longer_than_the_lease_does_not_run_the_messages_it_had_prefetched(
    make_stack: Callable[..., Stack], proxy: TcpProxy
):
    """A solo worker runs a long task while the messages it prefetched wait; it is partitioned
    for longer than the lease, so the other worker takes all of them. Once the long task ends
    the cut-off worker must not run the prefetched ones: their leases lapsed and were handed
    on. (The long task itself runs twice: a worker cut off for longer than the lease cannot
    be told from a dead one; that is what brings a dead worker's tasks back within a lease.)"""
    lease = 2.0
    stack = make_stack(
        lease_timeout=lease,
        sweep_interval=0.25,
        prefetch_multiplier=4,
        broker_url_override=proxied_url(proxy),
    )
    direct = make_stack(lease_timeout=lease, sweep_interval=0.25)
    sleeper = direct.task("sleep_then_record")
    long_id = sleeper.apply_async([lease + 1.5, "long"], ignore_result=True).id
    short = [sleeper.apply_async([0.1, f"short{i}"], ignore_result=True).id for i in range(3)]
    cut = stack.worker()
    stack.wait_for_tasks("start", [long_id], timeout=15)
    assert direct.broker.counts(DEFAULT_QUEUE)["reserved"] == 4  # all four prefetched

    proxy.partition()
    other = direct.worker(pool="threads", concurrency=4)
    # Healed once the other worker finished all four: the cut-off one finished the long task
    # well before (it started it a lease earlier), with the prefetched ones still to run.
    wait_until(
        lambda: (
            {e.task for e in direct.events("finish") if e.worker == other.nodename}
            == {long_id, *short}
            or None
        ),
        20,
        "the other worker to finish all four",
    )
    assert [e.task for e in direct.events("finish") if e.worker == cut.nodename] == [long_id]
    proxy.heal()

    # The cut-off worker finds, once it can ask, that it lost the prefetched messages' leases.
    wait_until(
        lambda: cut.log().count("lease lost") >= len(short) or None, 40, "lost leases logged"
    )
    direct.settled(DEFAULT_QUEUE, timeout=10)
    runs = Counter(e.task for e in direct.events("start"))
    assert runs == Counter({**dict.fromkeys(short, 1), long_id: 2})
    assert {e.worker for e in direct.events("start") if e.task in short} == {other.nodename}


@pytest.mark.slow
def test_acks_made_while_redis_is_paused_land_once_it_answers_again(
    server_factory: Callable[..., Server], prefix: str, tmp_path: Path
):
    """Redis stops answering (``CLIENT PAUSE``) while a threads pool finishes its tasks: the
    pool threads' acks fail, Celery gives the connection up at about the same moment, and the
    acks must still be written by the old connection's lingering renewer once Redis answers:
    none of the tasks runs a second time. Events and results live on another server, so the
    tasks can record their finish during the pause."""
    broker = server_factory()
    events = server_factory()
    with stack_factory(events.url, prefix, tmp_path) as make:
        stack = make(
            lease_timeout=10.0,
            sweep_interval=0.25,
            broker_url_override=f"celery-msg://{urlsplit(broker.url).netloc}/0",
        )
        stack.broker = Broker(broker.process.client(), prefix=prefix)
        sleeper = stack.task("sleep_then_record")
        stack.worker(pool="threads", concurrency=2)
        ids = [sleeper.apply_async([1.0, f"t{i}"], ignore_result=True).id for i in range(2)]
        stack.wait_for_tasks("start", ids, timeout=15)

        admin = broker.process.client()
        admin.execute_command("CLIENT", "PAUSE", "7000", "ALL")
        stack.wait_for_tasks("finish", ids, timeout=15)
        broker.process.client(socket_timeout=30).ping()  # answers once the pause is over

        stack.settled(DEFAULT_QUEUE, timeout=30)
        later = sleeper.apply_async([0.1, "later"], ignore_result=True).id
        stack.wait_for_tasks("finish", [later], timeout=30)
        # Nothing reserved is left: an ack that was never written would have kept its task
        # reserved until the lease lapsed, then run it again (counted by started_once).
        stack.settled(DEFAULT_QUEUE, timeout=15)
        started_once(stack, [*ids, later])
