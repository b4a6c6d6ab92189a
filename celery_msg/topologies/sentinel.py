"""A throwaway Sentinel topology: a master, its replicas and the sentinels watching it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, Self

import redis

from ..testing import HOST, ServerError, ServerKind, ServerProcess, TLSFiles
from .base import (
    Topology,
    answers_writes,
    replicas_online,
    stopped,
    text,
    wait_for,
    wait_replicated,
)


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
        tls: TLSFiles | None = None,
        config: Sequence[str] = (),
    ) -> None:
        super().__init__(kind, password=password, tls=tls, config=config)
        self.master_name = master_name
        self.master_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.master_password = master_password

    def _config_lines(self) -> list[str]:
        name = self.master_name
        lines = [
            *self._listen_lines(),
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


class SentinelTopology(Topology):
    """One master, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a majority).

    Timings are short on purpose: a master is declared down after ``down_after_ms`` (1 s), so
    a failover takes about 2-5 s here."""

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
        tls: TLSFiles | None = None,
    ) -> None:
        """``password``: the data nodes' default user (replicas and sentinels use it too);
        ``config`` lines go to every data node (e.g. an ACL ``user`` line), ``sentinel_config``
        to every sentinel; ``sentinel_password`` protects the sentinels themselves; ``tls``:
        every process (sentinels included) listens on TLS only."""
        super().__init__(tls)
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
            master = self._server(*auth)
            self.servers.append(master.start())
            for _ in range(self._replica_count):
                replica = self._server(*auth, f"replicaof {HOST} {master.port}")
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
                    tls=self.tls,
                    config=self._sentinel_config,
                )
                self.sentinels.append(sentinel.start())
            self.wait_until_settled(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _server(self, *config: str) -> ServerProcess:
        return ServerProcess(
            self.kind,
            appendonly=self._appendonly,
            password=self.password,
            tls=self.tls,
            config=(*self._config, *config),
        )

    def wait_until_settled(self, timeout: float = 20.0) -> None:
        """Until every replica is in sync and every sentinel knows them and the others."""
        wait_for(self._settled, timeout, "the sentinel topology to settle")

    def _settled(self) -> bool:
        try:
            with self.server_on(self.master_port()).client() as client:
                info = client.info("replication")
            if len(replicas_online(info)) < self._replica_count:
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

    def replicated(self, timeout: float = 10.0) -> None:
        """Until every replica has every write the master acknowledged so far."""
        wait_replicated(self.master, self._replica_count, timeout)

    def wait_for_failover(self, old_port: int, timeout: float = 30.0) -> ServerProcess:
        """Until every running sentinel names the same new master, none flags it down or in
        failover (what a client's discovery accepts), and it accepts writes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self._agreed_master()
            if port is not None and port != old_port and answers_writes(self.server_on(port)):
                return self.server_on(port)
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
                if text(_field(state, "flags")) != "master":  # s_down, o_down, failover...
                    return None
                ports.add(int(_field(state, "port")))
            except (redis.RedisError, OSError, KeyError, TypeError, ValueError):
                return None
        return ports.pop() if len(ports) == 1 else None

    @contextlib.contextmanager
    def replicas_lagging(self, seconds: float) -> Iterator[None]:
        """Stop every replica (SIGSTOP) for ``seconds``, then run the body, then resume them
        (see :func:`~celery_msg.topologies.base.stopped`)."""
        master = self.master_port()
        with stopped([s for s in self.servers if s.port != master and s.running], seconds):
            yield

    def broker_url(self, db: int = 0, userinfo: str = "") -> str:
        """``celery-msg+sentinel://[userinfo@]127.0.0.1:P/db;...``: one part per sentinel
        (``celery-msgs`` with TLS)."""
        at = f"{userinfo}@" if userinfo else ""
        return ";".join(
            f"{self.scheme}+sentinel://{at}{HOST}:{s.port}/{db}" for s in self.sentinels
        )

    def sentinel_kwargs(self) -> dict[str, Any]:
        """The ``sentinel_kwargs`` transport option that reaches these sentinels (TLS, and the
        sentinels' password); empty when they need neither."""
        kwargs: dict[str, Any] = self.redis_tls()
        if self.sentinel_password is not None:
            kwargs["password"] = self.sentinel_password
        return kwargs

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
