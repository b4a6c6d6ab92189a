"""Helpers for the kombu-level integration tests (``test_transport_*.py``): no Celery worker.

- :func:`connect` opens a kombu ``Connection`` to a test server with the test's key prefix.
- :class:`Receiver` is one kombu ``Consumer`` on a connection that records what it receives,
  acking on receipt or not, and drains until an exact number of messages has arrived.
- :func:`publish` sends messages whose ``headers["id"]`` is their ID, as Celery does, so that
  :meth:`celery_msg.core.Broker.lookup` finds them by that ID.
- :class:`ConsumerProcess` runs a consumer in a child process that the test can SIGKILL or
  SIGSTOP: a consumer that really dies, or really freezes, with its lease renewer inside.
- :class:`CuttingProxy` sits between a client and a server and drops the reply to one chosen
  request: the server did the work, the client never hears of it (a connection lost mid-reply).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from kombu import Connection, Exchange, Queue
from kombu.message import Message
from waiting import wait_until as wait_until

import celery_msg  # noqa: F401  (registers the celery-msg:// scheme)
from celery_msg.core import Broker
from celery_msg.testing import Closing

if TYPE_CHECKING:
    from conftest import Server

REPO = Path(__file__).resolve().parents[2]

#: Options that make lease expiry and reclaim fast enough for tests to wait for them.
FAST = {"lease_timeout": 1.0, "sweep_interval": 0.2}


def url(server: Server, db: int | str = 0, scheme: str = "celery-msg") -> str:
    return f"{scheme}://127.0.0.1:{server.process.port}/{db}"


def connect(server: Server, prefix: str, **options: Any) -> Connection:
    """A kombu connection to ``server`` whose every key starts with ``prefix``."""
    return Connection(url(server), transport_options={"key_prefix": prefix, **options})


def broker(server: Server, prefix: str, **options: Any) -> Broker:
    """A core :class:`Broker` with a client of its own, for looking at (or writing) queues."""
    return Broker(server.process.client(), prefix=prefix, **options)


def direct_queue(name: str, **kwargs: Any) -> Queue:
    """A queue on the anonymous exchange: publish with ``routing_key=name``."""
    return Queue(name, Exchange(""), routing_key=name, **kwargs)


def publish(
    conn: Connection,
    ids: Iterable[str],
    *,
    routing_key: str,
    exchange: Exchange | None = None,
    **kwargs: Any,
) -> None:
    """Publish one message per ID; the body is ``{"id": id}`` and ``headers["id"]`` the ID."""
    producer = conn.Producer(exchange=exchange or Exchange(""))
    for message_id in ids:
        producer.publish(
            {"id": message_id}, routing_key=routing_key, headers={"id": message_id}, **kwargs
        )


def ids_of(messages: Iterable[Message]) -> list[str]:
    return [m.headers["id"] for m in messages]


def ack_now(message: Message) -> None:
    """Ack from another thread: written at once, not buffered for the draining thread's next
    round trip (or the renewer's) as an ack from the draining thread is."""
    failures: list[BaseException] = []

    def ack() -> None:
        try:
            message.ack()
        except BaseException as exc:
            failures.append(exc)

    acker = threading.Thread(target=ack)
    acker.start()
    acker.join()
    if failures:
        raise failures[0]


class Receiver:
    """One consumer on ``queues`` that records every message it is handed."""

    def __init__(
        self,
        conn: Connection,
        queues: Sequence[Queue],
        *,
        prefetch_count: int | None = None,
        ack: bool = True,
    ) -> None:
        self.conn = conn
        self.ack = ack
        self.messages: list[Message] = []
        self.consumer = conn.Consumer(
            list(queues),
            callbacks=[self._on_message],
            accept=["json"],
            prefetch_count=prefetch_count,
        )
        self.consumer.consume()

    def _on_message(self, body: Any, message: Message) -> None:
        self.messages.append(message)
        if self.ack:
            message.ack()

    def receive(self, count: int, timeout: float = 5.0) -> list[Message]:
        """Drain until exactly ``count`` more messages arrived; return them in arrival order."""
        start = len(self.messages)
        deadline = time.monotonic() + timeout
        while len(self.messages) - start < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                got = ids_of(self.messages[start:])
                raise AssertionError(f"expected {count} messages within {timeout}s, got {got}")
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=remaining)
        new = self.messages[start:]
        assert len(new) == count, f"expected {count} messages, got {ids_of(new)}"
        return new

    def nothing_for(self, seconds: float) -> None:
        """Drain for ``seconds`` and assert that nothing arrived."""
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=remaining)
        assert self.messages[start:] == [], f"unexpected {ids_of(self.messages[start:])}"


# -- a consumer in a process of its own ------------------------------------------------------

_CONSUMER_SCRIPT = r"""
import json, logging, sys
import celery_msg
from kombu import Connection, Exchange, Queue

logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                    format="%(levelname)s %(name)s %(message)s")
url, prefix, name, prefetch, options = sys.argv[1:6]
prefetch = int(prefetch)
conn = Connection(url, transport_options={"key_prefix": prefix, **json.loads(options)})
held = {}

def on_message(body, message):
    held[message.headers["id"]] = message
    print(json.dumps({
        "got": message.headers["id"],
        "deliveries": message.delivery_info["delivery_count"],
        "consumer": conn.transport.consumer_id,
    }), flush=True)

consumer = conn.Consumer([Queue(name, Exchange(""), routing_key=name)], callbacks=[on_message],
                         accept=["json"], prefetch_count=prefetch)
consumer.consume()
while len(held) < prefetch:
    try:
        conn.drain_events(timeout=1)
    except TimeoutError:
        pass
for line in sys.stdin:
    verb, _, arg = line.strip().partition(" ")
    if verb == "ack":
        held[arg].ack()
        print(json.dumps({"acked": arg}), flush=True)
conn.release()
print(json.dumps({"closed": True}), flush=True)
"""


class ConsumerProcess(Closing):
    """A kombu consumer in a child process: it takes ``prefetch`` messages and holds them.

    It prints one JSON line per message (``got``, ``deliveries``, ``consumer``), acks a held
    message on ``ack <id>``, and closes its connection cleanly when stdin closes. Its log
    (warnings and up) is collected in :attr:`log`.
    """

    def __init__(
        self, server: Server, prefix: str, queue_name: str, *, prefetch: int = 1, **options: Any
    ) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        args = [url(server), prefix, queue_name, str(prefetch), json.dumps(options)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CONSUMER_SCRIPT, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._log: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read_events, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._read_log, args=(self.proc.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_events(self, stream: Any) -> None:
        for line in stream:
            self._events.put(json.loads(line))

    def _read_log(self, stream: Any) -> None:
        for line in stream:
            self._log.append(line)

    @property
    def log(self) -> str:
        return "".join(self._log)

    def event(self, timeout: float = 15.0) -> dict[str, Any]:
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"consumer process said nothing for {timeout}s "
                f"(exit code {self.proc.poll()}); its log:\n{self.log}"
            ) from None

    def received(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        events = [self.event(timeout) for _ in range(count)]
        assert all("got" in e for e in events), events
        return events

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: the consumer dies with its leases held and nothing flushed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def finish(self, timeout: float = 15.0) -> str:
        """Close stdin (the consumer closes its connection and exits); return its log."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return self.log

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            self.kill()


# -- a connection that loses one reply --------------------------------------------------------


class CuttingProxy:
    """A TCP proxy to a server that can drop the reply to the next request containing a marker.

    After :meth:`cut_reply_to`, the first client request containing ``marker`` is forwarded to the
    server, which executes it; its reply is discarded and both sockets of that connection are
    closed. Later connections (the client reconnecting) are forwarded normally.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.cuts = 0
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_reply_to(self, marker: bytes) -> None:
        with self._lock:
            self._marker = marker

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        armed = False
        try:
            while True:
                readable, _, _ = select.select([client, server], [], [])
                if client in readable:
                    data = client.recv(65536)
                    if not data:
                        return
                    with self._lock:
                        if self._marker is not None and self._marker in data:
                            armed, self._marker = True, None
                    server.sendall(data)
                if server in readable:
                    data = server.recv(65536)
                    if not data:
                        return
                    if armed:
                        with self._lock:
                            self.cuts += 1
                        return
                    client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()


def scan_keys(client: redis.Redis, match: str = "*") -> set[str]:
    return {k.decode() for k in client.scan_iter(match=match, count=1000)}
