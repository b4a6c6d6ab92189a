"""Sentinel broker URLs (issue 11): kombu's ``a+b://`` and ``;`` forms, read into sentinels and
data-node parameters, and the options that go with them; no server needed."""

from __future__ import annotations

import ssl

import pytest
from kombu import Connection

import celery_msg  # noqa: F401  (registers the URL schemes)
from celery_msg.connection import (
    SentinelMasterSSLConnection,
    redis_client,
    sentinel_address,
    sentinel_params,
)
from celery_msg.errors import ConfigurationError
from celery_msg.options import TransportOptions

URL = "celery-msg+sentinel://alice:s%40cret@h1:26379/2;celery-msg+sentinel://h2:26380/2"


def test_every_part_is_a_sentinel_and_the_credentials_are_the_data_nodes():
    address = sentinel_address(Connection(URL))
    assert address is not None
    assert address.sentinels == (("h1", 26379), ("h2", 26380))
    assert (address.data.userid, address.data.password) == ("alice", "s@cret")
    hosts, params = sentinel_params(address, TransportOptions(master_name="mymaster"))
    assert hosts == [("h1", 26379), ("h2", 26380)]
    assert (params["db"], params["username"], params["password"]) == (2, "alice", "s@cret")
    assert "host" not in params and "ssl" not in params
    # The sentinels' own connections get the socket options, not the data nodes' password.
    assert "password" not in params["sentinel_kwargs"]
    assert params["sentinel_kwargs"]["socket_timeout"] == params["socket_timeout"]


def test_the_form_kombu_switches_to_on_failover_reads_the_same():
    """After a connection error kombu moves to the next ';' part and parses it whole, as
    transport ``celery-msg+sentinel``: the sentinels and credentials must not change."""
    conn = Connection(URL)
    conn.switch(conn.alt[1])
    assert conn.transport_cls == "celery-msg+sentinel"
    address = sentinel_address(conn)
    assert address is not None
    assert address.sentinels == (("h1", 26379), ("h2", 26380))
    assert address.data.password == "s@cret"


def test_tls_to_the_data_nodes_and_sentinel_credentials_from_the_options():
    address = sentinel_address(Connection("celery-msgs+sentinel://h1"))
    assert address is not None and address.sentinels == (("h1", 26379),)
    options = TransportOptions(master_name="m", sentinel_kwargs={"password": "sentinel-pw"})
    _, params = sentinel_params(address, options)
    # TLS through the connection class (which finds the master even outside the pool).
    assert params["connection_class"] is SentinelMasterSSLConnection
    assert params["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert params["sentinel_kwargs"]["password"] == "sentinel-pw"


def test_a_sentinel_url_without_master_name_fails_naming_the_option():
    with pytest.raises(ConfigurationError, match="master_name"):
        redis_client(Connection("celery-msg+sentinel://h1:26379"), TransportOptions())


def test_master_name_without_a_sentinel_url_fails_naming_the_option():
    with pytest.raises(ConfigurationError, match="master_name: only used with"):
        redis_client(Connection("celery-msg://h1:6379"), TransportOptions(master_name="m"))


def test_a_part_that_is_not_a_sentinel_is_refused():
    with pytest.raises(ConfigurationError, match="every ';' part"):
        sentinel_address(Connection("celery-msg+sentinel://h1;celery-msg://h2"))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"master_name": ""}, "master_name: must be a non-empty string"),
        ({"sentinel_kwargs": "pw"}, "sentinel_kwargs"),
        ({"min_other_sentinels": -1}, "min_other_sentinels"),
    ],
)
def test_bad_sentinel_options_fail_at_start_up_naming_the_option(
    options: dict[str, object], match: str
):
    with pytest.raises(ConfigurationError, match=match):
        TransportOptions.from_mapping(options)
