"""Throwaway replicated topologies for test suites: a master, its replicas and sentinels.

Built from the same ``redis-server`` / ``valkey-server`` binaries as :mod:`celery_msg.testing`
(a sentinel is the server binary started with ``--sentinel``), each process on a free port of
127.0.0.1 with its own directory, so a test can SIGKILL the master and watch the sentinels
promote the replica. Timings are short on purpose: a master is declared down after
``down_after_ms`` (1 s), so a failover takes about 2-5 s here.

    with SentinelTopology("valkey") as topo:
        url = topo.broker_url()   # celery-msg+sentinel://127.0.0.1:P1/0;...
        options = {"master_name": topo.master_name}
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import redis

from .testing import HOST, ServerError, ServerKind, ServerProcess


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
    ) -> None:
        super().__init__(kind)
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
        return lines


class SentinelTopology:
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
    ) -> None:
        self.kind: ServerKind = kind
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
            master = ServerProcess(self.kind, appendonly=self._appendonly, config=self._config)
            self.servers.append(master.start())
            for _ in range(self._replica_count):
                config = (*self._config, f"replicaof {HOST} {master.port}")
                replica = ServerProcess(self.kind, appendonly=self._appendonly, config=config)
                self.servers.append(replica.start())
            for _ in range(self._sentinel_count):
                sentinel = SentinelProcess(
                    self.kind,
                    master_name=self.master_name,
                    master_port=master.port,
                    quorum=self._sentinel_count // 2 + 1,
                    down_after_ms=self.down_after_ms,
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
        """Until the sentinels name a master other than ``old_port`` and it accepts writes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                port = self.master_port()
            except ServerError:
                port = old_port
            if port != old_port:
                server = self.server_on(port)
                try:
                    with server.client() as client:
                        if client.info("replication").get("role") == "master":
                            return server
                except (redis.RedisError, OSError):
                    pass
            time.sleep(0.1)
        raise ServerError(f"no failover away from port {old_port} within {timeout}s")

    @contextlib.contextmanager
    def replicas_lagging(self, seconds: float) -> Iterator[None]:
        """Stop every replica (SIGSTOP) for ``seconds``, then run the body, then resume them:
        a master that keeps acknowledging writes its replicas do not have (a network hiccup),
        and whatever the body does to it happens before they catch up."""
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _field(state: Any, name: str) -> Any:
    """A field of a ``SENTINEL MASTER`` reply (a dict with bytes keys, or text ones)."""
    if name in state:
        return state[name]
    return state[name.encode()]
