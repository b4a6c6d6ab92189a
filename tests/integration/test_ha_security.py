"""TLS and ACL users on a Redis Cluster and through Sentinel (issue 11): a real Celery worker
over ``celery-msgs+cluster://`` and ``celery-msgs+sentinel://`` (every node, every sentinel on
TLS only), and as the README's least-privileged user on a Cluster. Results and the task event
list live on a plain server of the same kind, so every execution is counted outside the
broker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from celery_helpers import Stack, readme_acl, stack_factory
from kombu import Connection
from server_kinds import TLS_KINDS

from celery_msg import PermissionDenied
from celery_msg.connection import redis_client
from celery_msg.core import Broker
from celery_msg.options import TransportOptions
from celery_msg.slots import queue_slot
from celery_msg.testing import ServerKind, ServerProcess, TLSFiles
from celery_msg.topologies import ClusterTopology, SentinelTopology

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.slow

#: Queues whose slots are on three different masters of an evenly split 3-master cluster.
QUEUES = ("a", "b", "c")


@pytest.fixture(params=TLS_KINDS, ids=lambda kind: f"tls-{kind}")
def tls_kind(request: pytest.FixtureRequest) -> ServerKind:
    kind: ServerKind = request.param
    return kind


@pytest.fixture
def store(tls_kind: ServerKind) -> Iterator[ServerProcess]:
    """Where results and the task events go: a plain server nothing here encrypts or kills."""
    with ServerProcess(tls_kind) as process:
        yield process


def run_on_every_queue(stack: Stack, queues: tuple[str, ...] = ("celery",)) -> None:
    """Ten tasks per queue through a worker on all of them: each runs exactly once."""
    worker = stack.worker(queues=queues, pool="threads", concurrency=2)
    record = stack.task("record_now")
    results = [record.apply_async((f"{q}{i}",), queue=q) for q in queues for i in range(10)]
    assert sorted(r.get(timeout=30) for r in results) == sorted(
        f"{q}{i}" for q in queues for i in range(10)
    )
    runs = Counter(e.task for e in stack.events("start"))
    assert {runs[r.id] for r in results} == {1}
    inspect = stack.app.control.inspect(destination=[worker.nodename], timeout=5)
    assert inspect.ping() == {worker.nodename: {"ok": "pong"}}
    assert worker.running


def test_a_celery_worker_runs_tasks_over_tls_on_a_cluster(
    tls_kind: ServerKind, tls_files: TLSFiles, store: ServerProcess, prefix: str, tmp_path: Path
):
    with (
        ClusterTopology(tls_kind, masters=3, tls=tls_files) as cluster,
        stack_factory(store.url, prefix, tmp_path) as make,
    ):
        assert cluster.broker_url().startswith("celery-msgs+cluster://")
        assert len({cluster.master_for_slot(queue_slot(q)).port for q in QUEUES}) == 3
        stack = make(
            broker_url_override=cluster.broker_url(), broker_ca_file=str(tls_files.ca_file)
        )
        run_on_every_queue(stack, QUEUES)
        # Only the TLS port listens, and our client verifies the certificate there.
        options = TransportOptions(key_prefix=prefix)
        with pytest.raises(Exception, match=r"(?i)certificate verify failed"):
            redis_client(Connection(cluster.broker_url()), options)


def test_a_celery_worker_runs_tasks_over_tls_through_sentinels(
    tls_kind: ServerKind, tls_files: TLSFiles, store: ServerProcess, prefix: str, tmp_path: Path
):
    """Sentinels and data nodes on TLS only: the worker asks the sentinels over TLS (the
    ``sentinel_kwargs`` option) and reaches the master over TLS (``celery-msgs+sentinel://``),
    before and after the master is killed."""
    with (
        SentinelTopology(tls_kind, tls=tls_files) as topology,
        stack_factory(store.url, prefix, tmp_path) as make,
    ):
        assert topology.broker_url().startswith("celery-msgs+sentinel://")
        stack = make(
            broker_url_override=topology.broker_url(),
            master_name=topology.master_name,
            broker_ca_file=str(tls_files.ca_file),
            lease_timeout=3.0,
            sweep_interval=0.25,
        )
        run_on_every_queue(stack)
        topology.replicated()
        old = topology.master_port()
        topology.server_on(old).kill()
        topology.wait_for_failover(old)
        after = [stack.task("add").delay(i, 1) for i in range(5)]
        assert [r.get(timeout=60) for r in after] == [1, 2, 3, 4, 5]


def cluster_acl(prefix: str, password: str) -> str:
    """README's ACL user with the additions its Cluster section lists."""
    return f"{readme_acl(prefix, password)} {readme_acl(prefix, password, 'acl-cluster')}"


def test_a_celery_worker_runs_on_a_cluster_as_the_readme_acl_user(
    server: Server, prefix: str, tmp_path: Path
):
    """The least-privileged user the README documents for a Cluster (its key prefix, its
    sharded channels, the listed commands): tasks on three shards and remote control work, and
    no node logs a refusal."""
    user = cluster_acl(prefix, "app-pw")
    with (
        ClusterTopology(server.kind, masters=3, config=[user]) as cluster,
        stack_factory(server.url, prefix, tmp_path) as make,
    ):
        stack = make(broker_url_override=cluster.broker_url(userinfo="celery:app-pw"))
        run_on_every_queue(stack, QUEUES)
        client, _ = redis_client(Connection(cluster.broker_url()), TransportOptions())
        broker = Broker(client, prefix=prefix)
        assert [broker.counts(q)["ready"] for q in QUEUES] == [0, 0, 0]
        denied = {node.port: refused(node, "celery") for node in cluster.nodes}
        assert denied == {node.port: [] for node in cluster.nodes}


def refused(node: ServerProcess, user: str) -> list[Any]:
    """What ``ACL LOG`` on ``node`` says ``user`` was refused, but redis-py's ``CLIENT
    SETINFO`` (refused and ignored: the README leaves it out, Redis 7.0 does not know it)."""
    with node.client() as admin:
        entries: list[dict[str, Any]] = admin.acl_log()
    found = []
    for entry in entries:
        if _text(entry.get("username")) != user:
            continue
        what = (_text(entry.get("reason")), _text(entry.get("object")))
        if what[1] != "client|setinfo":
            found.append(what)
    return found


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def test_the_cluster_acl_user_cannot_reach_another_prefix_nor_connect_without_command(
    server: Server, prefix: str
):
    """The same user under another prefix is refused by name; without ``+command`` (which
    redis-py's cluster client asks when it connects) connecting fails naming the command."""
    user = cluster_acl(prefix, "app-pw")
    without_command = user.replace("user celery ", "user nocmd ", 1).replace(" +command", "")
    with ClusterTopology(server.kind, masters=3, config=[user, without_command]) as cluster:
        url = cluster.broker_url(userinfo="celery:app-pw")
        client, _ = redis_client(Connection(url), TransportOptions())
        broker = Broker(client, prefix=f"other-{prefix}")
        with pytest.raises(PermissionDenied, match=r"(?i)no permissions"):
            broker.publish("a", "m1", "{}", 0)
        refused = Connection(cluster.broker_url(userinfo="nocmd:app-pw"))
        with pytest.raises(PermissionDenied, match=r"'command'"):
            redis_client(refused, TransportOptions())
