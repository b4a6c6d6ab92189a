"""Bad input through kombu: undecodable messages are dead-lettered (never lost, never blocking
the queue); invalid options and URLs fail at once, naming what is wrong; an unreachable server
fails with an error kombu recognises."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import pytest
from kombu import Connection
from kombu.exceptions import OperationalError
from kombu_helpers import Receiver, broker, connect, direct_queue, ids_of, publish

from celery_msg import BrokerConnectionError, ConfigurationError
from celery_msg.core import State
from celery_msg.testing import free_port

if TYPE_CHECKING:
    from conftest import Server

#: Payloads a kombu consumer cannot turn into a message, each with what is wrong with it.
BAD_PAYLOADS = {
    "not-json": b"\x80\x04\x95 this is not JSON",
    "no-properties": json.dumps({"body": "aGk=", "headers": {}}).encode(),
    "properties-not-an-object": json.dumps({"body": "aGk=", "properties": "nope"}).encode(),
    "no-body": json.dumps({"properties": {}, "headers": {}}).encode(),
    "a-json-list": b"[1, 2, 3]",
    "not-utf8": b'{"body": "\xff\xfe", "properties": {}}',
}


@pytest.mark.parametrize("kind", sorted(BAD_PAYLOADS))
def test_an_undecodable_message_is_dead_lettered_and_the_consumer_gets_the_next_good_one(
    server: Server, prefix: str, kind: str
):
    look = broker(server, prefix)
    with connect(server, prefix) as conn:
        publish(conn, ["good-1"], routing_key="work")
        look.publish("work", "bad", BAD_PAYLOADS[kind], 255)
        publish(conn, ["good-2"], routing_key="work")
        receiver = Receiver(conn, [direct_queue("work")], prefetch_count=1)
        assert ids_of(receiver.receive(2)) == ["good-1", "good-2"]

    (dead,) = look.lookup("bad", ["work"])
    assert dead.state is State.DEAD
    assert dead.payload == BAD_PAYLOADS[kind]
    assert dead.dead_reason is not None and dead.dead_reason["reason"] == "undecodable"
    assert dead.dead_reason["detail"]
    assert look.counts("work") == {"ready": 0, "reserved": 0, "scheduled": 0, "dead": 1}


def test_basic_get_skips_an_undecodable_message_after_dead_lettering_it(
    server: Server, prefix: str
):
    look = broker(server, prefix)
    look.publish("work", "bad", b"garbage", 255)
    with connect(server, prefix) as conn:
        publish(conn, ["good"], routing_key="work")
        bound = direct_queue("work")(conn.default_channel)
        message = bound.get(no_ack=True)
        assert message is not None and message.headers["id"] == "good"
        assert bound.get(no_ack=True) is None
    assert look.get("bad", ["work"]).state is State.DEAD


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"lease_timeout": 0}, "lease_timeout"),
        ({"lease_timeout": -1}, "lease_timeout"),
        ({"lease_timeout": "10"}, "lease_timeout"),
        ({"lease_timout": 5}, "lease_timout"),
        ({"sweep_interval": 0}, "sweep_interval"),
        ({"queue_order": "random"}, "queue_order"),
        ({"priority_order": "up"}, "priority_order"),
        ({"default_priority": 256}, "default_priority"),
        ({"fetch_batch": 0}, "fetch_batch"),
        ({"max_deliveries": -1}, "max_deliveries"),
        ({"key_prefix": ""}, "key_prefix"),
        ({"key_prefix": "{app}:"}, "key_prefix"),
    ],
)
def test_an_invalid_transport_option_fails_when_the_transport_is_created_naming_it(
    options: dict[str, object], named: str
):
    conn = Connection(f"celery-msg://127.0.0.1:{free_port()}/0", transport_options=options)
    with pytest.raises(ConfigurationError, match=named):
        conn.transport  # noqa: B018
    with pytest.raises(ConfigurationError, match=named):
        conn.ensure_connection(max_retries=0)


@pytest.mark.parametrize("path", ["abc", "0/extra", "1.5", "-1"])
def test_a_broker_url_whose_path_is_not_a_database_number_is_refused(path: str):
    conn = Connection(f"celery-msg://127.0.0.1:{free_port()}/{path}")
    with pytest.raises(ConfigurationError, match="database"):
        conn.transport  # noqa: B018


def test_a_database_the_server_does_not_have_is_a_configuration_error_naming_it(
    server: Server, prefix: str
):
    conn = Connection(
        f"celery-msg://127.0.0.1:{server.process.port}/99",
        transport_options={"key_prefix": prefix},
    )
    with pytest.raises(ConfigurationError, match="99"):
        conn.ensure_connection(max_retries=0)


def test_an_unreachable_server_fails_fast_with_a_connection_error_naming_it():
    port = free_port()  # nothing listens there
    conn = Connection(f"celery-msg://127.0.0.1:{port}/0")
    started = time.monotonic()
    with pytest.raises(OperationalError) as raised:
        conn.ensure_connection(max_retries=2, interval_start=0, interval_step=0, interval_max=0)
    took = time.monotonic() - started

    # kombu wraps what the transport raised (one of its connection_errors) in OperationalError.
    cause = raised.value.__cause__
    assert isinstance(cause, BrokerConnectionError)
    assert isinstance(cause, conn.connection_errors)
    assert f"cannot reach Redis at 127.0.0.1:{port}" in str(raised.value)
    # Three attempts (max_retries=2) at a closed port take milliseconds, not seconds of hidden
    # retries and back-off inside the Redis client.
    assert took < 2.0
