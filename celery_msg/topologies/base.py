"""What the Sentinel and the Cluster topologies share: waiting for a state to hold, reading a
server's replication, and the TLS every process of a topology speaks."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis

from ..testing import Managed, ServerError, ServerProcess, TLSFiles

#: How often a wait looks again.
POLL_INTERVAL = 0.05


class Topology(Managed):
    """Several processes started together on ``with``, every one closed on the way out."""

    def __init__(self, tls: TLSFiles | None) -> None:
        #: With TLS every process listens on TLS only (the servers among themselves too); the
        #: broker URLs use ``celery-msgs``, and clients must trust ``tls.ca_file``.
        self.tls = tls

    @property
    def scheme(self) -> str:
        """The broker URL scheme clients of this topology use."""
        return "celery-msg" if self.tls is None else "celery-msgs"

    def ssl_options(self) -> dict[str, str]:
        """Celery's ``broker_use_ssl`` for this topology (empty without TLS)."""
        return {} if self.tls is None else {"ssl_ca_certs": str(self.tls.ca_file)}

    def redis_tls(self) -> dict[str, Any]:
        """redis-py's keyword arguments to reach a process of this topology."""
        return {} if self.tls is None else {"ssl": True, "ssl_ca_certs": str(self.tls.ca_file)}


def wait_for(probe: Callable[[], bool], timeout: float, what: str) -> None:
    """Until ``probe()`` is true; :class:`ServerError` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() >= deadline:
            raise ServerError(f"waited {timeout}s for {what}")
        time.sleep(POLL_INTERVAL)


def replicas_online(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``slaveN`` entries of a master's ``INFO replication`` whose link is up."""
    return [
        value
        for name, value in info.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    ]


def wait_replicated(master: ServerProcess, replicas: int = 1, timeout: float = 10.0) -> None:
    """Until ``replicas`` replicas of ``master`` have every write it acknowledged so far.

    Not ``WAIT``: that counts the writes of its own connection only, and a test's fresh
    connection has written nothing, so it returns at once whatever the replicas lag."""
    with master.client() as client:
        target = int(client.info("replication")["master_repl_offset"])

        def caught_up() -> bool:
            online = replicas_online(client.info("replication"))
            return sum(1 for r in online if int(r.get("offset", -1)) >= target) >= replicas

        wait_for(caught_up, timeout, f"{replicas} replica(s) of port {master.port} to catch up")


def answers_writes(server: ServerProcess) -> bool:
    """Whether ``server`` is up and a master (not a replica, not loading)."""
    try:
        with server.client() as client:
            return bool(client.info("replication").get("role") == "master")
    except (redis.RedisError, OSError):
        return False


@contextlib.contextmanager
def stopped(processes: Sequence[ServerProcess], seconds: float) -> Iterator[None]:
    """Stop ``processes`` (SIGSTOP) for ``seconds``, then run the body, then resume them: a
    master that keeps acknowledging writes its replicas do not have, and whatever the body does
    to it (a SIGKILL) happens before they catch up. What the master had already sent waits in
    the kernel's socket buffers and still reaches a stopped replica, so a short lag with little
    traffic may lose nothing; a longer one loses the rest."""
    for process in processes:
        os.kill(process.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
        yield
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
