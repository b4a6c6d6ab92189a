"""The chaos benchmark's faults do to a Redis client what they claim, through a real server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.proxy import TcpProxy
from tests.conftest import Server


@pytest.fixture
def proxy(server: Server) -> Iterator[TcpProxy]:
    with TcpProxy(server.process.port) as proxy:
        yield proxy


def through(proxy: TcpProxy, **options: float) -> redis.Redis:
    """A client that reaches the server only through the proxy, with no retry of its own."""
    return redis.Redis(host="127.0.0.1", port=proxy.port, retry=Retry(NoBackoff(), 0), **options)


def _client_id_once_reconnected(client: redis.Redis) -> int:
    """The client's id on the server; the first command after the kill may still meet the old,
    closing link (the proxy passes the close on a moment later): a real client retries."""
    for _ in range(20):
        try:
            return int(client.client_id())
        except redis.ConnectionError:
            time.sleep(0.05)
    return int(client.client_id())


def test_client_kill_of_the_proxys_upstream_addresses_drops_exactly_the_proxied_client(
    server: Server, proxy: TcpProxy
) -> None:
    proxied = through(proxy, socket_timeout=5.0)
    direct = server.process.client()
    try:
        before = (proxied.client_id(), direct.client_id())
        (address,) = proxy.upstream_addresses()
        direct.client_kill(address)
        # redis-py replaces a pooled connection it finds closed, so the effect to look for is
        # a new server-side connection for the proxied client and the same one for the other.
        after = (_client_id_once_reconnected(proxied), direct.client_id())
        assert after[0] != before[0]
        assert after[1] == before[1]
        assert proxy.upstream_addresses() != [address]
    finally:
        proxied.close()
        direct.close()


def test_a_partitioned_client_times_out_and_works_again_once_healed(proxy: TcpProxy) -> None:
    client = through(proxy, socket_timeout=0.5)
    try:
        client.set("bench-proxy-key", b"before")
        proxy.partition()
        with pytest.raises(redis.TimeoutError):
            client.get("bench-proxy-key")
        proxy.heal()
        assert client.get("bench-proxy-key") == b"before"
    finally:
        client.delete("bench-proxy-key")
        client.close()


def test_a_redis_crash_closes_the_proxied_connection_and_a_restart_serves_it_again(
    fresh_server: Server,
) -> None:
    with TcpProxy(fresh_server.process.port) as proxy:
        client = through(proxy, socket_timeout=5.0)
        try:
            assert client.ping()
            fresh_server.process.kill()
            with pytest.raises(redis.ConnectionError):
                client.ping()
            assert proxy.upstream_addresses() == []
            fresh_server.process.restart()
            assert client.ping()
        finally:
            client.close()
