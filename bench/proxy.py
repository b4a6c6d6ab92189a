"""A loopback TCP proxy the chaos benchmark controls: forward, partition, heal, list links.

A worker whose broker URL points at the proxy talks to Redis through it, so the benchmark can
cut that worker off for a few seconds without root (no network namespace, no iptables): while
:meth:`TcpProxy.partition` is in force the proxy neither accepts new connections nor moves a
byte either way, as a dropped link would (connections stay open, data waits in the kernel
buffers); :meth:`TcpProxy.heal` resumes forwarding where it stopped. The upstream end of each
link is the proxy's own socket, so :meth:`TcpProxy.upstream_addresses` names exactly the
worker's connections as Redis sees them (for ``CLIENT KILL ADDR``).

Every loop is bounded by a short select timeout and checks the stop flag, so :meth:`close`
returns within a fraction of a second; every socket is closed there. Loopback only.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

HOST = "127.0.0.1"
#: How long a blocked loop waits before it looks at the stop / partition flags again (s).
TICK = 0.05
#: Longest a forwarded write may block (the reader on the other end is gone or stuck).
SEND_TIMEOUT = 10.0


class _Link:
    """One accepted connection and its upstream twin, pumped by two threads."""

    def __init__(self, downstream: socket.socket, upstream: socket.socket) -> None:
        self.downstream = downstream
        self.upstream = upstream
        host, port = upstream.getsockname()[:2]
        self.upstream_address = f"{host}:{port}"
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for sock in (self.downstream, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``; partition it at will."""

    def __init__(self, target_port: int, name: str = "proxy") -> None:
        self.target_port = target_port
        self.name = name
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._open = threading.Event()
        self._open.set()
        self._replies = threading.Event()  # cleared: server -> client bytes wait
        self._replies.set()
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        #: Connections accepted, and accepted but refused upstream (Redis down), since start.
        self.accepted = 0
        self.refused = 0

    def start(self) -> TcpProxy:
        self._spawn(self._accept_loop, "accept")
        return self

    @property
    def partitioned(self) -> bool:
        return not self._open.is_set()

    def partition(self) -> None:
        """Stop accepting and forwarding (both ways); open connections stay open."""
        self._open.clear()

    def hold_replies(self) -> None:
        """Forward commands but hold the server's replies: the server runs what clients send
        and they never hear back (as when a link dies after the request got through)."""
        self._replies.clear()

    def heal(self) -> None:
        """Resume accepting and forwarding, starting with the bytes that waited meanwhile."""
        self._replies.set()
        self._open.set()

    def upstream_addresses(self) -> list[str]:
        """``ip:port`` of each live link's upstream socket: the client address Redis sees."""
        with self._lock:
            return [link.upstream_address for link in self._links if not link.closed]

    def drop_all(self) -> None:
        """Close every open link (both ends), as a restart of the network path would."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def close(self) -> None:
        """Stop every loop, close every socket, and wait (briefly) for the threads."""
        self._stop.set()
        self._open.set()  # wake the pumps so they see the stop flag
        self._replies.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.drop_all()
        for thread in self._threads:
            thread.join(timeout=2.0)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _spawn(self, target: object, what: str, *args: object) -> None:
        thread = threading.Thread(
            target=target,  # type: ignore[arg-type]
            args=args,
            name=f"{self.name}-{what}",
            daemon=True,
        )
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if not self._open.wait(TICK):
                continue  # partitioned: leave new connections in the listen backlog
            try:
                readable, _, _ = select.select([self._listener], [], [], TICK)
            except (OSError, ValueError):
                return  # listener closed
            if not readable or not self._open.is_set():
                continue
            try:
                downstream, _ = self._listener.accept()
            except BlockingIOError:
                continue
            except OSError:
                return
            self.accepted += 1
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=1.0)
            except OSError:  # the server is down: the client sees its connection closed
                self.refused += 1
                with contextlib.suppress(OSError):
                    downstream.close()
                continue
            for sock in (downstream, upstream):
                sock.setblocking(True)
                sock.settimeout(SEND_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(downstream, upstream)
            with self._lock:
                self._links = [each for each in self._links if not each.closed]
                self._links.append(link)
            self._spawn(self._pump, "up", link, downstream, upstream, self._open)
            self._spawn(self._pump, "down", link, upstream, downstream, self._replies)

    def _pump(
        self, link: _Link, source: socket.socket, sink: socket.socket, gate: threading.Event
    ) -> None:
        try:
            while not self._stop.is_set() and not link.closed:
                if not self._open.wait(TICK) or not gate.wait(TICK):
                    continue  # partitioned (or replies held): read nothing, so nothing moves
                readable, _, _ = select.select([source], [], [], TICK)
                if not readable or not self._open.is_set() or not gate.is_set():
                    continue
                data = source.recv(65536)
                if not data:
                    return
                sink.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            link.close()
