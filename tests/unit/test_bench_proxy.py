"""The chaos benchmark's TCP proxy: it forwards, partitions, heals, and names its links.

No Redis here: a plain echo server on loopback stands in for it (the proxy moves bytes and
does not know the protocol).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bench.proxy import TcpProxy


class EchoServer:
    """Echoes every byte back; remembers the peer address of each connection it accepted."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.peers: list[str] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(f"{peer[0]}:{peer[1]}")
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(4096):
                conn.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
        self.sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # a blocked recv keeps a bare close() from
            with contextlib.suppress(OSError):  # sending FIN
                conn.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy(echo.port) as proxy:
        yield proxy


def connect(proxy: TcpProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5.0)


def test_bytes_sent_through_the_proxy_come_back_from_the_server(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


def test_nothing_moves_while_partitioned_and_what_waited_arrives_after_healing(
    proxy: TcpProxy,
) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"before")
        assert sock.recv(6) == b"before"
        proxy.partition()
        time.sleep(0.1)  # let the pumps see the flag (they look every 50 ms)
        sock.sendall(b"during")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(6)
        proxy.heal()
        sock.settimeout(5.0)
        assert sock.recv(6) == b"during"


def test_a_connection_opened_during_a_partition_is_served_only_after_healing(
    proxy: TcpProxy, echo: EchoServer
) -> None:
    proxy.partition()
    time.sleep(0.1)
    with connect(proxy) as sock:  # the kernel completes the handshake: the backlog holds it
        sock.sendall(b"hello")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(5)
        assert echo.peers == []
        proxy.heal()
        sock.settimeout(5.0)
        assert sock.recv(5) == b"hello"


def test_upstream_addresses_are_the_client_addresses_the_server_sees(
    proxy: TcpProxy, echo: EchoServer
) -> None:
    with connect(proxy) as first, connect(proxy) as second:
        for sock in (first, second):
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        assert sorted(proxy.upstream_addresses()) == sorted(echo.peers)


def test_a_connection_is_refused_by_closing_it_when_the_server_is_down() -> None:
    echo = EchoServer()
    port = echo.port
    echo.close()
    with TcpProxy(port) as proxy, connect(proxy) as sock:
        sock.settimeout(5.0)
        assert sock.recv(1) == b""  # closed by the proxy, not left hanging
        assert proxy.refused == 1


def test_the_server_closing_a_link_closes_the_clients_end(
    proxy: TcpProxy, echo: EchoServer
) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        echo.close()  # as CLIENT KILL or a Redis crash would
        sock.settimeout(5.0)
        assert sock.recv(1) == b""


def test_close_returns_promptly_and_closes_every_link(echo: EchoServer) -> None:
    proxy = TcpProxy(echo.port).start()
    sock = connect(proxy)
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"
    proxy.partition()
    started = time.monotonic()
    proxy.close()
    assert time.monotonic() - started < 2.0
    sock.settimeout(5.0)
    assert sock.recv(1) == b""
    sock.close()
