"""Holdings (a channel's leases, used from several threads) and URL -> redis-py parameters."""

from __future__ import annotations

import ssl
import threading

import pytest
import redis

from celery_msg.connection import BrokerAddress, database, redis_params
from celery_msg.core import Broker, Lease
from celery_msg.errors import ConfigurationError
from celery_msg.holdings import Holdings
from celery_msg.options import TransportOptions


def holdings() -> Holdings:
    """A book on a broker that is never called: these tests keep books, they settle nothing."""
    return Holdings(Broker(redis.Redis(host="127.0.0.1", port=1)))


def test_a_buffered_ack_stays_renewable_until_it_is_taken():
    book = holdings()
    book.add("1@q", Lease("q", "a", 1))
    book.add("2@q", Lease("q", "b", 2))

    assert book.buffer_ack("1@q") is True
    assert sorted(lease.key for lease in book.renewable()) == ["a", "b"]
    assert book.take_acks() == [Lease("q", "a", 1)]
    assert book.take_acks() == []
    assert [lease.key for lease in book.renewable()] == ["b"]


def test_a_lost_lease_can_be_neither_settled_nor_buffered():
    book = holdings()
    book.add("1@q", Lease("q", "a", 1))
    book.forget([Lease("q", "a", 1)])

    assert book.holds("1@q") is False
    assert book.buffer_ack("1@q") is False
    assert book.settle("1@q") is None
    assert book.renewable() == []


def test_settling_from_many_threads_settles_each_lease_exactly_once():
    book = holdings()
    for n in range(2000):
        book.add(f"{n}@q", Lease("q", f"m{n}", n))
    settled: list[Lease] = []
    lock = threading.Lock()

    def settle_all() -> None:
        for n in range(2000):
            lease = book.settle(f"{n}@q")
            if lease is not None:
                with lock:
                    settled.append(lease)

    threads = [threading.Thread(target=settle_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(lease.token for lease in settled) == list(range(2000))
    assert book.take_all() == []


def test_the_url_path_is_a_database_number():
    assert database(None) == 0
    assert database("/") == 0
    assert database("/7") == 7
    assert database(3) == 3
    for bad in ("/-1", "/abc", "x"):
        with pytest.raises(ConfigurationError, match="database number"):
            database(bad)


def test_plain_urls_give_plain_connections_with_the_url_parts():
    params = redis_params(
        BrokerAddress("celery-msg", "h", 7000, "/2", "u", "p"), TransportOptions()
    )
    assert {k: params[k] for k in ("host", "port", "db", "username", "password")} == {
        "host": "h",
        "port": 7000,
        "db": 2,
        "username": "u",
        "password": "p",
    }
    assert "ssl" not in params


def test_the_tls_scheme_verifies_certificates_by_default():
    params = redis_params(BrokerAddress("celery-msgs", "h"), TransportOptions())
    assert params["ssl"] is True
    assert params["ssl_cert_reqs"] == ssl.CERT_REQUIRED


def test_tls_options_are_passed_on_and_unknown_ones_refused_by_name():
    given = {"ssl_cert_reqs": "CERT_OPTIONAL", "ssl_ca_certs": "/ca.pem"}
    params = redis_params(BrokerAddress("celery-msgs", "h", ssl=given), TransportOptions())
    assert params["ssl_cert_reqs"] == ssl.CERT_OPTIONAL
    assert params["ssl_ca_certs"] == "/ca.pem"
    with pytest.raises(ConfigurationError, match="ssl_ca_cert"):
        redis_params(
            BrokerAddress("celery-msgs", "h", ssl={"ssl_ca_cert": "x"}), TransportOptions()
        )
    with pytest.raises(ConfigurationError, match="ssl_cert_reqs"):
        redis_params(
            BrokerAddress("celery-msgs", "h", ssl={"ssl_cert_reqs": "maybe"}), TransportOptions()
        )
